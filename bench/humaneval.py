"""HumanEval pass@1/pass@10 for several models (e.g. FP16 and its EXL2 conversions) and KV-cache types.

    python bench/humaneval.py MODEL [MODEL ...] [--caches fp16 q4 q8] [--samples-per-task 10]
        [--temperature 0.8] [--top-p 0.95] [--batch-size 64] [--limit N] [--device cuda] [--out DIR]

Each (model, cache) pair is one `exlq eval-humaneval ... --json` run in its own process (so GPU
memory starts empty each time); the per-sample JSONL and the JSON summary are kept in --out, and a
Markdown table of all of them is printed at the end. Pairs whose summary is already in --out are
not run again, so the same command continues where an earlier, time-limited call stopped.
Defaults are the usual pass@10 protocol: all 164 problems, 10 samples each, temperature 0.8, top-p 0.95.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def same_settings(result: dict, args: argparse.Namespace) -> bool:
    s = result.get("settings", {})
    return (result.get("samples_per_task"), s.get("temperature"), s.get("top_p"), s.get("max_new_tokens"), s.get("seed"), s.get("limit")) == (
        args.samples_per_task, args.temperature, args.top_p, args.max_new_tokens, args.seed, args.limit)


def run_one(model: Path, cache: str, args: argparse.Namespace) -> dict:
    name = f"{model.name}-{cache}"
    done_before = args.out / f"{name}.json"
    if done_before.exists():  # finished in an earlier call of the same command: keep it
        kept = json.loads(done_before.read_text())
        if same_settings(kept, args):
            print(f"{name}: kept from {done_before}", file=sys.stderr)
            return kept
    command = [
        sys.executable, "-m", "exlq.cli.app", "eval-humaneval", str(model), "--cache", cache,
        "--samples-per-task", str(args.samples_per_task), "--temperature", str(args.temperature),
        "--top-p", str(args.top_p), "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
        "--device", args.device, "--seed", str(args.seed), "--json", "-o", str(args.out / f"{name}.samples.jsonl"),
    ]  # fmt: skip
    if args.limit:
        command += ["--limit", str(args.limit)]
    print("$", " ".join(command), file=sys.stderr, flush=True)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return {"model": str(model), "cache": cache, "error": done.stderr.strip().splitlines()[-1:]}
    result = json.loads(done.stdout)
    (args.out / f"{name}.json").write_text(done.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--caches", nargs="+", default=["fp16"])
    parser.add_argument("--samples-per-task", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("/tmp/humaneval"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for model in args.models:
        for cache in args.caches:
            rows.append(run_one(model, cache, args))
    print("| model | cache | problems × samples | pass@1 | pass@10 | time s | generation tok/s | device |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['cache']} | failed: {r['error']} |  |  |  |  |  |")
            continue
        p10 = f"{r['pass@10']:.4f}" if "pass@10" in r else "-"
        print(f"| {Path(r['model']).name} | {r['settings']['cache']} | {r['problems']} × {r['samples_per_task']} | "
              f"{r['pass@1']:.4f} | {p10} | {r['time_s']:.0f} | {r['generation_tokens_per_second']:.0f} | {r['device']} |")  # fmt: skip


if __name__ == "__main__":
    main()
