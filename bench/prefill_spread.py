"""Prefill times call by call: the spread behind `exlq bench`'s prefill number (the mean of 3 calls after one).

    python bench/prefill_spread.py [--synthetic llama3-8b] [--bpw 4.0] [--lengths 512 2048] [--calls 10]

Why: session 39 saw the 8B's 512-token prefill at 8.9 k to 20.0 k tokens/s across `exlq bench` runs of the same
code on one H100 (2048 tokens: 32.9-34.5 k). Each call here is timed alone (CUDA events), so a slow first call, a
steady drift or a bimodal spread can be told apart before the bench's method is changed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing, as bench/gemv.py
from exlq.cli.bench import _synthetic_model  # noqa: E402
from exlq.eval.speed import prefill_call  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", default="llama3-8b")
    parser.add_argument("--bpw", type=float, default=4.0)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda")
    model = _synthetic_model(args.synthetic, args.bpw, device, 128)
    print(f"{torch.cuda.get_device_name(device)}: {args.synthetic} at {args.bpw} bpw")
    for length in args.lengths:
        run = prefill_call(model, length)  # the call `exlq bench` times (prefill_speed)
        times = []
        for _ in range(args.calls):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        rates = [length / t for t in times]
        print(f"{length} tokens: " + " ".join(f"{r / 1e3:.1f}k" for r in rates)
              + f" | median {statistics.median(rates) / 1e3:.1f}k tokens/s")
        del run  # its cache


if __name__ == "__main__":
    main()
