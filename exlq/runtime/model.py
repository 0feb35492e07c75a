"""The decoder-only causal LM shared by the Llama family; architectures subclass and override.

`forward` covers every way the runtime and the tools drive a model: full prefill, prefill
without logits, chunked prefill, incremental decode, batches with left padding, and only the
last `max_output_len` rows through `lm_head` (the vocabulary projection dominates small models).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from exlq.errors import ExlqError
from exlq.runtime.attention import AttentionBatch
from exlq.runtime.cache import KVCache
from exlq.runtime.graphs import DecodeGraphs, graphs_wanted
from exlq.runtime.kernels.fused_ops import as_tensor
from exlq.runtime.layers import Attention, DecoderLayer, Embedding, GatedMLP, RMSNorm
from exlq.runtime.linear import DenseLinear, load_linear
from exlq.runtime.rope import RotaryEmbedding
from exlq.runtime.weights import WeightStore


class DecoderOnlyLM(nn.Module):
    """Embeddings → N pre-norm decoder layers → final norm → lm_head, with HF tensor names."""

    config_class: type  # set by each architecture

    def __init__(self, config: Any, store: WeightStore, *, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.config = config
        self._dtype = dtype
        self._device = torch.device(device)
        self.model = nn.Module()
        self.model.embed_tokens = Embedding(
            store.get("model.embed_tokens.weight", dtype, device, shape=(config.vocab_size, config.hidden_size))
        )
        self.model.layers = nn.ModuleList(self.load_layer(store, i) for i in range(config.num_hidden_layers))
        self.model.norm = self.load_norm(store, "model.norm")
        self.lm_head = self.load_head(store)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling, self._device)
        self.layer_order: list[int] = list(range(config.num_hidden_layers))
        self.decode_graphs = DecodeGraphs()
        #: Bumped by every change of what the model computes (layer order, a swapped module such as a LoRA
        #: adapter): keys and values cached before it are stale (Generator starts over when it changes).
        self.revision = 0

    # ----- construction; architectures override the pieces that differ -----

    def linear(self, store: WeightStore, prefix: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return load_linear(
            store, prefix, in_features, out_features, bias=bias, dtype=self._dtype, device=self._device
        )

    def load_norm(self, store: WeightStore, prefix: str) -> RMSNorm:
        weight = store.get(f"{prefix}.weight", self._dtype, self._device, shape=(self.config.hidden_size,))
        return RMSNorm(weight, self.config.rms_norm_eps)

    def load_attention(self, store: WeightStore, prefix: str, layer: int) -> Attention:
        c = self.config
        q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        return Attention(
            self.linear(store, f"{prefix}.q_proj", c.hidden_size, q_out, c.qkv_bias),
            self.linear(store, f"{prefix}.k_proj", c.hidden_size, kv_out, c.qkv_bias),
            self.linear(store, f"{prefix}.v_proj", c.hidden_size, kv_out, c.qkv_bias),
            self.linear(store, f"{prefix}.o_proj", q_out, c.hidden_size, c.o_bias),
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            window=c.attention_window(layer),
        )

    def load_mlp(self, store: WeightStore, prefix: str) -> GatedMLP:
        c = self.config
        return GatedMLP(
            self.linear(store, f"{prefix}.gate_proj", c.hidden_size, c.intermediate_size, c.mlp_bias),
            self.linear(store, f"{prefix}.up_proj", c.hidden_size, c.intermediate_size, c.mlp_bias),
            self.linear(store, f"{prefix}.down_proj", c.intermediate_size, c.hidden_size, c.mlp_bias),
        )

    def load_layer(self, store: WeightStore, i: int) -> DecoderLayer:
        prefix = f"model.layers.{i}"
        return DecoderLayer(
            self.load_norm(store, f"{prefix}.input_layernorm"),
            self.load_attention(store, f"{prefix}.self_attn", i),
            self.load_norm(store, f"{prefix}.post_attention_layernorm"),
            self.load_mlp(store, f"{prefix}.mlp"),
        )

    def load_head(self, store: WeightStore) -> nn.Module:
        # A tied model shares the embedding (no copy), unless the checkpoint stores a head of its own
        # in another format: EXL2 files always carry a quantized `lm_head` (spec §10.1).
        stored_other_format = "lm_head.weight" not in store and any(n.startswith("lm_head.") for n in store.names())
        if self.config.tie_word_embeddings and not stored_other_format:
            return DenseLinear(self.model.embed_tokens.weight)
        return self.linear(store, "lm_head", self.config.hidden_size, self.config.vocab_size, False)

    # ----- properties -----

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_cache_layers(self) -> int:
        """KV-cache slots needed: one per decoder layer in execution order."""
        return len(self.layer_order)

    def set_layer_order(self, order: list[int] | None) -> None:
        """Run the decoder layers in `order` (repeats allowed; None: the stored order).

        Repeated layers share their weights, so memory for weights does not grow; each position in
        the order gets its own KV-cache slot, so caches made before the change no longer fit.
        """
        count = len(self.model.layers)
        if order is None:
            order = list(range(count))
        if not order or any(not 0 <= i < count for i in order):
            raise ExlqError(f"layer order must list layers 0..{count - 1} (got {order})")
        self.layer_order = list(order)
        self._changed()

    def new_cache(self, max_seq_len: int, batch_size: int = 1, cache_type=None) -> KVCache:
        """A KV cache for this model; `cache_type` as `KVCache.for_model` takes it (None: fp16)."""
        return KVCache.for_model(self, max_seq_len, batch_size, cache_type=cache_type)

    def replace_module(self, name: str, module: nn.Module) -> nn.Module:
        """Swap the submodule at dotted `name` (e.g. "lm_head") at run time; returns the old one."""
        parent_name, _, child = name.rpartition(".")
        parent = self.get_submodule(parent_name) if parent_name else self
        old = getattr(parent, child, None)
        if not isinstance(old, nn.Module):
            raise ExlqError(f"model has no module named {name!r}")
        setattr(parent, child, module)
        self._changed()
        return old

    def _changed(self) -> None:
        """What the model computes changed: captured steps call the old modules, cached keys/values are stale."""
        self.decode_graphs.clear()
        self.revision += 1

    # ----- forward -----

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        *,
        max_output_len: int | None = 1,
        pad_lengths: torch.Tensor | None = None,
        graph_step: bool = False,
    ) -> torch.Tensor | None:
        """Run `input_ids` [B, T] after whatever `cache` holds and return logits [B, n, vocab].

        n = `max_output_len` last positions (None: all; 0: no logits, prefill only). With a cache,
        the new keys/values are appended and `cache.seq_len` advances by T. `pad_lengths` [B]
        gives the number of left-pad tokens per row (a tensor or a list); with a cache it is set on the first call.
        `graph_step`: replay a CUDA graph for this multi-token call too, where graphs apply (worth it
        for calls repeated with one length, e.g. speculative verification; one-token steps always do).
        """
        input_ids = input_ids.to(self._device)
        if input_ids.dim() != 2:
            raise ExlqError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if max_output_len is not None and max_output_len < 0:
            raise ExlqError(f"max_output_len must be >= 0 or None (all positions), got {max_output_len}")
        bsz, new_len = input_ids.shape
        past_len = 0
        if pad_lengths is not None:  # one int64 a row on the model's device, as every consumer indexes it
            pad_lengths = torch.as_tensor(pad_lengths)
            if tuple(pad_lengths.shape) != (bsz,):
                raise ExlqError(f"pad_lengths needs one length a row ({bsz}), got shape {tuple(pad_lengths.shape)}")
            pad_lengths = pad_lengths.to(self._device, torch.int64).contiguous()
        if cache is not None:
            if cache.num_layers != self.num_cache_layers:
                raise ExlqError(
                    f"the cache has {cache.num_layers} layer slots but the model runs {self.num_cache_layers} layers; "
                    "make a new cache after changing the layer order"
                )
            cache.check_fits(bsz, new_len)
            past_len = cache.seq_len
            if pad_lengths is not None:
                if past_len:
                    raise ExlqError("pad_lengths can only be set on the first forward into an empty cache")
                cache.pad_lengths = pad_lengths
            pad_lengths = cache.pad_lengths
        if graphs_wanted(self, cache, bsz, new_len, max_output_len, graph_step):
            logits = self.decode_graphs.run(self, input_ids, cache)
            cache.seq_len = past_len + new_len
            return last_positions(logits, max_output_len)
        limit = cache.max_seq_len if cache is not None else None  # every position the forward writes is below it
        batch = self.attention_batch(bsz, new_len, past_len, pad_lengths, limit)
        hidden, delta = self.run_layers(self.embed(input_ids), batch, cache)
        if cache is not None:
            cache.seq_len = past_len + new_len
        if max_output_len == 0:
            return None
        return self.logits(last_positions(hidden, max_output_len), last_positions(delta, max_output_len))

    def prepare_decode(self, cache: KVCache) -> None:
        """Capture the CUDA graph that the next one-token step into `cache` will replay, if steps replay graphs
        and it is not captured yet. Its warm-up and capture take host time (30-60 ms on the H200); a caller that has
        just queued GPU work (a prefill) spends it while the GPU runs, not between two decode steps."""
        if cache.seq_len < cache.max_seq_len and graphs_wanted(self, cache, cache.batch_size, 1, 1):
            with torch.inference_mode():  # as forward runs the steps
                self.decode_graphs.prepare(self, cache)

    # ----- pieces of forward, public so the quantizer can run layers one at a time -----

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings as the float32 residual stream [B, T, hidden]."""
        return self.model.embed_tokens(input_ids.to(self._device)).float()

    def attention_batch(
        self, bsz: int, new_len: int, past_len: int = 0, pad_lengths: torch.Tensor | None = None,
        limit: int | None = None,
    ) -> AttentionBatch:
        """Positions, RoPE tables and masks shared by all layers for one forward call; `limit`: every position is
        below it (a cache's max_seq_len), so RoPE takes rows of its tables (RotaryEmbedding.cos_sin)."""
        positions = torch.arange(past_len, past_len + new_len, device=self._device)[None].expand(bsz, -1)
        if pad_lengths is not None:
            positions = (positions - pad_lengths[:, None]).clamp(min=0)
        cos, sin = self.rotary.cos_sin(positions, self._dtype, limit)
        return AttentionBatch(past_len, new_len, cos, sin, pad_lengths)

    def run_layers(
        self, hidden: torch.Tensor, batch: AttentionBatch, cache: KVCache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layers in `layer_order` on the residual stream: (residual, the last layer's MLP output),
        whose sum is the stream after the last layer (`logits` adds them inside the final norm)."""
        delta = None
        for slot, i in enumerate(self.layer_order):
            hidden, delta = self.model.layers[i].forward_deferred(hidden, delta, batch, cache, slot)
        return hidden, as_tensor(delta)

    def logits(self, hidden: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and lm_head over residual-stream rows (hidden + delta, when a delta is given)."""
        normed = self.model.norm(hidden) if delta is None else self.model.norm.add_and_norm(hidden, delta)[1]
        return self.lm_head(normed)


def last_positions(x: torch.Tensor, count: int | None) -> torch.Tensor | None:
    """The last `count` positions of x [B, T, ...] (None: all of them; 0: None)."""
    if count == 0:
        return None
    return x if count is None else x[:, -count:]
