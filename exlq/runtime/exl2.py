"""Reading the EXL2 on-disk format (spec: shared/specs/exl2-format.md): unpacking and exact dequantization.

Orientation: like ExLlamaV2, the dequantizer works on `Wt = Wᵀ`, shape [K, N_pad] (rows = input channels,
columns = output channels, padded to a multiple of 32). `Exl2Linear` turns that into the HF layout
[out_features, in_features] = [N, K] for `F.linear`.

Bit-exactness: `dequantize` reproduces ExLlamaV2's `QMatrix::reconstruct` bit for bit, which needs the
three separate fp16 roundings of spec §4.3/§6 (M = f16(qsm·prescale/256), S = f16(c²·M), w = f16((q−z)·S)).
Every fp16×fp16 product is exact in fp32, so computing in fp32 and rounding once to fp16 emulates the GPU.

All integer tensors on disk are bit containers: int32 words are read as uint32 values held in int64,
because a right shift on signed int32 is arithmetic.

Nothing here imports `exlq.quant`; the writer (`exlq.quant.exl2_pack`) builds on these helpers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from exlq.errors import ExlqError
from exlq.runtime import kernels
from exlq.runtime.kernels.fused_ops import Deferred, PendingNorm, as_tensor
from exlq.runtime.weights import WeightStore

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
#: Tensors every EXL2 linear must have (spec §1); `bias` is optional and `q_perm` is ignored.
REQUIRED_SUFFIXES = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")
#: Largest K whose permutation indices survive ExLlamaV2's cast to (u)int16 (spec §2.5).
MAX_IN_FEATURES = 65536

#: A group layout: (bits, rows) per group, in stored-row order.
Layout = list[tuple[int, int]]


def padded_width(out_features: int) -> int:
    """N_pad = 32·⌈N/32⌉: the column count ExLlamaV2 expects on disk."""
    return -(-out_features // 32) * 32


def as_uint32_values(words: torch.Tensor) -> torch.Tensor:
    """int32 bit containers → their unsigned values in int64, so that shifts are logical."""
    return words.to(torch.int64) & 0xFFFFFFFF


def as_int32_words(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 → the int32 words with the same bits (explicit wrap)."""
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def bit_positions(rows: int, bits: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(word index, bit shift) of each group-relative row's field in the group's bit string (spec §3.2)."""
    pos = torch.arange(rows, dtype=torch.int64, device=device) * bits
    return pos // 32, pos % 32


def group_word_offsets(layout: Layout) -> list[int]:
    """o_g: the first `q_weight` row of each group (a running sum of r·b/32, spec §2.3)."""
    offsets, acc = [], 0
    for bits, rows in layout:
        offsets.append(acc)
        acc += rows * bits // 32
    return offsets


def row_bits(layout: Layout, device: torch.device | None = None) -> torch.Tensor:
    """The bit width of every stored weight row [K] (int64)."""
    return torch.repeat_interleave(
        torch.tensor([b for b, _ in layout], device=device), torch.tensor([r for _, r in layout], device=device)
    )


def row_groups(layout: Layout, device: torch.device | None = None) -> torch.Tensor:
    """The group index of every stored weight row [K] (int64)."""
    return torch.repeat_interleave(torch.arange(len(layout), device=device), torch.tensor([r for _, r in layout], device=device))


def group_row_starts(layout: Layout) -> list[int]:
    """a_g: the first stored weight row of each group."""
    starts, acc = [], 0
    for _, rows in layout:
        starts.append(acc)
        acc += rows
    return starts


def unpack_group(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Codes int64 [rows, N] of one group from its uint32 values [rows·bits/32, N].

    A field may straddle two words (3/5/6-bit); joining each word with the low byte of the next one
    gives a ≤40-bit window that always holds the whole field.
    """
    word, shift = bit_positions(rows, bits, words.device)
    lo = words[word]
    hi = words[(word + 1).clamp(max=words.shape[0] - 1)]
    joined = lo | ((hi & 0xFF) << 32)
    return (joined >> shift[:, None]) & ((1 << bits) - 1)


def decode_q_groups(
    q_groups: torch.Tensor, word_rows: int, name: str = "q_groups", weight_name: str = "q_weight"
) -> Layout:
    """`q_groups` (pairs of bits, word offset) + `q_weight.shape[0]` → [(bits, rows)] (spec §2.4).

    Unlike ExLlamaV2's floor division, a group whose words do not hold a whole number of rows is an
    error: such a file is corrupt, not a layout.
    """
    if q_groups.dim() != 1 or q_groups.numel() == 0 or q_groups.numel() % 2:
        shape = list(q_groups.shape)
        raise ExlqError(f"{name} must be a non-empty 1-D list of (bits, offset) pairs, got shape {shape}")
    pairs = q_groups.to(torch.int64).view(-1, 2).tolist()
    offsets = [o for _, o in pairs]
    if offsets[0] != 0:
        raise ExlqError(f"{name}: the first group must start at q_weight row 0, not {offsets[0]}")
    layout: Layout = []
    for g, ((bits, start), end) in enumerate(zip(pairs, offsets[1:] + [word_rows])):
        if bits not in SUPPORTED_BITS:
            raise ExlqError(f"{name}: group {g} has {bits} bits; EXL2 supports {SUPPORTED_BITS}")
        if end <= start or ((end - start) * 32) % bits:
            raise ExlqError(
                f"{name}: group {g} spans rows {start}..{end} of {weight_name} ({word_rows} rows), "
                f"which is not a positive whole number of {bits}-bit rows"
            )
        layout.append((bits, (end - start) * 32 // bits))
    return layout


def check_descending(layout: Layout, name: str = "q_groups") -> None:
    """Groups must be in non-increasing bit order: ExLlamaV2 walks the widths 8→6→5→4→3→2 (spec §2.2)."""
    bits = [b for b, _ in layout]
    if any(a < b for a, b in zip(bits, bits[1:])):
        raise ExlqError(f"{name}: group bit widths {bits} are not in descending order, which ExLlamaV2 misreads")


def unpack_q_weight(q_weight: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Codes [K, N_pad] int16 in stored row order (unsigned, 0 ≤ q < 2^b)."""
    words = as_uint32_values(q_weight)
    codes = torch.empty(sum(r for _, r in layout), q_weight.shape[1], dtype=torch.int16, device=q_weight.device)
    for (bits, rows), a, o in zip(layout, group_row_starts(layout), group_word_offsets(layout)):
        codes[a : a + rows] = unpack_group(words[o : o + rows * bits // 32], bits, rows).to(torch.int16)
    return codes


def unpack_q_scale(q_scale: torch.Tensor) -> torch.Tensor:
    """Scale codes c ∈ 1…16, int16 [G, 8·q_scale.shape[1]]; column 8m+i is nibble i of word m (spec §4.1)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q_scale.device)
    nibbles = (as_uint32_values(q_scale)[..., None] >> shifts) & 0xF
    return (nibbles.reshape(q_scale.shape[0], -1) + 1).to(torch.int16)


def pack_q_scale(scale_codes: torch.Tensor) -> torch.Tensor:
    """Scale codes c ∈ 1…16 [G, N] → `q_scale` int32 [G, N/8]; nibble i of word m holds c(8m+i) − 1."""
    codes = scale_codes.to(torch.int64)
    if codes.numel() and (codes.min() < 1 or codes.max() > 16):
        raise ExlqError("scale codes must lie in 1..16")
    if codes.shape[1] % 8:
        raise ExlqError(f"q_scale packs 8 columns per word; {codes.shape[1]} columns is not a multiple of 8")
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)
    words = ((codes - 1).reshape(codes.shape[0], -1, 8) << shifts).sum(-1)
    return as_int32_words(words)


def scale_multipliers(q_scale_max: torch.Tensor, prescale: float = 1.0) -> torch.Tensor:
    """M_g = f16(f32(q_scale_max) × f32(prescale/256)): ExLlamaV2's in-place load-time multiply (§4.3 step 1)."""
    factor = torch.tensor(prescale / 256, dtype=torch.float32, device=q_scale_max.device)
    return (q_scale_max.to(torch.float16).float() * factor).half()


def effective_scales(scale_codes: torch.Tensor, q_scale_max: torch.Tensor, prescale: float = 1.0) -> torch.Tensor:
    """S[g, n] = f16(c² × M_g), fp16 [G, N] (§4.3 step 2); c² ≤ 256 is exact in fp16."""
    c_squared = (scale_codes.to(torch.int32) ** 2).half()
    return (c_squared.float() * scale_multipliers(q_scale_max, prescale).float()[:, None]).half()


def perm_from_invperm(q_invperm: torch.Tensor, name: str = "q_invperm") -> torch.Tensor:
    """perm = argsort(q_invperm): stored row i holds original input channel perm[i] (spec §5)."""
    inv = q_invperm.to(torch.int64)
    if not torch.equal(torch.sort(inv).values, torch.arange(inv.numel(), device=inv.device)):
        raise ExlqError(f"{name} is not a permutation of 0..{inv.numel() - 1}")
    return torch.argsort(inv)


def dequantize_stored(
    q_weight: torch.Tensor,
    q_scale: torch.Tensor,
    q_scale_max: torch.Tensor,
    q_groups: torch.Tensor,
    prescale: float = 1.0,
) -> torch.Tensor:
    """Wt in stored (act-order) row order, fp16 [K, N_pad]: `reconstruct` without a permutation."""
    layout = decode_q_groups(q_groups, q_weight.shape[0])
    check_descending(layout)
    _check_scale_shapes(q_weight, q_scale, q_scale_max, len(layout))
    scales = effective_scales(unpack_q_scale(q_scale), q_scale_max, prescale)
    words = as_uint32_values(q_weight)
    out = torch.empty(sum(r for _, r in layout), q_weight.shape[1], dtype=torch.float16, device=q_weight.device)
    for g, ((bits, rows), a, o) in enumerate(zip(layout, group_row_starts(layout), group_word_offsets(layout))):
        codes = unpack_group(words[o : o + rows * bits // 32], bits, rows)
        out[a : a + rows] = ((codes - (1 << (bits - 1))).float() * scales[g].float()).half()
    return out


def dequantize(
    q_weight: torch.Tensor,
    q_scale: torch.Tensor,
    q_scale_max: torch.Tensor,
    q_groups: torch.Tensor,
    q_invperm: torch.Tensor,
    prescale: float = 1.0,
) -> torch.Tensor:
    """Wt in original input-channel order, fp16 [K, N_pad], bit-exact with ExLlamaV2's `reconstruct` (§6).

    The HF weight is `dequantize(...)[:, :N].T`; padded columns ≥ N are left for the caller to drop.
    """
    stored = dequantize_stored(q_weight, q_scale, q_scale_max, q_groups, prescale)
    if q_invperm.numel() != stored.shape[0]:
        raise ExlqError(f"q_invperm has {q_invperm.numel()} entries but q_groups describe {stored.shape[0]} rows")
    out = torch.empty_like(stored)
    out[perm_from_invperm(q_invperm)] = stored
    return out


def _check_scale_shapes(q_weight: torch.Tensor, q_scale: torch.Tensor, q_scale_max: torch.Tensor, groups: int) -> None:
    """The cross-tensor shape rules of `make_q_matrix` (spec §1), for callers of the bare functions."""
    if q_weight.dim() != 2 or q_weight.shape[1] % 32:
        raise ExlqError(f"q_weight must be [rows, N_pad] with N_pad a multiple of 32, got {list(q_weight.shape)}")
    if tuple(q_scale.shape) != (groups, q_weight.shape[1] // 8):
        raise ExlqError(f"q_scale has shape {list(q_scale.shape)}, expected {[groups, q_weight.shape[1] // 8]}")
    if tuple(q_scale_max.shape) != (groups,):
        raise ExlqError(f"q_scale_max has shape {list(q_scale_max.shape)}, expected [{groups}]")


# ----- the stored tensors of one layer -----

_DTYPES = {
    "q_weight": (torch.int32,),
    "q_scale": (torch.int32,),
    "q_scale_max": (torch.float16,),
    "q_groups": (torch.int16,),
    "q_invperm": (torch.int32, torch.int16),
    "bias": (torch.float16, torch.bfloat16, torch.float32),
}


@dataclass
class Exl2Tensors:
    """The on-disk tensors of one EXL2 linear (spec §1), as stored: what the writer produces and the loader reads."""

    q_weight: torch.Tensor  # int32 [Σ r·b/32, N_pad]
    q_scale: torch.Tensor  # int32 [G, N_pad/8]
    q_scale_max: torch.Tensor  # fp16 [G]
    q_groups: torch.Tensor  # int16 [2G]
    q_invperm: torch.Tensor  # int32 [K]
    bias: torch.Tensor | None = None  # fp16 [N_pad]

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors keyed `<prefix>.<suffix>`, ready for `safetensors.torch.save_file`."""
        return {f"{prefix}.{f.name}": t for f in fields(self) if (t := getattr(self, f.name)) is not None}

    @classmethod
    def from_store(
        cls, store: WeightStore, prefix: str, device: torch.device | str | None, *, bias: bool
    ) -> Exl2Tensors:
        """Read `<prefix>.q_*` in their stored dtypes; missing tensors are named in the error."""
        for suffix in REQUIRED_SUFFIXES:
            if f"{prefix}.{suffix}" not in store:
                raise ExlqError(
                    f"tensor {prefix}.{suffix} is missing: an EXL2 layer needs {', '.join(REQUIRED_SUFFIXES)}"
                )
        bias_name = f"{prefix}.bias"
        if bias and bias_name not in store:
            raise ExlqError(f"tensor {bias_name} is missing, but config.json says the layer has a bias")
        tensors = {s: store.get(f"{prefix}.{s}", None, device) for s in REQUIRED_SUFFIXES}
        b = store.get(bias_name, None, device) if bias_name in store else None
        return cls(**tensors, bias=b)

    def validate(self, in_features: int, out_features: int, prefix: str = "<layer>") -> Layout:
        """Check dtypes and shapes against the layer's features; returns the group layout."""
        n_pad = padded_width(out_features)
        for f in fields(self):
            t = getattr(self, f.name)
            if t is not None and t.dtype not in _DTYPES[f.name]:
                allowed = " or ".join(str(d).removeprefix("torch.") for d in _DTYPES[f.name])
                raise ExlqError(f"tensor {prefix}.{f.name} has dtype {t.dtype}, EXL2 stores it as {allowed}")
        groups = self.q_scale_max.numel()
        if self.q_scale_max.dim() != 1 or groups == 0:
            shape = list(self.q_scale_max.shape)
            raise ExlqError(f"tensor {prefix}.q_scale_max must be 1-D with one entry per group, got shape {shape}")
        if self.q_weight.dim() != 2 or self.q_weight.shape[1] != n_pad:
            self._shape_error(prefix, "q_weight", ("rows", n_pad), in_features, out_features)
        expect = {
            "q_scale": (groups, n_pad // 8),
            "q_groups": (2 * groups,),
            "q_invperm": (in_features,),
            "bias": (n_pad,),
        }
        for name, shape in expect.items():
            tensor = getattr(self, name)
            if tensor is not None and tuple(tensor.shape) != shape:
                self._shape_error(prefix, name, shape, in_features, out_features)
        layout = decode_q_groups(self.q_groups, self.q_weight.shape[0], f"{prefix}.q_groups", f"{prefix}.q_weight")
        check_descending(layout, f"{prefix}.q_groups")
        rows = sum(r for _, r in layout)
        if rows != in_features:
            raise ExlqError(
                f"tensor {prefix}.q_weight has {self.q_weight.shape[0]} word rows, which {prefix}.q_groups "
                f"splits into {rows} input rows, but the layer has in_features={in_features}"
            )
        if in_features > MAX_IN_FEATURES:
            raise ExlqError(f"{prefix}: EXL2 supports in_features ≤ {MAX_IN_FEATURES}, got {in_features}")
        perm_from_invperm(self.q_invperm, f"tensor {prefix}.q_invperm")
        return layout

    def _shape_error(self, prefix: str, name: str, shape: tuple, in_features: int, out_features: int) -> None:
        raise ExlqError(
            f"tensor {prefix}.{name} has shape {list(getattr(self, name).shape)}, expected {list(shape)} "
            f"(in_features={in_features}, out_features={out_features} padded to {padded_width(out_features)}, "
            f"{self.q_scale_max.numel()} groups)"
        )

    def total_bits(self) -> int:
        """Bits of the stored tensors: §13's payload (q_weight, q_scale, q_scale_max, q_groups, q_invperm, bias)."""
        return sum(t.numel() * t.element_size() * 8 for f in fields(self) if (t := getattr(self, f.name)) is not None)

    def bits_per_weight(self) -> float:
        """total_bits / (K·N_pad [+ N_pad with a bias]): the converter's accounting (§13), padded N included."""
        n_pad = self.q_weight.shape[1]
        weights = self.q_invperm.numel() * n_pad + (n_pad if self.bias is not None else 0)
        return self.total_bits() / weights

    def with_output_order(self, order: torch.Tensor) -> Exl2Tensors:
        """The same layer with its outputs reordered: output j is this layer's output order[j] (`order` a permutation
        of the N = len(order) outputs; padding columns stay last). Columns are independent in EXL2, so this moves
        q_weight's columns, their scale nibbles in q_scale and the bias."""
        n_pad = self.q_weight.shape[1]
        columns = torch.cat([order.to(self.q_weight.device, torch.int64),
                             torch.arange(order.numel(), n_pad, device=self.q_weight.device)])
        return replace(
            self,
            q_weight=self.q_weight[:, columns].contiguous(),
            q_scale=pack_q_scale(unpack_q_scale(self.q_scale)[:, columns]),
            bias=None if self.bias is None else self.bias[columns].contiguous(),
        )

    def with_stored_input_order(self) -> Exl2Tensors:
        """The same products for inputs given in stored row order: input j is this layer's input perm[j] (its
        act-order permutation), so no permutation is left (q_invperm the identity)."""
        return replace(self, q_invperm=torch.arange(self.q_invperm.numel(), dtype=self.q_invperm.dtype,
                                                    device=self.q_invperm.device))

    def dequantize(self, prescale: float = 1.0) -> torch.Tensor:
        """Wt fp16 [K, N_pad] in original row order (see `dequantize`)."""
        return dequantize(self.q_weight, self.q_scale, self.q_scale_max, self.q_groups, self.q_invperm, prescale)

    def weight(self, out_features: int, prescale: float = 1.0) -> torch.Tensor:
        """The exact fp16 weight in HF layout [out_features, in_features] (padded columns dropped)."""
        return self.dequantize(prescale)[:, :out_features].T

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], prefix: str) -> Exl2Tensors:
        """The inverse of `state_dict`: this layer's `<prefix>.<suffix>` tensors out of a flat dict."""
        names = {f.name for f in fields(cls)}
        start = len(prefix) + 1
        return cls(**{k[start:]: v for k, v in tensors.items() if k.startswith(f"{prefix}.") and k[start:] in names})


# ----- the runtime layer -----


class Exl2Linear(nn.Module):
    """An EXL2-quantized linear layer: CUDA kernels on the packed data, or the torch reference path.

    The stored tensors are kept as buffers, exactly as on disk. On a GPU with kernels enabled
    (`exlq.runtime.kernels.enabled`) and fp16/bf16 activations, the kernels read them directly
    (`exlq.runtime.kernels.exl2_ops`): no dense copy is ever made. Otherwise (CPU, fp32, old GPUs) the
    first forward dequantizes them once into a dense [out, in] weight in the compute dtype and caches
    it: a 4-bit layer then costs its packed size plus 2 (fp16) or 4 (fp32) bytes per weight, i.e. no
    memory saving over a dense model, in exchange for plain `F.linear` speed. `clear_cache()` drops it.
    """

    def __init__(
        self,
        tensors: Exl2Tensors,
        in_features: int,
        out_features: int,
        *,
        dtype: torch.dtype = torch.float16,
        prescale: float = 1.0,
        prefix: str = "<layer>",
    ):
        super().__init__()
        self.layout = tensors.validate(in_features, out_features, prefix)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.prescale = dtype, prescale
        for f in fields(tensors):
            self.register_buffer(f.name, getattr(tensors, f.name))
        #: Stored bits per weight, spec §13 (padded N; q_invperm and bias included).
        self.bits_per_weight = tensors.bits_per_weight()
        self._dense: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._plan = None  # kernel tables (exl2_ops.Exl2Plan), built on the first kernel forward
        #: Where reorder_outputs / read_stored_order moved the features (None: as in the file): output j is the
        #: file's output feature_order_out[j], input j its input feature_order_in[j] (LoRA terms follow them).
        self.feature_order_out: torch.Tensor | None = None
        self.feature_order_in: torch.Tensor | None = None

    @classmethod
    def can_load(cls, store: WeightStore, prefix: str) -> bool:
        return f"{prefix}.q_weight" in store

    @classmethod
    def load(cls, store, prefix, in_features, out_features, bias, dtype, device) -> Exl2Linear:
        tensors = Exl2Tensors.from_store(store, prefix, device, bias=bias)
        return cls(tensors, in_features, out_features, dtype=dtype, prefix=prefix)

    @property
    def tensors(self) -> Exl2Tensors:
        return Exl2Tensors(**{f.name: getattr(self, f.name) for f in fields(Exl2Tensors)})

    def dequantized_weight(self) -> torch.Tensor:
        """The exact fp16 weight in HF layout [out_features, in_features] (padded columns dropped)."""
        return self.tensors.weight(self.out_features, self.prescale)

    def clear_cache(self) -> None:
        self._dense = None
        self._plan = None

    def stored_input_order(self) -> torch.Tensor | None:
        """The order this layer's GEMV reads its input in (its act-order permutation: stored row r holds input
        channel perm[r]), or None where that is the input's own order."""
        perm = perm_from_invperm(self.q_invperm)
        return None if torch.equal(perm, torch.arange(perm.numel(), device=perm.device)) else perm

    def reorder_outputs(self, order: torch.Tensor) -> None:
        """Compute output j as the current output order[j] (Exl2Tensors.with_output_order): the same products."""
        self._set_tensors(self.tensors.with_output_order(order))
        order = order.to("cpu", torch.int64)
        self.feature_order_out = order if self.feature_order_out is None else self.feature_order_out[order]

    def read_stored_order(self) -> None:
        """Take the input in stored row order from now on (input j: the current input perm[j]), so the GEMV reads it
        from consecutive addresses; whatever produces the input must reorder its outputs to match."""
        perm = perm_from_invperm(self.q_invperm).cpu()
        self._set_tensors(self.tensors.with_stored_input_order())
        self.feature_order_in = perm if self.feature_order_in is None else self.feature_order_in[perm]

    def _set_tensors(self, tensors: Exl2Tensors) -> None:
        for f in fields(tensors):
            setattr(self, f.name, getattr(tensors, f.name))
        self.clear_cache()

    def _dense_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._dense is None or self._dense[0].device != self.q_weight.device:
            # Plain tensors even under inference_mode, so the cache is usable in any later mode.
            with torch.inference_mode(False), torch.no_grad():
                weight = self.dequantized_weight().to(self.compute_dtype).contiguous()
                bias = None if self.bias is None else self.bias[: self.out_features].to(self.compute_dtype)
            self._dense = (weight, bias)
        return self._dense

    def kernel_plan(self):
        """The kernels' tables for this layer on its current device (built once)."""
        from exlq.runtime.kernels.exl2_ops import build_plan

        if self._plan is None or self._plan.q_weight.data_ptr() != self.q_weight.data_ptr():
            self._plan = build_plan(self.tensors, self.layout, self.out_features, self.prescale)
        return self._plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.applies(x):
            from exlq.runtime.kernels.exl2_ops import matmul

            return matmul(self.kernel_plan(), x)
        weight, bias = self._dense_weight()
        return F.linear(x, weight, bias)

    def forward_gated(self, gate: torch.Tensor | Deferred, up: torch.Tensor | Deferred,
                      unfinished: bool = False) -> torch.Tensor | Deferred:
        """self(silu(gate) * up) (down_proj of a gated MLP); on the GPU the GEMV forms its input as it reads it, from
        gate/up's unfinished sums where they come Deferred (exl2_ops.matmul_gated). `unfinished`: as
        forward_unfinished."""
        if not kernels.applies(gate):
            return self(F.silu(as_tensor(gate)) * as_tensor(up))
        from exlq.runtime.kernels.exl2_ops import matmul_gated

        return matmul_gated(self.kernel_plan(), gate, up, unfinished)

    def forward_unfinished(self, x: torch.Tensor) -> torch.Tensor | Deferred:
        """self(x), except that on the GPU a one-row product may come back unfinished (exl2_ops.PendingSums), for the
        residual add after it (the next norm) to end in its own launch."""
        if not kernels.applies(x):
            return self(x)
        from exlq.runtime.kernels.exl2_ops import matmul_unfinished

        return matmul_unfinished([self.kernel_plan()], x)[0]

    @staticmethod
    def forward_many(layers: list[Exl2Linear], x: torch.Tensor | PendingNorm,
                     deferred: bool = False) -> list[torch.Tensor | Deferred]:
        """[layer(x) for layer in layers]; on the GPU one kernel launch for all (few-row x), because for small
        models each launch costs more than the product itself. A pending norm goes to that launch, which forms it as
        it gathers its input (exl2_ops.gemv). `deferred`: one-row products may come back unfinished
        (exl2_ops.PendingSums), for the launch that reads them next to end (q/k/v's: RoPE's)."""
        if not kernels.applies(x):
            x = as_tensor(x)
            return [layer(x) for layer in layers]
        from exlq.runtime.kernels.exl2_ops import matmul_many, matmul_unfinished

        plans = [layer.kernel_plan() for layer in layers]
        return matmul_unfinished(plans, x) if deferred else matmul_many(plans, x)

    def extra_repr(self) -> str:
        bits = "/".join(str(b) for b in dict.fromkeys(b for b, _ in self.layout))
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"groups={len(self.layout)}, bits={bits}, bpw={self.bits_per_weight:.3f}"
        )
