"""CUDA-graph decode: one captured graph replays a whole decode step.

A small model decodes in a few hundred microseconds of GPU time, but launching its ~20 kernels per
layer from Python costs more than that. Capturing the step once and replaying it removes the host
from the loop. A graph needs fixed shapes and addresses, so the captured step differs from the eager
one only in how it finds the position: the cache position lives in a device tensor, the new keys and
values are written from that position on (fused RoPE + store kernel, or `index_copy_`), and attention
runs over a fixed-length prefix of the cache buffer: SDPA with a mask (keys beyond each token's position
masked out), or the one-token kernel, which reads the position from the device and skips those keys. For SDPA
that length is a bucket (`step_span`): the end position rounded up to a multiple of `BUCKET`, one graph per bucket,
so attention costs what the context needs, not what `max_seq_len` allows; the one-token kernel takes
`attention_ops.LONG_SPAN` positions, then the whole cache, one graph for each. The rest is the eager code.

Used automatically by `DecoderOnlyLM.forward` for one-token steps into a `KVCache` on a CUDA device
whose batch fills the cache (`EXLQ_CUDA_GRAPHS=0` turns it off): an unquantized one, or a quantized one
past its dense prefix (its quantize and dequantize kernels are part of the step). Calls of a few
tokens that repeat with one length ask for it with `graph_step=True` (speculative verification:
eager, its k+1-token forward cost ~6x a replayed one-token step on the H200, all of it host time).
Graphs are captured per (cache, batch shape, tokens) on first use, or ahead of it by `DecoderOnlyLM.prepare_decode`
(the generator does so while the GPU runs the prompt), and dropped when the model's modules or layer order change.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch

from exlq.runtime import kernels
from exlq.runtime.attention import AttentionBatch
from exlq.runtime.cache import KVCache
from exlq.runtime.kernels import attention_ops

MAX_GRAPHS = 16  # captured steps kept per model (each holds a private memory pool), least recently used dropped
BUCKET = 256  # attention spans of the captured steps: multiples of this many positions (step_span)
MAX_STEP_TOKENS = 16  # longest multi-token call (graph_step=True) replayed from a graph
#: Eager steps run before a capture: one loads every kernel and sizes every workspace, so the capture sees no first
#: use. Each costs an eager step of host time (H200: 15-37 ms, smollm2 to the 8B; docs/benchmarks.md, session 27).
WARMUP_STEPS = 1


@dataclass
class StaticDecodeBatch(AttentionBatch):
    """An AttentionBatch whose position is a device tensor, so the same graph serves every step."""

    write_positions: torch.Tensor | None = None  # [T] int64: the cache positions of the new tokens
    key_positions: torch.Tensor | None = None  # [span] int64: 0..span-1, the cache positions attention reads

    def mask(self, window: int | None) -> tuple[object | None, bool]:
        if window not in self._masks:
            query_positions = self.write_positions[:, None]  # [T, 1]
            allowed = self.key_positions[None, :] <= query_positions
            if window is not None:
                allowed = allowed & (query_positions - self.key_positions[None, :] < window)
            allowed = allowed[None, None]  # [1, 1, T, K]
            if self.pad_lengths is not None:
                allowed = allowed & (self.key_positions[None, :] >= self.pad_lengths[:, None])[:, None, None, :]
            # Additive, in the compute dtype: SDPA turns a boolean mask into this itself, in every layer's call.
            bias = torch.zeros(allowed.shape, dtype=self.cos.dtype, device=allowed.device)
            self._masks[window] = (bias.masked_fill_(~allowed, float("-inf")), False)
        return self._masks[window]

    def store(self, cache, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache.write_at(layer, keys, values, self.write_positions)
        return cache.read_span(layer, keys.shape[0], self.key_positions.numel())

    def cache_position(self) -> torch.Tensor:
        return self.write_positions[:1]

    def attended(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.key_positions.numel()  # the graph's bucket: positions beyond the token are masked
        return keys[:, :, :length], values[:, :, :length]


def graphs_possible(model, cache) -> bool:
    """Whether steps of `model` into `cache` can be replayed from graphs now (device, cache state, switch)."""
    return (
        cache is not None
        and type(cache) is KVCache
        and cache.static_steps_ok
        and model.device.type == "cuda"
        and os.environ.get("EXLQ_CUDA_GRAPHS", "1") != "0"
    )


def graphs_wanted(model, cache, bsz: int, new_len: int, max_output_len: int | None, graph_step: bool = False) -> bool:
    """Whether this forward replays a captured step: every one-token step that can (with or without logits: a
    speculative draft catching up runs one token for its cache only), and `graph_step` calls."""
    one_token = new_len == 1 and max_output_len in (0, 1, None)
    return (
        (one_token or (graph_step and 1 <= new_len <= MAX_STEP_TOKENS))
        and graphs_possible(model, cache)
        and cache.allocated
        and bsz == cache.batch_size
        and not torch.cuda.is_current_stream_capturing()
    )


def step_span(cache: KVCache, tokens: int, heads: int) -> int:
    """The attention span of a captured step of `tokens` tokens from `cache.seq_len` (part of its graph's key), for a
    model of `heads` query heads.

    A one-token step into an unquantized cache (left-padded or not) takes the one-token attention kernel, which reads
    keys up to the token only and whose launch depends on the span only through its cluster size: its span is
    `attention_ops.graph_span`, so a generation captures one graph, or two (each capture costs 40-60 ms of host time
    on the H200; one every 256 tokens cost a 1024-token generation 8-17 % of its decode rate, docs/benchmarks.md,
    sessions 27-28). Elsewhere the step reads its whole span (SDPA's masked keys, a quantized cache's dequantized
    prefix): the step's end rounded up to a multiple of BUCKET."""
    end = cache.seq_len + tokens
    reads_to_token = (tokens == 1 and not cache.cache_type.quantized
                      and cache.dtype in kernels.ACTIVATION_TAGS and kernels.enabled(cache.device)
                      and attention_ops.enabled() and attention_ops.takes_heads(cache.head_dim, heads, cache.num_kv_heads))  # fmt: skip
    if reads_to_token:
        return attention_ops.graph_span(end, cache.max_seq_len)
    return min(cache.max_seq_len, -(-end // BUCKET) * BUCKET)


def static_decode_step(
    model, cache: KVCache, ids: torch.Tensor, position: torch.Tensor, pad: torch.Tensor | None, key_positions: torch.Tensor
) -> torch.Tensor:
    """A step of T tokens whose shapes and addresses do not depend on the position (what a graph captures).

    ids [B, T]; position [1] int64 (the cache position of the first token); pad [B] left-pad lengths or
    None; key_positions arange(span): attention reads cache positions below span, each token masked
    beyond its own position. Returns logits [B, T, vocab]. Runs anywhere (the CPU tests check it
    against eager forwards); only its capture needs CUDA.
    """
    bsz, tokens = ids.shape
    # one token: its position as it is (no arange and add in every replay)
    write_positions = position if tokens == 1 else position + torch.arange(tokens, device=position.device)
    positions = write_positions[None].expand(bsz, tokens)
    if pad is not None:
        positions = (positions - pad[:, None]).clamp(min=0)
    cos, sin = model.rotary.cos_sin(positions, model.dtype, cache.max_seq_len)
    # past_len: the position at capture, for host-side choices only (a quantized cache's prefix is complete).
    batch = StaticDecodeBatch(
        cache.seq_len, tokens, cos, sin, pad, write_positions=write_positions, key_positions=key_positions
    )
    return model.logits(*model.run_layers(model.embed(ids), batch, cache))


class DecodeGraph:
    """One captured step of `tokens` tokens for one cache and batch size."""

    def __init__(self, model, cache: KVCache, padded: bool, span: int, tokens: int = 1):
        device, bsz = model.device, cache.batch_size
        self.cache_ref = weakref.ref(cache)
        self.ids = torch.zeros(bsz, tokens, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.pad = torch.zeros(bsz, dtype=torch.long, device=device) if padded else None
        self.key_positions = torch.arange(span, device=device)
        self.graph = torch.cuda.CUDAGraph()
        self.logits: torch.Tensor | None = None

    def capture(self, model, cache: KVCache) -> None:
        """Warm up on a side stream (loads kernels, sizes workspaces), then capture the step."""
        side = torch.cuda.Stream(model.device)
        side.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step(model, cache)
        torch.cuda.current_stream(model.device).wait_stream(side)
        with torch.cuda.graph(self.graph):
            self.logits = self._step(model, cache)

    def _step(self, model, cache: KVCache) -> torch.Tensor:
        return static_decode_step(model, cache, self.ids, self.position, self.pad, self.key_positions)

    def load_inputs(self, ids: torch.Tensor, cache: KVCache) -> None:
        """Copy this step's token ids, cache position and pad lengths into the captured input tensors."""
        self.ids.copy_(ids)
        self.position.fill_(cache.seq_len)
        if self.pad is not None:
            self.pad.copy_(cache.pad_lengths)

    def run(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, T, vocab] of `ids` [B, T] from position `cache.seq_len` on (the caller advances seq_len)."""
        self.load_inputs(ids, cache)
        self.graph.replay()
        return self.logits.clone()


class DecodeGraphs:
    """The captured steps of one model, looked up by cache and batch shape."""

    def __init__(self) -> None:
        self._graphs: dict[tuple, DecodeGraph] = {}

    def clear(self) -> None:
        self._graphs.clear()

    def run(self, model, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self._graph(model, ids, cache).run(ids, cache)

    def prepare(self, model, cache: KVCache) -> None:
        """Capture the one-token step from `cache.seq_len` now, if it is not yet: its warm-up and capture cost host
        time, which a caller can spend while the GPU still runs queued work (a prefill). The warm-up writes keys and
        values of a placeholder token at the position the real step will overwrite."""
        self._graph(model, torch.zeros(cache.batch_size, 1, dtype=torch.long, device=model.device), cache)

    def _graph(self, model, ids: torch.Tensor, cache: KVCache) -> DecodeGraph:
        """The captured step for `ids` [B, T] from `cache.seq_len`: found, or captured on these inputs."""
        tokens = ids.shape[1]
        span = step_span(cache, tokens, model.config.num_attention_heads)
        key = (id(cache), cache.batch_size, cache.pad_lengths is not None, span, tokens)
        graph = self._graphs.pop(key, None)
        if graph is None or graph.cache_ref() is not cache:
            while len(self._graphs) >= MAX_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))
            graph = DecodeGraph(model, cache, padded=cache.pad_lengths is not None, span=span, tokens=tokens)
            graph.load_inputs(ids, cache)  # the warm-up and capture run on the step's inputs
            graph.capture(model, cache)
        self._graphs[key] = graph  # most recently used last
        return graph
