"""What the decode step's small kernels cost it: the GPU's decode rate with some of them not launched at all.

A probe, not a mode: the skipped kernels' outputs are stale or garbage, so the tokens mean nothing; only the rate
does. Each setting drops the model's captured graphs, patches the launches out and times `--steps` one-token steps
replayed back to back (no token read between them: the GPU's own rate). The gap between "none" and a setting is what
fusing those kernels into their neighbours could win at most (their launches and their latency on the step's
critical path), so a fusion can be priced before it is written.

    python3 bench/skip_probe.py [--shapes llama3-8b qwen2.5-0.5b] [--bpw 4.0] [--steps 256] [--rounds 2]
        [--settings none norm rope finish attention norm+rope+finish]

Kernels: norm (add_rms_norm: the residual add and RMSNorm before each attention and MLP), rope (rope_store: RoPE and
the cache write), finish (exl2_finish: the split GEMVs' output writes), attention (the one-token attention kernel).
Where the streamed GEMV folds the norm into its gather (small models, fused_ops.NORM_FOLD), `norm` leaves out only
the norms it does not fold (the first layer's input norm, the final one): run with EXLQ_NORM_FOLD=0 to price them all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exlq.cli.bench import _synthetic_model  # noqa: E402
from exlq.eval.speed import PROMPT_TOKENS  # noqa: E402
from exlq.runtime import layers  # noqa: E402
from exlq.runtime.kernels import attention_ops, exl2_ops, fused_ops, sampling_ops  # noqa: E402


def _no_norm(residual, delta, weight, eps):
    out = torch.empty(residual.shape, dtype=weight.dtype, device=residual.device)
    return residual, out


def _no_rope(q, k, v, cos, sin, key_cache, value_cache, position):
    bsz, tokens, heads, dim = q.shape
    return torch.empty(bsz, heads, tokens, dim, dtype=q.dtype, device=q.device)


def _no_attention(q, k, v, position, window):
    return torch.empty_like(q)


PATCHES = {  # kernel -> (module, attribute, replacement)
    "norm": (layers, "add_rms_norm", _no_norm),
    "rope": (fused_ops, "rope_store", _no_rope),
    "finish": (exl2_ops, "finish_sums", lambda *args: None),
    "attention": (attention_ops, "decode_attention", _no_attention),
}


@contextlib.contextmanager
def skipped(kernels: list[str]):
    saved = [(module, name, getattr(module, name)) for module, name, _ in (PATCHES[k] for k in kernels)]
    for k in kernels:
        module, name, replacement = PATCHES[k]
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def decode_rate(model, steps: int) -> float:
    """Tokens/s of `steps` replayed one-token steps after a 32-token prompt (greedy, nothing read in between), timed
    on a second pass over the same positions, so every graph those positions need is captured before the clock runs
    (the first version timed the first pass: a tree whose graphs change with the position paid a capture in it)."""
    cache = model.new_cache(PROMPT_TOKENS + steps + 8)
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT_TOKENS), device=model.device)

    def run() -> None:
        cache.reset()
        token = sampling_ops.argmax(model(prompt, cache)[:, -1])[:, None]
        for _ in range(steps):
            token = sampling_ops.argmax(model(token, cache)[:, -1])[:, None]

    run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    middle = time.perf_counter()
    cache.reset()
    model(prompt, cache)  # the prompt's share of the timed pass, taken out
    torch.cuda.synchronize()
    return steps / (middle - start - (time.perf_counter() - middle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["llama3-8b", "qwen2.5-0.5b"])
    parser.add_argument("--bpw", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=["none", "norm", "rope", "finish", "attention",
                                                          "norm+rope+finish"])
    args = parser.parse_args()
    for shape in args.shapes:
        model = _synthetic_model(shape, args.bpw, torch.device("cuda"), 128)
        for round_ in range(args.rounds):
            for setting in args.settings:
                kernels = [] if setting == "none" else setting.split("+")
                model.decode_graphs.clear()
                with skipped(kernels):
                    rate = decode_rate(model, args.steps)
                model.decode_graphs.clear()
                row = {"shape": shape, "round": round_, "skipped": setting, "tokens_per_second": round(rate, 1)}
                print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
