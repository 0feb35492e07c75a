"""Fused element-wise kernels of the decode step (`cuda/fused.cu`): residual add + RMSNorm (which can also end the
unfinished sums of the product before it), SiLU gate; and values left for the next launch to produce on the way
(`Deferred`): the residual add + RMSNorm left pending for the next GEMV to fold into its gather (`PendingNorm`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from exlq.errors import ExlqError
from exlq.runtime.kernels import ACTIVATION_TAGS
from exlq.runtime.kernels.launch import allow_shared, kernel, launch

SOURCE = "fused.cu"
_TAGS = ACTIVATION_TAGS
NORM_PER_THREAD = 16  # NORM_PER_THREAD in the .cu: values of a row each thread of add_rms_norm holds
NORM_MAX_HIDDEN = NORM_PER_THREAD * 1024  # longer rows take the torch path (layers.RMSNorm)
INSTANCES = tuple(f"{name}<{tag}>" for name in ("add_rms_norm", "finish_add_rms_norm", "silu_mul", "rope_store",
                                               "finish_rope_store") for tag in _TAGS.values())


#: Leave a one-row decode step's residual add + RMSNorm pending for the q/k/v and gate/up GEMVs: a streamed one folds
#: it into its activation gather, others read finish_add_rms_norm's output (exl2_ops.gemv; docs/benchmarks.md,
#: sessions 29-31). EXLQ_NORM_FOLD=0: add_rms_norm before each, as before.
NORM_FOLD = os.environ.get("EXLQ_NORM_FOLD", "1") != "0"
#: rope_store ends one token's q/k/v left as their GEMV's sums (finish_rope_store), so no exl2_finish runs before it.
#: EXLQ_ROPE_FINISH=0: exl2_finish first, as before (an A/B switch: the same launches otherwise).
ROPE_FINISH = os.environ.get("EXLQ_ROPE_FINISH", "1") != "0"


@dataclass
class UnfinishedSums:
    """A one-row product's fp32 sums, still in its GEMV's workspace, and its bias: the delta add_rms_norm can end in
    its own launch (T(sums + bias), as exl2_finish would write it), re-zeroing the sums."""

    sums: torch.Tensor  # [n_pad] fp32
    bias: torch.Tensor | None  # [n_pad] fp32
    #: fp32 sums the product's input was gathered from (gate/up's, for down_proj), re-zeroed by the launch that ends
    #: this product (exl2_ops.matmul_gated)
    extra: torch.Tensor | None = None


def extra_operands(extra: torch.Tensor | None) -> tuple:
    """The `extra, extra_count` operands of a kernel that ends a product (UnfinishedSums.extra): none is (null, 0)."""
    return (None, 0) if extra is None else (extra, extra.numel())


def add_rms_norm(
    residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
    new_residual: torch.Tensor | None = None, sums: UnfinishedSums | None = None, order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + delta in float32, weight * norm(that) in weight's dtype); delta None: just the norm.
    `new_residual`: where the sum goes (a fresh tensor by default). `sums` (one row, delta None): the delta is that
    product's, ended here (no exl2_finish launch before). `order` (int32 [hidden]): output i is the norm's channel
    order[i] (OutputOrder); the residual keeps its own."""
    hidden = weight.numel()
    residual = residual.contiguous()
    rows = residual.numel() // hidden
    if sums is not None and (delta is not None or rows != 1):
        raise ExlqError("add_rms_norm ends unfinished sums of one row, in place of a delta")
    if delta is None and sums is None:
        new_residual = residual
    elif new_residual is None:
        new_residual = torch.empty_like(residual)
    out = torch.empty(residual.shape, dtype=weight.dtype, device=residual.device)
    threads = min(1024, max(32, -(-hidden // 8 // 32) * 32))  # about 8 values a thread
    if hidden > NORM_MAX_HIDDEN:
        raise ExlqError(f"the fused RMSNorm kernel holds at most {NORM_MAX_HIDDEN} values a row, not {hidden}")
    if sums is None:
        name, operands = "add_rms_norm", (residual, None if delta is None else delta.contiguous(), weight)
    else:
        name, operands = "finish_add_rms_norm", (residual, sums.sums, sums.bias, sums.sums.numel(), weight)
    function = kernel(SOURCE, INSTANCES, f"{name}<{_TAGS[weight.dtype]}>", residual.device)
    extra = () if sums is None else extra_operands(sums.extra)
    shared = 0 if order is None else hidden * 4  # the output row and the order, staged
    if shared:
        allow_shared(function, shared)
    launch(function, (rows, 1, 1), (threads, 1, 1), (*operands, new_residual, out, hidden, float(eps), *extra, order),
           residual.device, overlap=True, shared_bytes=shared)
    return new_residual, out


class Deferred:
    """A value a kernel has yet to produce, left for the launch that reads it next to produce on the way (no kernel of
    its own); `tensor()` produces it for any other reader. Its shape, device and (unless a subclass says otherwise)
    dtype are those of `_shaped()`."""

    def tensor(self) -> torch.Tensor:
        raise NotImplementedError

    def _shaped(self) -> torch.Tensor:
        """A tensor of this value's shape, on its device."""
        raise NotImplementedError

    @property
    def shape(self) -> torch.Size:
        return self._shaped().shape

    @property
    def device(self) -> torch.device:
        return self._shaped().device

    @property
    def dtype(self) -> torch.dtype:
        return self._shaped().dtype

    def unfinished(self) -> bool:
        """Whether this value is a product's unfinished sums that take_sums would hand over."""
        return False

    def take_sums(self) -> UnfinishedSums | None:
        """The unfinished sums this value is, handed over to the one launch that ends them (then never again); None
        where it is not such sums."""
        return None


@dataclass(frozen=True)
class OutputOrder:
    """A norm's output in the order its readers store their input rows (layers.RMSNorm.put_output_in_order)."""

    order: torch.Tensor  # int32 [hidden]: output i is channel order[i]
    slot: torch.Tensor  # int32 [hidden]: channel c is output slot[c] (a fold lays residual + delta out by it)
    weight: torch.Tensor  # [hidden]: the norm's weight in the output's order (what a fold reads)


@dataclass
class PendingNorm(Deferred):
    """weight * norm(residual + delta) of one row, not computed yet: a GEMV that takes it (`exl2_ops.gemv`) forms it
    as it gathers its input, after exl2_finish_norm (the end of the product delta comes from, the residual add and the
    norm's sums of squares in one launch), so the decode step runs no norm kernel; anything else calls `tensor()`.
    Whoever consumes it writes residual + delta (fp32) into `new_residual`, which the layer keeps as its residual.
    With `ordered`, the output is in that order."""

    residual: torch.Tensor  # [..., hidden] fp32, one row
    delta: torch.Tensor | Deferred  # [..., hidden] in weight's dtype (exl2_ops.PendingSums: a product's sums)
    weight: torch.Tensor  # [hidden]
    eps: float
    new_residual: torch.Tensor  # [..., hidden] fp32, written by the consumer
    ordered: OutputOrder | None = None  # the output's order (None: the channels' own)
    fold: tuple | None = None  # exl2_ops.norm_fold's (NormFold, its partial sums, its ordered residual), once launched
    _out: torch.Tensor | None = None

    @staticmethod
    def possible(residual: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether a GEMV could fold this norm: one contiguous row."""
        return NORM_FOLD and residual.numel() == weight.numel() and residual.is_contiguous()

    def _shaped(self) -> torch.Tensor:
        return self.residual

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def tensor(self) -> torch.Tensor:
        """The norm's output, by the add_rms_norm kernel (once; it writes new_residual too, unless a fold did, and ends
        the delta's product when that is unfinished)."""
        if self._out is None:
            order = None if self.ordered is None else self.ordered.order
            if self.fold is not None:  # new_residual already holds residual + delta
                self._out = add_rms_norm(self.new_residual, None, self.weight, self.eps, order=order)[1]
            else:  # a product's sums end inside the norm's launch
                sums = self.delta.take_sums() if isinstance(self.delta, Deferred) else None
                delta = None if sums is not None else as_tensor(self.delta)
                self._out = add_rms_norm(self.residual, delta, self.weight, self.eps, self.new_residual, sums,
                                         order)[1]
        return self._out


def as_tensor(x: torch.Tensor | Deferred) -> torch.Tensor:
    """x itself, or a deferred value produced now."""
    return x.tensor() if isinstance(x, Deferred) else x


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """T(silu(gate)) * up, as `F.silu(gate) * up` computes it in gate's dtype."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    blocks = min(-(-n // 256), 4096)
    function = kernel(SOURCE, INSTANCES, f"silu_mul<{_TAGS[gate.dtype]}>", gate.device)
    launch(function, (max(blocks, 1), 1, 1), (256, 1, 1), (gate, up, out, n), gate.device, overlap=True)
    return out


def ends_token_sums(q: torch.Tensor | Deferred, k: torch.Tensor | Deferred, v: torch.Tensor | Deferred) -> bool:
    """Whether one token of one sequence has q, k and v [B, T, ...] all still their GEMV's unfinished sums, for the
    launch after them to end (finish_rope_store, or the attention's: attention.AttentionBatch.attention), with
    ROPE_FINISH on."""
    return (ROPE_FINISH and math.prod(q.shape[:2]) == 1
            and all(isinstance(t, Deferred) and t.unfinished() for t in (q, k, v)))


def rope_store(
    q: torch.Tensor | Deferred,
    k: torch.Tensor | Deferred,
    v: torch.Tensor | Deferred,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    position: torch.Tensor | int,
) -> torch.Tensor:
    """RoPE on q [B, T, Hq·D] and k [B, T, Hkv·D] (or [B, T, H, D]), k and v appended to the caches [B, Hkv, S, D] at
    `position`; one token's q, k and v left as their GEMV's unfinished sums (Deferred) are ended by the same launch
    (finish_rope_store: no exl2_finish before it), others produced first.

    `position` is the first cache position written: an int, or a [1] int64 device tensor (CUDA graphs).
    Returns the rotated queries [B, Hq, T, D]; rounding as `apply_rotary` in the cache dtype.
    """
    bsz, tokens = q.shape[:2]
    dim = cos.shape[-1]
    q_heads, kv_heads = math.prod(q.shape[2:]) // dim, math.prod(k.shape[2:]) // dim
    q_out = torch.empty(bsz, q_heads, tokens, dim, dtype=q.dtype, device=q.device)
    device_position = position if isinstance(position, torch.Tensor) else None
    where = (device_position, 0 if device_position is not None else int(position))
    tables = (cos.contiguous(), sin.contiguous(), q_out, key_cache, value_cache, *where)
    if ends_token_sums(q, k, v):
        sums = [t.take_sums() for t in (q, k, v)]
        name, operands = "finish_rope_store", (*(x for s in sums for x in (s.sums, s.bias)), *tables)
    else:
        name, operands = "rope_store", (*(as_tensor(t).contiguous() for t in (q, k, v)), *tables, tokens)
    function = kernel(SOURCE, INSTANCES, f"{name}<{_TAGS[q.dtype]}>", q.device)
    launch(function, (bsz * tokens, q_heads + kv_heads, 1), (dim // 2, 1, 1),
           (*operands, q_heads, kv_heads, dim, key_cache.shape[2]), q.device, overlap=True)
    return q_out
