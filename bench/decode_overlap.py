"""How much of a decode step is the host's turn. Greedy decode loops over the same positions:
- waiting: each token read (`.item()`) before the next step is queued (exlq/eval/speed.py's loop until session 23);
- queued: the next step queued behind the token's read (`TokenReader`, as `Generator.generate` and speed.py now do);
- queued_item: the next step queued, then `.item()`, which waits for that step too (the first attempt);
- unread: no reads at all (the GPU's own rate).
Each takes the sampler's argmax (the kernel on the GPU). Also the step's tail outside the graph (clone of the logits,
torch's argmax, the kernel's), GPU time in a CUDA graph.

    python3 bench/decode_overlap.py [--shapes llama3-8b qwen2.5-0.5b smollm2-135m] [--bpw 4.0] [--steps 256]

Synthetic models as `exlq bench --synthetic` builds them (random EXL2 codes, no calibration).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv import graph_seconds  # noqa: E402

from exlq.cli.bench import _synthetic_model  # noqa: E402
from exlq.eval.speed import PROMPT_TOKENS  # noqa: E402
from exlq.runtime.generator import TokenReader  # noqa: E402
from exlq.runtime.kernels import sampling_ops  # noqa: E402


def rates(model, steps: int, cache_tokens: int = 4096) -> dict[str, float]:
    """Tokens/s of each loop over the same positions (each run twice; the second is timed)."""
    device = model.device
    cache = model.new_cache(cache_tokens)
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT_TOKENS), device=device)

    def next_tokens(ids: torch.Tensor) -> torch.Tensor:
        return sampling_ops.argmax(model(ids, cache)[:, -1])[:, None]

    def waiting(count: int) -> None:  # read each token before queueing the next step
        token = next_tokens(prompt)
        for _ in range(count):
            token = next_tokens(token)
            token[0, 0].item()

    def queued(count: int) -> None:  # queue step t+1 behind token t's copy, then read token t
        token = next_tokens(prompt)
        for _ in range(count):
            reader.start(token)
            following = next_tokens(token)
            reader.value()
            token = following
        token[0, 0].item()

    def queued_item(count: int) -> None:  # queue step t+1, then .item() on token t: waits for step t+1 as well
        token = next_tokens(prompt)
        for _ in range(count):
            following = next_tokens(token)
            token[0, 0].item()
            token = following
        token[0, 0].item()

    def unread(count: int) -> None:
        token = next_tokens(prompt)
        for _ in range(count):
            token = next_tokens(token)

    result = {}
    reader = TokenReader(device)
    loops = (("waiting", waiting), ("queued", queued), ("queued_item", queued_item), ("unread", unread),
             ("waiting_again", waiting), ("queued_again", queued))
    for name, loop in loops:
        for timed in (False, True):
            cache.reset()
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            loop(steps)
            torch.cuda.synchronize(device)
            if timed:
                result[name] = steps / (time.perf_counter() - start)
    return result


def tail_microseconds(vocab: int, device: torch.device) -> dict[str, float]:
    """The work after a graph step, GPU time alone (bench/gemv.py's graph of PER_GRAPH calls): the logits' clone,
    torch's argmax (on fp16, and on the float32 copy the sampler made before) and the argmax kernel."""
    logits = torch.randn(1, 1, vocab, device=device, dtype=torch.float16)
    calls = {"clone": lambda: logits.clone(), "argmax": lambda: logits[:, -1].argmax(-1),
             "argmax_fp32": lambda: logits[:, -1].float().argmax(-1),
             "argmax_kernel": lambda: sampling_ops.argmax(logits[:, -1])}
    return {name: graph_seconds(fn) * 1e6 for name, fn in calls.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["llama3-8b", "qwen2.5-0.5b", "smollm2-135m"])
    parser.add_argument("--bpw", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=256)
    args = parser.parse_args()
    device = torch.device("cuda")
    for shape in args.shapes:
        model = _synthetic_model(shape, args.bpw, device, 128)
        with torch.inference_mode():
            row = {"shape": shape, "bpw": args.bpw, **{k: round(v, 1) for k, v in rates(model, args.steps).items()},
                   "tail_us": {k: round(v, 2) for k, v in tail_microseconds(model.config.vocab_size, device).items()}}
        print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
