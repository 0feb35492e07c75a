"""GPU time of one token's sampling, per setting and vocabulary: what the decode step spends after its graph.

    python3 bench/sampling.py [--vocabs 49152 128256 151936] [--rows 1]
    EXLQ_KERNELS=0 python3 bench/sampling.py   # the torch path only, for comparison

With the next step queued behind each token's read (`TokenReader`), the host's share of sampling overlaps the GPU,
but the sampling kernels themselves run between two graph replays. Per setting: the kernels' GPU time a token under
torch.profiler (their sum, without the gaps between them, which eager launches add), the kernel count, and the wall
time of a call with a sync (host and GPU). Not a CUDA graph, as bench/gemv.py times: the sampler draws from its own
generator, whose state a graph replay would have to carry.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from exlq.runtime.sampler import Sampler, SamplerSettings  # noqa: E402

SETTINGS = {
    "greedy": SamplerSettings(),
    "infer default (T 0.8, top-p 0.95, min-p 0.05)": SamplerSettings(temperature=0.8, top_p=0.95, min_p=0.05, seed=1),
    "T 0.8 only": SamplerSettings(temperature=0.8, seed=1),
    "T 0.8, top-p 0.9": SamplerSettings(temperature=0.8, top_p=0.9, seed=1),
    "infer default, repetition penalty 1.1": SamplerSettings(temperature=0.8, top_p=0.95, min_p=0.05,
                                                             repetition_penalty=1.1, seed=1),
    "T 0.8, top-k 40": SamplerSettings(temperature=0.8, top_k=40, seed=1),
    "T 0.8, top-k 40, top-p 0.9, repetition penalty 1.1": SamplerSettings(temperature=0.8, top_k=40, top_p=0.9,
                                                                          repetition_penalty=1.1, seed=1),
    "greedy, repetition penalty 1.1": SamplerSettings(repetition_penalty=1.1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[49152, 128256, 151936])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--history", type=int, default=512, help="tokens of history (for the penalty)")
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    device = torch.device("cuda")
    for vocab in args.vocabs:
        logits = torch.randn(args.rows, vocab, device=device, dtype=torch.float16) * 3
        history = torch.randint(0, vocab, (args.rows, args.history), device=device)
        row = {"vocab": vocab, "rows": args.rows}
        for name, settings in SETTINGS.items():
            sampler = Sampler(settings)
            row[name] = measure(lambda: sampler.sample(logits, history), args.calls)
        print(json.dumps(row), flush=True)


def measure(fn, calls: int) -> dict[str, float]:
    """GPU kernel µs a call (profiler), kernels a call, and wall µs a call with a sync after each."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / calls
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, float] = {}
    for e in kernels:
        name = e.name.split("<")[0].split("(")[0]
        by_name[name] = by_name.get(name, 0.0) + (e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
    gpu = sum(by_name.values())
    result = {"gpu_us": round(gpu / calls, 2), "kernels": round(len(kernels) / calls, 1), "wall_us": round(wall * 1e6, 1)}
    if len(by_name) <= 6:  # the sampling kernels' own split (the torch path has too many to list)
        result["us_by_kernel"] = {name: round(t / calls, 2) for name, t in by_name.items()}
    return result


if __name__ == "__main__":
    main()
