"""Where a decode step's GPU time goes: kernel time by kernel name, under torch.profiler.

    python bench/profile_decode.py [--synthetic llama3-8b | --model DIR] [--bpw 4.0] [--steps 32] [--batch 1]

Decodes as `exlq bench` does (32-token prompt, greedy, one host sync per token, CUDA graphs if enabled; `--batch B`
sequences a step, as `exlq bench --batch B`),
first untimed over the same positions so every graph is captured, then profiles `--steps` more steps and
prints GPU time per step by kernel (CUPTI records the kernels inside graph replays) against the wall time
per step: the gap between the two is launch and host time the GPU spends idle.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exlq.cli.bench import _real_model, _synthetic_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", default="llama3-8b")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--bpw", type=float, default=4.0)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--max-seq-len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together a step")
    args = parser.parse_args()

    device = torch.device("cuda")
    model = _real_model(args.model, device) if args.model else _synthetic_model(args.synthetic, args.bpw, device, args.group_size)
    cache = model.new_cache(args.max_seq_len, batch_size=args.batch)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, 32), device=device)

    def run(count: int) -> None:
        cache.reset()
        token = model(prompt, cache).argmax(-1)
        for _ in range(count):
            token = model(token, cache).argmax(-1)
            token.tolist()

    run(args.steps)  # graphs captured, kernels loaded
    torch.cuda.synchronize()
    start = time.perf_counter()
    run(args.steps)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / args.steps
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        run(args.steps)
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            slot = per_kernel[event.name[:90]]
            slot[0] += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
            slot[1] += 1
    # the prompt's prefill is in the profile too: report per decode step, prefill included (it is one forward of 32)
    total = sum(t for t, _ in per_kernel.values())
    print(f"wall per step {wall * 1e6:.0f} us (tokens/s {1 / wall:.1f}); GPU kernel time per step "
          f"{total / args.steps:.0f} us ({100 * total / args.steps / (wall * 1e6):.0f} % of wall)")
    print(f"{'us/step':>9} {'calls/step':>10} {'us/call':>8}  kernel")
    for name, (t, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{t / args.steps:9.1f} {n / args.steps:10.1f} {t / n:8.2f}  {name}")


if __name__ == "__main__":
    main()
