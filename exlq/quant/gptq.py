"""GPTQ-style error-compensating quantization of one weight matrix into EXL2 groups.

The matrix's input channels are put in act-order (largest Hessian diagonal first), cut into
groups of descending bit width (the salient channels get the most bits, as the format requires),
and quantized group by group: each channel's rounding error is pushed onto the channels not yet
quantized through the inverse Hessian's Cholesky factor, and the rest of the matrix is updated
lazily after every group, so each group's scales are searched on fully updated weights.

Scales follow the format exactly (spec §4, §14): per group one fp16 `q_scale_max` and per output
column a 4-bit code c ∈ 1..16 with scale ≈ (c/16)²·q_scale_max, reproduced with the same fp16
roundings the runtime's dequantizer applies, so what we measure here is what the model computes.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from exlq.errors import ExlqError
from exlq.runtime.exl2 import effective_scales, group_row_starts, row_bits, row_groups
from exlq.runtime.kernels import enabled as kernels_enabled
from exlq.runtime.kernels import gptq_ops

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
# Clipping factors searched per group (the reference converter tries 97 over [0.70, 1.20], §14):
# a coarse pass, then a fine one around its best, reaches the same resolution in a third of the work.
COARSE_CLIP = torch.linspace(0.70, 1.20, 11)
FINE_CLIP_OFFSETS = torch.linspace(-0.05, 0.05, 21)
ERROR_NORM = 3.5  # exponent of the clip search's error, as in the reference converter


@dataclass(frozen=True)
class QuantSpec:
    """One quantization option for a matrix: bit widths (descending), their shares of K, group sizes."""

    bits: tuple[int, ...]
    proportions: tuple[float, ...]
    group_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.bits) == len(self.proportions) == len(self.group_sizes)) or not self.bits:
            raise ExlqError(f"bits, proportions and group sizes must be non-empty lists of equal length: {self}")
        if any(b not in SUPPORTED_BITS for b in self.bits) or list(self.bits) != sorted(self.bits, reverse=True):
            raise ExlqError(f"bit widths must be distinct, descending and among {SUPPORTED_BITS}: {self.bits}")
        if len(set(self.bits)) != len(self.bits):
            raise ExlqError(f"bit widths must be distinct: {self.bits}")
        if abs(sum(self.proportions) - 1.0) > 1e-9:
            raise ExlqError(f"proportions must sum to 1: {self.proportions}")
        if any(g % 32 for g in self.group_sizes):
            raise ExlqError(f"group sizes must be multiples of 32: {self.group_sizes}")

    @classmethod
    def uniform(cls, bits: int, group_size: int = 128) -> QuantSpec:
        return cls((bits,), (1.0,), (group_size,))

    def describe(self) -> str:
        return "/".join(
            f"{b}b{round(p * 100)}%g{g}" for b, p, g in zip(self.bits, self.proportions, self.group_sizes)
        )

    def group_layout(self, in_features: int) -> list[tuple[int, int]]:
        """[(bits, rows)] per group in stored order, cut as the reference converter does (§2.6)."""
        k = in_features
        if k % 32 and not (k % 32 == 16):
            raise ExlqError(f"EXL2 needs in_features to be a multiple of 32 (or 32m+16); got {k}")
        layout: list[tuple[int, int]] = []
        start, remaining = 0, k
        for bits, share, size in zip(self.bits, self.proportions, self.group_sizes):
            count = math.ceil(min(k * share, remaining) / size) if remaining > 0 else 0
            for _ in range(count):
                rows = min(size, k - start)
                if rows <= 0:
                    break
                layout.append((bits, rows))
                start += rows
            remaining -= count * size
        if start != k:
            raise ExlqError(f"{self.describe()} does not cover {k} input channels")
        last_bits, last_rows = layout[-1]
        if last_rows % 32 and last_bits != 2:
            # A 16-row tail must be 2-bit (§2.5): demote it rather than write an unreadable layout.
            layout[-1] = (2, last_rows)
        return layout


def quantize_codes(w: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(rint(w / S) + 2^(b-1), 0, 2^b - 1) per column scale; w [N, r], scales [N]."""
    zero = 2 ** (bits - 1)
    return torch.clamp(torch.round(_safe_div(w, scales.float()[:, None])) + zero, 0, 2**bits - 1)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """f16((q - 2^(b-1)) · S) as the runtime computes it, returned as float32."""
    return ((codes - 2 ** (bits - 1)) * scales.float()[:, None]).half().float()


def column_scale_codes(w: torch.Tensor, bits: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column 4-bit scale codes c ∈ 1..16 [..., N] for group weights w [..., N, r], and the group's largest
    base scale smax [...] (scale ≈ (c/16)²·smax: codes uniform in √scale, spec §14). `bits`: an int, or one width
    per group of a batch w [B, N, r]."""
    half_range = (2**bits - 1) / 2 if isinstance(bits, int) else _width_constants(bits, w.device)[2]
    base = (w.abs().amax(dim=-1) + 1e-12) / half_range
    smax = base.amax(dim=-1)
    return torch.clamp(torch.round(16 * torch.sqrt(base / smax[..., None])), 1, 16), smax


@functools.cache
def _clip_factors(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """COARSE_CLIP and FINE_CLIP_OFFSETS on `device`, copied once (a copy per group was a host sync on the GPU)."""
    return COARSE_CLIP.to(device), FINE_CLIP_OFFSETS.to(device)


@functools.cache
def _width_constants(bits: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group of a batch of widths: the zero point 2^(b-1) and largest code 2^b - 1 as [B, 1, 1, 1] floats, and
    half the code range [B, 1], on `device` (made once per combination of widths)."""
    widths = torch.tensor(bits, dtype=torch.float64)
    zero, maxq = (2 ** (widths - 1)).float(), (2**widths - 1).float()
    return zero.view(-1, 1, 1, 1).to(device), maxq.view(-1, 1, 1, 1).to(device), (maxq / 2).view(-1, 1).to(device)


def search_group_scales(
    w: torch.Tensor, bits: int, row_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale codes [N] (1..16), q_scale_max (fp16 scalar) and effective scales [N] for group weights w [N, r].

    Codes come from each column's range relative to the largest (uniform in √scale); a global
    clipping factor p is then chosen to minimize Σ|dequant(quant(w)) − w|^3.5 over the group, and
    finally each column picks its own least-squares code under that q_scale_max, each row's squared
    error weighted by `row_weights` [r] when given (GPTQ passes 1/[H⁻¹ Cholesky]_kk², the weight with
    which row k's rounding error reaches the layer's output).
    """
    codes, q_scale_max, scales = search_group_scales_many(w[None], (bits,), row_weights)
    return codes[0], q_scale_max[0], scales[0]


def search_group_scales_many(
    w: torch.Tensor, bits: tuple[int, ...], row_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """search_group_scales for B groups of equal rows at once: w [B, N, r], bits [B] (each group its own width),
    row weights [r] shared -> codes [B, N], q_scale_max [B], scales [B, N]. Each group's result is exactly what it
    gets alone; batching the groups that start at one GPTQ block (one per measured option) saves the GPU ~100 small
    launches per group, which bound the measurement's time there."""
    coarse, fine_offsets = _clip_factors(w.device)
    codes, smax = column_scale_codes(w, bits)
    best_p, _ = _best_clip(w, codes, smax, coarse.expand(w.shape[0], -1), bits)
    fine = (best_p[:, None] + fine_offsets).clamp(0.70, 1.20)
    _, q_scale_max = _best_clip(w, codes, smax, fine, bits)
    codes = _best_column_codes(w, q_scale_max, bits, row_weights)
    return codes, q_scale_max, effective_scales(codes, q_scale_max)


def _batched_scales(codes: torch.Tensor, q_scale_max: torch.Tensor) -> torch.Tensor:
    """effective_scales for codes [B, P, N] under q_scale_max [B, P] -> [B, P, N]."""
    b, p, n = codes.shape
    return effective_scales(codes.reshape(b * p, n), q_scale_max.reshape(b * p)).reshape(b, p, n)


def _best_column_codes(w: torch.Tensor, q_scale_max: torch.Tensor, bits: tuple[int, ...], row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each column's own least-squares code (1..16) under its group's q_scale_max: w [B, N, r] -> [B, N].

    The range-based codes are only a starting point: with few bits, clipping a column's largest
    weights often lowers its total error. Squared error here (not the clip search's 3.5 norm) is
    what measured best: uniform 3-bit GPTQ of the rotated smollm2-135m, KL vs FP16 0.863 -> 0.730;
    weighting the rows by their output saliency took it to 0.668 (4-bit: 0.196 -> 0.187).
    """
    groups, n = w.shape[0], w.shape[1]
    all_codes = torch.arange(1, 17, device=w.device, dtype=torch.int32)[None, :, None].expand(groups, 16, n)
    scales = _batched_scales(all_codes, q_scale_max[:, None].expand(groups, 16))  # [B, 16, N]
    errors = _column_errors(w, scales, bits, 2.0, row_weights)
    return (torch.argmin(errors, dim=1) + 1).to(torch.int32)


def _best_clip(
    w: torch.Tensor, codes: torch.Tensor, smax: torch.Tensor, factors: torch.Tensor, bits: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group the clipping factor [B] (of factors [B, F]) with the smallest 3.5-norm error, and its fp16
    q_scale_max [B] (rows unweighted: weighting them as the codes are was measured slightly worse, 3-bit proxy KL
    0.675 against 0.668). Stays on the device: no host sync."""
    candidates = (smax[:, None] * factors).half()  # [B, F]
    scales = _batched_scales(codes[:, None].expand(-1, factors.shape[1], -1), candidates)
    best = torch.argmin(_column_errors(w, scales, bits, ERROR_NORM).sum(dim=-1), dim=1)[:, None]
    return factors.gather(1, best)[:, 0], candidates.gather(1, best)[:, 0]


def _candidates_per_pass(w: torch.Tensor) -> int:
    """Candidates a pass of _column_errors evaluates: ~16 M elements a temporary on a GPU (few launches), ~1 M on a
    CPU (temporaries that stay in its caches: 2.3x faster than 16 M on this project's machine)."""
    max_elements = 1 << 24 if w.is_cuda else 1 << 20
    return max(1, max_elements // w.numel())


def _column_errors(
    w: torch.Tensor, scales: torch.Tensor, bits: tuple[int, ...], norm: float, row_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per column Σ_rows weight_row·|dequant(quant(w)) − w|^norm for groups w [B, N, r] and candidate scales
    [B, P, N] -> [B, P, N].

    Candidates are evaluated a bounded number at a time (_candidates_per_pass), so a temporary holds at most ~16 M
    floats on a GPU, ~1 M on a CPU.
    """
    if len(set(bits)) == 1:  # Python numbers: faster than broadcast tensors in torch's CPU kernels
        zero, maxq = 2 ** (bits[0] - 1), 2 ** bits[0] - 1
    else:
        zero, maxq, _ = _width_constants(bits, w.device)
    errors = []
    for chunk in scales.split(_candidates_per_pass(w), dim=1):
        s = chunk.float()[..., None]  # [B, p, N, 1]
        # _safe_div with its masks on the small scale tensor: x / s, 0 where s is 0 (two full-size passes, not five)
        q = torch.round(w[:, None] / torch.where(s > 0, s, 1.0) * (s > 0)) + zero
        q = torch.clamp(q, 0, maxq) if isinstance(maxq, int) else torch.minimum(torch.clamp(q, min=0), maxq)
        error = (((q - zero) * s).half().float() - w[:, None]).abs().pow(norm)
        errors.append((error if row_weights is None else error * row_weights).sum(dim=-1))
    return torch.cat(errors, dim=1)


@dataclass
class QuantizedMatrix:
    """A weight matrix in EXL2 terms, in stored (act-order) row order; see exlq.quant.exl2_pack."""

    codes: torch.Tensor  # [K, N] int32 unsigned codes, stored order
    scale_codes: torch.Tensor  # [G, N] int32 in 1..16
    q_scale_max: torch.Tensor  # [G] fp16
    groups: list[tuple[int, int]]  # (bits, rows) per group, descending bits
    perm: torch.Tensor  # [K] int64: stored row i holds input channel perm[i]

    @property
    def in_features(self) -> int:
        return self.codes.shape[0]

    @property
    def out_features(self) -> int:
        return self.codes.shape[1]

    def dequantize(self) -> torch.Tensor:
        """W [N, K] float32 in original channel order, exactly as the runtime reconstructs it."""
        device = self.codes.device
        scales = effective_scales(self.scale_codes, self.q_scale_max).float()[row_groups(self.groups).to(device)]
        zero = (2 ** (row_bits(self.groups) - 1)).float()[:, None].to(device)
        stored = ((self.codes.float() - zero) * scales).half().float()  # dequantize_codes, every group at once
        weight = torch.empty_like(stored)
        weight[self.perm] = stored
        return weight.T.contiguous()

    def weight_bits(self) -> int:
        """Bits of codes alone (Σ rows·bits·N); the format's full accounting adds scales and indices."""
        return sum(bits * rows for bits, rows in self.groups) * self.out_features


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix dead channels (H_ii = 0: never active, weight irrelevant) and add relative damping."""
    h = hessian.clone().double()
    w = weight.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return h, w


def inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ (GPTQ's error-propagation matrix), adding damping if H is not PD."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    extra = 0.0
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(h + extra * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            return torch.linalg.cholesky(inverse, upper=True).float()
        extra = max(extra * 10, 1e-6 * float(torch.mean(torch.diag(h))))
    raise ExlqError("the Hessian is not positive definite even after extra damping (too little calibration data?)")


def quantize_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    name: str = "the weight matrix",
    refine_sweeps: int = 0,
) -> QuantizedMatrix:
    """Quantize W [N, K] given the input Hessian H = XᵀX [K, K] (None: plain round-to-nearest), then
    `refine_sweeps` passes of coordinate descent over the codes (`refine_codes`)."""
    return quantize_gptq_many(
        weight, hessian, [spec], damp=damp, act_order=act_order, name=name, refine_sweeps=refine_sweeps
    )[0]


def quantize_gptq_many(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    specs: list[QuantSpec],
    *,
    damp: float = 0.01,
    act_order: bool = True,
    name: str = "the weight matrix",
    refine_sweeps: int = 0,
) -> list[QuantizedMatrix]:
    """quantize_gptq for several specs at once: one pass over the columns, batched over the specs.

    All specs share the act-order permutation and H⁻¹, and every group boundary falls on a
    multiple of 32 columns, so the column loop (GPTQ's sequential part) runs once with the specs
    stacked [P, N, K], with the lazy update after every 32-column block.
    """
    n_out, k_in = weight.shape
    device = weight.device
    if not torch.isfinite(weight).all():
        raise ExlqError(f"{name} holds NaN or Inf weights; the input model is damaged")
    layouts = [spec.group_layout(k_in) for spec in specs]
    if hessian is None:
        h, w = torch.eye(k_in, dtype=torch.float64, device=device), weight.float().clone()
    else:
        if hessian.shape != (k_in, k_in) or not torch.isfinite(hessian).all():
            raise ExlqError(f"the Hessian of {name} must be a finite [{k_in}, {k_in}] matrix")
        h, w = prepare_hessian(hessian.to(device), weight, damp)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(k_in, device=device)
    hinv = None if hessian is None else inverse_cholesky_upper(h[perm][:, perm])
    stacked = w[:, perm].unsqueeze(0).repeat(len(specs), 1, 1)  # [P, N, K]

    codes = torch.empty(len(specs), k_in, n_out, dtype=torch.int32, device=device)
    scale_codes = [torch.empty(len(layout), n_out, dtype=torch.int32, device=device) for layout in layouts]
    q_scale_max = [torch.empty(len(layout), dtype=torch.float16, device=device) for layout in layouts]
    scales = torch.zeros(len(specs), n_out, device=device)
    group_at = [
        {start: (g, bits, rows) for g, ((bits, rows), start) in enumerate(zip(layout, group_row_starts(layout)))}
        for layout in layouts
    ]
    bits_by_row = torch.stack([row_bits(layout, device) for layout in layouts])  # [P, K]
    # How much each row's rounding error reaches the output (its scale codes weigh rows by it).
    saliency = None if hinv is None else 1.0 / torch.diagonal(hinv) ** 2
    # The kernel reads H⁻¹'s factor row-major (cholesky returns it transposed); the torch path keeps it as it is.
    hinv_rows = hinv.contiguous() if hinv is not None and kernels_enabled(device) else None
    for b0 in range(0, k_in, BLOCK):
        b1 = min(b0 + BLOCK, k_in)
        # Groups of the options that begin here: their scales are searched on updated weights, all of one row
        # count at once.
        by_rows: dict[int, list[int]] = defaultdict(list)
        for p, starts in enumerate(group_at):
            if b0 in starts:
                by_rows[starts[b0][2]].append(p)
        for rows, members in by_rows.items():
            weights = None if saliency is None else saliency[b0 : b0 + rows]
            widths = tuple(group_at[p][b0][1] for p in members)
            found = search_group_scales_many(stacked[members, :, b0 : b0 + rows], widths, weights)
            for i, p in enumerate(members):
                g = group_at[p][b0][0]
                scale_codes[p][g], q_scale_max[p][g] = found[0][i], found[1][i]
                scales[p] = found[2][i].float()
        block_bits = bits_by_row[:, b0].float()  # blocks never straddle groups
        zero = (2 ** (block_bits - 1))[:, None]
        maxq = (2**block_bits - 1)[:, None]
        block = stacked[:, :, b0:b1].clone()
        if hinv_rows is not None:  # _gptq_rows in one launch (cuda/gptq.cu)
            errors = gptq_ops.gptq_block(block, hinv_rows, scales, zero[:, 0], maxq[:, 0], codes, b0)
        else:
            errors = _gptq_rows(block, hinv, scales, zero, maxq, codes, b0)
        if hinv is not None:
            stacked[:, :, b1:] -= errors @ hinv[b0:b1, b1:]
    matrices = [QuantizedMatrix(codes[p], scale_codes[p], q_scale_max[p], layouts[p], perm) for p in range(len(specs))]
    if hinv is None or refine_sweeps == 0:
        return matrices
    target, h_stored = w[:, perm], h[perm][:, perm].float()
    return [refine_codes(m, target, h_stored, refine_sweeps) for m in matrices]


def _gptq_rows(block: torch.Tensor, hinv: torch.Tensor | None, scales: torch.Tensor, zero: torch.Tensor,
               maxq: torch.Tensor, codes: torch.Tensor, b0: int) -> torch.Tensor:
    """GPTQ's column loop over one block [P, N, width] of stored rows b0.. (the torch path; gptq_ops.gptq_block is its
    kernel): each row is rounded (codes [P, K, N] written) and its error pushed onto the block's later rows through
    H⁻¹'s Cholesky factor; returns the scaled errors [P, N, width] for the update of the rows after the block."""
    errors = torch.empty_like(block)
    for i in range(block.shape[2]):
        column = block[:, :, i]
        q, value = _to_grid(column, scales, zero, maxq)
        codes[:, b0 + i] = q.to(torch.int32)
        if hinv is None:  # round-to-nearest
            continue
        err = (column - value) / hinv[b0 + i, b0 + i]
        block[:, :, i:] -= err[:, :, None] * hinv[b0 + i, b0 + i : b0 + block.shape[2]]
        errors[:, :, i] = err
    return errors


def refine_codes(matrix: QuantizedMatrix, target: torch.Tensor, hessian: torch.Tensor, sweeps: int) -> QuantizedMatrix:
    """Coordinate descent on GPTQ's codes (as in QuantEase): with the scales fixed, each stored row in turn
    takes the grid value that minimizes tr((W − Ŵ) H (W − Ŵ)ᵀ) given all the others, for every output
    column at once. GPTQ fixes each row looking only forward; a sweep lets every row answer the rows
    after it too. The objective never increases (each step is the exact 1-D minimum on the grid).

    target [N, K] and hessian [K, K] in stored (act-order) order, as GPTQ used them (damped).
    """
    k_in = matrix.in_features
    scales = effective_scales(matrix.scale_codes, matrix.q_scale_max).float()  # [G, N]
    bits_of_row = row_bits(matrix.groups, target.device)
    row_scales = scales[row_groups(matrix.groups, target.device)]  # [K, N]
    zero = (2 ** (bits_of_row - 1)).float()[:, None]
    maxq = (2**bits_of_row - 1).float()[:, None]
    codes = matrix.codes.float()  # [K, N]
    values = ((codes - zero) * row_scales).half().float()  # [K, N]: Ŵᵀ as the runtime computes it
    gradient = (target - values.T) @ hessian  # [N, K]: (W − Ŵ) H
    diagonal = torch.diagonal(hessian).contiguous()
    on_kernel = kernels_enabled(target.device)
    hessian = hessian.contiguous() if on_kernel else hessian  # the kernel reads it row-major
    for _ in range(sweeps):
        for b0 in range(0, k_in, BLOCK):
            b1 = min(b0 + BLOCK, k_in)
            if on_kernel:  # the row loop below in one launch (cuda/gptq.cu)
                changes = gptq_ops.refine_block(values, codes, gradient, hessian, diagonal, row_scales, zero, maxq,
                                                b0, b1 - b0)
            else:
                changes = _refine_rows(values, codes, gradient, hessian, diagonal, row_scales, zero, maxq, b0, b1)
            gradient[:, :b0] -= changes @ hessian[b0:b1, :b0]
            gradient[:, b1:] -= changes @ hessian[b0:b1, b1:]
    return QuantizedMatrix(codes.to(torch.int32), matrix.scale_codes, matrix.q_scale_max, matrix.groups, matrix.perm)


def _refine_rows(values: torch.Tensor, codes: torch.Tensor, gradient: torch.Tensor, hessian: torch.Tensor,
                 diagonal: torch.Tensor, row_scales: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor, b0: int,
                 b1: int) -> torch.Tensor:
    """refine_codes' row loop over rows b0..b1 (the torch path; gptq_ops.refine_block is its kernel): each row takes
    its best grid value given the others, the block's gradient columns follow; returns the changes [N, b1 - b0]."""
    changes = torch.zeros(gradient.shape[0], b1 - b0, device=gradient.device)
    for k in range(b0, b1):
        q, new = _to_grid(values[k] + gradient[:, k] / diagonal[k], row_scales[k], zero[k], maxq[k])
        change = new - values[k]
        codes[k], values[k] = q, new
        gradient[:, b0:b1] -= change[:, None] * hessian[k, b0:b1]
        changes[:, k - b0] = change
    return changes


BLOCK = 32  # every group boundary is a multiple of 32 rows (group sizes are), so blocks never straddle groups


def _to_grid(x: torch.Tensor, scales: torch.Tensor, zero, maxq) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest codes q (as floats, clamped to 0..maxq) and their values f16((q − zero)·scale), as the runtime
    dequantizes them, for x on a grid of per-column `scales` (GPTQ's and coordinate descent's rounding)."""
    q = torch.minimum(torch.clamp(torch.round(_safe_div(x, scales)) + zero, min=0), maxq)
    return q, ((q - zero) * scales).half().float()


def _safe_div(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x / scale, with 0 where a scale is 0 (an all-zero group: every code is the zero point)."""
    return torch.where(scales > 0, x / torch.where(scales > 0, scales, 1.0), 0.0)


def hessian_weighted_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """trace((W − Q) H (W − Q)ᵀ): the expected squared output error for inputs with second moment H."""
    delta = (weight.double() - quantized.double())
    return float(torch.einsum("nk,kl,nl->", delta, hessian.double(), delta))
