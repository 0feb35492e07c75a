"""The reference converter's option grid (spec §12) and its bit accounting (spec §13).

The grid is kept as data: each table lists joint rows of per-matrix specs written in the spec's own
`bits / proportions / group sizes` notation, so a row can be checked against the spec by eye and an
extended grid is just another table (DENSE_TABLE, ours, is one; with it, the default grid). Bit allocation here is per matrix, so
`candidate_specs` gives each matrix every spec that appears in its column, whatever row it came from.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial

from exlq.errors import ExlqError
from exlq.quant.gptq import QuantSpec

# Shape used to order candidates when the caller gives none: the nominal bpw ordering barely
# depends on it, but it must be fixed so the order is deterministic.
DEFAULT_SORT_SHAPE = (4096, 4096)

# Mixture-of-experts names for the MLP matrices (spec §11.2: w1 = gate, w3 = up, w2 = down).
MATRIX_ALIASES: dict[str, str] = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def parse_spec(text: str) -> QuantSpec:
    """`"6,3,2 / .05,.2,.75 / 32,64,64"` → QuantSpec; a single group size applies to every width."""
    bits_s, props_s, groups_s = (part.strip() for part in text.split("/"))
    bits = tuple(int(b) for b in bits_s.split(","))
    proportions = tuple(float(p) for p in props_s.split(","))
    groups = tuple(int(g) for g in groups_s.split(","))
    if len(groups) == 1:
        groups = groups * len(bits)
    return QuantSpec(bits, proportions, groups)


@dataclass(frozen=True)
class OptionTable:
    """Joint rows of specs, one column per matrix, as in the converter's `qparams_*` lists."""

    matrices: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        bad = [i for i, row in enumerate(self.rows) if len(row) != len(self.matrices)]
        if bad:
            raise ValueError(f"rows {bad} do not have one spec per matrix {self.matrices}")

    def row(self, index: int) -> dict[str, QuantSpec]:
        """The joint option `index` as {matrix name: spec}."""
        return {name: parse_spec(text) for name, text in zip(self.matrices, self.rows[index])}

    def column(self, matrix_name: str) -> list[QuantSpec]:
        """Every spec in a matrix's column, in row order, duplicates removed."""
        col = self.matrices.index(matrix_name)
        return list(dict.fromkeys(parse_spec(row[col]) for row in self.rows))


# §12.1 qparams_attn: (q_proj, k_proj, v_proj, o_proj).
ATTN_TABLE = OptionTable(
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    (
        ("3,2/.05,.95/64", "3,2/.05,.95/64", "3,2/.05,.95/64", "3,2/.05,.95/64"),
        ("3,2/.1,.9/64", "3,2/.1,.9/64", "3,2/.25,.75/64", "3,2/.1,.9/64"),
        ("3,2/.1,.9/64", "3,2/.1,.9/64", "4,3/.1,.9/128", "3,2/.1,.9/64"),
        ("3,2/.1,.9/64", "3,2/.1,.9/64", "4,3/.1,.9/128", "4,3/.1,.9/128"),
        ("4,3/.1,.9/128", "4,3/.1,.9/128", "4,3/.1,.9/128", "4,3/.1,.9/128"),
        ("4,3/.1,.9/128", "4,3/.1,.9/128", "4,3/.1,.9/64", "4,3/.1,.9/128"),
        ("4/1/128", "4/1/128", "4/1/128", "4/1/128"),
        ("4/1/128", "4/1/128", "4/1/64", "4/1/128"),
        ("4/1/64", "4/1/64", "4/1/32", "4/1/64"),
        ("4/1/32", "4/1/32", "4/1/32", "4/1/32"),
        ("5,4/.1,.9/128", "5,4/.1,.9/128", "5,4/.1,.9/64", "5,4/.1,.9/128"),
        ("5,4/.1,.9/64", "5,4/.1,.9/64", "5,4/.1,.9/32", "5,4/.1,.9/64"),
        ("5,4/.1,.9/64", "5,4/.1,.9/64", "5/1/64", "5,4/.1,.9/64"),
        ("5,4/.1,.9/32", "5,4/.1,.9/32", "5/1/32", "5,4/.1,.9/32"),
        ("6,5/.1,.9/128", "6,5/.1,.9/128", "6/1/128", "6,5/.1,.9/128"),
        ("6,5/.1,.9/32", "6,5/.1,.9/32", "6/1/32", "6,5/.1,.9/32"),
        ("6/1/128", "6/1/128", "6/1/128", "6/1/128"),
        ("6/1/32", "6/1/32", "8/1/32", "6/1/32"),
        ("8/1/128", "8/1/128", "8/1/128", "8/1/128"),
    ),
)

# §12.2 qparams_mlp: (gate_proj, up_proj, down_proj).
MLP_TABLE = OptionTable(
    ("gate_proj", "up_proj", "down_proj"),
    (
        ("3,2/.05,.95/64", "3,2/.05,.95/64", "6,3,2/.05,.2,.75/32,64,64"),
        ("3,2/.1,.9/64", "3,2/.25,.75/64", "6,3,2/.05,.2,.75/32,64,64"),
        ("3,2/.1,.9/64", "3,2/.3,.7/64", "5,3/.05,.95/32"),
        ("3,2/.1,.9/64", "3,2/.3,.7/64", "5,4/.05,.95/32"),
        ("4,3/.1,.9/128", "4,3/.25,.75/128", "8,4,3/.05,.1,.85/32,128,128"),
        ("4,3/.1,.9/32", "4,3/.25,.75/32", "8,4,3/.05,.1,.85/32,32,32"),
        ("4,3/.1,.9/32", "4,3/.25,.75/32", "8,4/.05,.95/32,128"),
        ("4/1/128", "4/1/32", "8,4/.05,.95/32,128"),
        ("4/1/32", "4/1/32", "8,4/.05,.95/32,32"),
        ("5,4/.1,.9/128", "5,4/.25,.75/128", "8,5,4/.05,.1,.85/32,128,128"),
        ("5,4/.1,.9/32", "5,4/.25,.75/32", "8,5,4/.05,.1,.85/32,32,32"),
        ("6,5/.1,.9/128", "6,5/.25,.75/128", "8,6,5/.05,.1,.85/32,128,128"),
        ("6,5/.1,.9/32", "6,5/.25,.75/32", "8,6,5/.05,.1,.85/32,32,32"),
        ("6/1/128", "6/1/128", "8,6/.05,.95/32,128"),
        ("8,6/.1,.9/128", "8,6/.1,.9/128", "8,6/.15,.85/128"),
        ("8,6/.1,.9/128", "8,6/.1,.9/128", "8/1/128"),
        ("8/1/128", "8/1/128", "8/1/128"),
    ),
)

REFERENCE_TABLES: tuple[OptionTable, ...] = (ATTN_TABLE, MLP_TABLE)

# Our own options for every matrix, filling the reference grid's holes. Allocation here is per matrix, so a matrix
# can sit at any point of its own column; the reference columns jump from ~2.4 to ~3.1 bpw (no plain 3-bit option),
# from ~4.2-4.4 to ~5.1 (no 4.5- or 5-bit option for most matrices) and from ~6.2 to 8. Every spec is a valid EXL2
# layout (widths 2-8, groups of 32/64/128 in descending-bit order). The default since session 13, with the options
# scored on held-out calibration rows (measure's `holdout`): alone, the dense grid lost at 6.0 bpw, where the
# allocator trusted the optimistic errors of 5-bit groups of 32 scored on the rows they were fitted on; together
# they lowered KL at every bitrate on the GPU harness (smollm2, full calibration: docs/benchmarks.md, session 13).
# Plain 6 bits (6/1/128, 6/1/32) since session 20: down_proj's column had none, so at 6.0 bpw it had to mix ~5.5-bit
# and ~6.2-bit options; with them, smollm2's KL at 6.0 fell from 0.00973 to 0.00884 (at 5.0, 0.03005 → 0.02999).
DENSE_SPECS = (
    "3/1/128", "3/1/32", "4,3/.5,.5/128", "5,4/.5,.5/128", "5/1/128", "5/1/32", "6,5/.5,.5/128", "6/1/128", "6/1/32",
    "8,6/.5,.5/128",
)
_ALL_MATRICES = ATTN_TABLE.matrices + MLP_TABLE.matrices
DENSE_TABLE = OptionTable(_ALL_MATRICES, tuple((spec,) * len(_ALL_MATRICES) for spec in DENSE_SPECS))
DENSE_TABLES: tuple[OptionTable, ...] = (*REFERENCE_TABLES, DENSE_TABLE)

# Finer 8/6 mixes between 6.2 and 7.4 bpw. At a small hidden size the grid jumps there (smollm2's q_proj, K = 576:
# from 6/1/32 at 6.18 bpw to 8,6/.5,.5/128 at 7.42, since the 10 % 8-bit options round their share up to a group of
# 128 rows); these sit at 6.4-7.0. An experiment for the 6.0 bar (`--grid fine`), not measured on the GPU harness yet.
FINE_SPECS = ("8,6/.1,.9/32", "8,6/.25,.75/32", "8,6/.25,.75/128")
FINE_TABLE = OptionTable(_ALL_MATRICES, tuple((spec,) * len(_ALL_MATRICES) for spec in FINE_SPECS))
FINE_TABLES: tuple[OptionTable, ...] = (*DENSE_TABLES, FINE_TABLE)

# The option grids `measure` and `convert` can try (`--grid`): "reference" is the reference converter's own; each
# grid holds the one before it.
GRIDS: dict[str, tuple[OptionTable, ...]] = {"reference": REFERENCE_TABLES, "dense": DENSE_TABLES, "fine": FINE_TABLES}
DEFAULT_GRID = "dense"
DEFAULT_TABLES = GRIDS[DEFAULT_GRID]

# §12.3 qparams_headoptions; head bits 16 means "keep the head in FP16" and is the caller's business.
HEAD_OPTIONS: dict[int, QuantSpec] = {
    2: parse_spec("4,2/.3,.7/32"),
    3: parse_spec("4,3/.15,.85/32"),
    4: parse_spec("6,4/.15,.85/32"),
    5: parse_spec("6,5/.15,.85/128"),
    6: parse_spec("8,6/.15,.85/128"),
    8: parse_spec("8/1.0/128"),
}


def head_candidates(head_bits: int, in_features: int, out_features: int) -> list[QuantSpec]:
    """Layouts for lm_head at `head_bits`: the head option (§12.3), and for its two-width options the same two widths
    in groups of 32, 64 or 128 rows with as many high-width rows as fit in the option's own bits at this shape.

    The option's shares are rounded up to whole groups, so at a small hidden size its high-width part can cost far
    more than its share (smollm2, K = 576: one 8-bit group of 128 rows is 22 % of K, not 15 %); smaller groups then
    spend the same bits better. No candidate takes more bits than the option (pass the padded out_features).
    """
    option = HEAD_OPTIONS[head_bits]
    layouts = {tuple(option.group_layout(in_features)): option}
    if len(option.bits) == 2:
        budget = total_bits(option, in_features, out_features, bias=False)
        for size in (32, 64, 128):
            best = None
            for rows in range(size, in_features, size):  # high-width rows, whole groups; at least one low-width row
                share = (rows - 0.5) / in_features  # cut as exactly rows / size groups
                spec = QuantSpec(option.bits, (share, 1.0 - share), (size, size))
                if total_bits(spec, in_features, out_features, bias=False) > budget:
                    break
                best = spec
            if best is not None:
                layouts.setdefault(tuple(best.group_layout(in_features)), best)
    return list(layouts.values())


def candidate_specs(
    matrix_name: str,
    tables: tuple[OptionTable, ...] = DEFAULT_TABLES,
    shape: tuple[int, int] = DEFAULT_SORT_SHAPE,
) -> list[QuantSpec]:
    """The specs worth trying for one matrix, cheapest first (bpw at `shape` = (K, N_pad)).

    A name no table knows (another architecture's naming) gets the union of every table's specs.
    """
    return list(_candidate_specs(MATRIX_ALIASES.get(matrix_name, matrix_name), tables, shape))


def grid_digest(grid: str) -> str:
    """A short hash of a grid's tables, for job fingerprints: a work directory measured over a grid's older options
    must not resume under the same name with new ones (the dense grid gained plain 6 bits in session 20)."""
    tables = [(table.matrices, table.rows) for table in GRIDS[grid]]
    return hashlib.sha256(repr(tables).encode()).hexdigest()[:12]


def grid_specs(grid: str) -> Callable[[str], list[QuantSpec]]:
    """candidate_specs over one of GRIDS, by name (what `--grid` selects)."""
    if grid not in GRIDS:
        raise ExlqError(f"--grid must be one of {', '.join(GRIDS)} (got {grid!r})")
    return partial(candidate_specs, tables=GRIDS[grid])


@cache
def _candidate_specs(
    matrix_name: str, tables: tuple[OptionTable, ...], shape: tuple[int, int]
) -> tuple[QuantSpec, ...]:
    columns = [t.column(matrix_name) for t in tables if matrix_name in t.matrices]
    if not columns:
        columns = [t.column(name) for t in tables for name in t.matrices]
    unique = dict.fromkeys(spec for col in columns for spec in col)
    k, n = shape
    return tuple(sorted(unique, key=lambda s: (total_bits(s, k, n, bias=False), s.describe())))


def rows_per_width(spec: QuantSpec, in_features: int) -> list[tuple[int, int, int]]:
    """[(bits, groups, rows)] per width, counted as the converter's `total_bits` does (§13 steps 1-2).

    Unlike `QuantSpec.group_layout` this neither validates K nor demotes a 16-row tail: it is the
    converter's accounting, which callers compare against.
    """
    out: list[tuple[int, int, int]] = []
    remaining_groups_rows, unassigned = in_features, in_features
    for bits, share, size in zip(spec.bits, spec.proportions, spec.group_sizes):
        groups = math.ceil(min(in_features * share, remaining_groups_rows) / size)
        remaining_groups_rows -= groups * size
        rows = min(groups * size, unassigned)
        unassigned -= rows
        out.append((bits, groups, rows))
    if remaining_groups_rows > 0:
        raise ValueError(f"{spec.describe()} does not cover {in_features} input channels")
    return out


def total_bits(spec: QuantSpec, in_features: int, out_features: int, bias: bool) -> int:
    """Bits the converter charges for one matrix (§13); pass the padded out_features (multiple of 32)."""
    widths = rows_per_width(spec, in_features)
    n_groups = sum(groups for _, groups, _ in widths)
    weight_bits = sum(rows * out_features * bits for bits, _, rows in widths)
    group_bits = n_groups * (16 + 32 + 4 * out_features)  # q_scale_max, q_groups, q_scale
    perm_bits = 32 * in_features  # q_invperm
    bias_bits = 16 * out_features if bias else 0
    return weight_bits + group_bits + perm_bits + bias_bits


def bits_per_weight(spec: QuantSpec, in_features: int, out_features: int, bias: bool) -> float:
    """total_bits / (K·N [+ N with a bias]), as the converter reports a matrix's bpw (§13 step 4)."""
    numel = in_features * out_features + (out_features if bias else 0)
    return total_bits(spec, in_features, out_features, bias) / numel
