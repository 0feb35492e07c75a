"""Speculative decoding: decode tokens/s with and without a draft model, and the acceptance rate.

    python bench/speculative.py MAIN_DIR DRAFT_DIR [--prompts 8] [--max-new-tokens 128] [--draft-tokens 4] [--device cuda]

Prompts are the first HumanEval problems (../shared/data/humaneval, or $EXLQ_SHARED_DIR), completed
raw and greedily, so both runs produce the same tokens and only the speed differs (checked).
Tokens/s = new tokens / wall time of the whole call (prompt prefill included), summed over prompts.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exlq.runtime.generator import Generator  # noqa: E402
from exlq.runtime.loader import load_model  # noqa: E402
from exlq.runtime.sampler import SamplerSettings  # noqa: E402
from exlq.runtime.speculative import SpeculativeGenerator  # noqa: E402
from exlq.runtime.tokenizer import Tokenizer  # noqa: E402


def humaneval_prompts(count: int) -> list[str]:
    shared = Path(os.environ.get("EXLQ_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
    with gzip.open(shared / "data" / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        return [json.loads(line)["prompt"] for line, _ in zip(f, range(count))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("main_dir", type=Path)
    parser.add_argument("draft_dir", type=Path)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    tokenizer = Tokenizer.from_dir(args.main_dir)
    main_model = load_model(args.main_dir, device=args.device)
    draft_model = load_model(args.draft_dir, device=args.device)
    greedy = SamplerSettings(temperature=0.0)
    plain = Generator(main_model, tokenizer, max_seq_len=2048)
    spec = SpeculativeGenerator(
        Generator(main_model, tokenizer, max_seq_len=2048),
        Generator(draft_model, Tokenizer.from_dir(args.draft_dir), max_seq_len=2048),
        draft_tokens=args.draft_tokens,
    )
    totals = {"plain": [0, 0.0], "draft": [0, 0.0]}
    proposed = accepted = 0
    for prompt in humaneval_prompts(args.prompts):
        ids = tokenizer.encode(prompt)
        runs = {}
        for name, gen in (("plain", plain), ("draft", spec)):
            started = time.perf_counter()
            result = gen.generate(ids, sampler=greedy, max_new_tokens=args.max_new_tokens, eos_ids=[])
            seconds = time.perf_counter() - started
            totals[name][0] += result.new_tokens
            totals[name][1] += seconds
            runs[name] = result
        if runs["plain"].token_ids != runs["draft"].token_ids:
            raise SystemExit("speculative greedy output differs from plain greedy output")
        proposed += runs["draft"].draft_proposed
        accepted += runs["draft"].draft_accepted
    summary = {
        "main": str(args.main_dir), "draft": str(args.draft_dir), "device": str(main_model.device),
        "dtype": str(main_model.dtype), "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
        "draft_tokens": args.draft_tokens,
        "plain_tokens_per_s": round(totals["plain"][0] / totals["plain"][1], 2),
        "draft_tokens_per_s": round(totals["draft"][0] / totals["draft"][1], 2),
        "acceptance_rate": round(accepted / max(proposed, 1), 3),
    }
    summary["speedup"] = round(summary["draft_tokens_per_s"] / summary["plain_tokens_per_s"], 2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
