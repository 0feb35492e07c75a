"""Writing the EXL2 on-disk format: pack codes and scales into the tensors ExLlamaV2 loads (spec §1–§5, §17).

Inputs are in stored (act-order) row order and ExLlamaV2's orientation: codes [K, N] (row i uses the bit
width of its group), scale codes [G, N] with c ∈ 1…16. Columns are padded to N_pad = 32·⌈N/32⌉ the way
ExLlamaV2's converter does it (zero weights: value code 2^(b−1), scale code 1 = nibble 0), never with
`pack`'s accidental 0xF nibbles (§3.5).

The reader (`exlq.runtime.exl2`) is the inverse; both share the bit-position helpers so they cannot drift.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from exlq.errors import ExlqError
from exlq.quant.gptq import column_scale_codes, quantize_codes
from exlq.runtime.exl2 import (
    MAX_IN_FEATURES,
    SUPPORTED_BITS,
    Exl2Tensors,
    Layout,
    as_int32_words,
    bit_positions,
    check_descending,
    effective_scales,
    group_row_starts,
    group_word_offsets,
    pack_q_scale,
    padded_width,
    row_bits,
)


def validate_layout(layout: Layout, in_features: int | None = None) -> None:
    """The writer's rules (§2.5, §17): descending bits, whole words, rows a multiple of 32 (16 for 2-bit).

    16-row 2-bit groups are accepted anywhere because `reconstruct` handles them (golden case C_mixed),
    although ExLlamaV2's small-batch GEMM is only known to be safe when just the last group is one.
    """
    if not layout:
        raise ExlqError("an EXL2 layout needs at least one group")
    for g, (bits, rows) in enumerate(layout):
        if bits not in SUPPORTED_BITS:
            raise ExlqError(f"group {g}: {bits} bits is not an EXL2 width {SUPPORTED_BITS}")
        step = 16 if bits == 2 else 32
        if rows <= 0 or rows % step:
            raise ExlqError(f"group {g}: {rows} rows at {bits} bits; EXL2 needs a positive multiple of {step}")
    check_descending(layout, "layout")
    total = sum(r for _, r in layout)
    if in_features is not None and total != in_features:
        raise ExlqError(f"the layout covers {total} rows but the matrix has {in_features} input rows")
    if total > MAX_IN_FEATURES:
        raise ExlqError(f"EXL2 supports at most {MAX_IN_FEATURES} input rows, the layout has {total}")


def converter_layout(
    in_features: int, bits: Sequence[int], props: Sequence[float], group_size: int | Sequence[int]
) -> Layout:
    """The group layout ExLlamaV2's converter cuts for a QParams (bits, bits_prop, group_size), spec §2.6."""
    sizes = [group_size] * len(bits) if isinstance(group_size, int) else list(group_size)
    layout: Layout = []
    remaining, start = in_features, 0
    for b, p, gs in zip(bits, props, sizes):
        n = math.ceil(min(in_features * p, remaining) / gs)
        remaining -= n * gs
        for _ in range(n):
            rows = min(gs, in_features - start)
            if rows > 0:
                layout.append((b, rows))
            start += rows
    if remaining > 0:
        raise ExlqError(f"bits_prop {list(props)} leaves {remaining} of {in_features} rows without a group")
    return layout


def pack_group(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint32 values (int64) [rows·bits/32, N] of one group: row j's code at bit j·bits of each column's string.

    Fields never overlap, so adding them is the same as OR-ing them (`index_add_` is vectorized);
    a field that straddles two words puts its high bits at the bottom of the next word.
    """
    rows = codes.shape[0]
    word, shift = bit_positions(rows, bits, codes.device)
    words = torch.zeros(rows * bits // 32, codes.shape[1], dtype=torch.int64, device=codes.device)
    words.index_add_(0, word, (codes << shift[:, None]) & 0xFFFFFFFF)
    spill = shift + bits > 32
    if spill.any():
        words.index_add_(0, word[spill] + 1, codes[spill] >> (32 - shift[spill])[:, None])
    return words


def pack_q_weight(codes: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Codes [K, N] (stored order) → `q_weight` int32 [Σ r·b/32, N].

    Only the packing rules are checked here (codes in range, whole words), so that any layout
    ExLlamaV2 can pack, even a wrongly ordered one, is reproduced bit for bit; `pack_exl2` checks the rest.
    """
    codes = codes.to(torch.int64)
    if codes.shape[0] != sum(r for _, r in layout):
        raise ExlqError(f"codes have {codes.shape[0]} rows but the layout covers {sum(r for _, r in layout)}")
    out = torch.empty(sum(r * b // 32 for b, r in layout), codes.shape[1], dtype=torch.int32, device=codes.device)
    for g, ((bits, rows), a, o) in enumerate(zip(layout, group_row_starts(layout), group_word_offsets(layout))):
        if (rows * bits) % 32:
            raise ExlqError(f"group {g}: {rows} rows × {bits} bits do not fill whole 32-bit words")
        group = codes[a : a + rows]
        if group.numel() and (group.min() < 0 or group.max() >= 1 << bits):
            raise ExlqError(f"group {g}: codes must lie in 0..{(1 << bits) - 1} for {bits} bits")
        out[o : o + rows * bits // 32] = as_int32_words(pack_group(group, bits))
    return out


def encode_q_groups(layout: Layout) -> torch.Tensor:
    """`q_groups` int16 [2G]: (bits, first q_weight row) per group (§2.3)."""
    pairs = [(b, o) for (b, _), o in zip(layout, group_word_offsets(layout))]
    return torch.tensor(pairs, dtype=torch.int16).flatten()


def invperm_from_perm(perm: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """`q_invperm` int32 [K] = argsort(perm), where stored row i holds original channel perm[i]; None = identity."""
    if perm is None:
        return torch.arange(in_features, dtype=torch.int32)
    perm = torch.as_tensor(perm).to(torch.int64)
    if not torch.equal(torch.sort(perm).values, torch.arange(in_features, device=perm.device)):
        raise ExlqError(f"perm is not a permutation of 0..{in_features - 1}")
    return torch.argsort(perm).to(torch.int32)


def _pad_columns(t: torch.Tensor, n_pad: int, value: torch.Tensor | int | float) -> torch.Tensor:
    """Append columns up to n_pad, filled with `value` (a scalar, or one value per row)."""
    extra = n_pad - t.shape[1]
    if extra == 0:
        return t
    fill = torch.as_tensor(value, dtype=t.dtype, device=t.device).reshape(-1, 1).expand(t.shape[0], extra)
    return torch.cat([t, fill], dim=1)


def pack_exl2(
    codes: torch.Tensor,
    scale_codes: torch.Tensor,
    q_scale_max: torch.Tensor,
    layout: Layout,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> Exl2Tensors:
    """Everything one quantized linear stores (§1, §17), from codes [K, N] and scale codes [G, N] in stored order.

    `perm[i]` is the original input channel of stored row i (None: no act-order). Columns are padded to
    N_pad with zero weights; the bias (if any) is zero-padded and stored as fp16.
    """
    validate_layout(layout, codes.shape[0])
    if tuple(scale_codes.shape) != (len(layout), codes.shape[1]):
        raise ExlqError(f"scale codes have shape {list(scale_codes.shape)}, expected {[len(layout), codes.shape[1]]}")
    if tuple(q_scale_max.shape) != (len(layout),):
        raise ExlqError(f"q_scale_max has shape {list(q_scale_max.shape)}, expected [{len(layout)}]")
    n, n_pad = codes.shape[1], padded_width(codes.shape[1])
    zero_codes = 1 << (row_bits(layout, codes.device) - 1)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ExlqError(f"bias has shape {list(bias.shape)}, expected [{n}]")
    return Exl2Tensors(
        q_weight=pack_q_weight(_pad_columns(codes.to(torch.int64), n_pad, zero_codes), layout),
        q_scale=pack_q_scale(_pad_columns(scale_codes.to(torch.int64), n_pad, 1)),
        q_scale_max=q_scale_max.to(torch.float16),
        q_groups=encode_q_groups(layout),
        q_invperm=invperm_from_perm(perm, codes.shape[0]).to(codes.device),
        bias=None if bias is None else _pad_columns(bias.to(torch.float16)[None], n_pad, 0)[0],
    )


def quantize_rtn(
    weight: torch.Tensor,
    layout: Layout,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> Exl2Tensors:
    """Round-to-nearest EXL2 quantization of an HF weight [N, K] (no calibration, no clipping search).

    Per group it picks scales as ExLlamaV2's `find_params` does with p = 1 (§14): per-column
    c = clamp(round(16·√(base/smax)), 1, 16), q_scale_max = f16(smax), and quantizes with the exact
    fp16 scale the reader will use, so the only error is rounding (and the top code's clipping).
    Padding columns come from `pack_exl2` and equal what quantizing ExLlamaV2's zero-padded rows gives.
    """
    _, k = weight.shape
    validate_layout(layout, k)
    wt = weight.T.float()
    if perm is not None:
        wt = wt[torch.as_tensor(perm, device=wt.device).to(torch.int64)]
    codes = torch.empty(wt.shape, dtype=torch.int64, device=wt.device)
    scale_codes = torch.empty(len(layout), wt.shape[1], dtype=torch.int64, device=wt.device)
    q_scale_max = torch.empty(len(layout), dtype=torch.float16, device=wt.device)
    for g, ((bits, rows), a) in enumerate(zip(layout, group_row_starts(layout))):
        x = wt[a : a + rows].T  # [N, rows]
        column_codes, smax = column_scale_codes(x, bits)
        scale_codes[g] = column_codes.to(torch.int64)
        q_scale_max[g] = smax.half()
        scale = effective_scales(scale_codes[g : g + 1], q_scale_max[g : g + 1])[0]
        codes[a : a + rows] = quantize_codes(x, scale, bits).T.to(torch.int64)
    return pack_exl2(codes, scale_codes, q_scale_max, layout, perm, bias)
