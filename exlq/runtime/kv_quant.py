"""Quantized KV-cache formats: what a cache type means, and the quantize/dequantize math.

A quantized side (keys or values) is cut into groups of `group` elements along head_dim. Each
group is rotated by a normalized Hadamard matrix first: an outlier channel (Qwen2 keys have a
few channels hundreds of times larger than the rest) is spread over the whole group, so one
max-abs scale per group no longer wastes almost every level on it. The rotation is orthogonal
and symmetric (H = Hᵀ = H⁻¹), so dequantization applies the same matrix again.

Rounding is symmetric "mid-rise": b-bit codes c in [0, 2ᵇ-1] stand for (c - (2ᵇ-1)/2) · scale,
with scale = max|y| / ((2ᵇ-1)/2) stored as fp16. This uses all 2ᵇ levels (mid-tread rounding
with a zero level, codes in ±(2ᵇ⁻¹-1), leaves one unused: 3 levels instead of 4 at 2 bits) and
needs no zero point; rotated groups are close to zero-mean and Gaussian, so the missing exact
zero costs nothing (measured on smollm2-135m and qwen2.5-coder-0.5b keys and values, rotated
as here: lower squared error than mid-tread at 2, 4 and 8 bits, by 13-55 % at 2-4 bits and ~1 %
at 8; unrotated, mid-tread can win; `bench/kv_cache.py --rounding`, docs/benchmarks.md). An asymmetric min/max variant was a little
more accurate at the same bits but needs a second fp16 number per group (+0.5 bit per element),
which buys more when spent on the codes. The cache (cache.py) subtracts a per-channel offset
before calling these functions and, for keys, multiplies each channel by a scale from the dense
prefix (`key_channel_scales`); see QuantizedStore.

Why key channels are scaled: attention reads keys only through the logits q·k, so a key
channel's rounding error costs in proportion to the query on that channel. The rotation spreads
the error of a group evenly over its channels (its step is set by the whole group's energy), so
a channel where the queries are large but the keys barely vary gets as much error as a busy one.
Qwen2.5-0.5B has exactly that (a few channels with huge queries and, from the k_proj bias, huge but
near-constant keys): without the scales its q4 cache cost +19 % perplexity, with them +2 %
(docs/benchmarks.md; SmolLM2's +2.9 % became +2.3 %). Quantizing k·s instead of k, the logit
error is Σ_c q_c·e_c/s_c with e roughly uniform of variance ∝ Σ_c s_c²·σ_c² (σ_c: the key
spread); by Cauchy-Schwarz that is smallest for s_c² ∝ |q_c|/σ_c, estimated from the dense
prefix as rms(q_c)/rms(k_c - m_c).

Codes are packed densely: every 8 consecutive b-bit codes fill b bytes, little-endian (code i
of the 8 sits at bits b·i .. b·i+b-1 of that 8b-bit word). `quantize_kv` and `dequantize_kv` are
pure functions of tensors so a CUDA kernel can replace them one for one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from exlq.errors import ExlqError

DEFAULT_GROUP = 32
DEFAULT_DENSE_PREFIX = 16
KEY_SCALE_FLOOR = 0.1  # per-channel rms statistics are floored at this fraction of their mean over the head
MIN_BITS, MAX_BITS = 2, 8
NAMED_TYPES = {"fp16": None, "q4": 4, "q6": 6, "q8": 8}
SCALE_DTYPE = torch.float16
_FP16_TINY = float(torch.finfo(torch.float16).tiny)
_FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass(frozen=True)
class CacheType:
    """Bits per key and per value element (None: unquantized, in the model dtype) and the group size."""

    key_bits: int | None = None
    value_bits: int | None = None
    group: int = DEFAULT_GROUP
    dense_prefix: int = DEFAULT_DENSE_PREFIX  # first positions kept unquantized; their mean is the offset
    key_scales: bool = True  # per-channel key scales from the dense prefix (key_channel_scales); False for ablations

    def __post_init__(self) -> None:
        for side, bits in (("key", self.key_bits), ("value", self.value_bits)):
            if bits is not None and not MIN_BITS <= bits <= MAX_BITS:
                raise ExlqError(f"{side} bits must be between {MIN_BITS} and {MAX_BITS} (got {bits})")
        if self.group < 8 or self.group & (self.group - 1):
            raise ExlqError(f"the cache group size must be a power of 2, at least 8 (got {self.group})")
        if self.dense_prefix < 0:
            raise ExlqError(f"dense_prefix must be at least 0 (got {self.dense_prefix})")

    @property
    def quantized(self) -> bool:
        return self.key_bits is not None or self.value_bits is not None

    @property
    def name(self) -> str:
        """fp16, q4, q6, q8, or k4v2 style for other combinations; g64 / p0 / s0 mark a non-default group / dense
        prefix / no per-channel key scales."""
        if self.key_bits == self.value_bits:
            name = "fp16" if self.key_bits is None else f"q{self.key_bits}"
        else:
            name = f"k{self.key_bits or 16}v{self.value_bits or 16}"
        if self.quantized and self.group != DEFAULT_GROUP:
            name += f"g{self.group}"
        if self.quantized and self.dense_prefix != DEFAULT_DENSE_PREFIX:
            name += f"p{self.dense_prefix}"
        if self.key_bits is not None and not self.key_scales:
            name += "s0"
        return name

    def check_head_dim(self, head_dim: int) -> None:
        if self.quantized and head_dim % self.group:
            raise ExlqError(
                f"the {self.name} cache quantizes groups of {self.group} elements, but head_dim={head_dim} "
                f"is not a multiple of {self.group}; use --cache fp16"
            )


FP16 = CacheType()


def parse_cache_type(cache: str, cache_bits: str | None = None) -> CacheType:
    """`--cache fp16|q4|q6|q8` and the `--cache-bits K,V` override (each 2..8) -> CacheType."""
    name = cache.strip().lower()
    if name not in NAMED_TYPES:
        raise ExlqError(f"unknown --cache {cache!r}; choose one of: {', '.join(NAMED_TYPES)} (or --cache-bits K,V)")
    if cache_bits is None:
        bits = NAMED_TYPES[name]
        return CacheType(bits, bits)
    parts = [p.strip() for p in cache_bits.split(",")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ExlqError(f"--cache-bits takes two integers K,V such as 4,2 (got {cache_bits!r})")
    key_bits, value_bits = int(parts[0]), int(parts[1])
    if not (MIN_BITS <= key_bits <= MAX_BITS and MIN_BITS <= value_bits <= MAX_BITS):
        raise ExlqError(f"--cache-bits K,V: each must be between {MIN_BITS} and {MAX_BITS} (got {cache_bits!r})")
    return CacheType(key_bits, value_bits)


def as_cache_type(cache_type: CacheType | str | None) -> CacheType:
    """Accept a CacheType, a --cache name ("q4") or None (fp16) wherever a cache is made."""
    if cache_type is None:
        return FP16
    if isinstance(cache_type, str):
        return parse_cache_type(cache_type)
    return cache_type


@functools.lru_cache(maxsize=16)
def hadamard(size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalized Sylvester-Hadamard matrix of `size` (a power of 2): symmetric and orthogonal."""
    if size < 1 or size & (size - 1):
        raise ExlqError(f"a Hadamard rotation needs a power-of-2 size (got {size})")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(size)).to(device=device, dtype=dtype)


def key_channel_scales(
    centered: torch.Tensor,
    query_energy: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    floor: float = KEY_SCALE_FLOOR,
) -> torch.Tensor:
    """Per-channel key multipliers s [..., 1, D] from the dense prefix (see the module docstring).

    `centered`: the prefix's keys minus their mean, [..., P, D]; `query_energy`: the queries' q² at
    those positions, summed over the query heads that share the KV head, [..., P, D] (None or all
    zero when the cache was not shown the queries: they then count as equal on every channel).
    s_c² = rms(q_c) / rms(k_c - m_c), each rms floored at `floor` × its mean over the channels so
    that a channel nearly constant over the prefix (or without query energy) gets no runaway weight,
    then s is scaled to RMS 1 over the channels, which keeps the fp16 group scales in their range.
    Keys are quantized as (k - m)·s and read back as x̂/s + m. `valid` [..., P, 1] (1/0): the positions
    that count (a row's window may be partly unknown); the others must be zero in both inputs.
    """

    def floored(x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(x, floor * x.mean(-1, keepdim=True)).clamp_min(1e-12)

    count = centered.shape[-2] if valid is None else valid.sum(-2, keepdim=True)
    key_rms = floored((centered.float().pow(2).sum(-2, keepdim=True) / count).sqrt())
    query_rms = torch.ones_like(key_rms) if query_energy is None else floored((query_energy.float().sum(-2, keepdim=True) / count).sqrt())
    scales = (query_rms / key_rms).sqrt()
    return scales / scales.pow(2).mean(-1, keepdim=True).sqrt()


def packed_size(n: int, bits: int) -> int:
    """Bytes that `n` codes of `bits` bits take (n a multiple of 8)."""
    return n * bits // 8


def _code_places(bits: int) -> list[tuple[int, int, bool]]:
    """For code i of an 8-code block: (its first byte, its bit shift there, whether it spills into the next byte)."""
    return [(bits * i // 8, bits * i % 8, bits * i % 8 + bits > 8) for i in range(8)]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] (each < 2^bits, n a multiple of 8) -> densely packed uint8 [..., n·bits/8]."""
    if bits == 8:
        return codes.to(torch.uint8)
    *lead, n = codes.shape
    octets = codes.reshape(*lead, n // 8, 8).to(torch.int16)
    out = torch.zeros(*lead, n // 8, bits, dtype=torch.int16, device=codes.device)
    for i, (byte, shift, spills) in enumerate(_code_places(bits)):
        out[..., byte] |= (octets[..., i] << shift) & 0xFF
        if spills:
            out[..., byte + 1] |= octets[..., i] >> (8 - shift)
    return out.to(torch.uint8).reshape(*lead, n * bits // 8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 [..., n·bits/8] -> uint8 codes [..., n]."""
    if bits == 8:
        return packed
    *lead, m = packed.shape
    blocks = packed.reshape(*lead, m // bits, bits).to(torch.int16)
    mask = (1 << bits) - 1
    codes = []
    for byte, shift, spills in _code_places(bits):
        word = blocks[..., byte] | (blocks[..., byte + 1] << 8) if spills else blocks[..., byte]
        codes.append((word >> shift) & mask)
    return torch.stack(codes, dim=-1).to(torch.uint8).reshape(*lead, m // bits * 8)


def quantize_kv(x: torch.Tensor, bits: int, group: int = DEFAULT_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (packed uint8 codes [..., D·bits/8], fp16 scales [..., D/group]).

    Each group of `group` elements is rotated by the Hadamard matrix, then rounded mid-rise
    against its max-abs scale (see the module docstring). Math in float32 whatever x's dtype;
    codes are computed against the fp16-rounded scale, the one dequantization will use.
    """
    *lead, dim = x.shape
    groups = x.reshape(*lead, dim // group, group).float() @ hadamard(group, x.device)
    half = ((1 << bits) - 1) / 2
    scales = (groups.abs().amax(-1, keepdim=True) / half).clamp(_FP16_TINY, _FP16_MAX).to(SCALE_DTYPE)
    codes = torch.round(groups / scales.float() + half).clamp_(0, 2 * half)
    return pack_codes(codes.to(torch.uint8).reshape(*lead, dim), bits), scales[..., 0]


def dequantize_kv(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, group: int = DEFAULT_GROUP, dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """Inverse of quantize_kv up to rounding: (packed codes, scales) -> x [..., D] in `dtype`."""
    values = unpack_codes(codes, bits)
    *lead, dim = values.shape
    half = ((1 << bits) - 1) / 2
    groups = (values.reshape(*lead, dim // group, group).float() - half) * scales[..., None].float()
    return (groups @ hadamard(group, codes.device)).reshape(*lead, dim).to(dtype)

