"""Kernel-level benchmark: the EXL2 GEMV alone at Llama-3-8B layer shapes, GB/s against copy bandwidth.

    python3 bench/gemv.py [--bpw 4.0] [--rows 1 4] [--shapes 4096x14336 ...] [--group-size 32] [--json-out FILE]
    python3 bench/gemv.py --once --shapes 4096x14336     # a few plain calls, no timing: for ncu (gpu_ab.sh STAGE=ncu)
    python3 bench/gemv.py --step llama3-8b [--floor dram_step.json] [--after-norm]   # each GEMV launch of the one-token step

Each product is captured 50 times in one CUDA graph and the graph replayed, so launch overhead from Python
is not in the number. The 50 products cycle over enough copies of the layer to exceed twice the L2 cache,
so the weights stream from device memory as in a real decode step (a 4096x14336 layer at 4 bpw fits in the
50 MB L2; `--l2-hot` times one copy, as before 2026-12-01). Bytes counted: every stored tensor of the layer
(q_weight, q_scale, q_scale_max, q_groups, q_invperm), read once per product. torch's FP16 GEMV (F.linear on
the dense weight) is timed the same way for reference.

`--step SHAPE` times each GEMV launch of a synthetic shape's one-token step as the runtime groups them (q/k/v in one
launch, o, gate/up in one, down with silu(gate)·up formed in its gather, the 6-bit head), each with its finish, and
adds them up: the step's GEMV time on this code, against the pure reads of the same bytes (`--floor`: the JSON of
`bench/dram_pattern.py --step SHAPE`) and the issue's target (75 % of the roofline). Each launch is timed after
itself, so its start overlaps its own kind's tail; `--after-norm` also times it after a one-row add_rms_norm whose
output it reads (one block, as before gate/up in the model), minus that norm alone: where most SMs idle before a
launch, a one-wave grid has all its blocks' early loads done by the wait, which launch after launch hides (session 42:
gate/up in one wave 0.3-0.6 µs slower timed after itself, the 8B's decode 3 % faster).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from exlq.eval.speed import copy_bandwidth  # noqa: E402
from exlq.quant.synthetic import layer_linears, random_exl2, synthetic_config  # noqa: E402
from exlq.runtime.exl2 import Exl2Linear  # noqa: E402
from exlq.runtime.kernels import exl2_ops, exl2_stream_ops, fused_ops  # noqa: E402

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024)]  # (in_features K, out_features N)
PER_GRAPH = 50


def shape(text: str) -> tuple[int, int]:
    """'4096x14336' -> (4096, 14336)."""
    k, n = text.lower().split("x")
    return int(k), int(n)


def copies_beyond_l2(nbytes: int, device: torch.device, hot: bool = False) -> int:
    """How many copies of an nbytes tensor together exceed twice the L2 cache (so none stays cached)."""
    if hot:
        return 1
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, -(-2 * l2 // nbytes))


def cycling(product):
    """A no-argument callable that calls product(0), product(1), ... in turn (one layer copy per call)."""
    counter = iter(range(1 << 62))
    return lambda: product(next(counter))


def graph_seconds(fn, replays: int = 20, warm_calls: int = PER_GRAPH) -> float:
    """Seconds per call of `fn`, from replaying a CUDA graph of PER_GRAPH calls (after warm_calls uncaptured)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warm_calls):  # every layer copy once, before capture (a first call builds its launch plan)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(PER_GRAPH):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (replays * PER_GRAPH)


def step_launches(name: str) -> list[tuple[str, int, list[int], float | None, int]]:
    """(label, K, out features of each matrix, bpw (None: the one asked for), launches a step) of each GEMV launch of
    a one-token step of synthetic shape `name`, grouped as the runtime groups them; the head at 6 bits (the
    converter's default; also exlq.quant.synthetic's)."""
    c = synthetic_config(name)
    shapes, layers = layer_linears(c), c["num_hidden_layers"]
    groups = {"q/k/v": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
              "gate/up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
    launches = []
    for label, names in groups.items():  # (out, in) each; a launch's matrices share their input
        launches.append((label, shapes[names[0]][1], [shapes[name][0] for name in names], None, layers))
    launches.append(("head", c["hidden_size"], [c["vocab_size"]], 6.0, 1))  # tied or not (synthetic.SyntheticStore)
    return launches


def time_step(name: str, bpw: float, bandwidth: float, floor: dict | None, after_norm: bool = False) -> dict:
    """Each of step_launches(name) timed as the runtime calls it (matmul_many; down_proj with its `up`), and the sum;
    `after_norm`: also after a one-row add_rms_norm that makes its input, less the norm alone."""
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    floors = {m["matrix"]: m for m in floor["matrices"]} if floor else {}
    rows, total, total_after, total_floor = [], 0.0, 0.0, {"plain": 0.0, "chained": 0.0}
    for label, k, outs, launch_bpw, count in step_launches(name):
        def make() -> list[Exl2Linear]:
            return [Exl2Linear(random_exl2(k, n, launch_bpw or bpw, generator), k, n, dtype=torch.float16) for n in outs]

        first = make()
        stored = sum(layer.kernel_plan().q_weight.numel() * 4 for layer in first)  # weights only, as dram_pattern
        copies = [first] + [make() for _ in range(copies_beyond_l2(stored, device) - 1)]
        plans = [[layer.kernel_plan() for layer in copy] for copy in copies]
        x = torch.randn(1, k, device=device, dtype=torch.float16)
        up = x.clone() if label == "down" else None
        seconds = graph_seconds(cycling(lambda j: exl2_ops.matmul_many(plans[j % len(plans)], x, up)),
                                warm_calls=max(PER_GRAPH, len(plans)))
        row = {"launch": label, "K": k, "N": outs, "launches": count, "microseconds": seconds * 1e6,
               "weight_bytes": stored, "fraction_of_copy": stored / seconds / 1e9 / bandwidth}
        total += seconds * 1e6 * count
        line = (f"{label:8s} K={k:5d} N={'+'.join(map(str, outs)):17s} x{count:2d}: {seconds * 1e6:7.1f} us "
                f"{100 * row['fraction_of_copy']:5.1f} % of copy")
        if after_norm:
            residual = torch.randn(1, k, device=device)
            delta = torch.randn(1, k, device=device, dtype=torch.float16)
            weight = torch.ones(k, device=device, dtype=torch.float16)

            def normed() -> torch.Tensor:
                return fused_ops.add_rms_norm(residual, delta, weight, 1e-5)[1]

            norm_seconds = graph_seconds(normed)
            pair_seconds = graph_seconds(cycling(lambda j: exl2_ops.matmul_many(plans[j % len(plans)], normed(), up)),
                                         warm_calls=max(PER_GRAPH, len(plans)))
            row["norm_us"], row["after_norm_us"] = norm_seconds * 1e6, (pair_seconds - norm_seconds) * 1e6
            total_after += row["after_norm_us"] * count
            line += f" | after a norm {row['after_norm_us']:6.1f} us (norm alone {row['norm_us']:4.1f})"
        if label in floors:
            for kind in total_floor:
                row[f"{kind}_read_us"] = floors[label][f"best_{kind}_us"]
                total_floor[kind] += floors[label][f"best_{kind}_us"] * count
            line += f" | pure read {row['plain_read_us']:6.1f} us, chained {row['chained_read_us']:6.1f} us"
        print(line)
        rows.append(row)
        del copies, plans, first
    weight_bytes = sum(r["weight_bytes"] * r["launches"] for r in rows)
    roofline = bandwidth * 1e9 / weight_bytes
    print(f"{name} at {bpw} bpw: the step's GEMVs {total / 1e3:.3f} ms = {1e6 / total:.0f} tok/s if nothing else ran "
          f"(roofline {roofline:.0f}, target 75 % = {0.75 * roofline:.0f})")
    if after_norm:
        print(f"  each after a norm: {total_after / 1e3:.3f} ms = {1e6 / total_after:.0f} tok/s")
    for kind, microseconds in total_floor.items():
        if microseconds:
            print(f"  the same bytes as {kind} pure reads: {microseconds / 1e3:.3f} ms = {1e6 / microseconds:.0f} tok/s")
    return {"shape": name, "bpw": bpw, "launches": rows, "gemv_step_ms": total / 1e3,
            "gemv_step_after_norm_ms": total_after / 1e3 if after_norm else None,
            "roofline_tokens_per_second": roofline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bpw", type=float, default=4.0)
    parser.add_argument("--rows", type=int, nargs="+", default=[1])
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--shapes", type=shape, nargs="+", default=SHAPES, help="KxN (in x out features) each")
    parser.add_argument("--group-size", type=int, default=128, help="rows per group (real conversions often use 32)")
    parser.add_argument("--l2-hot", action="store_true", help="one copy per layer (may stay in L2)")
    parser.add_argument("--once", action="store_true", help="8 plain calls per shape and row count, no timing (profilers)")
    parser.add_argument("--step", help="time the GEMV launches of this synthetic shape's one-token step instead")
    parser.add_argument("--floor", type=Path, help="with --step: bench/dram_pattern.py --step's JSON, side by side")
    parser.add_argument("--after-norm", action="store_true",
                        help="with --step: also time each launch after a one-row norm that makes its input")
    args = parser.parse_args()
    device = torch.device("cuda")
    if args.step:
        bandwidth = copy_bandwidth(device)
        print(f"{torch.cuda.get_device_name(device)}: copy bandwidth {bandwidth:.0f} GB/s")
        floor = json.loads(args.floor.read_text())["step_floor"] if args.floor else None
        record = time_step(args.step, args.bpw, bandwidth, floor, args.after_norm)
        if args.json_out:
            args.json_out.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "copy_gbps": bandwidth,
                                                 **record}, indent=2))
        return
    if args.once:
        generator = torch.Generator(device=device).manual_seed(0)
        for k, n in args.shapes:
            layer = Exl2Linear(random_exl2(k, n, args.bpw, generator, group_size=args.group_size), k, n, dtype=torch.float16)
            for rows in args.rows:
                x = torch.randn(rows, k, device=device, dtype=torch.float16)
                for _ in range(8):
                    layer(x)
        torch.cuda.synchronize()
        return
    bandwidth = copy_bandwidth(device)
    generator = torch.Generator(device=device).manual_seed(0)
    results = []
    print(f"{torch.cuda.get_device_name(device)}: copy bandwidth {bandwidth:.0f} GB/s")
    for k, n in args.shapes:
        def make():
            return random_exl2(k, n, args.bpw, generator, group_size=args.group_size)

        tensors = make()
        stored = tensors.total_bits() // 8
        layers = [Exl2Linear(tensors if i == 0 else make(), k, n, dtype=torch.float16)
                  for i in range(copies_beyond_l2(stored, device, args.l2_hot))]
        dense = [torch.randn(n, k, device=device, dtype=torch.float16)
                 for _ in range(copies_beyond_l2(n * k * 2, device, args.l2_hot))]
        layer = layers[0]
        for rows in args.rows:
            x = torch.randn(rows, k, device=device, dtype=torch.float16)
            seconds = graph_seconds(cycling(lambda i: layers[i % len(layers)](x)), warm_calls=max(PER_GRAPH, len(layers)))
            fp16_seconds = graph_seconds(cycling(lambda i: F.linear(x, dense[i % len(dense)])))
            plan = layer.kernel_plan()
            first = exl2_ops.launch_rows([plan], rows, x.dtype, device)  # the first launch's rows; "+": more launches
            tensor_cores, columns = exl2_ops.gemv_route([plan], first, x.dtype)
            kernel = "mma" if tensor_cores else "wide" if columns > 1 else "narrow"
            if exl2_stream_ops.applies([plan], first, x.dtype, device):
                kernel = "stream"
            elif exl2_stream_ops.applies_rows([plan], first, x.dtype, device):
                kernel = "srows"
            kernel += "+" if first < rows else ""
            row = {
                "k": k, "n": n, "rows": rows, "kernel": kernel,
                "bpw": round(layer.bits_per_weight, 4), "microseconds": seconds * 1e6,
                "gbps": stored / seconds / 1e9, "fraction_of_copy": stored / seconds / 1e9 / bandwidth,
                "fp16_microseconds": fp16_seconds * 1e6, "fp16_gbps": n * k * 2 / fp16_seconds / 1e9,
            }
            results.append(row)
            print(f"K={k:5d} N={n:5d} M={rows:2d} {kernel:6s} bpw {row['bpw']:.3f}: {row['microseconds']:7.1f} us "
                  f"{row['gbps']:6.0f} GB/s = {100 * row['fraction_of_copy']:5.1f}% of copy | "
                  f"torch fp16 {row['fp16_microseconds']:7.1f} us {row['fp16_gbps']:6.0f} GB/s")
    if args.json_out:
        args.json_out.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "copy_gbps": bandwidth,
                                             "l2_hot": args.l2_hot, "group_size": args.group_size,
                                             "results": results}, indent=2))


if __name__ == "__main__":
    main()
