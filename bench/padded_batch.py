"""Decode rate of a left-padded batch (BatchGenerator's unequal prompts, as batched HumanEval makes them) against
the same batch with equal prompts, with the one-token attention kernel and without (EXLQ_DECODE_ATTENTION=0: SDPA
under the padding mask).

    python bench/padded_batch.py [--synthetic qwen2.5-0.5b | --model DIR] [--batch 8] [--steps 256]

Each setting: prompts of 100 to 300 tokens (or all 300), one prefill, then `--steps` greedy one-token steps with
one host sync each, as BatchGenerator runs them; timed twice over the same positions (the cache rewound): the
first run includes the CUDA-graph captures a generation pays (one a span on the kernel, one every 256 positions on
SDPA), the second is the steady state.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exlq.cli.bench import _real_model, _synthetic_model  # noqa: E402


def decode_seconds(model, cache, first: torch.Tensor, steps: int) -> float:
    """Seconds of `steps` greedy one-token steps from the cache's position, one host sync a step."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    token = first
    for _ in range(steps):
        token = model(token, cache).argmax(-1)
        token.tolist()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", default="qwen2.5-0.5b")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--bpw", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=256)
    args = parser.parse_args()

    device = torch.device("cuda")
    model = _real_model(args.model, device) if args.model else _synthetic_model(args.synthetic, args.bpw, device, 128)
    gen = torch.Generator().manual_seed(0)
    longest = 300
    ids = torch.randint(0, model.config.vocab_size, (args.batch, longest), generator=gen).to(device)
    unequal = torch.linspace(100, longest, args.batch).round().long()
    for prompts, pads in (("unequal", longest - unequal), ("equal", None)):
        for kernel in ("1", "0"):
            os.environ["EXLQ_DECODE_ATTENTION"] = kernel
            model.decode_graphs.clear()
            cache = model.new_cache(longest + args.steps, batch_size=args.batch)
            first = model(ids, cache, pad_lengths=pads).argmax(-1)
            cold = decode_seconds(model, cache, first, args.steps)
            cache.truncate(longest)
            warm = decode_seconds(model, cache, first, args.steps)
            rate = lambda seconds: args.batch * args.steps / seconds  # noqa: E731
            print(f"{prompts:8s} prompts, attention {'kernel' if kernel == '1' else 'SDPA  '}: "
                  f"{rate(cold):8.1f} tok/s with graph captures, {rate(warm):8.1f} steady "
                  f"({len(model.decode_graphs._graphs)} graphs)")


if __name__ == "__main__":
    main()
