"""The streamed GEMV's tables (CPU): its chunks are whole 32-row blocks that fit a unit, and its gather table puts every
stored row's activation in the pair path's slot with its width's prescale. The kernel itself is tested on the GPU
(tests/test_kernels_gpu.py, kind "stream")."""

from __future__ import annotations

import pytest
import torch

from exlq.errors import ExlqError
from exlq.quant.exl2_pack import converter_layout
from exlq.runtime.exl2 import group_row_starts, row_bits
from exlq.runtime.kernels import exl2_stream_ops
from exlq.runtime.kernels.exl2_ops import chunk_table

LAYOUTS = [
    (576, [8, 4, 3], [0.1, 0.4, 0.5], [32, 64, 64]),
    (960, [6, 5, 4, 3, 2], [0.05, 0.1, 0.25, 0.3, 0.3], [32, 32, 64, 64, 128]),
    (14336, [4, 3], [0.96, 0.04], 128),
    (4096, [8, 6, 5], [0.3, 0.3, 0.4], 128),  # 128-row groups cut into 64- and 96-row units
]


@pytest.mark.parametrize("k, bits, props, group", LAYOUTS)
def test_stream_chunks_fit_a_unit_and_cover_every_row_once(k, bits, props, group):
    layout = converter_layout(k, bits, props, group)
    assert exl2_stream_ops.eligible(layout)
    table = chunk_table(layout, exl2_stream_ops.unit_rows)
    starts = group_row_starts(layout)
    row = word = 0
    for b, rows, first_word, first_row, g, shift in table:
        assert (first_row, first_word) == (row, word)
        assert rows % 32 == 0 and 0 < rows * b // 32 <= exl2_stream_ops.STREAM_WORD_ROWS
        groups = set()
        for block in range(rows // 32):  # block sb's scale row is group first + (sb >> shift), of this width
            at = g + (block >> shift)
            assert layout[at][0] == b and starts[at] <= first_row + 32 * block < starts[at] + layout[at][1]
            groups.add(at)
        assert len(groups) == ((rows // 32 - 1) >> shift) + 1  # the scale rows the producer copies (unit_groups)
        row, word = row + rows, word + rows * b // 32
    assert row == k


@pytest.mark.parametrize("k, bits, props, group", LAYOUTS)
def test_gather_table_holds_channel_slot_and_prescale(k, bits, props, group):
    layout = converter_layout(k, bits, props, group)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k)).to(torch.int32)
    entries = exl2_stream_ops.gather_table(layout, perm).long()
    assert torch.equal(entries & 0x1FFFF, perm.long())
    widths = row_bits(layout)
    shifts = entries >> 22
    assert torch.equal(shifts, torch.where(widths == 8, 9, widths + 3))
    slots = ((entries >> 17) & 31).view(-1, 32)
    assert torch.equal(slots.sort(dim=1).values, torch.arange(32).expand_as(slots))  # a permutation in every block


def test_pair_slots_pair_the_rows_the_pair_path_decodes_together():
    """Adjacent slots 2i, 2i + 1 hold the two rows one mask-and-or decodes at once: for 4 bits rows r and r + 4 of a
    word (nibbles 0 and 1 of each byte pair), for 3/5/6 bits rows r and r + 16, for 2 bits r and r + 8, for 8 bits
    r and r + 2."""
    partner = {4: 4, 3: 16, 5: 16, 6: 16, 2: 8, 8: 2}
    for bits, apart in partner.items():
        slots = exl2_stream_ops.pair_slot(bits, torch.arange(32))
        row_at = torch.empty(32, dtype=torch.long)
        row_at[slots] = torch.arange(32)
        assert torch.all(row_at[1::2] - row_at[0::2] == apart), bits


def test_layers_with_partial_blocks_or_huge_inputs_are_not_streamed():
    assert not exl2_stream_ops.eligible(converter_layout(592, [5, 4, 2], [0.3, 0.3, 0.4], [32, 64, 32]))  # 16-row tail
    assert not exl2_stream_ops.eligible([(4, 128)] * (exl2_stream_ops.MAX_K // 128 + 1))
    assert exl2_stream_ops.unit_rows(2) == exl2_stream_ops.unit_rows(4) == 128
    assert (exl2_stream_ops.unit_rows(5), exl2_stream_ops.unit_rows(6), exl2_stream_ops.unit_rows(8)) == (96, 64, 64)


def test_unit_table_carries_each_units_group_multipliers():
    layout = converter_layout(960, [6, 5, 4, 3, 2], [0.05, 0.1, 0.25, 0.3, 0.3], [32, 32, 64, 64, 128])
    table = chunk_table(layout, exl2_stream_ops.unit_rows)
    scale_max = torch.rand(len(layout)) + 0.5
    units = exl2_stream_ops.unit_table(table, scale_max)
    assert units.shape == (len(table), 8)
    for (bits, rows, word, row, group, shift), entry in zip(table, units):
        assert entry[:4].tolist() == [bits | rows << 8 | shift << 16, word, row, group]
        groups = ((rows // 32 - 1) >> shift) + 1
        multipliers = entry[4:].view(torch.float32)
        assert torch.equal(multipliers[:groups], scale_max[group : group + groups])
        assert not multipliers[groups:].any()


def test_host_stage_size_is_the_kernels():
    """The host sizes the kernel's shared memory: a stage of another size than the .cu's would put the activations
    past the allocation."""
    from exlq.runtime.kernels.compiler import SOURCE_DIR

    text = (SOURCE_DIR / exl2_stream_ops.SOURCE).read_text()
    assert f"4 * RowStage::WORDS == {exl2_stream_ops.STAGE_BYTES}," in text
    assert f"4 * RowsStage::WORDS == {exl2_stream_ops.ROWS_STAGE_BYTES}," in text


def test_grid_takes_the_blocks_that_fit_at_most_one_a_unit(monkeypatch):
    monkeypatch.setattr(exl2_stream_ops, "BLOCKS_PER_SM", 4)
    stage = exl2_stream_ops.shared_bytes(4096, 2)  # two stages and 4096 activations: ~41 KB, 4 an SM fit
    assert exl2_stream_ops.grid_size(10_000, stage, 132, 228 * 1024) == 4 * 132
    assert exl2_stream_ops.grid_size(100, stage, 132, 228 * 1024) == 100
    big = exl2_stream_ops.shared_bytes(14336, 4)  # ~96 KB: two an SM
    assert exl2_stream_ops.grid_size(10_000, big, 132, 228 * 1024) == 2 * 132
    monkeypatch.setattr(exl2_stream_ops, "MAX_GRID", 7)
    assert exl2_stream_ops.grid_size(10_000, stage, 132, 228 * 1024) == 7


def test_the_default_stages_fit_a_block_at_every_eligible_width(monkeypatch):
    """A Hopper block takes at most 227 KB of dynamic shared memory: the default stages at every K up to the widest
    activations the kernel accepts (MAX_K) must fit, or that launch fails on the device. By K (session 32): 5 stages
    and 2 blocks an SM at the 8B's 4096 inputs, 4 and 3 at Llama-3.2-1B's 2048, 3 and 4 at smollm2's 576."""
    monkeypatch.setattr(exl2_stream_ops, "STAGES", None)
    monkeypatch.setattr(exl2_stream_ops, "BLOCKS_PER_SM", 4)
    hopper = 227 * 1024
    for k in (32, 576, 2047, 2048, 4096, 14336, exl2_stream_ops.MAX_K):
        stages = exl2_stream_ops.stages_for(k, hopper)
        assert stages == next(s for least, s in exl2_stream_ops.STAGES_BY_K if k >= least) <= exl2_stream_ops.MAX_STAGES
        assert exl2_stream_ops.shared_bytes(k, stages) <= hopper
    for k, stages, blocks in ((4096, 5, 2), (2048, 4, 3), (576, 3, 4)):
        assert exl2_stream_ops.stages_for(k, hopper) == stages
        assert exl2_stream_ops.grid_size(10_000, exl2_stream_ops.shared_bytes(k, stages), 132, 228 * 1024) == blocks * 132


def test_stages_drop_to_what_fits_the_block_and_a_set_count_wins(monkeypatch):
    """Where the GPU gives a block less (sm_120: ~99 KB), a long row takes fewer stages rather than failing or leaving
    the kernel; EXLQ_STREAM_STAGES (STAGES) overrides the table."""
    monkeypatch.setattr(exl2_stream_ops, "STAGES", None)
    small = 99 * 1024
    assert exl2_stream_ops.stages_for(4096, small) == 5  # 93 KB
    assert exl2_stream_ops.stages_for(16384, small) == 4  # 5 stages + 32 KB of activations: 115 KB; 4: 98 KB
    assert exl2_stream_ops.stages_for(32768, small) == 2  # 2 stages + 64 KB: 97 KB
    assert exl2_stream_ops.stages_for(32768, 96 * 1024) is None
    monkeypatch.setattr(exl2_stream_ops, "STAGES", 2)
    assert exl2_stream_ops.stages_for(4096, 227 * 1024) == 2
    monkeypatch.setattr(exl2_stream_ops, "STAGES", 12)  # past STREAM_MAX_STAGES: the most the kernel has
    assert exl2_stream_ops.stages_for(576, 227 * 1024) == exl2_stream_ops.MAX_STAGES


def test_a_launch_whose_block_would_not_fit_the_gpu_takes_the_register_kernel(monkeypatch):
    """sm_120 parts give a block ~99 KB of shared memory, the H100 227 KB: long rows (the activations sit beside the
    stages) take fewer stages there, and where even 2 would not fit, the register kernel, instead of failing at
    launch."""
    from types import SimpleNamespace

    monkeypatch.setattr(exl2_stream_ops, "ENABLED", True)
    monkeypatch.setattr(exl2_stream_ops, "hopper_or_newer", lambda device: True)
    monkeypatch.setattr(exl2_stream_ops, "device_index", lambda device: 0)
    monkeypatch.setattr(exl2_stream_ops, "STAGES", None)

    def plan(k: int) -> SimpleNamespace:
        return SimpleNamespace(in_features=k, stream_chunks=object(), q_weight=torch.empty(k // 8, 256, dtype=torch.int32))

    for limit, fits in ((227 * 1024, (4096, 32768)), (99 * 1024, (4096, 16384, 32768)), (96 * 1024, (4096, 16384))):
        monkeypatch.setattr(exl2_stream_ops, "block_shared_limit", lambda index, limit=limit: limit)
        for k in fits:
            assert exl2_stream_ops.applies([plan(k)], 1, torch.float16, "cuda")
    assert not exl2_stream_ops.applies([plan(32768)], 1, torch.float16, "cuda")  # 96 KB: 2 stages + 64 KB of x


def test_multi_row_blocks_hold_the_window_their_units_cover(monkeypatch):
    """A multi-row block holds the activations of the rows its units cover (at most 128 a unit, all of K for a run
    past two strips) beside its stages: at the 8B's shapes on an H100-sized GPU (132 SMs) 2 blocks an SM of 4 stages,
    down_proj's K 14336 at 8 rows in a window of 896 rows; with a grid of 3 blocks its window is all of K and 8 rows do
    not fit (229 KB), 4 do; 16 rows of down_proj fit one block an SM (146 KB: twice the offset sums, 2 row tiles).
    Whatever it returns fits the block and the SMs and covers each block's units."""
    hopper, sm = 227 * 1024 - 144, 228 * 1024
    geometry = exl2_stream_ops.window_geometry
    assert geometry(768, 4096, 8, hopper, 132, sm, 4, 4, None) == (264, 384, 4)  # q/k/v: 24 strips x 32 chunks
    assert geometry(1792, 14336, 8, hopper, 132, sm, 4, 4, None) == (264, 896, 4)  # down_proj: 16 x 112
    assert geometry(1792, 14336, 16, hopper, 132, sm, 4, 4, None) == (132, 1792, 4)
    assert geometry(1792, 14336, 8, hopper, 132, sm, 4, 4, 3) is None
    assert geometry(1792, 14336, 4, hopper, 132, sm, 4, 4, 3) == (3, 14336, 4)
    assert geometry(1792, 14336, 4, 170 * 1024, 132, sm, 4, 4, 3) == (3, 14336, 2)  # 165 KB; 3 stages: 182 KB
    for units, k, rows, limit, wanted, most, max_grid in ((768, 4096, 8, hopper, 4, 4, None), (40, 576, 3, 99 * 1024, 8, 2, None),
                                                       (3584, 4096, 2, hopper, 2, 4, 7), (16032, 4096, 8, hopper, 4, 4, None),
                                                       (3584, 4096, 16, hopper, 4, 4, None), (768, 4096, 11, hopper, 4, 4, None)):
        grid, window, stages = geometry(units, k, rows, limit, 132, sm, wanted, most, max_grid)
        shared = exl2_stream_ops.rows_shared_bytes(window, rows, stages)
        assert shared <= limit and 2 <= stages <= wanted
        assert grid <= min(most, sm // (shared + 1152)) * 132 and (max_grid is None or grid <= max_grid)
        assert window == min(k, -(-units // grid) * 128)
    assert exl2_stream_ops.rows_shared_bytes(384, 8, 2) == 2 * 17472 + 8 * 384 * 2 + 384 + 8 * 4 * 8 * 36
    assert exl2_stream_ops.rows_shared_bytes(384, 16, 2) == 2 * 17472 + 16 * 384 * 2 + 2 * 384 + 8 * 4 * 16 * 36


def test_multi_row_launches_take_the_streamed_kernel_only_where_it_applies(monkeypatch):
    """4 to 16 fp16 rows, every matrix with stream chunks and the tensor-core gather table, on Hopper, where a block
    fits; EXLQ_STREAM_ROWS (ROWS) lists the row counts it takes, none with "0"."""
    from types import SimpleNamespace

    monkeypatch.setattr(exl2_stream_ops, "ENABLED", True)
    monkeypatch.setattr(exl2_stream_ops, "ROWS", (4, 8))
    monkeypatch.setattr(exl2_stream_ops, "hopper_or_newer", lambda device: True)
    monkeypatch.setattr(exl2_stream_ops, "device_index", lambda device: 0)
    monkeypatch.setattr(exl2_stream_ops, "block_shared_limit", lambda index: 227 * 1024)
    monkeypatch.setattr(exl2_stream_ops, "sm_limits", lambda index: (132, 228 * 1024))

    def plan(k: int, gather: object | None = True, n: int = 4096) -> SimpleNamespace:
        return SimpleNamespace(in_features=k, n_pad=n, stream_chunks=torch.empty(k // 128, 8), gather=gather)

    assert exl2_stream_ops.applies_rows([plan(4096), plan(4096)], 8, torch.float16, "cuda")
    assert exl2_stream_ops.applies_rows([plan(14336)], 8, torch.float16, "cuda")
    monkeypatch.setattr(exl2_stream_ops, "MAX_GRID", 3)  # each block's window: all of K
    assert exl2_stream_ops.applies_rows([plan(14336)], 4, torch.float16, "cuda")
    assert not exl2_stream_ops.applies_rows([plan(14336)], 8, torch.float16, "cuda")  # 229 KB: does not fit
    monkeypatch.setattr(exl2_stream_ops, "MAX_GRID", None)
    for rows in (1, 2, 3, 5):
        assert not exl2_stream_ops.applies_rows([plan(4096)], rows, torch.float16, "cuda")
    monkeypatch.setattr(exl2_stream_ops, "ROWS", exl2_stream_ops.DEFAULT_ROWS)
    for rows in range(4, 17):
        assert exl2_stream_ops.applies_rows([plan(4096)], rows, torch.float16, "cuda")
    assert not exl2_stream_ops.applies_rows([plan(4096)], 17, torch.float16, "cuda")
    assert not exl2_stream_ops.applies_rows([plan(4096)], 8, torch.bfloat16, "cuda")
    assert not exl2_stream_ops.applies_rows([plan(4096), plan(4096, gather=None)], 8, torch.float16, "cuda")
    monkeypatch.setattr(exl2_stream_ops, "ROWS", exl2_stream_ops.row_counts("1,2,3,4,8"))
    for rows in (1, 2, 3):
        assert exl2_stream_ops.applies_rows([plan(4096)], rows, torch.float16, "cuda")
    monkeypatch.setattr(exl2_stream_ops, "ROWS", exl2_stream_ops.row_counts("0"))
    assert not exl2_stream_ops.applies_rows([plan(4096)], 8, torch.float16, "cuda")
    with pytest.raises(ExlqError, match="among"):
        exl2_stream_ops.row_counts("17")
