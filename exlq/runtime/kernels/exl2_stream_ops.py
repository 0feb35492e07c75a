"""The streamed one-row EXL2 GEMV (`cuda/exl2_stream.cu`, sm_90+): its tables, its launch geometry and its launch.

A persistent grid (a few blocks an SM) whose producer warp copies the packed weights into shared memory with bulk
copies ahead of the arithmetic, starting before the programmatic-launch wait, so the memory streams without the
register kernel's serial phases (docs/benchmarks.md, session 24). The products end as sums in the fp32 workspace:
`exl2_ops.gemv` launches `exl2_finish` after it, as for the split register kernel.

Launches of 4 to 16 fp16 rows take the same kernel's multi-row instances (`exl2_stream_rows`, `applies_rows`):
the same producer and units, with `exl2_mma.cu`'s tensor-core arithmetic as the consumers and its gather table.

Per matrix it needs two tables, built once per layer: the stream chunks (≤ STREAM_WORD_ROWS word rows of one width:
one unit of work a strip, with its groups' multipliers) and the gather table (per stored row: input channel, slot in the fp16 pair path's order,
prescale).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence

import torch

from exlq.errors import ExlqError
from exlq.runtime.exl2 import Layout, row_bits
from exlq.runtime.kernels import target
from exlq.runtime.kernels.launch import allow_shared, device_index, hopper_or_newer, kernel, launch

SOURCE = "exl2_stream.cu"
COLUMN_CHOICES = (1, 2)  # columns a consumer thread takes: the one-row kernel's instances
#: Activation rows of the multi-row kernel's instances (exl2_stream_rows<M>: tensor cores, 8 consumer warps)
ROW_COUNTS = tuple(range(1, 17))
INSTANCES = (tuple(f"exl2_stream<fp16_t, {c}>" for c in COLUMN_CHOICES)
             + tuple(f"exl2_stream<fp16_t, {c}, true>" for c in COLUMN_CHOICES)  # on gate/up's sums (matmul_gated)
             + tuple(f"exl2_stream_rows<{m}>" for m in ROW_COUNTS))
STREAM_COLUMNS = 256  # STREAM_COLUMNS in the .cu: columns of a strip
STREAM_WORD_ROWS = 16  # STREAM_WORD_ROWS in the .cu: most word rows of a unit


def stage_bytes(row_words: int) -> int:
    """A stage (struct Stage in the .cu): the unit's word rows `row_words` words apart, its scale words, its header."""
    return 4 * (STREAM_WORD_ROWS * row_words + 4 * STREAM_COLUMNS // 8 + 16)


STAGE_BYTES = stage_bytes(STREAM_COLUMNS)  # the one-row kernel's
ROWS_STAGE_BYTES = stage_bytes(STREAM_COLUMNS + 8)  # the multi-row kernel's: its word rows 8 banks apart
MAX_STAGES = 8  # STREAM_MAX_STAGES in the .cu
MAX_K = 32768  # most input rows: a block's activations (2 bytes a row) sit in its shared memory beside the stages
MAX_GROUP = 4  # MAX_GROUP in exl2_common.cuh
#: On by default on sm_90+ for one fp16 row; EXLQ_GEMV_STREAM=0: the register kernel everywhere.
ENABLED = os.environ.get("EXLQ_GEMV_STREAM", "1") != "0"
#: Launches of at most this many packed weight bytes take it (EXLQ_STREAM_MAX_MB): on the H200 (docs/benchmarks.md,
#: sessions 24 and 31) it is faster than the register kernel up to ~19 MB (4096x4096: 6.5 against 8.5 µs; 4096x6144
#: 8.9 / 9.5, at 6 bpw 10.4 / 11.0; 4096x8192 10.2 / 10.5) and slower from ~21 MB (4096x10240 12.1 / 11.3; 4096x14336
#: 14.8 / 12.3; smollm2's 576x49152 head 14.4 / 13.6), where its consumers' arithmetic is the limit; a launch it
#: takes also folds the norm before it. 8 MiB left the 8B's q/k/v (12.5 MB) to the register kernel: 19 MiB, +3 %.
#: The H100 keeps the same limit (session 39: the 8B 385 / 385 tok/s at 19 MiB against 334 / 345 at 64; session 51:
#: 440 against 397 at 32 MiB, down_proj streamed, and 371 at 64).
MAX_BYTES = int(float(os.environ.get("EXLQ_STREAM_MAX_MB", "19")) * (1 << 20))
#: Shared-memory stages a block (EXLQ_STREAM_STAGES fixes them; by default STAGES_BY_K picks them) and blocks an SM
#: (tuning, docs/benchmarks.md). Session 24 found 4 blocks of 2 stages fastest of seven
#: settings for the GEMV alone; in decode, session 31 measured 3 stages faster than 2 (the 8B +4.2 %).
STAGES: int | None = int(os.environ["EXLQ_STREAM_STAGES"]) if os.environ.get("EXLQ_STREAM_STAGES") else None
#: (least K, stages) by default, the first that K reaches. Measured in decode (session 32, same-call rounds against 3
#: stages): the 8B (K 4096) +2.0 % with 5 (2 blocks an SM; 4 stages, 3 blocks: −2.5 %; 6: −2 %), Llama-3.2-1B (K 2048)
#: +6.6 / +7.3 % with 4 (3 blocks an SM; 5: +5 %); at K 576 and 896 (smollm2, Qwen2.5-0.5B) 3, 4 and 5 are even.
#: With one column a thread (session 47) the 8B keeps 5: 3 stages −3.0 %, 4 −4.3 %, 6 −1.3 %.
STAGES_BY_K = ((4096, 5), (2048, 4), (0, 3))


def row_counts(setting: str) -> tuple[int, ...]:
    """The row counts an EXLQ_STREAM_ROWS setting lists ("4,5,6,7,8"; "0": none); a count without an instance is an
    error."""
    counts = tuple(int(m) for m in setting.replace(" ", "").split(",") if m and int(m) != 0)
    if any(m not in ROW_COUNTS for m in counts):
        raise ExlqError(f"EXLQ_STREAM_ROWS={setting!r}: row counts must be among {ROW_COUNTS}, or 0 for none")
    return counts


#: The multi-row kernel takes launches of ROWS fp16 rows on Hopper, every size (EXLQ_STREAM_ROWS: "0" for none, or a
#: comma-separated list of ROW_COUNTS). 4 to 16 by default, where the tensor-core kernel was no faster than torch's
#: FP16 GEMV (docs/benchmarks.md, session 33); 2 and 3 rows take the wide register kernel unless listed, and 1 row the
#: one-row streamed kernel up to MAX_BYTES, the register kernel above, unless listed (then the launches above).
DEFAULT_ROWS = tuple(range(4, 17))
ROWS = row_counts(os.environ["EXLQ_STREAM_ROWS"]) if "EXLQ_STREAM_ROWS" in os.environ else DEFAULT_ROWS
#: Its stages (EXLQ_STREAM_ROWS_STAGES), fewer where a block would not fit. At 15-16 rows of the 8B's shapes 4 stages
#: leave one block an SM (113-116 KB); 3 stages, which keep two, were slower on the H100 (session 40: 16 rows at
#: 4096x14336 49.9 against 45.1 µs, 14336x4096 48.1 against 46.8).
ROWS_STAGES = int(os.environ.get("EXLQ_STREAM_ROWS_STAGES", "4"))
#: Columns a consumer thread takes (EXLQ_STREAM_COLUMNS, one of COLUMN_CHOICES): 1, so a block has 8 consumer warps.
#: Alone, streaming a large matrix, 2 columns were as fast (session 24); but in the decode step a launch's weights
#: are mostly in its stages before its programmatic wait, and what the step waits for is the consumers' arithmetic
#: after it, which twice the warps shorten (session 47, H100, in-process A/B of 512-step runs: the 8B +2.4 %, its
#: q/k/v and o_proj 0.6 and 0.9 µs a layer shorter in the step's timeline; smollm2 +5.0 %; Llama-3.2-1B +0.1 %,
#: Qwen2.5-0.5B +0.7 %, medians, inside their noise).
THREAD_COLUMNS = int(os.environ.get("EXLQ_STREAM_COLUMNS", "1"))
BLOCKS_PER_SM = int(os.environ.get("EXLQ_STREAM_BLOCKS", "4"))
MAX_GRID: int | None = None  # tests: a small grid, so each block walks many units, strips and matrices


def unit_rows(bits: int) -> int:
    """Most stored rows of one stream chunk: whole 32-row blocks, ≤ 128, whose words fit STREAM_WORD_ROWS word rows
    (2-4 bits: 128, 5: 96, 6 and 8: 64)."""
    return min(128, STREAM_WORD_ROWS * 32 // bits // 32 * 32)


def pair_slot(bits: int, p: torch.Tensor) -> torch.Tensor:
    """Where row p (0-31) of a 32-row block sits in the fp16 pair path's order (pair_slot in exl2_dot.cuh)."""
    if bits == 4:
        return (p & ~7) + (p & 3) * 2 + ((p >> 2) & 1)
    if bits in (3, 5, 6):
        return ((p & 15) << 1) | (p >> 4)
    if bits == 2:
        return (p & ~15) + (p & 7) * 2 + ((p >> 3) & 1)
    return (p & ~3) + (p & 1) * 2 + ((p >> 1) & 1)


def half_shift(bits: int) -> int:
    """log2 of the pair path's activation prescale for a width (half_shift in exl2_dot.cuh)."""
    return 9 if bits == 8 else bits + 3


def eligible(layout: Layout) -> bool:
    """Whether the streamed GEMV takes a layer: every group whole 32-row blocks (as the pair path reads them) and its
    activations fit shared memory."""
    return all(rows % 32 == 0 for _, rows in layout) and sum(rows for _, rows in layout) <= MAX_K


def unit_table(table: list[tuple[int, int, int, int, int, int]], scale_max: torch.Tensor) -> torch.Tensor:
    """int32 [C, 8] on scale_max's device: per stream chunk (exl2_ops.chunk_table with `unit_rows`) the GEMV's int4
    entry {bits | rows << 8 | shift << 16, first word row, first stored row, first group}, then the float32 bits of
    the multipliers M_g of its ≤ 4 groups (zero past them): the producer hands both to the consumers in the stage."""
    multipliers = scale_max.float().cpu()
    rows = []
    for bits, chunk_rows, word, row, group, shift in table:
        groups = ((chunk_rows // 32 - 1) >> shift) + 1
        values = torch.zeros(4, dtype=torch.float32)
        values[:groups] = multipliers[group : group + groups]
        rows.append(torch.cat([torch.tensor([bits | chunk_rows << 8 | shift << 16, word, row, group], dtype=torch.int32),
                               values.view(torch.int32)]))
    return torch.stack(rows).to(scale_max.device)


def gather_table(layout: Layout, perm: torch.Tensor) -> torch.Tensor:
    """int32 [K]: input channel | pair slot << 17 | prescale shift << 22, per stored row."""
    bits = row_bits(layout)
    within = torch.arange(bits.numel()) & 31
    slots, shifts = torch.zeros_like(bits), torch.zeros_like(bits)
    for width in bits.unique().tolist():
        rows = bits == width
        slots[rows] = pair_slot(width, within[rows])
        shifts[rows] = half_shift(width)
    return (perm.cpu().long() | slots << 17 | shifts << 22).to(torch.int32).to(perm.device)


class StreamMatrix(ctypes.Structure):
    """`struct StreamMatrix` of the .cu."""

    _fields_ = [
        *[(name, ctypes.c_uint64) for name in ("q_weight", "q_scale", "chunks", "gather", "workspace")],
        *[(name, ctypes.c_int32) for name in ("n_pad", "chunk_count", "unit0")],
    ]


class StreamGroup(ctypes.Structure):
    """`struct StreamGroup` of the .cu, passed by value."""

    _fields_ = [("m", StreamMatrix * MAX_GROUP), ("count", ctypes.c_int32), ("units", ctypes.c_int32)]


class NormFold(ctypes.Structure):
    """`struct NormFold` of exl2_stream.cu: the norm a launch folds into its gather (exl2_ops.norm_fold); all zero for
    none."""

    _fields_ = [("residual", ctypes.c_uint64), ("weight", ctypes.c_uint64), ("partials", ctypes.c_uint64),
                ("count", ctypes.c_int32), ("eps", ctypes.c_float)]


NO_FOLD = NormFold()  # every launch without a fold passes this one (read only)


def applies(plans: Sequence, rows: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a GEMV launch goes to the streamed kernel: one fp16 row, every matrix eligible, at most MAX_BYTES of
    packed weights in all, sm_90 or newer, and a block of at least 2 stages within the shared memory the GPU gives one
    (sm_120 parts give ~99 KB, not the H100's 227: there long rows take fewer stages, the longest the register
    kernel)."""
    return (ENABLED and rows == 1 and dtype == torch.float16 and all(p.stream_chunks is not None for p in plans)
            and sum(p.q_weight.numel() * 4 for p in plans) <= MAX_BYTES and hopper_or_newer(device)
            and stages_for(plans[0].in_features, block_shared_limit(device_index(device))) is not None)


def stages_for(in_features: int, limit: int) -> int | None:
    """Stages a block takes at K = in_features (STAGES where set, else STAGES_BY_K's), fewer (down to 2) where the
    block would not fit `limit` bytes of shared memory; None where 2 do not fit either. Worked out once per (K, limit,
    STAGES): `applies` and `launch_stream` both ask at every streamed launch."""
    return _stages_for(in_features, limit, STAGES)


@functools.cache
def _stages_for(in_features: int, limit: int, fixed: int | None) -> int | None:
    wanted = fixed if fixed is not None else next(stages for least, stages in STAGES_BY_K if in_features >= least)
    for stages in range(max(2, min(MAX_STAGES, wanted)), 1, -1):
        if shared_bytes(in_features, stages) <= limit:
            return stages
    return None


def applies_rows(plans: Sequence, rows: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a GEMV launch goes to the multi-row kernel: ROWS fp16 rows, every matrix streamable with the tensor-core
    gather table (whole 32-row groups, exl2_ops.mma_gather_table), sm_90 or newer, and a block of at least 2 stages
    and its window of activations within the GPU's shared memory (rows_geometry)."""
    return (ENABLED and rows in ROWS and dtype == torch.float16
            and all(p.stream_chunks is not None and p.gather is not None for p in plans) and hopper_or_newer(device)
            and rows_geometry(plans, rows, device) is not None)


def plan_units(plan) -> int:
    """A matrix's units: its strips times its stream chunks."""
    return -(-plan.n_pad // STREAM_COLUMNS) * plan.stream_chunks.shape[0]


def unit_count(plans: Sequence) -> int:
    """Units of a streamed launch: all its matrices'."""
    return sum(plan_units(plan) for plan in plans)


def rows_geometry(plans: Sequence, rows: int, device: torch.device) -> tuple[int, int, int] | None:
    """(grid, window, stages) of a multi-row launch (window_geometry on this GPU), None where no block fits."""
    index = device_index(device)
    return window_geometry(unit_count(plans), plans[0].in_features, rows, block_shared_limit(index),
                           *sm_limits(index), ROWS_STAGES, BLOCKS_PER_SM, MAX_GRID)


@functools.cache
def window_geometry(units: int, in_features: int, rows: int, limit: int, sms: int, shared_per_sm: int, wanted: int,
                    blocks_per_sm: int, max_grid: int | None) -> tuple[int, int, int] | None:
    """A multi-row block holds the activations of the rows its units cover, its window: at most min(K, 128 a unit)
    (a run of units within two strips covers their rows only, 128 at most each: unit_rows; a longer run, all of K).
    The window depends on the units a block takes, so on the grid, which depends on the block's shared memory: with
    the most stages that fit (`wanted` down to 2), start from one unit a block and take fewer, larger blocks until
    as many fit the SMs (at most `blocks_per_sm` each) as the grid has."""
    for stages in range(max(2, min(MAX_STAGES, wanted)), 1, -1):
        grid = units if max_grid is None else min(units, max_grid)
        while True:
            window = min(in_features, -(-units // grid) * 128)
            shared = rows_shared_bytes(window, rows, stages)
            fit = min(blocks_per_sm, shared_per_sm // (shared + 1024 + 128))  # + the block's reserved 1 KiB, barriers
            if shared > limit or fit == 0:
                break
            most = min(units, fit * sms)
            if grid <= most:
                return grid, window, stages
            grid = most  # fewer blocks, more units each: a larger window, checked again
    return None


def rows_shared_bytes(window: int, rows: int, stages: int) -> int:
    """Dynamic shared memory of a multi-row block: the stages, the activations [rows][window] (fp16), the offset sums
    [window / 32][8 · row tiles] (fp32; a row tile is the mma's 8 rows) and the 8 consumer warps' epilogue sums
    [rows][36] (fp32)."""
    return stages * ROWS_STAGE_BYTES + 2 * rows * window + 4 * 8 * row_tiles(rows) * (window // 32) + 8 * 4 * rows * 36


def row_tiles(rows: int) -> int:
    """The mma's 8-row tiles a launch of `rows` activation rows takes (row_tiles in exl2_mma.cuh)."""
    return -(-rows // 8)


def shared_bytes(in_features: int, stages: int) -> int:
    """Dynamic shared memory of a block: the stages, then K fp16 activations (rounded to 16 bytes)."""
    return stages * STAGE_BYTES + -(-2 * in_features // 16) * 16


@functools.cache
def block_shared_limit(index: int) -> int:
    """Dynamic shared memory one block of GPU `index` may take (the opt-in maximum), less what the kernel declares
    statically (its barriers: STREAM_MAX_STAGES pairs of 8 bytes, and the fold's inv)."""
    return target.shared_limits(index)[0] - 2 * 8 * MAX_STAGES - 16


@functools.cache
def sm_limits(index: int) -> tuple[int, int]:
    """(SMs, shared memory bytes an SM) of GPU `index`, looked up once (launch_stream runs every decode step)."""
    return torch.cuda.get_device_properties(index).multi_processor_count, target.shared_limits(index)[1]


def grid_size(units: int, shared: int, sms: int, shared_per_sm: int) -> int:
    """Blocks of the persistent grid: BLOCKS_PER_SM an SM, fewer where shared memory runs out, at most one a unit."""
    fit = max(1, shared_per_sm // (shared + 1024 + 128))  # + the block's reserved 1 KiB and its barriers
    blocks = min(units, min(BLOCKS_PER_SM, fit) * sms)
    return max(1, blocks if MAX_GRID is None else min(blocks, MAX_GRID))


def stream_group(plans: Sequence, sums: Sequence[int], gathers: Sequence[torch.Tensor]) -> StreamGroup:
    """The launch's StreamGroup: each matrix's tables, its sums' address and its units after the previous ones'."""
    group = StreamGroup(count=len(plans))
    units = 0
    for i, (plan, at, gather) in enumerate(zip(plans, sums, gathers, strict=True)):
        group.m[i] = StreamMatrix(plan.q_weight.data_ptr(), plan.q_scale.data_ptr(), plan.stream_chunks.data_ptr(),
                                  gather.data_ptr(), at, plan.n_pad, plan.stream_chunks.shape[0], units)
        units += plan_units(plan)
    group.units = units
    return group


def launch_stream_rows(plans: Sequence, x: torch.Tensor, sums: Sequence[int]) -> None:
    """Add x[M, K] @ W_i (M in ROW_COUNTS, fp16, ≤ MAX_GROUP matrices) into the fp32 sums at device addresses `sums[i]`
    ([M][n_pad_i], zero before) with the multi-row kernel (applies_rows); exl2_finish ends them."""
    device = plans[0].q_weight.device
    rows, k = x.shape
    group = stream_group(plans, sums, [plan.gather for plan in plans])
    grid, window, stages = rows_geometry(plans, rows, device)
    function = kernel(SOURCE, INSTANCES, f"exl2_stream_rows<{rows}>", device)
    shared = rows_shared_bytes(window, rows, stages)
    allow_shared(function, shared)
    launch(function, (grid, 1, 1), (STREAM_COLUMNS + 32, 1, 1), (x, k, group, stages, window), device, overlap=True,
           shared_bytes=shared)


def launch_stream(plans: Sequence, x: torch.Tensor | None, up: torch.Tensor | None, sums: Sequence[int],
                  fold: NormFold, gathered: bool = False) -> None:
    """Add x[1, K] @ W_i (for ≤ MAX_GROUP matrices, with `up`: silu_mul(x, up) @ W, one matrix) into the fp32 sums at
    device addresses `sums[i]` ([n_pad_i], zero before); exl2_finish ends them. `fold`: where set, the input is that
    norm's output, formed in the gather (x unused). `gathered` (one matrix, with `up`, no fold): x and up are gate/up's
    unfinished fp32 sums (the SUMS instances)."""
    device = plans[0].q_weight.device
    group = stream_group(plans, sums, [plan.stream_gather for plan in plans])
    stages = stages_for(plans[0].in_features, block_shared_limit(device_index(device)))
    if THREAD_COLUMNS not in COLUMN_CHOICES:
        raise ExlqError(f"EXLQ_STREAM_COLUMNS must be one of {COLUMN_CHOICES}, not {THREAD_COLUMNS}")
    columns = THREAD_COLUMNS
    function = kernel(SOURCE, INSTANCES, f"exl2_stream<fp16_t, {columns}" + (", true>" if gathered else ">"), device)
    shared = shared_bytes(plans[0].in_features, stages)
    allow_shared(function, shared)
    threads = STREAM_COLUMNS // columns + 32
    grid = grid_size(group.units, shared, *sm_limits(device_index(device)))
    launch(function, (grid, 1, 1), (threads, 1, 1),
           (x, up, plans[0].in_features, group, stages, fold), device, overlap=True,
           shared_bytes=shared)
