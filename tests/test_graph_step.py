"""The position-independent decode step that CUDA graphs capture, and the GEMV's chunk tables (CPU)."""

from __future__ import annotations

import pytest
import torch

from exlq.quant.exl2_pack import converter_layout
from exlq.runtime.exl2 import group_row_starts
from exlq.runtime import graphs
from exlq.runtime.graphs import BUCKET, static_decode_step, step_span
from exlq.quant.synthetic import random_exl2
from exlq.runtime.exl2 import decode_q_groups
from exlq.runtime.kernels.exl2_ops import (
    CHUNK_ROWS, COLUMN_CHOICES, SPLIT_ROWS, THREADS, WIDE_COLUMNS, build_plan, chunk_table, split_points,
)
from exlq.runtime.kv_quant import CacheType
from exlq.runtime.loader import load_model


@pytest.mark.parametrize("variant", ["qwen2", "mistral-window"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("tokens", [1, 3])  # decode steps; 3: speculative verification's multi-token graphs
@pytest.mark.parametrize("cache_type", [None, CacheType(4, 4, group=16, dense_prefix=2)], ids=["fp16", "q4"])
def test_static_step_equals_eager_forward(tiny_model_dirs, variant, padded, tokens, cache_type):
    """The step a graph captures gives eager decoding's logits and cache contents (a quantized cache: its codes)."""
    model = load_model(tiny_model_dirs[variant], device="cpu", dtype="fp32")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=gen)
    steps = torch.randint(0, model.config.vocab_size, (2, 12), generator=gen)
    pad = torch.tensor([0, 4]) if padded else None
    eager_cache, static_cache = (model.new_cache(48, batch_size=2, cache_type=cache_type) for _ in range(2))
    model(ids, eager_cache, pad_lengths=pad)
    model(ids, static_cache, pad_lengths=pad)
    span = torch.arange(32)  # a bucket shorter than max_seq_len: positions beyond it are never read
    for i in range(0, steps.shape[1], tokens):
        expected = model(steps[:, i : i + tokens], eager_cache, max_output_len=None)
        position = torch.tensor([static_cache.seq_len])
        with torch.inference_mode():  # as inside model.forward, where the graphs run it
            got = static_decode_step(model, static_cache, steps[:, i : i + tokens], position, static_cache.pad_lengths, span)
        static_cache.seq_len += tokens
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    end = eager_cache.seq_len
    if cache_type is None:
        torch.testing.assert_close(static_cache.keys.data[0][:, :, :end], eager_cache.keys.data[0][:, :, :end])
    else:
        assert torch.equal(static_cache.keys.codes[0][:, :, :end], eager_cache.keys.codes[0][:, :, :end])
        assert torch.equal(static_cache.values.scales[1][:, :, :end], eager_cache.values.scales[1][:, :, :end])
    assert BUCKET % 32 == 0


@pytest.mark.parametrize("kernel_attention", [True, False])
def test_one_token_kernel_steps_span_the_whole_cache(monkeypatch, kernel_attention):
    """One-token steps into an fp16 cache, left-padded or not, on the attention kernel (whose grid depends on the span
    only through its cluster size): LONG_SPAN (1024) up to 1024 keys, then the whole cache, one or two graphs a
    generation; every other step (SDPA and quantized caches read the whole span, a head shape the kernel was not built
    for): multiples of 256."""
    from exlq.runtime.cache import KVCache

    monkeypatch.setattr(graphs.kernels, "enabled", lambda device: kernel_attention)  # a CUDA device's answer
    cache = KVCache(num_layers=1, num_kv_heads=2, head_dim=64, max_seq_len=6000)

    def span(seq_len: int, tokens: int = 1, cache: KVCache = cache, heads: int = 14) -> int:
        cache.seq_len = seq_len
        return step_span(cache, tokens, heads)

    linear = {0: 256, 255: 256, 256: 512, 600: 768, 1023: 1024, 1024: 1280, 1100: 1280, 2047: 2048, 2048: 2304,
              4500: 4608, 5999: 6000}
    kernel = {0: 1024, 255: 1024, 256: 1024, 600: 1024, 1023: 1024, 1024: 6000, 1100: 6000, 2047: 6000, 2048: 6000,
              4500: 6000, 5999: 6000}
    assert {n: span(n) for n in linear} == (kernel if kernel_attention else linear)
    cache.pad_lengths = torch.tensor([0, 5])  # a left-padded batch: the kernel skips each row's padding
    assert {n: span(n) for n in linear} == (kernel if kernel_attention else linear)
    cache.pad_lengths = None
    small = KVCache(num_layers=1, num_kv_heads=2, head_dim=64, max_seq_len=1000)
    assert span(999, cache=small) == 1000
    assert {n: span(n, tokens=3) for n in (0, 254, 600)} == {0: 256, 254: 512, 600: 768}  # multi-token steps
    assert span(600, heads=18) == 768  # 9 query heads a KV head: SDPA
    odd = KVCache(num_layers=1, num_kv_heads=2, head_dim=80, max_seq_len=6000)
    assert span(600, cache=odd) == 768  # head size 80: SDPA
    quantized = KVCache(num_layers=1, num_kv_heads=2, head_dim=64, max_seq_len=6000, cache_type="q4")
    assert span(600, cache=quantized) == 768
    assert BUCKET == 256


LAYOUTS = [
    (576, [8, 4, 3], [0.1, 0.4, 0.5], [32, 64, 64]),
    (976, [6, 5, 4, 3, 2], [0.05, 0.1, 0.25, 0.3, 0.3], [32, 32, 64, 64, 64]),
    (14336, [4, 3], [0.96, 0.04], 128),
    (592, [5, 4, 2], [0.3, 0.3, 0.4], [32, 64, 32]),  # merged small groups and a 16-row 2-bit tail
]


def test_small_equal_groups_share_a_chunk():
    layout = converter_layout(576, [4], [1.0], 32)  # 18 groups of 32 rows
    table = chunk_table(layout)
    assert [t[1] for t in table] == [128, 128, 128, 128, 64] and all(t[5] == 0 for t in table)
    assert [t[4] for t in table] == [0, 4, 8, 12, 16]


@pytest.mark.parametrize("k, bits, props, group", LAYOUTS)
@pytest.mark.parametrize("tiles", [1, 5, 112])
def test_chunk_table_and_splits_cover_every_row_once(k, bits, props, group, tiles):
    layout = converter_layout(k, bits, props, group)
    table = chunk_table(layout)
    row, word = 0, 0
    starts = group_row_starts(layout)
    for b, rows, first_word, first_row, g, shift in table:
        assert first_row == row and first_word == word and 0 < rows <= CHUNK_ROWS
        assert layout[g][0] == b and (rows * b) % 32 == 0 and starts[g] <= first_row
        # every 32-row block's group is first group + (block >> shift), all of this chunk's width
        for block in range(-(-rows // 32)):
            group = g + (block >> shift)
            assert layout[group][0] == b and starts[group] <= first_row + 32 * block < starts[group] + layout[group][1]
        row, word = row + rows, word + rows * b // 32
    assert row == k and word == sum(r * b // 32 for b, r in layout)
    points = split_points(table, tiles)
    assert points[0] == 0 and points[-1] == len(table) and points == sorted(set(points))
    for start, stop in zip(points, points[1:]):
        assert sum(t[1] for t in table[start:stop]) <= SPLIT_ROWS



@pytest.mark.parametrize("n", [32, 576, 4160, 14336])
def test_plans_split_k_for_every_gemv_width(n):
    """Each GEMV variant (1 or 2 columns a thread) gets its own K splits, sized for its tile count: wider tiles leave
    fewer blocks, so their splits are at most as long (never longer than the activations' shared memory)."""
    k = 4096
    tensors = random_exl2(k, n, 4.0, torch.Generator().manual_seed(n), group_size=128)
    plan = build_plan(tensors, decode_q_groups(tensors.q_groups, tensors.q_weight.shape[0]), n)
    table = chunk_table(decode_q_groups(tensors.q_groups, tensors.q_weight.shape[0]))
    for columns in COLUMN_CHOICES:
        tiles = plan.tiles(columns)
        assert (tiles - 1) * THREADS * columns < plan.n_pad <= tiles * THREADS * columns
        points = plan.splits(columns).tolist()
        assert points == split_points(table, tiles)
        assert points[0] == 0 and points[-1] == len(table)
    if n == 14336:  # Llama-3-8B's gate/up: 112 tiles of 128 columns, 56 of 256; 16 splits of 256 rows each
        assert plan.tiles(1) == 112 and plan.tiles(WIDE_COLUMNS) == 56
        assert len(plan.splits(1)) == len(plan.splits(WIDE_COLUMNS)) == 17


@pytest.mark.parametrize("outs, expected", [([14336, 14336], 512), ([4096, 1024, 1024], None), ([28672, 28672], 512),
                                            ([8192, 8192], 384)])
def test_group_wave_splits_fit_one_wave(outs, expected, monkeypatch):
    """A one-row wide group launch whose 256-row splits need two waves of blocks takes the shortest longer split that
    fits one (H100: 132 SMs x 7 blocks): the 8B's gate/up 8 splits of 512 rows, 896 blocks; q/k/v keeps its own
    splits; the longer tables still cover every chunk once, in splits of at most their rows."""
    from exlq.runtime.kernels import exl2_ops

    monkeypatch.setattr(exl2_ops, "GROUP_WAVE", True)
    k = 4096
    plans = []
    for i, n in enumerate(outs):
        tensors = random_exl2(k, n, 4.0, torch.Generator().manual_seed(i), group_size=128)
        layout = decode_q_groups(tensors.q_groups, tensors.q_weight.shape[0])
        plans.append(build_plan(tensors, layout, n))
        table = chunk_table(layout)
        for rows in exl2_ops.GROUP_SPLIT_ROWS:
            points = plans[-1].split_tables[WIDE_COLUMNS, rows].tolist()
            assert points[0] == 0 and points[-1] == len(table) and points == sorted(set(points))
            assert all(sum(t[1] for t in table[a:b]) <= rows for a, b in zip(points, points[1:]))
    chosen = exl2_ops.wave_split_rows(plans, 132 * 7)
    assert chosen == expected
    key = WIDE_COLUMNS if chosen is None else (WIDE_COLUMNS, chosen)
    blocks = sum(p.tiles(WIDE_COLUMNS) * (p.split_tables[key].numel() - 1) for p in plans)
    assert blocks <= 924 or chosen == exl2_ops.GROUP_SPLIT_ROWS[-1]


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [16, 128])
def test_rope_table_rows_are_the_values_computed_per_forward(dtype, head_dim):
    """cos/sin as rows of the tables made once for a cache's positions equal those computed for the forward's own
    positions (each element is the same float32 product and cos / sin, rounded once)."""
    from exlq.runtime.rope import RotaryEmbedding

    rotary = RotaryEmbedding(head_dim, 500000.0, LLAMA3_SCALING, torch.device("cpu"))
    positions = torch.randint(0, 3000, (3, 7), generator=torch.Generator().manual_seed(head_dim))
    from_tables = rotary.cos_sin(positions, dtype, limit=3000)
    computed = rotary.cos_sin(positions, dtype)
    for got, expected in zip(from_tables, computed):
        assert got.shape == expected.shape == (3, 1, 7, head_dim) and got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got, expected)


def test_rope_tables_grow_for_a_longer_cache_and_keep_the_old_ones(monkeypatch):
    """A table serves every shorter limit; a longer cache gets a new one, and the one it replaces stays alive (a
    captured graph reads it by address); made TABLE_CHUNK rows at a time, its rows are those computed at once;
    EXLQ_ROPE_TABLE=0 computes every forward's rows."""
    from exlq.runtime import rope

    monkeypatch.setattr(rope, "TABLE_CHUNK", 64)  # tables made a few rows at a time: the same rows
    rotary = rope.RotaryEmbedding(16, 10000.0, None, torch.device("cpu"))
    first = rotary.tables(torch.float16, 100)
    assert first[0].shape == (100, 16) and rotary.tables(torch.float16, 40) is first
    second = rotary.tables(torch.float16, 300)
    assert second[0].shape == (300, 16) and rotary._outgrown == [first]
    assert torch.equal(second[0][:100], first[0]) and torch.equal(second[1][:100], first[1])
    computed = rotary.cos_sin(torch.arange(300)[None], torch.float16)
    assert torch.equal(second[0], computed[0][0, 0]) and torch.equal(second[1], computed[1][0, 0])
    made = []
    monkeypatch.setattr(rope, "TABLE", False)
    monkeypatch.setattr(rotary, "tables", lambda *args: made.append(args))
    rotary.cos_sin(torch.tensor([[5]]), torch.float16, limit=300)
    assert made == []


def test_forwards_into_a_cache_take_rope_rows_from_the_tables(tiny_model_dirs, monkeypatch):
    """Forwards into a cache (prefill, eager steps and the step a graph captures) ask for RoPE rows of tables as long
    as the cache; a forward without a cache computes its own."""
    model = load_model(tiny_model_dirs["qwen2"], device="cpu", dtype="fp32")
    limits = []
    original = model.rotary.cos_sin
    monkeypatch.setattr(model.rotary, "cos_sin", lambda positions, dtype, limit=None: (
        limits.append(limit), original(positions, dtype, limit))[1])
    cache = model.new_cache(40)
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    model(ids, cache)
    model(ids[:, :1], cache)
    with torch.inference_mode():
        static_decode_step(model, cache, ids[:, :1], torch.tensor([cache.seq_len]), None, torch.arange(32))
    model(ids)
    # the prefill (then the table's own rows, made once), the eager step, the captured step, the forward with no cache
    assert limits == [40, None, 40, 40, None]
