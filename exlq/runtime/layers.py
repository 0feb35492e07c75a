"""Building blocks of Llama-family decoders: RMSNorm, attention, gated MLP, decoder layer.

Module and parameter names follow HF checkpoints (`self_attn.q_proj`, `mlp.down_proj`, ...), so
`state_dict()` keys are the checkpoint's tensor names. The residual stream is kept in float32
whatever the compute dtype: it is cheap, and it prevents the fp16 overflow that Qwen2 models
hit in their residual activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from exlq.runtime import kernels
from exlq.runtime.attention import AttentionBatch
from exlq.runtime.cache import KVCache
from exlq.runtime.kernels.fused_ops import (
    NORM_MAX_HIDDEN, Deferred, OutputOrder, PendingNorm, add_rms_norm, as_tensor,
)
from exlq.runtime.linear import align_gated, align_norm, project_each, project_gated, project_to_residual


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and returned in the weight's dtype; after `put_output_in_order`, its
    channels in the order the layers reading it store their input rows."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        # set by put_output_in_order (not saved: the file's norm is `weight`): int32 [hidden] each
        self.register_buffer("output_order", None, persistent=False)  # output i is channel output_order[i]
        self.register_buffer("output_slot", None, persistent=False)  # channel c is output output_slot[c]
        self.register_buffer("output_weight", None, persistent=False)  # weight[output_order]

    def put_output_in_order(self, order: torch.Tensor) -> None:
        """Give output i as channel order[i] from now on (linear.align_norm: the stored row order of the GEMVs that
        read it, so they gather it from consecutive addresses). The same values, moved."""
        order = order.to(self.weight.device, torch.int64)
        self.output_order = order.to(torch.int32)
        self.output_slot = torch.argsort(order).to(torch.int32)
        self.output_weight = self.weight[order].contiguous()

    def _ordered(self) -> OutputOrder | None:
        if self.output_order is None:
            return None
        return OutputOrder(self.output_order, self.output_slot, self.output_weight)

    def _fused(self) -> bool:
        """Whether the fused kernel runs this norm (on a kernel-enabled GPU, rows it can hold in registers)."""
        return self.weight.numel() <= NORM_MAX_HIDDEN and kernels.applies(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self._fused():
            return add_rms_norm(x, None, self.weight, self.eps, order=self.output_order)[1]
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x.to(self.weight.dtype)
        return out if self.output_order is None else out[..., self.output_order.long()]

    def add_and_norm(
        self, residual: torch.Tensor, delta: torch.Tensor | Deferred, defer: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | PendingNorm]:
        """(residual + delta in float32, the norm of that): one kernel on the GPU instead of four. With `defer`, a
        one-row norm on the GPU is returned pending (PendingNorm), for the next GEMV to fold in: the residual comes
        back unwritten, and is written once the pending norm is consumed (project_each consumes it)."""
        if residual.dtype == torch.float32 and delta.dtype == self.weight.dtype and self._fused():
            if defer and PendingNorm.possible(residual, self.weight):
                new_residual = torch.empty_like(residual)
                return new_residual, PendingNorm(residual, delta, self.weight, self.eps, new_residual, self._ordered())
            return add_rms_norm(residual, as_tensor(delta), self.weight, self.eps, order=self.output_order)
        residual = residual + as_tensor(delta).float()
        return residual, self(residual)


class Embedding(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, RoPE and an optional KV cache."""

    def __init__(
        self,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        o_proj: nn.Module,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        window: int | None = None,
    ):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.window = window

    def forward(
        self, x: torch.Tensor | PendingNorm, batch: AttentionBatch, cache: KVCache | None, cache_layer: int,
        unfinished: bool = False,
    ) -> torch.Tensor | Deferred:
        """The attention's output; `unfinished`: possibly Deferred, for the residual add after it (project_to_residual)."""
        bsz, length, _ = x.shape
        # deferred: a one-token step's q/k/v may stay their GEMV's sums, which the RoPE (or attention) kernel ends
        q, k, v = project_each((self.q_proj, self.k_proj, self.v_proj), x, deferred=True)
        out = batch.attention(cache, cache_layer, q, k, v, self.head_dim, self.window)
        out = out.transpose(1, 2).reshape(bsz, length, self.num_heads * self.head_dim)
        return project_to_residual(self.o_proj, out) if unfinished else self.o_proj(out)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)). Where the formats allow it (EXL2 with act-order) and the kernels run, gate/up's
    outputs are put in the order down_proj stores its rows at construction (linear.align_gated), so those three
    layers' buffers differ from the file's: the same products, read from consecutive addresses."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        align_gated(gate_proj, up_proj, down_proj)  # the intermediate features in the order down_proj reads them

    def forward(self, x: torch.Tensor | PendingNorm, unfinished: bool = False) -> torch.Tensor | Deferred:
        """The MLP's output; `unfinished`: possibly Deferred, for the residual add after it (project_to_residual)."""
        # deferred: a one-token step's gate/up may stay their GEMV's sums, which down_proj's GEMV gathers from
        gate, up = project_each((self.gate_proj, self.up_proj), x, deferred=True)
        return project_gated(self.down_proj, gate, up, unfinished)


class DecoderLayer(nn.Module):
    """Pre-norm block: r += attn(norm(r)); r += mlp(norm(r)) with r in float32. Where q/k/v (or gate/up) are EXL2
    with one act-order permutation, the norm before them can give its output in their stored row order
    (linear.align_norm, EXLQ_ALIGN_NORMS): the same products, read from consecutive addresses."""

    def __init__(self, input_layernorm: RMSNorm, self_attn: Attention, post_attention_layernorm: RMSNorm, mlp: GatedMLP):
        super().__init__()
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp
        # each norm's output in the order its readers store their input rows, where they share one (linear.align_norm)
        align_norm(input_layernorm, (self_attn.q_proj, self_attn.k_proj, self_attn.v_proj))
        align_norm(post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))

    def forward(
        self, residual: torch.Tensor, batch: AttentionBatch, cache: KVCache | None, cache_layer: int
    ) -> torch.Tensor:
        residual, delta = self.forward_deferred(residual, None, batch, cache, cache_layer)
        return residual + as_tensor(delta).float()

    def forward_deferred(
        self,
        residual: torch.Tensor,
        delta: torch.Tensor | Deferred | None,
        batch: AttentionBatch,
        cache: KVCache | None,
        cache_layer: int,
    ) -> tuple[torch.Tensor, torch.Tensor | Deferred]:
        """The layer on residual + delta, returning (its residual before the MLP's output, that output).

        A model runs its layers this way so each layer's last residual add happens inside the next norm
        (one fused kernel on the GPU instead of a cast, an add and a norm; at one row, none: o_proj's and
        down_proj's products are left unfinished and the norm pending, and the launch before q/k/v or gate/up ends
        the product with the residual add and the norm's sums, their GEMV forming the normed input as it gathers it);
        `forward` adds it at once. The delta returned may be Deferred (read it with `as_tensor`).
        """
        if delta is None:
            normed = self.input_layernorm(residual)
        else:
            residual, normed = self.input_layernorm.add_and_norm(residual, delta, defer=True)
        attended = self.self_attn(normed, batch, cache, cache_layer, unfinished=True)
        residual, normed = self.post_attention_layernorm.add_and_norm(residual, attended, defer=True)
        return residual, self.mlp(normed, unfinished=True)
