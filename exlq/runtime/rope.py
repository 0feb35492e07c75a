"""Rotary position embeddings (RoPE) with the `rope_scaling` types of HF configs.

Frequencies are computed in float32 from the config once. A forward into a cache takes cos/sin as rows of tables
made once for the cache's positions (4 · head_dim bytes a position in fp16); other forwards compute them for their
own positions only.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from exlq.errors import ExlqError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_type_of(rope_scaling: dict[str, Any] | None) -> str:
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def inverse_frequencies(head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/d), adjusted per `rope_scaling` (linear and llama3 change it here)."""
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = rope_type_of(rope_scaling)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if kind == "llama3":
        return _llama3_inverse_frequencies(inv_freq, rope_scaling)
    raise ExlqError(
        f"rope_scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _llama3_inverse_frequencies(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short kept, a smooth blend between."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


#: Forwards into a cache take cos and sin as rows of tables made once for every position the cache holds (two index
#: kernels a forward, against seven to compute them: a decode step's graph is a chain of small launches).
#: EXLQ_ROPE_TABLE=0 computes them every forward, as before (an A/B switch).
TABLE = os.environ.get("EXLQ_ROPE_TABLE", "1") != "0"
TABLE_CHUNK = 8192  # positions a table is made from at a time


class RotaryEmbedding:
    """Holds inv_freq on the model's device and makes (cos, sin) for given positions."""

    def __init__(self, head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None, device: torch.device):
        self.inv_freq = inverse_frequencies(head_dim, rope_theta, rope_scaling).to(device)
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        # Tables a longer cache replaced: a CUDA graph captured with one reads it by address, so it is never freed.
        self._outgrown: list[tuple[torch.Tensor, torch.Tensor]] = []

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype, limit: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (int) -> cos, sin of shape [B, 1, T, head_dim] in `dtype`. With `limit` (every position
        below it: a cache's max_seq_len), the rows of tables made for positions [0, limit) (`tables`): the same
        values on a GPU, where each element is computed alone; a CPU's vectorized cos may round a table's element
        an ulp apart from a short row's."""
        if limit is not None and TABLE:
            cos, sin = self.tables(dtype, limit)
            return cos[positions][:, None], sin[positions][:, None]
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def tables(self, dtype: torch.dtype, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [n, head_dim] in `dtype` for positions 0..n-1, n ≥ limit: made on first use, or remade when a
        longer cache asks (before a graph's capture: its warm-up step asks first)."""
        tables = self._tables.get(dtype)
        if tables is None or tables[0].shape[0] < limit:
            if tables is not None:
                self._outgrown.append(tables)
            device, dim = self.inv_freq.device, 2 * self.inv_freq.numel()
            tables = self._tables[dtype] = tuple(torch.empty(limit, dim, dtype=dtype, device=device) for _ in "cs")
            for start in range(0, limit, TABLE_CHUNK):  # float32 temporaries of TABLE_CHUNK rows, not of the cache's
                rows = torch.arange(start, min(limit, start + TABLE_CHUNK), device=device)[None]
                for table, part in zip(tables, self.cos_sin(rows, dtype)):
                    table[start : start + rows.shape[1]] = part[0, 0]
        return tables


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, D] queries or keys (HF's non-interleaved half-split convention)."""
    return x * cos + _rotate_half(x) * sin
