"""EXL2 matrix products on the GPU: host-side tables for `cuda/exl2_matmul.cu` and the dispatch by row count.

Decode (at most `GEMV_MAX_ROWS` activation rows) streams the packed weights once per launch of up to `GEMV_ROWS[0]`
rows with the split-K GEMV kernel, which also multiplies up to `MAX_GROUP` matrices of the same input in one
launch (q/k/v, gate/up: `matmul_many`); prefill dequantizes the layer to a dense fp16/bf16 matrix and lets
cuBLAS do the product, which is cheaper than a quantized kernel once the product is compute bound.

The packed tensors stay exactly as stored (no load-time re-layout); the kernels need only a chunk table
(≤ 128 rows of one width each, one group or several small ones), the K-split boundaries, the act-order
permutation and the group scale multipliers M_g = f16(q_scale_max · prescale / 256), all built once per
layer by `build_plan`.

Two GEMV kernels. `exl2_mma.cu` (tensor cores) takes launches of 4 to 16 fp16 activation rows for layers whose
groups are whole 32-row blocks (every converter layout with K a multiple of 32): on the H200 it is 7-33 % faster
than `exl2_matmul.cu` at 4 and 8 rows, but 14-26 % slower at 1-2 rows (docs/benchmarks.md, session 10). Its mma
takes 8 rows whatever the launch holds, and 9-16 rows two mma on the same decoded weights, so 5-7 and 9-16 rows are
one launch (`launch_rows`), not 4 + 1-3 or 8 + 1-8 reading the weights twice.
`exl2_matmul.cu` (one column a thread) takes everything else: 1-3 rows, bf16, layers with a short last group.
`MMA = False` (EXLQ_MMA=0) forces it everywhere. Launches of 1-3 rows whose matrices are all at least `WIDE_MIN_COLUMNS` wide take its "wide"
instances instead: 2 adjacent columns a thread (one 8-byte load a word row), so the per-block work (activation
gather, chunk walk, split-K epilogue) is shared by twice the weights. On Hopper, one fp16 row of launches up to
`exl2_stream_ops.MAX_BYTES` takes the streamed kernel (`exl2_stream_ops`) instead, and launches of 4 to 16 fp16 rows
its multi-row instances where their block fits (`exl2_stream_ops.applies_rows`).

At decode, a one-row product the residual stream adds next (o_proj's, down_proj's) may come back unfinished
(`PendingSums`, through `matmul_unfinished`), and a pending norm (`fused_ops.PendingNorm`) is handed to the GEMV as
is: the next norm's launch ends the product (`norm_fold`: exl2_finish_norm before a streamed GEMV, which folds the
norm into its gather; else fused_ops.add_rms_norm), so no launch is spent on that product's end alone. So do q/k/v's
(RoPE ends them: fused_ops.rope_store) and gate/up's (down_proj's GEMV gathers from them: matmul_gated).
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from exlq.runtime.exl2 import (
    Exl2Tensors, Layout, group_row_starts, group_word_offsets, perm_from_invperm, row_bits, scale_multipliers,
)
from exlq.runtime.kernels import ACTIVATION_TAGS, exl2_stream_ops
from exlq.runtime.kernels.fused_ops import (
    Deferred, PendingNorm, UnfinishedSums, as_tensor, extra_operands, silu_mul,
)
from exlq.runtime.kernels.launch import blocks_per_sm, device_index, kernel, launch
from exlq.runtime.kernels.workspace import Workspace

SOURCE = "exl2_matmul.cu"
MMA_SOURCE = "exl2_mma.cu"
#: Use the tensor-core GEMV where it applies; EXLQ_MMA=0 (or tests, benchmarks) switches it off to compare.
MMA = os.environ.get("EXLQ_MMA", "1") != "0"
MMA_MAX_K = 1 << 20  # the gather table holds an input channel in 20 bits
THREADS = 128  # THREADS in the .cu: output columns per block
SPLIT_ROWS = 256  # SPLIT_ROWS in the .cu: most stored rows one block reads
CHUNK_ROWS = 128  # rows of one group a thread handles at once (its words all in flight together)
GEMV_ROWS = (8, 4, 3, 2, 1)  # the register kernel's instances by activation rows; other counts are cut into these
GEMV_MAX_ROWS = 32  # above this, dequantize + cuBLAS
TARGET_BLOCKS = 264  # about two blocks per SM on an H100: K splits shrink until this many exist
MAX_GROUP = 4  # MAX_GROUP in the .cu: most matrices of one input one launch multiplies (q/k/v, gate/up)
WIDE_COLUMNS = 2  # adjacent columns a thread of the wide GEMV instances (exl2_gemv<T, M, 2>)
COLUMN_CHOICES = (1, WIDE_COLUMNS)  # the GEMV's instances by columns a thread
WIDE_ROWS = (3, 2, 1)  # launches of these many rows may take the wide instances
#: The wide instances take a launch whose matrices all have at least this many (padded) columns (on the H200 they
#: are 18-22 % faster at 4096x14336 and 14336x4096, 5-10 % slower at 4096x4096 and below: docs/benchmarks.md,
#: session 12). EXLQ_GEMV_WIDE=0 switches them off, =1 on for every width.
WIDE_MIN_COLUMNS = {"0": 1 << 62, "1": 0}.get(os.environ.get("EXLQ_GEMV_WIDE", ""), 2048)
#: Kernel instances by activation dtype, each compiled on its first use.
INSTANCE_SETS = {
    dtype: tuple(
        [f"{name}<{tag}, {m}>" for name in ("exl2_gemv", "exl2_gemv_group") for m in GEMV_ROWS]
        + [f"{name}<{tag}, {m}, {c}>" for c in COLUMN_CHOICES[1:] for name in ("exl2_gemv", "exl2_gemv_group")
           for m in WIDE_ROWS]
        + [f"exl2_gemv<{tag}, 1, {c}, true>" for c in COLUMN_CHOICES]  # down_proj on gate/up's sums (matmul_gated)
        + [f"exl2_dequant<{tag}>", f"exl2_finish<{tag}>", f"exl2_finish_norm<{tag}>"]
    )
    for dtype, tag in ACTIVATION_TAGS.items()
}
FINISH_THREADS = 256  # FINISH_THREADS in the .cu
#: The split-K GEMVs (the tensor-core one too, since session 33) end at their atomics and `exl2_finish`, launched
#: after them, writes the outputs: no fence, counter and read-back at the end of every block (docs/benchmarks.md,
#: sessions 20-21: one row of 4096x14336 13.2 -> 12.5 µs, the 8B's decode +1.9 %).
#: EXLQ_GEMV_FINISH=0: each K split's last block writes them, inside the GEMV.
FINISH_KERNEL = os.environ.get("EXLQ_GEMV_FINISH", "1") != "0"
#: Whether a streamed one-row GEMV folds a pending norm into its gather (norm_fold: from exl2_finish_norm's partial
#: sums of squares) rather than read the output of the norm kernel; the register kernel never folds (each of its
#: thousands of blocks would wait on the partials before its gather: the 8B decoded 4 % slower so, docs/benchmarks.md,
#: session 30) and takes finish_add_rms_norm's output, which also ends the product before it (PendingSums.take_sums).
#: EXLQ_FOLD_STREAM=0: the norm kernel before every GEMV.
FOLD_STREAM = os.environ.get("EXLQ_FOLD_STREAM", "1") != "0"
#: Longer K splits for one-row group launches of the wide kernel (exl2_gemv_group<T, 1, 2> keeps up to
#: GROUP_SPLIT_ROWS[-1] rows a block, GROUP_SPLIT_ROWS in the .cu): where the launch's own splits need two waves of
#: blocks, wave_split_rows picks the shortest of these that fits one (the 8B's gate/up: 896 blocks of 512-row splits
#: instead of 1792; its decode +3 % on the H100, docs/benchmarks.md, session 42). EXLQ_GROUP_WAVE=0: always their own.
GROUP_SPLIT_ROWS = (384, 512)
GROUP_WAVE = os.environ.get("EXLQ_GROUP_WAVE", "1") != "0"
#: A one-row down_proj on the register kernel gathers silu(gate)·up from the gate/up launch's unfinished sums
#: (matmul_gated), so that launch needs no exl2_finish. EXLQ_GATED_SUMS=0: exl2_finish first, as before.
GATED_SUMS = os.environ.get("EXLQ_GATED_SUMS", "1") != "0"
#: The same where down_proj is on the one-row streamed kernel (the small models; exl2_stream<fp16_t, C, true>):
#: timed in session 45 (H100) at +2.0 % on Llama-3.2-1B but -4.4 % on Qwen2.5-0.5B, and again in session 48 (one
#: column a consumer thread) at +1.7 % and -3.9 %; session 49's timeline of Qwen2.5-0.5B puts the loss outside
#: down_proj (the attention and the other streamed launches slower; cause not found), so off unless
#: EXLQ_GATED_SUMS_STREAM=1.
GATED_SUMS_STREAM = os.environ.get("EXLQ_GATED_SUMS_STREAM", "0") == "1"
MMA_ROWS = tuple(range(16, 3, -1))  # launches of these many rows go to the tensor-core kernel (where it applies)
MMA_INSTANCES = tuple(f"{name}<{m}>" for name in ("exl2_mma", "exl2_mma_group") for m in MMA_ROWS)


@dataclass
class Exl2Plan:
    """What the kernels need besides the packed tensors, on the layer's device."""

    q_weight: torch.Tensor  # int32 [words, N_pad], as stored
    q_scale: torch.Tensor  # int32 [G, N_pad / 8], as stored
    scale_max: torch.Tensor  # float32 [G]: the fp16 values M_g
    chunks: torch.Tensor  # int32 [C, 4]: bits | rows << 8 | group shift << 16, first word row, first stored row, first group
    #: int32 [S + 1] per columns a GEMV thread takes (COLUMN_CHOICES): the chunk index where each K split starts
    split_tables: dict[int | tuple[int, int], torch.Tensor]  # (columns, rows): GROUP_SPLIT_ROWS splits (group wave)
    perm: torch.Tensor  # int32 [K]: stored row -> input channel
    gather: torch.Tensor | None  # int32 [K]: the tensor-core GEMV's gather table (mma_gather_table); None: not eligible
    bias: torch.Tensor | None  # float32 [N_pad]
    in_features: int
    out_features: int
    #: The streamed GEMV's tables (exl2_stream_ops); None where it does not take the layer
    stream_chunks: torch.Tensor | None = None  # int32 [C, 8]: exl2_stream_ops.unit_table
    stream_gather: torch.Tensor | None = None  # int32 [K]: input channel | pair slot << 17 | prescale shift << 22

    @property
    def n_pad(self) -> int:
        return self.q_weight.shape[1]

    def tiles(self, columns: int = 1) -> int:
        """Column tiles of a GEMV whose threads take `columns` adjacent columns each."""
        return -(-self.n_pad // (THREADS * columns))

    def splits(self, columns: int, rows: int | None = None) -> torch.Tensor:
        """The K-split table of that GEMV: its own, or (a group wave) the one of `rows`-row splits."""
        return self.split_tables[columns] if rows is None else self.split_tables[columns, rows]


def chunk_table(layout: Layout, max_rows: Callable[[int], int] = lambda bits: CHUNK_ROWS,
                ) -> list[tuple[int, int, int, int, int, int]]:
    """(bits, rows, first word row, first stored row, first group, group shift) of every chunk: ≤ max_rows(bits)
    rows (CHUNK_ROWS; a multiple of 32) of one width, whose words a thread loads at once. A chunk may hold several
    consecutive equal groups of 32 or 64 rows (2^shift blocks of 32 rows each; shift 2 for 128-row groups), so small
    groups cost no extra serial load: real conversions use groups of 32 for many matrices. Groups with a partial
    32-row block stand alone."""
    table = []
    row0s, word0s = group_row_starts(layout), group_word_offsets(layout)
    g = 0
    while g < len(layout):
        bits, rows = layout[g]
        most = max_rows(bits)
        if rows % 32 == 0 and rows < most and most % rows == 0:
            count = 1
            while count < most // rows and g + count < len(layout) and layout[g + count] == (bits, rows):
                count += 1
            table.append((bits, rows * count, word0s[g], row0s[g], g, (rows // 32).bit_length() - 1))
            g += count
            continue
        for start in range(0, rows, most):  # one group (of 128 rows, or an odd one) per chunk
            table.append((bits, min(most, rows - start), word0s[g] + start * bits // 32, row0s[g] + start, g, 2))
        g += 1
    return table


def packed_chunks(table: list[tuple[int, int, int, int, int, int]], device: torch.device) -> torch.Tensor:
    """The kernels' int4 chunk entries {bits | rows << 8 | shift << 16, first word row, first stored row, first group}."""
    packed = [(bits | rows << 8 | shift << 16, word, row, g) for bits, rows, word, row, g, shift in table]
    return torch.tensor(packed, dtype=torch.int32, device=device)


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor, contiguous at a 16-byte aligned address (bulk copies need one; a view into a loaded file may not)."""
    tensor = tensor.contiguous()
    return tensor if tensor.data_ptr() % 16 == 0 else tensor.clone()


def split_points(table: list[tuple[int, int, int, int, int, int]], column_tiles: int) -> list[int]:
    """Chunk indices where K splits start (plus the end): splits of ≤ SPLIT_ROWS rows, enough blocks overall."""
    total_rows = sum(t[1] for t in table)
    wanted = -(-total_rows * column_tiles // TARGET_BLOCKS)
    return chunk_splits(table, max(CHUNK_ROWS, min(SPLIT_ROWS, -(-wanted // CHUNK_ROWS) * CHUNK_ROWS)))


def chunk_splits(table: list[tuple[int, int, int, int, int, int]], split_rows: int) -> list[int]:
    """Chunk indices where K splits of at most `split_rows` rows start (plus the end)."""
    points, rows = [0], 0
    for i, (_, chunk_rows, *_rest) in enumerate(table):
        if rows + chunk_rows > split_rows:
            points.append(i)
            rows = 0
        rows += chunk_rows
    points.append(len(table))
    return points


def pair_row(bits: int, pair: int, half: int) -> int:
    """Which of a lane's 8 rows (of a 32-row block) is half `half` of code pair `pair` (= 2·step + i in
    exl2_mma.cu's decode_step)."""
    if bits == 8:
        return (pair & 1) + 2 * half + 4 * (pair >> 1)
    return pair + 4 * half


def pair_shift(bits: int, pair: int) -> int:
    """log2 of the factor decode_step leaves on pair `pair` (the activations are scaled by its inverse)."""
    return {4: 4 * (pair & 1), 2: 2 * pair}.get(bits, 0)


def _slot_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """[9, 32] slot and shift of row i (0-31) of a 32-row block, by width (rows 2-8 used)."""
    slots, shifts = torch.zeros(9, 32, dtype=torch.int64), torch.zeros(9, 32, dtype=torch.int64)
    for bits in (2, 3, 4, 5, 6, 8):
        for lane in range(4):
            for pair in range(4):
                for half in range(2):
                    row = 8 * lane + pair_row(bits, pair, half)
                    slots[bits, row], shifts[bits, row] = 8 * lane + 2 * pair + half, pair_shift(bits, pair)
    return slots, shifts


_SLOTS, _SHIFTS = _slot_tables()


def mma_gather_table(layout: Layout, perm: torch.Tensor) -> torch.Tensor | None:
    """Per stored row: input channel | slot << 20 | shift << 25 | (bits - 1) << 28, where slot (0-31) is the row's place
    in its 32-row block of the tensor-core GEMV's activation buffer (lane t's pairs at 8t + 2·pair + half) and shift
    the power of two its activation is divided by. None when the layer does not fit that kernel: a group that is not
    whole 32-row blocks (then no chunk is), or K ≥ 2^20."""
    if perm.numel() >= MMA_MAX_K or any(rows % 32 for _, rows in layout):
        return None
    bits = row_bits(layout)
    within = torch.arange(perm.numel()) & 31  # every group starts at a multiple of 32 rows
    entries = perm.cpu().long() | _SLOTS[bits, within] << 20 | _SHIFTS[bits, within] << 25 | (bits - 1) << 28
    return entries.to(torch.int32).to(perm.device)


def build_plan(tensors: Exl2Tensors, layout: Layout, out_features: int, prescale: float = 1.0) -> Exl2Plan:
    device = tensors.q_weight.device
    table = chunk_table(layout)
    perm = perm_from_invperm(tensors.q_invperm)
    streamed = exl2_stream_ops.eligible(layout)
    scale_max = scale_multipliers(tensors.q_scale_max, prescale).float().contiguous()
    plan = Exl2Plan(
        q_weight=aligned(tensors.q_weight),
        q_scale=aligned(tensors.q_scale),
        scale_max=scale_max,
        chunks=packed_chunks(table, device),
        split_tables={},
        perm=perm.to(torch.int32).contiguous(),
        gather=mma_gather_table(layout, perm),
        bias=None if tensors.bias is None else tensors.bias.float().contiguous(),
        in_features=perm.numel(),
        out_features=out_features,
        stream_chunks=exl2_stream_ops.unit_table(chunk_table(layout, exl2_stream_ops.unit_rows), scale_max) if streamed else None,
        stream_gather=exl2_stream_ops.gather_table(layout, perm.to(torch.int32)) if streamed else None,
    )
    for columns in COLUMN_CHOICES:
        points = split_points(table, plan.tiles(columns))
        plan.split_tables[columns] = torch.tensor(points, dtype=torch.int32, device=device)
    if GROUP_WAVE:
        for split_rows in GROUP_SPLIT_ROWS:
            plan.split_tables[WIDE_COLUMNS, split_rows] = torch.tensor(
                chunk_splits(table, split_rows), dtype=torch.int32, device=device)
    return plan


def wave_split_rows(plans: Sequence[Exl2Plan], wave: int) -> int | None:
    """The K split (GROUP_SPLIT_ROWS) for a one-row wide group launch of which `wave` blocks run at once: None (the
    plans' own splits) where those fit one wave, else the shortest longer split that does, else the longest."""

    def blocks(rows: int | None) -> int:
        return sum(p.tiles(WIDE_COLUMNS) * (p.splits(WIDE_COLUMNS, rows).numel() - 1) for p in plans)

    if blocks(None) <= wave:
        return None
    return next((rows for rows in GROUP_SPLIT_ROWS if blocks(rows) <= wave), GROUP_SPLIT_ROWS[-1])


_workspace = Workspace()  # the GEMV's partial sums and tile counters
#: The sums of a product left unfinished for the next norm (PendingSums): apart from every other launch's, so no
#: launch between the product and the kernel that ends it can add into them.
_unfinished_workspace = Workspace()


class GemvMatrix(ctypes.Structure):
    """`struct GemvMatrix` of the .cu: one matrix of a GEMV launch (device pointers as 64-bit addresses)."""

    _fields_ = [
        *[(name, ctypes.c_uint64) for name in
          ("q_weight", "q_scale", "scale_max", "chunks", "split_chunks", "perm", "bias", "workspace", "counters", "y")],
        *[(name, ctypes.c_int32) for name in ("N", "n_pad", "tiles", "splits", "block0")],
    ]


class GemvGroup(ctypes.Structure):
    """`struct GemvGroup` of the .cu, passed to the kernel by value."""

    _fields_ = [("m", GemvMatrix * MAX_GROUP), ("count", ctypes.c_int32)]


class PendingSums(Deferred):
    """A one-row product left as fp32 sums for the launch that reads it next to end (exl2_ops.gemv, `unfinished`):
    o_proj's and down_proj's for the residual add after them (the next norm's `norm_fold` ends them inside
    exl2_finish_norm, the add and the norm's sums of squares in the same launch), q/k/v's for RoPE
    (fused_ops.rope_store). `take_sums` hands them to such a launch; anything else calls `tensor()` (exl2_finish).
    The products of one launch (q/k/v) are `siblings`: `tensor()` ends those not yet taken in one exl2_finish."""

    def __init__(self, group: GemvGroup, plan: Exl2Plan, out: torch.Tensor, sums: torch.Tensor, index: int = 0,
                 extra: torch.Tensor | None = None):
        self.group, self.plan, self.out, self.sums = group, plan, out, sums  # sums: [n_pad] fp32, the workspace's
        self.index = index  # the product's matrix in its launch's group
        self.extra = extra  # fp32 sums its input was gathered from (gate/up's: matmul_gated), zeroed at its end
        self.ended = False
        self.siblings: list[PendingSums] = [self]
        self.span = sums  # the sums of every sibling, one after the other

    @property
    def matrix(self) -> GemvMatrix:
        return self.group.m[self.index]

    def unfinished(self) -> bool:
        return not self.ended

    def take_sums(self) -> UnfinishedSums | None:
        if self.ended:
            return None
        self.ended = True  # ended by whoever takes them: its output is never written (that launch was its use)
        return UnfinishedSums(self.sums, self.plan.bias, self.extra)

    def _shaped(self) -> torch.Tensor:
        return self.out

    def tensor(self) -> torch.Tensor:
        if not self.ended:
            left = [s for s in self.siblings if not s.ended]
            group = GemvGroup(count=len(left))
            for i, s in enumerate(left):
                group.m[i] = s.matrix
                s.ended = True
            finish_sums(group, [s.plan for s in left], 1, self.out.dtype, self.out.device, self.extra)
        return self.out


def pending_products(group: GemvGroup, plans: Sequence[Exl2Plan], outs: Sequence[torch.Tensor],
                     workspace: torch.Tensor, extra: torch.Tensor | None = None) -> list[PendingSums]:
    """The PendingSums of each product of a one-row launch whose sums lie one after the other from the start of
    `workspace` (n_pad each), siblings of each other; `extra`: a single product's."""
    assert extra is None or len(plans) == 1, "extra sums belong to a single product's input"
    span = workspace[: sum(p.n_pad for p in plans)]
    sums = span.split([p.n_pad for p in plans])
    pending = [PendingSums(group, plan, out, s, i, extra)
               for i, (plan, out, s) in enumerate(zip(plans, outs, sums, strict=True))]
    for p in pending:
        p.siblings, p.span = pending, span
    return pending


def norm_fold(pending: PendingNorm) -> exl2_stream_ops.NormFold:
    """The NormFold of a pending norm (once): exl2_finish_norm writes residual + delta to its new residual and the
    sums of squares by FINISH_THREADS-value pieces, ending the delta's sums where they are still unfinished. A norm
    whose output has an order (PendingNorm.ordered) gets residual + delta also in that order, which the fold reads."""
    if pending.fold is None:
        hidden = pending.weight.numel()
        count = -(-hidden // FINISH_THREADS)
        partials = torch.empty(count, dtype=torch.float32, device=pending.device)
        delta = pending.delta
        sums = delta.take_sums() if isinstance(delta, Deferred) else None  # ended by this launch, if unfinished
        matrix = delta.matrix if sums is not None else GemvMatrix()
        function = kernel(SOURCE, INSTANCE_SETS[pending.dtype], f"exl2_finish_norm<{ACTIVATION_TAGS[pending.dtype]}>",
                          pending.device)
        blocks = count if sums is None else max(count, -(-sums.sums.numel() // FINISH_THREADS))  # padding zeroed too
        ordered = pending.ordered
        stored = None if ordered is None else torch.empty_like(pending.new_residual)
        launch(function, (blocks, 1, 1), (FINISH_THREADS, 1, 1),
               (matrix, None if sums is not None else as_tensor(delta), pending.residual, pending.new_residual,
                partials, hidden, *extra_operands(None if sums is None else sums.extra), stored,
                None if ordered is None else ordered.slot), pending.device, overlap=True)
        read, weight = (pending.new_residual, pending.weight) if ordered is None else (stored, ordered.weight)
        fold = exl2_stream_ops.NormFold(read.data_ptr(), weight.data_ptr(), partials.data_ptr(), count, pending.eps)
        pending.fold = (fold, partials, stored)
    return pending.fold[0]


def gemv_route(plans: Sequence[Exl2Plan], rows: int, dtype: torch.dtype) -> tuple[bool, int]:
    """Which GEMV a launch of `rows` activation rows takes: (tensor cores?, columns a thread of the other kernel)."""
    tensor_cores = MMA and rows in MMA_ROWS and dtype == torch.float16 and all(p.gather is not None for p in plans)
    wide = not tensor_cores and rows in WIDE_ROWS and all(p.n_pad >= WIDE_MIN_COLUMNS for p in plans)
    return tensor_cores, WIDE_COLUMNS if wide else 1


def launch_rows(plans: Sequence[Exl2Plan], rows: int, dtype: torch.dtype, device: torch.device) -> int:
    """How many of `rows` activation rows the next GEMV launch takes: up to MMA_ROWS[0] at once where a tensor-core
    kernel has an instance for that count (the streamed multi-row one, exl2_stream_ops.applies_rows, or exl2_mma.cu),
    so 5-7 and 9-16 rows read the weights once (20 rows: 16 + 4); else the most of GEMV_ROWS that fit (5 rows: 4 + 1,
    13: 8 + 4 + 1). Only counts without a register-kernel instance ask which kernel would take them."""
    most = min(rows, MMA_ROWS[0])
    if most in GEMV_ROWS or exl2_stream_ops.applies_rows(plans, most, dtype, device) or gemv_route(plans, most, dtype)[0]:
        return most
    return next(m for m in GEMV_ROWS if m <= rows)


def gemv(plans: Sequence[Exl2Plan], x: torch.Tensor | PendingNorm, outs: Sequence[torch.Tensor],
         up: torch.Tensor | None = None, unfinished: bool = False) -> list[PendingSums] | None:
    """outs[i][M, N_i] = x[M, K] @ W_i (+ bias_i) for M contiguous rows (a count launch_rows gives), ≤ MAX_GROUP
    matrices of input size K, in one launch: the matrices' blocks share one grid, so small layers do not each pay a launch. With
    `up`, the input is silu_mul(x, up), computed as the kernel gathers it (one matrix; else by silu_mul first).

    A PendingNorm x (one row) is folded into the gather (exl2_stream_ops.NormFold) of a streamed launch, else computed
    first. `unfinished` (one row): products that would end in exl2_finish (all of the launch's) are returned as
    PendingSums instead, for the launch that reads them next to end."""
    pending = x if isinstance(x, PendingNorm) else None
    if pending is not None:
        x = pending.residual.view(1, -1)  # its row count and device; the kernels read the fold's tensors
    rows = x.shape[0]
    device = x.device
    dtype = pending.dtype if pending is not None else x.dtype
    streamed = exl2_stream_ops.applies(plans, rows, dtype, device)
    fold = exl2_stream_ops.NO_FOLD
    if pending is not None:
        if FOLD_STREAM and streamed:
            fold = norm_fold(pending)
        else:
            x = pending.tensor().view(rows, -1)
    unfinished = unfinished and rows == 1
    if streamed:
        return streamed_gemv(plans, x, outs, up, fold, unfinished)
    if exl2_stream_ops.applies_rows(plans, rows, dtype, device):
        return streamed_gemv(plans, x, outs, up, unfinished=unfinished, tensor_cores=True)
    tensor_cores, columns = gemv_route(plans, rows, dtype)
    if tensor_cores:
        name = "exl2_mma" if len(plans) == 1 else "exl2_mma_group"
        function = kernel(MMA_SOURCE, MMA_INSTANCES, f"{name}<{rows}>", device)
    else:
        name = "exl2_gemv" if len(plans) == 1 else "exl2_gemv_group"  # one matrix: fewer registers
        instance = f"{name}<{ACTIVATION_TAGS[dtype]}, {rows}" + (f", {columns}>" if columns > 1 else ">")
        function = kernel(SOURCE, INSTANCE_SETS[dtype], instance, device)
    longer = None  # (wide implies no tensor cores: gemv_route)
    if GROUP_WAVE and len(plans) > 1 and rows == 1 and columns == WIDE_COLUMNS:
        wave = blocks_per_sm(function, THREADS) * exl2_stream_ops.sm_limits(device_index(device))[0]
        longer = wave_split_rows(plans, wave)
    if up is not None and (tensor_cores or len(plans) > 1):
        x, up = silu_mul(x, up), None
    inputs = (x,) if tensor_cores or len(plans) > 1 else (x, up)
    return register_launch(function, plans, outs, inputs, rows, columns, longer, tensor_cores, unfinished)


def sums_store(unfinished: bool, plans: Sequence[Exl2Plan], extra: torch.Tensor | None = None) -> Workspace:
    """Where a launch's split sums go: a single product left unfinished (o_proj's, down_proj's, for the next norm to
    end), or one whose input is gate/up's sums (`extra`: those lie in the common workspace until it ends), apart from
    every other launch's, so no launch before its end can add into them; the rest in the common workspace (products
    of a group left unfinished, q/k/v's or gate/up's, are read by the very next launch)."""
    return _unfinished_workspace if extra is not None or (unfinished and len(plans) == 1) else _workspace


def register_launch(function: int, plans: Sequence[Exl2Plan], outs: Sequence[torch.Tensor], inputs: tuple, rows: int,
                    columns: int, longer: int | None, tensor_cores: bool, unfinished: bool,
                    extra: torch.Tensor | None = None) -> list[PendingSums] | None:
    """The launch of a register (or exl2_mma.cu) GEMV kernel `function` over `plans` with its activation operands
    `inputs` ((x,), or (x, up) for one matrix), K splits `longer` (None: the plans' own), its sums in sums_store's; then
    exl2_finish (with `extra`, exl2_finish's) or, `unfinished`, the PendingSums of products all split along K."""
    device = outs[0].device
    finish = FINISH_KERNEL  # exl2_finish writes the outputs of split products
    workspace, counters = sums_store(unfinished, plans, extra).get(
        device, rows * sum(p.n_pad for p in plans), sum(p.tiles(columns) for p in plans))
    group = GemvGroup(count=len(plans))
    blocks = floats = tiles = 0
    split_k, every_split = False, True  # products split along K: their outputs are exl2_finish's (with `finish`)
    for i, (plan, out) in enumerate(zip(plans, outs, strict=True)):
        split_chunks = plan.splits(columns, longer)
        splits, plan_tiles = split_chunks.numel() - 1, plan.tiles(columns)
        split_k |= splits > 1
        every_split &= splits > 1
        rows_in = plan.gather if tensor_cores else plan.perm  # the field each kernel reads for its input rows
        group.m[i] = GemvMatrix(
            plan.q_weight.data_ptr(), plan.q_scale.data_ptr(), plan.scale_max.data_ptr(), plan.chunks.data_ptr(),
            split_chunks.data_ptr(), rows_in.data_ptr(), 0 if plan.bias is None else plan.bias.data_ptr(),
            workspace.data_ptr() + 4 * floats, 0 if finish else counters.data_ptr() + 4 * tiles, out.data_ptr(),
            plan.out_features, plan.n_pad, plan_tiles, splits, blocks,
        )
        blocks += plan_tiles * splits
        floats += rows * plan.n_pad
        tiles += plan_tiles
    operands = (*inputs, plans[0].in_features, group.m[0] if len(plans) == 1 else group)
    launch(function, (blocks, 1, 1), (THREADS, 1, 1), operands, device, overlap=True)
    if finish and split_k:
        if unfinished and every_split:
            return pending_products(group, plans, outs, workspace, extra)
        finish_sums(group, plans, rows, outs[0].dtype, device, extra)
    return None


def finish_sums(group: GemvGroup, plans: Sequence[Exl2Plan], rows: int, dtype: torch.dtype, device: torch.device,
                extra: torch.Tensor | None = None) -> None:
    """exl2_finish: y = T(sums + bias) and the sums re-zeroed, for the group's matrices whose `splits` > 1; `extra`
    (fp32), the sums the product's input was gathered from, re-zeroed too (matmul_gated)."""
    finisher = kernel(SOURCE, INSTANCE_SETS[dtype], f"exl2_finish<{ACTIVATION_TAGS[dtype]}>", device)
    width = -(-rows * max(plan.n_pad for plan in plans) // FINISH_THREADS)
    launch(finisher, (width, len(plans), 1), (FINISH_THREADS, 1, 1), (group, rows, *extra_operands(extra)), device,
           overlap=True)


def streamed_gemv(plans: Sequence[Exl2Plan], x: torch.Tensor, outs: Sequence[torch.Tensor],
                  up: torch.Tensor | None = None, fold: exl2_stream_ops.NormFold = exl2_stream_ops.NO_FOLD,
                  unfinished: bool = False, tensor_cores: bool = False,
                  extra: torch.Tensor | None = None) -> list[PendingSums] | None:
    """gemv through a streamed kernel: one fp16 row (exl2_stream_ops.applies), or, `tensor_cores`,
    exl2_stream_ops.ROWS rows through the multi-row kernel (applies_rows; no `fold` there); its sums, then
    exl2_finish (or, `unfinished`: one row, PendingSums); with a `fold` set, that norm formed in the
    gather (x unused).
    `up`: silu_mul first, except for the one-row kernel's single matrix, which forms it as it gathers. `extra`: x and
    up are gate/up's unfinished sums (fp32 [1, K]; matmul_gated), and extra their span, which whatever ends this
    product re-zeroes (sums_store keeps its own sums apart from them)."""
    rows = x.shape[0]
    if up is not None and (len(plans) > 1 or tensor_cores):
        x, up = silu_mul(x, up), None
    workspace, _ = sums_store(unfinished, plans, extra).get(x.device, rows * sum(plan.n_pad for plan in plans), 0)
    group = GemvGroup(count=len(plans))
    sums, at = [], workspace.data_ptr()
    for i, (plan, out) in enumerate(zip(plans, outs, strict=True)):
        sums.append(at)
        at += 4 * rows * plan.n_pad
        group.m[i] = GemvMatrix(  # for exl2_finish: every product is left as sums (splits > 1)
            bias=0 if plan.bias is None else plan.bias.data_ptr(), workspace=sums[-1], y=out.data_ptr(),
            N=plan.out_features, n_pad=plan.n_pad, splits=2,
        )
    if tensor_cores:
        exl2_stream_ops.launch_stream_rows(plans, x, sums)
    else:
        exl2_stream_ops.launch_stream(plans, None if fold.residual else x, up, sums, fold, gathered=extra is not None)
    if unfinished:
        return pending_products(group, plans, outs, workspace, extra)
    finish_sums(group, plans, rows, outs[0].dtype, outs[0].device, extra)
    return None


def dequantize_stored(plan: Exl2Plan, dtype: torch.dtype, input_order: bool = False) -> torch.Tensor:
    """Wt [K, N_pad] in stored row order (in fp16 bit-exact with `exlq.runtime.exl2.dequantize_stored`), or with
    `input_order` in input-channel order (row perm[r] holds stored row r), which x multiplies without a gather."""
    out = torch.empty(plan.in_features, plan.n_pad, dtype=dtype, device=plan.q_weight.device)
    function = kernel(SOURCE, INSTANCE_SETS[dtype], f"exl2_dequant<{ACTIVATION_TAGS[dtype]}>", out.device)
    launch(
        function,
        (plan.tiles(), plan.chunks.shape[0], 1),
        (THREADS, 1, 1),
        (plan.q_weight, plan.q_scale, plan.scale_max, plan.chunks, plan.perm if input_order else None, out, plan.n_pad),
        out.device,
    )
    return out


def matmul_many(plans: Sequence[Exl2Plan], x: torch.Tensor | PendingNorm,
                up: torch.Tensor | None = None) -> list[torch.Tensor]:
    """[x @ W_iᵀ (+ bias_i)] for x [..., K] in fp16 or bf16 and matrices of input size K: GEMV for few rows (up to
    MAX_GROUP matrices a launch), dequantize + cuBLAS per matrix for many. With `up` (x's shape), the input is
    silu_mul(x, up): the GEMV computes it as it gathers (down_proj of a gated MLP). A PendingNorm x (one row) goes to
    the GEMV as is, which folds it where it can (gemv)."""
    lead = x.shape[:-1]
    if isinstance(x, PendingNorm):
        x2, up2, rows = x, None, 1
    else:
        x2 = x.reshape(-1, plans[0].in_features).contiguous()
        up2 = None if up is None else up.reshape(x2.shape).contiguous()
        rows = x2.shape[0]
    if rows > GEMV_MAX_ROWS:
        if up2 is not None:
            x2, up2 = silu_mul(x2, up2), None
        ys = []
        for plan in plans:
            weight = dequantize_stored(plan, x.dtype, input_order=True)[:, : plan.out_features]
            if plan.bias is None:
                ys.append(x2 @ weight)
            else:
                ys.append(torch.addmm(plan.bias[: plan.out_features].to(x.dtype), x2, weight))
    else:
        ys = [torch.empty(rows, plan.out_features, dtype=x.dtype, device=x.device) for plan in plans]
        groups = [range(first, min(first + MAX_GROUP, len(plans))) for first in range(0, len(plans), MAX_GROUP)]
        start = 0
        while start < rows:  # each group's launch takes as many rows as every group can
            stop = start + min(launch_rows(plans[g.start : g.stop], rows - start, x.dtype, x.device) for g in groups)
            if stop - start == rows:  # one launch takes every row: x as it is (a PendingNorm cannot be sliced)
                part, up_part = x2, up2
            else:
                part, up_part = x2[start:stop], None if up2 is None else up2[start:stop]
            for g in groups:
                gemv(plans[g.start : g.stop], part, [ys[i][start:stop] for i in g], up_part)
            start = stop
    return [y.view(*lead, plan.out_features) for y, plan in zip(ys, plans)]


def matmul_unfinished(plans: Sequence[Exl2Plan], x: torch.Tensor | PendingNorm,
                      up: torch.Tensor | None = None) -> list[torch.Tensor | PendingSums]:
    """matmul_many(plans, x, up), except that one-row products that would end in exl2_finish come back as PendingSums,
    for the launch that reads them next to end (o_proj's and down_proj's: the next norm's, norm_fold; q/k/v's:
    fused_ops.rope_store)."""
    lead = x.shape[:-1]
    if lead.numel() != 1 or len(plans) > MAX_GROUP:
        return matmul_many(plans, x, up)
    ys = [torch.empty(*lead, plan.out_features, dtype=x.dtype, device=x.device) for plan in plans]  # (addresses)
    one = x if isinstance(x, PendingNorm) else x.reshape(1, -1).contiguous()
    rest = gemv(plans, one, ys, None if up is None else up.reshape(1, -1).contiguous(), unfinished=True)
    return ys if rest is None else rest


def matmul_gated(plan: Exl2Plan, gate: torch.Tensor | Deferred, up: torch.Tensor | Deferred,
                 unfinished: bool = False) -> torch.Tensor | PendingSums:
    """x @ Wᵀ for x = silu(gate) * up (down_proj of a gated MLP), which the GEMV forms as it gathers its input;
    `unfinished`: as matmul_unfinished. Where gate and up are still their one-row launch's sums (project_each,
    deferred), the register GEMV gathers from those (exl2_gemv's SUMS), so they need no exl2_finish: the launch that
    ends this product re-zeroes them too (its `extra`). Otherwise they are finished first."""
    if not gathers_sums(plan, gate, up):
        gate, up = as_tensor(gate), as_tensor(up)
        return matmul_unfinished([plan], gate, up)[0] if unfinished else matmul_many([plan], gate, up)[0]
    gate_sums, up_sums = gate.take_sums().sums, up.take_sums().sums
    device, dtype = gate.device, gate.dtype
    out = torch.empty(*gate.shape[:-1], plan.out_features, dtype=dtype, device=device)
    if exl2_stream_ops.applies([plan], 1, dtype, device):
        pending = streamed_gemv([plan], gate_sums.view(1, -1), [out], up_sums.view(1, -1), unfinished=unfinished,
                                extra=gate.span)
    else:
        columns = gemv_route([plan], 1, dtype)[1]
        name = f"exl2_gemv<{ACTIVATION_TAGS[dtype]}, 1, {columns}, true>"
        pending = register_launch(kernel(SOURCE, INSTANCE_SETS[dtype], name, device), [plan], [out],
                                  (gate_sums, up_sums), 1, columns, None, False, unfinished, gate.span)
    return out if pending is None else pending[0]


def gathers_sums(plan: Exl2Plan, gate: torch.Tensor | Deferred, up: torch.Tensor | Deferred) -> bool:
    """Whether matmul_gated's GEMV takes gate and up as their sums: both one row's, unfinished and unbiased, the only
    products of their launch (their span is what the product's end re-zeroes); the product on the register kernel
    split along K (so ended by exl2_finish or a norm's launch, which re-zero them), or, with GATED_SUMS_STREAM, on the
    one-row streamed kernel (always left as sums)."""
    if not (GATED_SUMS and FINISH_KERNEL and isinstance(gate, PendingSums) and isinstance(up, PendingSums)):
        return False
    if not (gate.unfinished() and up.unfinished() and gate.siblings == [gate, up] and gate.plan.bias is None
            and up.plan.bias is None and math.prod(gate.shape[:-1]) == 1):
        return False
    device, dtype = gate.device, gate.dtype
    if exl2_stream_ops.applies([plan], 1, dtype, device):
        return GATED_SUMS_STREAM
    if exl2_stream_ops.applies_rows([plan], 1, dtype, device):
        return False
    columns = gemv_route([plan], 1, dtype)[1]
    return plan.splits(columns).numel() - 1 > 1


def matmul(plan: Exl2Plan, x: torch.Tensor) -> torch.Tensor:
    """y = x @ Wᵀ (+ bias) for x [..., K] in fp16 or bf16: GEMV for few rows, dequantize + cuBLAS for many."""
    return matmul_many([plan], x)[0]
