"""Where a launch's stragglers come from, block by block: reads `bench/step_timeline.py --records-out F.npz`.

Session 54's marks showed gate/up's 896 blocks passing their wait together and doing the same work, yet the last
block's products ending 4.4 µs after the median block's (docs/benchmarks.md). The remedy depends on the cause: slow
SMs (the same ones in every layer), SMs holding more of the launch's blocks than others, or particular column tiles or
K splits (where their weights lie). For each launch of an instance (one a layer), this prints the spread of a mark
(default 1: the register GEMV's "products done") from the launch's first wait, and the same times grouped by SM, by
how many of the launch's blocks shared the SM, by the block's rank among its SM's blocks, and by block index (with
--tiles, by K split: index // tiles). Session 55's answer (H100, 8B at positions 256 and 1024): mostly the rank, the
order a block arrived on its SM: the first of an SM's seven ends ~1.2 µs before the launch's median, the seventh ~1.2
µs after it, and the spread within an SM is ~4× that between the SMs' means.

    python3 bench/timeline_blocks.py rec_256.npz ["exl2_gemv_group<fp16_t, 1, 2>" ...] [--mark 1] [--tiles 56]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

DEFAULT_INSTANCES = ("exl2_gemv_group<fp16_t, 1, 2>", "exl2_gemv<fp16_t, 1, 2, true>")


def launch_times(records: np.ndarray, mark: int) -> np.ndarray:
    """Each block's mark `mark`, µs from the launch's first wait."""
    first_wait = int(records["wait"].min())
    return (records["marks"][:, mark].astype(np.int64) - first_wait) / 1e3


def straggler_report(launches: list[np.ndarray], mark: int = 1, tiles: int | None = None) -> dict:
    """The spread of `mark` over all blocks of `launches` (one instance's launches, e.g. one a layer) and its groupings:
    per SM (median over its blocks), the SMs' consistency between the first and second half of the launches (a
    correlation near 1: the same SMs are slow every time), by blocks the SM held in that launch, by block index, by
    the block's rank among its SM's blocks in launch order (the hardware deals blocks out in index order, so this is
    the order they arrived on the SM), and the variance split into between the SMs' means and around them."""
    by_load, by_split, by_rank = defaultdict(list), defaultdict(list), defaultdict(list)
    between, within, sm_last = [], [], []  # per launch: variance of the SMs' means, of blocks around their SM's mean
    halves = (defaultdict(list), defaultdict(list))  # per SM, the first and the second half of the launches
    times, blocks = [], []
    for n, records in enumerate(launches):
        t = launch_times(records, mark)
        half = halves[0 if n < len(launches) // 2 else 1]
        centred = t - np.median(t)
        sm_means = np.zeros(len(t))
        for sm in np.unique(records["sm"]).tolist():
            on_sm = np.flatnonzero(records["sm"] == sm)
            on_sm = on_sm[np.argsort(records["block"][on_sm], kind="stable")]  # the SM's blocks in launch order
            half[sm].extend(t[on_sm].tolist())
            by_load[len(on_sm)].extend(t[on_sm].tolist())  # by how many of this launch's blocks the SM held
            for rank, value in enumerate(centred[on_sm].tolist()):
                by_rank[rank].append(value)
            sm_means[on_sm] = t[on_sm].mean()
            sm_last.append(float(centred[on_sm].max()))
        between.append(float(np.var(sm_means)))
        within.append(float(np.var(t - sm_means)))
        if tiles:
            for block, value in zip(records["block"].tolist(), t.tolist()):
                by_split[block // tiles].append(value)
        times.append(t)
        blocks.append(records["block"])
    t, b = np.concatenate(times), np.concatenate(blocks)
    sm_median = {sm: float(np.median(halves[0][sm] + halves[1][sm])) for sm in set(halves[0]) | set(halves[1])}
    ranked = sorted(sm_median.items(), key=lambda item: -item[1])  # slowest first
    both = sorted(set(halves[0]) & set(halves[1]))
    first = [np.median(halves[0][sm]) for sm in both]
    second = [np.median(halves[1][sm]) for sm in both]
    spread = len(both) > 2 and np.std(first) > 0 and np.std(second) > 0
    consistency = float(np.corrcoef(first, second)[0, 1]) if spread else None
    order = np.argsort(b, kind="stable")
    index_groups = np.array_split(order, 8)
    return {
        "blocks": int(t.size),
        "percentiles": dict(zip(("p10", "p50", "p90", "p99", "max"), np.percentile(t, [10, 50, 90, 99, 100]).tolist())),
        "sm_consistency": consistency,
        "slowest_sms": ranked[:8],
        "fastest_sms": ranked[::-1][:4],
        "by_blocks_on_sm": {load: (len(v), float(np.median(v))) for load, v in sorted(by_load.items())},
        "by_index_octile": [float(np.median(t[g])) for g in index_groups],
        "by_split": {s: float(np.median(v)) for s, v in sorted(by_split.items())},
        "by_rank_on_sm": [float(np.mean(by_rank[rank])) for rank in sorted(by_rank)],
        "variance_between_sms": float(np.mean(between)),
        "variance_within_sms": float(np.mean(within)),
        "sm_last_after_median": dict(zip(("p50", "p90", "max"), np.percentile(sm_last, [50, 90, 100]).tolist())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", help="step_timeline.py --records-out's .npz")
    parser.add_argument("instances", nargs="*", default=list(DEFAULT_INSTANCES))
    parser.add_argument("--mark", type=int, default=1,
                        help="timeline_mark index (the register GEMV's: 0 gathered, 1 products done, 2 atomics)")
    parser.add_argument("--tiles", type=int, help="column tiles of one matrix (block // tiles: its K split)")
    args = parser.parse_args()
    data = np.load(args.records)
    names = [str(n) for n in data["instances"]]
    for instance in args.instances:
        launches = [data[f"records_{i}"] for i, name in enumerate(names) if name == instance]
        if not launches:
            print(f"{instance}: no launch in {args.records}")
            continue
        r = straggler_report(launches, args.mark, args.tiles)
        print(f"== {instance}: {len(launches)} launches, {r['blocks']} blocks, mark {args.mark} "
              "(µs from the launch's first wait)")
        print("  " + " ".join(f"{k} {v:.2f}" for k, v in r["percentiles"].items()))
        c = r["sm_consistency"]
        print("  per-SM medians, first against second half of the launches: correlation "
              + ("-" if c is None else f"{c:.2f}"))
        print("  slowest SMs " + ", ".join(f"{sm}: {v:.2f}" for sm, v in r["slowest_sms"])
              + "; fastest " + ", ".join(f"{sm}: {v:.2f}" for sm, v in r["fastest_sms"]))
        print("  by the launch's blocks on the SM: "
              + ", ".join(f"{k} ({n} blocks): {v:.2f}" for k, (n, v) in r["by_blocks_on_sm"].items()))
        print("  by rank on its SM (its blocks in launch order), mean from the launch's median: "
              + " ".join(f"{v:+.2f}" for v in r["by_rank_on_sm"]))
        print(f"  variance between the SMs' means {r['variance_between_sms']:.2f}, within an SM "
              f"{r['variance_within_sms']:.2f}; each SM's last block after the median: "
              + " ".join(f"{k} {v:.2f}" for k, v in r["sm_last_after_median"].items()))
        print("  by block index, eighths: " + " ".join(f"{v:.2f}" for v in r["by_index_octile"]))
        if r["by_split"]:
            print("  by K split: " + " ".join(f"{s}: {v:.2f}" for s, v in r["by_split"].items()))


if __name__ == "__main__":
    main()
