"""The streamed one-row EXL2 GEMV (`cuda/exl2_stream.cu`, sm_90+): its tables, its launch geometry and its launch.

A persistent grid (a few blocks an SM) whose producer warp copies the packed weights into shared memory with bulk
copies ahead of the arithmetic, starting before the programmatic-launch wait, so the memory streams without the
register kernel's serial phases (docs/benchmarks.md, session 24). The products end as sums in the fp32 workspace:
`exl2_ops.gemv` launches `exl2_finish` after it, as for the split register kernel.

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

from exlq.runtime.exl2 import Layout, row_bits
from exlq.runtime.kernels import target
from exlq.runtime.kernels.launch import allow_shared, device_index, hopper_or_newer, kernel, launch

SOURCE = "exl2_stream.cu"
COLUMN_CHOICES = (1, 2)  # columns a consumer thread takes: the kernel's instances
INSTANCES = tuple(f"exl2_stream<fp16_t, {c}>" for c in COLUMN_CHOICES)
STREAM_COLUMNS = 256  # STREAM_COLUMNS in the .cu: columns of a strip
STREAM_WORD_ROWS = 16  # STREAM_WORD_ROWS in the .cu: most word rows of a unit
STAGE_BYTES = 4 * (STREAM_WORD_ROWS * STREAM_COLUMNS + 4 * STREAM_COLUMNS // 8 + 16)  # words, scale words, header
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
MAX_BYTES = int(float(os.environ.get("EXLQ_STREAM_MAX_MB", "19")) * (1 << 20))
#: Shared-memory stages a block (EXLQ_STREAM_STAGES fixes them; by default STAGES_BY_K picks them), columns a consumer
#: thread and blocks an SM (tuning, docs/benchmarks.md). Session 24 found 4 blocks of 2 stages fastest of seven
#: settings for the GEMV alone; in decode, session 31 measured 3 stages faster than 2 (the 8B +4.2 %).
STAGES: int | None = int(os.environ["EXLQ_STREAM_STAGES"]) if os.environ.get("EXLQ_STREAM_STAGES") else None
#: (least K, stages) by default, the first that K reaches. Measured in decode (session 32, same-call rounds against 3
#: stages): the 8B (K 4096) +2.0 % with 5 (2 blocks an SM; 4 stages, 3 blocks: −2.5 %; 6: −2 %), Llama-3.2-1B (K 2048)
#: +6.6 / +7.3 % with 4 (3 blocks an SM; 5: +5 %); at K 576 and 896 (smollm2, Qwen2.5-0.5B) 3, 4 and 5 are even.
STAGES_BY_K = ((4096, 5), (2048, 4), (0, 3))
THREAD_COLUMNS = int(os.environ.get("EXLQ_STREAM_COLUMNS", "2"))
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


def launch_stream(plans: Sequence, x: torch.Tensor | None, up: torch.Tensor | None, sums: Sequence[int],
                  fold: NormFold) -> None:
    """Add x[1, K] @ W_i (for ≤ MAX_GROUP matrices, with `up`: silu_mul(x, up) @ W, one matrix) into the fp32 sums at
    device addresses `sums[i]` ([n_pad_i], zero before); exl2_finish ends them. `fold`: where set, the input is that
    norm's output, formed in the gather (x unused)."""
    device = plans[0].q_weight.device
    group = StreamGroup(count=len(plans))
    units = 0
    for i, (plan, at) in enumerate(zip(plans, sums, strict=True)):
        strips, chunk_count = -(-plan.n_pad // STREAM_COLUMNS), plan.stream_chunks.shape[0]
        group.m[i] = StreamMatrix(
            plan.q_weight.data_ptr(), plan.q_scale.data_ptr(), plan.stream_chunks.data_ptr(),
            plan.stream_gather.data_ptr(), at, plan.n_pad, chunk_count, units,
        )
        units += strips * chunk_count
    group.units = units
    stages = stages_for(plans[0].in_features, block_shared_limit(device_index(device)))
    columns = THREAD_COLUMNS if THREAD_COLUMNS in COLUMN_CHOICES else 2
    function = kernel(SOURCE, INSTANCES, f"exl2_stream<fp16_t, {columns}>", device)
    shared = shared_bytes(plans[0].in_features, stages)
    allow_shared(function, shared)
    threads = STREAM_COLUMNS // columns + 32
    grid = grid_size(units, shared, *sm_limits(device_index(device)))
    launch(function, (grid, 1, 1), (threads, 1, 1),
           (x, up, plans[0].in_features, group, stages, fold), device, overlap=True,
           shared_bytes=shared)
