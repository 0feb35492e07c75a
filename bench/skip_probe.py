"""What the decode step's launches cost it: the GPU's decode rate with some of them not launched at all.

A probe, not a mode: the skipped kernels' outputs are stale or garbage (sums they would end keep growing), so the
tokens mean nothing; only the rate does. Each setting drops the model's captured graphs, takes the chosen kernels'
launches out (by instance name, at every kernel module's `launch`: today's kernels whatever path launches them) and
times `--steps` one-token steps replayed back to back (no token read between them: the GPU's own rate). The gap
between "none" and a setting is what those launches cost the step in its chain of overlapping launches (their
latency on its critical path, not their time alone), so a fusion or a faster kernel can be priced before it is
written. The argmax that picks each next token is never skipped (the ids must stay valid).

    python3 bench/skip_probe.py [--shapes llama3-8b qwen2.5-0.5b] [--bpw 4.0] [--steps 256] [--rounds 2]
        [--settings none finish norm rope attention small stream register group gemvs]

Settings join groups with "+": finish (exl2_finish: split products' ends), norm (finish_add_rms_norm,
exl2_finish_norm, add_rms_norm: the residual adds and norms), rope (rope_store, finish_rope_store), attention
(decode_attention, rope_decode_attention), small (those four), stream (the one-row streamed GEMVs: every launch of a
small model's, q/k/v and o_proj on the 8B), register (exl2_gemv: the 8B's down_proj and head), group
(exl2_gemv_group: the 8B's gate/up), gemvs (those three). Session 28 patched the Python functions instead (that
table in docs/benchmarks.md); kernels launched with nothing to wait on cost the chain ~nothing, so a setting prices
the kernels' work and latency.
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
from exlq.runtime.kernels import attention_ops, exl2_ops, exl2_stream_ops, fused_ops, kv_ops, sampling_ops  # noqa: E402

MODULES = (attention_ops, exl2_ops, exl2_stream_ops, fused_ops, kv_ops, sampling_ops)  # each binds its own `launch`
GROUPS = {  # setting -> instance-name prefixes of the launches it leaves out
    "finish": ("exl2_finish<",),
    "norm": ("finish_add_rms_norm<", "exl2_finish_norm<", "add_rms_norm<"),
    "rope": ("rope_store<", "finish_rope_store<"),
    "attention": ("decode_attention<", "rope_decode_attention<"),
    "stream": ("exl2_stream<",),
    "register": ("exl2_gemv<",),
    "group": ("exl2_gemv_group<",),
}
GROUPS["small"] = GROUPS["finish"] + GROUPS["norm"] + GROUPS["rope"] + GROUPS["attention"]
GROUPS["gemvs"] = GROUPS["stream"] + GROUPS["register"] + GROUPS["group"]


def prefixes_of(setting: str) -> tuple[str, ...]:
    """The instance-name prefixes a setting ("none", or groups joined by "+") leaves out."""
    return () if setting == "none" else tuple(p for group in setting.split("+") for p in GROUPS[group])


NAMES: dict[int, str] = {}  # kernel handle -> instance name, as `kernel` handed them out (kept across settings)


@contextlib.contextmanager
def skipped(prefixes: tuple[str, ...], counts: dict[str, int], launches: list | None = None):
    """Every kernel module's `kernel` records each handle's instance name, and its `launch` returns at once for the
    instances whose name starts with one of `prefixes` (counted by name in `counts`: a setting that skips nothing
    shows); `launches`, where given, gets (name, grid, block) of every launch made (bench/step_timeline.py)."""
    saved = [(module, module.kernel, module.launch) for module in MODULES]

    def recording(original):
        def kernel(source, instances, name, device):
            handle = original(source, instances, name, device)
            NAMES[handle] = name
            return handle
        return kernel

    def skipping(original):
        def launch(function, *args, **kwargs):
            name = NAMES.get(function, "")
            if launches is not None:
                launches.append((name, tuple(args[0]), tuple(args[1])))
            if prefixes and name.startswith(prefixes):
                counts[name] = counts.get(name, 0) + 1
                return None
            return original(function, *args, **kwargs)
        return launch

    for module, kernel, launch in saved:
        module.kernel, module.launch = recording(kernel), skipping(launch)
    try:
        yield
    finally:
        for module, kernel, launch in saved:
            module.kernel, module.launch = kernel, launch


def decode_rate(model, steps: int, prompt_tokens: int = PROMPT_TOKENS) -> float:
    """Tokens/s of `steps` replayed one-token steps after a `prompt_tokens` prompt (greedy, nothing read between), timed
    on a second pass over the same positions, so every graph those positions need is captured before the clock runs
    (the first version timed the first pass: a tree whose graphs change with the position paid a capture in it)."""
    cache = model.new_cache(prompt_tokens + steps + 8)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), device=model.device)

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
    parser.add_argument("--settings", nargs="+", default=["none", "finish", "norm", "rope", "attention", "small",
                                                          "stream", "register", "group", "gemvs"])
    args = parser.parse_args()
    for shape in args.shapes:
        model = _synthetic_model(shape, args.bpw, torch.device("cuda"), 128)
        for round_ in range(args.rounds):
            for setting in args.settings:
                model.decode_graphs.clear()
                counts: dict[str, int] = {}
                with skipped(prefixes_of(setting), counts):
                    rate = decode_rate(model, args.steps)
                model.decode_graphs.clear()
                row = {"shape": shape, "round": round_, "skipped": setting, "tokens_per_second": round(rate, 1),
                       "launches_left_out": counts}  # eager launches (prefills, warm-ups, captures), by instance
                print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
