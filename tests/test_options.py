"""The converter's option grid (spec §12) and its bit accounting (§13), checked against the spec's bpw columns."""

from __future__ import annotations

import random

import pytest

from exlq.quant.gptq import QuantSpec
from exlq.quant.options import (
    ATTN_TABLE,
    DENSE_SPECS,
    DENSE_TABLE,
    DENSE_TABLES,
    FINE_SPECS,
    GRIDS,
    HEAD_OPTIONS,
    MLP_TABLE,
    REFERENCE_TABLES,
    OptionTable,
    bits_per_weight,
    candidate_specs,
    grid_digest,
    grid_specs,
    head_candidates,
    parse_spec,
    total_bits,
)

# The bpw columns of §12.1 / §12.2 / §12.3, copied from the spec.
ATTN_BPW = [2.133, 2.215, 2.426, 2.672, 3.164, 3.168, 4.039, 4.047, 4.086, 4.133,
            4.168, 4.194, 4.403, 4.459, 5.383, 5.459, 6.039, 6.633, 8.039]  # fmt: skip
MLP_BPW = [2.248, 2.326, 2.597, 2.913, 3.285, 3.368, 3.620, 4.139, 4.200,
           4.267, 4.351, 5.250, 5.333, 6.072, 6.303, 6.869, 8.036]  # fmt: skip
HEAD_BPW = {2: 2.735, 3: 3.282, 4: 4.439, 5: 5.189, 6: 6.345, 8: 8.032}

# Llama-2-7B shapes (K, N) per matrix, as the spec's bpw column uses them.
LLAMA2_SHAPES = {
    **{name: (4096, 4096) for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
    "gate_proj": (4096, 11008),
    "up_proj": (4096, 11008),
    "down_proj": (11008, 4096),
}


def joint_bpw(row: dict[str, QuantSpec]) -> float:
    bits = sum(total_bits(spec, *LLAMA2_SHAPES[name], bias=False) for name, spec in row.items())
    numel = sum(k * n for k, n in (LLAMA2_SHAPES[name] for name in row))
    return bits / numel


@pytest.mark.parametrize(("table", "expected"), [(ATTN_TABLE, ATTN_BPW), (MLP_TABLE, MLP_BPW)], ids=["attn", "mlp"])
def test_every_joint_row_reproduces_the_spec_bpw(table, expected):
    assert len(table.rows) == len(expected)
    got = [round(joint_bpw(table.row(i)), 3) for i in range(len(table.rows))]
    assert got == expected


def test_head_options_reproduce_the_spec_bpw():
    assert sorted(HEAD_OPTIONS) == [2, 3, 4, 5, 6, 8]
    got = {hb: round(bits_per_weight(spec, 4096, 32000, bias=False), 3) for hb, spec in HEAD_OPTIONS.items()}
    assert got == HEAD_BPW


@pytest.mark.parametrize("k, n", [(576, 49152), (896, 151936), (4096, 128256), (64, 256)])
def test_head_candidates_never_cost_more_than_the_head_option(k, n):
    for head_bits, option in HEAD_OPTIONS.items():
        candidates = head_candidates(head_bits, k, n)
        assert candidates[0] == option  # the option itself is always tried
        layouts = [tuple(c.group_layout(k)) for c in candidates]
        assert len(set(layouts)) == len(layouts)  # each layout once
        budget = total_bits(option, k, n, bias=False)
        assert all(total_bits(c, k, n, bias=False) <= budget and c.bits == option.bits for c in candidates)
        if len(option.bits) == 1:
            assert candidates == [option]


def test_head_candidates_spend_the_rounded_up_group_better():
    """smollm2's head (K = 576): the 6-bit option's 15 % of 8-bit rows round up to one group of 128 (22 % of K);
    in groups of 32 the same bits buy 96 8-bit rows, all with finer scales."""
    layouts = [c.group_layout(576) for c in head_candidates(6, 576, 49152)]
    assert [(8, 32)] * 3 + [(6, 32)] * 15 in layouts
    assert HEAD_OPTIONS[6].group_layout(576)[0] == (8, 128)


def test_first_attention_option_matches_the_measurement_example():
    # §11.2: Llama-2-7B's first self_attn option has total_bits = 143142912.
    assert sum(total_bits(s, 4096, 4096, bias=False) for s in ATTN_TABLE.row(0).values()) == 143142912


def test_total_bits_of_the_reference_layout_example():
    # §2.6: K=14336, [6,3,2]/[.05,.2,.75]/[32,64,64] → 23×32 @6, 45×64 @3, 167×64 + 32 @2.
    spec = QuantSpec((6, 3, 2), (0.05, 0.2, 0.75), (32, 64, 64))
    k, n = 14336, 4096
    groups = 23 + 45 + 168
    weight = (23 * 32 * 6 + 45 * 64 * 3 + (167 * 64 + 32) * 2) * n
    expected = weight + groups * 16 + groups * 32 + groups * n * 4 + k * 32
    assert total_bits(spec, k, n, bias=False) == expected
    assert total_bits(spec, k, n, bias=True) == expected + 16 * n
    assert bits_per_weight(spec, k, n, bias=True) == (expected + 16 * n) / (k * n + n)


def payload_bits_from_layout(spec: QuantSpec, k: int, n: int) -> int:
    """The file's payload (§1) from the independently written group layout of gptq.py."""
    layout = spec.group_layout(k)
    return sum(b * r * n for b, r in layout) + len(layout) * (16 + 32 + 4 * n) + 32 * k


def test_total_bits_equals_the_payload_of_the_actual_layout():
    rng = random.Random(0)
    specs = [s for name in LLAMA2_SHAPES for s in candidate_specs(name)] + list(HEAD_OPTIONS.values())
    for _ in range(300):
        spec = rng.choice(specs)
        k, n = 32 * rng.randint(1, 500), 32 * rng.randint(1, 500)
        assert total_bits(spec, k, n, bias=False) == payload_bits_from_layout(spec, k, n), (spec, k, n)


def test_parse_spec_expands_a_single_group_size():
    assert parse_spec("4,3/.1,.9/128") == QuantSpec((4, 3), (0.1, 0.9), (128, 128))
    assert parse_spec("8,4,3/.05,.1,.85/32,128,128") == QuantSpec((8, 4, 3), (0.05, 0.1, 0.85), (32, 128, 128))


def column_specs(table, name) -> set[QuantSpec]:
    return {table.row(i)[name] for i in range(len(table.rows))}


@pytest.mark.parametrize(
    ("name", "count"),
    [("q_proj", 14), ("k_proj", 14), ("v_proj", 15), ("o_proj", 14), ("gate_proj", 13), ("up_proj", 13), ("down_proj", 14)],
)
def test_candidates_are_the_deduplicated_column_sorted_by_bpw(name, count):
    table = ATTN_TABLE if name in ATTN_TABLE.matrices else MLP_TABLE
    specs = candidate_specs(name, REFERENCE_TABLES)
    assert len(specs) == count == len(set(specs))
    assert set(specs) == column_specs(table, name)
    k, n = LLAMA2_SHAPES[name]
    for tables in (REFERENCE_TABLES, DENSE_TABLES):  # sorting at another shape works too
        costs = [total_bits(s, k, n, bias=False) for s in candidate_specs(name, tables, shape=(k, n))]
        assert costs == sorted(costs)


@pytest.mark.parametrize("name", ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
def test_dense_grid_adds_our_options_to_the_reference_column(name):
    reference = set(candidate_specs(name, REFERENCE_TABLES))
    dense = candidate_specs(name, DENSE_TABLES)
    assert candidate_specs(name) == dense == grid_specs("dense")(name)  # the default is the dense grid
    assert candidate_specs(name, REFERENCE_TABLES) == grid_specs("reference")(name)
    assert len(dense) == len(set(dense)) and set(dense) == reference | {parse_spec(s) for s in DENSE_SPECS}
    assert parse_spec("3/1/128") in set(dense) - reference and parse_spec("5/1/32") in dense  # holes it fills
    for spec in dense:  # every option is a layout the format can store: descending widths, 2-8 bits
        assert list(spec.bits) == sorted(spec.bits, reverse=True) and set(spec.bits) <= {2, 3, 4, 5, 6, 8}
        assert abs(sum(spec.proportions) - 1) < 1e-9 and set(spec.group_sizes) <= {32, 64, 128}


@pytest.mark.parametrize("name", ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"])
def test_fine_grid_fills_the_gap_below_7_4_bpw_at_small_hidden_sizes(name):
    """The fine grid is the dense one plus 8/6 mixes; at smollm2's K = 576 the attention columns jump from 6.18 to
    7.42 bpw without them, and with them have options at 6.3-7.0."""
    dense = set(candidate_specs(name, DENSE_TABLES))
    fine = grid_specs("fine")(name)
    assert set(fine) == dense | {parse_spec(s) for s in FINE_SPECS} and len(fine) == len(set(fine))
    k, n = (576, 576) if name != "down_proj" else (1536, 576)
    bpw = sorted(total_bits(s, k, n, bias=False) / (k * n) for s in fine)
    assert max(b - a for a, b in zip(bpw, bpw[1:]) if 6.0 <= a < 7.0) < 0.5
    if name in ("q_proj", "k_proj", "o_proj"):
        dense_bpw = sorted(total_bits(s, k, n, bias=False) / (k * n) for s in dense)
        assert max(b - a for a, b in zip(dense_bpw, dense_bpw[1:]) if 6.0 <= a < 7.0) > 1.0  # the gap it fills
    for spec in fine:  # storable layouts
        assert list(spec.bits) == sorted(spec.bits, reverse=True) and set(spec.group_sizes) <= {32, 64, 128}
        spec.group_layout(k)


def test_candidates_use_per_width_group_sizes():
    assert QuantSpec((6, 3, 2), (0.05, 0.2, 0.75), (32, 64, 64)) in candidate_specs("down_proj")
    assert QuantSpec((8, 4), (0.05, 0.95), (32, 128)) in candidate_specs("down_proj")
    assert QuantSpec((4, 3), (0.1, 0.9), (128, 128)) in candidate_specs("q_proj")
    assert QuantSpec((8,), (1.0,), (32,)) in candidate_specs("v_proj")
    assert QuantSpec((8,), (1.0,), (32,)) not in candidate_specs("q_proj")


def test_unknown_names_get_every_spec_and_moe_names_their_mlp_column():
    union = set().union(*(column_specs(t, m) for t in (ATTN_TABLE, MLP_TABLE) for m in t.matrices))
    assert set(candidate_specs("c_fc", REFERENCE_TABLES)) == union
    assert len(candidate_specs("c_fc", REFERENCE_TABLES)) == len(union)
    assert set(candidate_specs("c_fc")) == union | {parse_spec(s) for s in DENSE_SPECS}  # the default grid's
    assert candidate_specs("w2") == candidate_specs("down_proj")
    assert candidate_specs("w1") == candidate_specs("gate_proj")


def test_grid_digest_names_a_grids_contents(monkeypatch):
    """Job fingerprints carry it (measure.measure_settings): a work directory measured over a grid's older options
    must not resume with new ones under the same grid name."""
    digests = {name: grid_digest(name) for name in GRIDS}
    assert len(set(digests.values())) == len(GRIDS) and digests["dense"] == grid_digest("dense")
    extra = OptionTable(("down_proj",), (("6/1/64",),))
    monkeypatch.setitem(GRIDS, "dense", (*GRIDS["dense"], extra))
    assert grid_digest("dense") != digests["dense"]


def test_every_matrix_has_a_plain_six_bit_option():
    """down_proj's reference column jumps from ~5.5 to ~6.2 bpw; the plain 6-bit options fill it (KL at 6.0 on
    smollm2 0.00973 -> 0.00884, docs/benchmarks.md, session 20)."""
    six = {parse_spec("6/1/128"), parse_spec("6/1/32")}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert six <= set(candidate_specs(name)), name
