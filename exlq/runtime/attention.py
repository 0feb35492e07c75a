"""Masks and the SDPA call shared by every attention layer of one forward pass.

New tokens attending to cached ones need a causal mask aligned to the lower right (query i sits
at absolute position past+i). SDPA's `is_causal` is upper-left aligned, so it is used only when
nothing is cached and a single decoded token needs no mask at all; chunked prefill after cached
tokens, left padding (batches of unequal prompts) and sliding windows get an explicit boolean
mask. (torch's `causal_lower_right` bias would do for the first case, but importing it loads
torch._dynamo, which costs every CLI call about two seconds.)
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from exlq.runtime import kernels
from exlq.runtime.kernels import attention_ops, fused_ops
from exlq.runtime.kernels.fused_ops import Deferred, as_tensor
from exlq.runtime.rope import apply_rotary


#: EXLQ_SDPA_DECODE=cudnn|efficient|math|flash pins one SDPA backend for one-token steps (an A/B switch for
#: `exlq bench`; unset: torch's choice, cuDNN's fused kernel on the H200 with the graph step's additive mask), where the
#: decode kernel (`attention_ops`) does not apply or EXLQ_DECODE_ATTENTION=0.
DECODE_BACKEND = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                  "math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}.get(os.environ.get("EXLQ_SDPA_DECODE", ""))


@dataclass
class AttentionBatch:
    """Per-forward facts every layer needs, computed once: positions, RoPE tables, masks."""

    past_len: int
    new_len: int
    cos: torch.Tensor
    sin: torch.Tensor
    pad_lengths: torch.Tensor | None = None
    _masks: dict = field(default_factory=dict)

    def mask(self, window: int | None) -> tuple[object | None, bool]:
        """(attn_mask, is_causal) for SDPA, cached per sliding-window size."""
        if window not in self._masks:
            self._masks[window] = build_mask(self.past_len, self.new_len, self.pad_lengths, window, self.cos.device)
        return self._masks[window]

    def store(self, cache, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this forward's keys/values to `cache` slot `layer`; returns all keys/values to attend to."""
        return cache.store(layer, keys, values, self.past_len)

    def cache_position(self) -> int | torch.Tensor:
        """Where this forward's first token goes in the cache (a device tensor for CUDA graphs)."""
        return self.past_len

    def attended(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The part of whole cache buffers that attention reads: everything up to this forward's last token."""
        end = self.past_len + self.new_len
        return keys[:, :, :end], values[:, :, :end]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
        """Attention of this forward's queries q [B, H, T, D] over k, v [B, Hkv, K, D]: a one-token step on the GPU
        takes the decode kernel, which reads keys from each row's first unpadded one up to the token's position only;
        everything else SDPA."""
        if kernels.applies(q) and attention_ops.applies(q, k, v):  # one token, etc.
            return attention_ops.decode_attention(q, k, v, self.cache_position(), window, self.pad_lengths)
        mask, is_causal = self.mask(window)
        return attend(q, k, v, mask, is_causal)

    def attention(
        self, cache, layer: int, q: torch.Tensor | Deferred, k: torch.Tensor | Deferred, v: torch.Tensor | Deferred,
        head_dim: int, window: int | None,
    ) -> torch.Tensor:
        """The attention of this forward's new tokens (q, k, v [B, T, H·D], as their projections give them) over the
        cache and themselves, [B, Hq, T, D]: rotate_and_store, then attend. One launch for all of it where a single
        token of one unpadded sequence has q/k/v still their GEMV's sums (fused_ops.ends_token_sums) over an
        unquantized cache, in shapes the decode kernel takes (attention_ops.rope_attention, behind EXLQ_ROPE_ATTENTION)."""
        buffers = self._dense_buffers(cache, layer, q)
        if (buffers is not None and attention_ops.ROPE_ATTENTION and self.pad_lengths is None
                and self.cos.shape[-1] == head_dim and fused_ops.ends_token_sums(q, k, v)):
            keys, values = self.attended(*buffers)
            heads = math.prod(q.shape[2:]) // head_dim
            if attention_ops.takes_caches(heads, q.dtype, keys, values):
                sums = [t.take_sums() for t in (q, k, v)]
                return attention_ops.rope_attention(sums, self.cos, self.sin, keys, values, self.cache_position(),
                                                    window, heads)
        q, k, v = self.rotate_and_store(cache, layer, q, k, v, head_dim, buffers)
        return self.attend(q, k, v, window)

    def _dense_buffers(self, cache, layer: int, q: torch.Tensor | Deferred) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's whole key/value buffers, where kernels run and the cache is unquantized (cache.dense_layer)."""
        if cache is None or not kernels.applies(q):
            return None
        return cache.dense_layer(layer, q.shape[0])

    def rotate_and_store(
        self, cache, layer: int, q: torch.Tensor | Deferred, k: torch.Tensor | Deferred, v: torch.Tensor | Deferred,
        head_dim: int, buffers: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RoPE on q, k [B, T, H·D], k and v appended to the cache: (q, all keys, all values) as [B, H, T|K, D].

        One fused kernel on the GPU into the layer's whole key/value `buffers` when the cache is unquantized
        (_dense_buffers; the kernel also ends q/k/v left Deferred by their GEMV); the torch ops otherwise. A quantized
        cache sees the queries first (cache.observe_queries).
        """
        if buffers is not None:
            from exlq.runtime.kernels.fused_ops import rope_store

            q = rope_store(q, k, v, self.cos, self.sin, *buffers, self.cache_position())
            return (q, *self.attended(*buffers))
        bsz, length = q.shape[:2]
        q, k, v = (as_tensor(t).view(bsz, length, -1, head_dim).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # a quantized cache weighs its key channels by the queries of its first positions
            cache.observe_queries(layer, q, self.past_len)
        q = apply_rotary(q, self.cos, self.sin)
        k = apply_rotary(k, self.cos, self.sin)
        if cache is not None:
            k, v = self.store(cache, layer, k, v)
        return q, k, v


def build_mask(
    past_len: int, new_len: int, pad_lengths: torch.Tensor | None, window: int | None, device: torch.device
) -> tuple[object | None, bool]:
    total = past_len + new_len
    window_binds = window is not None and total > window
    if pad_lengths is None and not window_binds:
        if new_len == 1:
            return None, False
        if past_len == 0:
            return None, True
    q_pos = torch.arange(past_len, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window_binds:
        allowed &= (q_pos - k_pos) < window
    allowed = allowed[None]  # [1, T, K]
    if pad_lengths is not None:
        allowed = allowed & (k_pos[None] >= pad_lengths[:, None, None])
        # Query rows that are themselves padding would see no key and give NaN: let them see themselves.
        allowed = allowed | ((k_pos == q_pos)[None] & (q_pos[None] < pad_lengths[:, None, None]))
    return allowed[:, None], False  # [B or 1, 1, T, K]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: object | None, is_causal: bool) -> torch.Tensor:
    """softmax(q kᵀ/√d + mask) v for q [B, H, T, D] and k, v [B, Hkv, K, D] (grouped-query aware).

    One-token decode with grouped KV heads folds the G query heads of each KV head into G query rows
    of that head ([B, Hkv, G, D]): the same result, with no KV expansion and no GQA code path in SDPA.
    The masks of a one-token step do not depend on the query row, so they broadcast unchanged.
    """
    bsz, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    if length == 1 and heads != kv_heads and not is_causal:
        folded = q.reshape(bsz, kv_heads, heads // kv_heads, dim)
        with sdpa_kernel([DECODE_BACKEND]) if DECODE_BACKEND is not None else nullcontext():
            out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask)
        return out.reshape(bsz, heads, 1, dim)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=heads != kv_heads
    )
