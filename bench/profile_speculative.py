"""Where the host time of speculative decoding goes: cProfile over one greedy generation.

    python3 bench/profile_speculative.py MAIN_DIR DRAFT_DIR [--max-new-tokens 64] [--draft-tokens 4]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speculative import humaneval_prompts  # noqa: E402

from exlq.runtime.generator import Generator  # noqa: E402
from exlq.runtime.loader import load_model  # noqa: E402
from exlq.runtime.sampler import SamplerSettings  # noqa: E402
from exlq.runtime.speculative import SpeculativeGenerator  # noqa: E402
from exlq.runtime.tokenizer import Tokenizer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("main_dir", type=Path)
parser.add_argument("draft_dir", type=Path)
parser.add_argument("--max-new-tokens", type=int, default=64)
parser.add_argument("--draft-tokens", type=int, default=4)
args = parser.parse_args()
tokenizer = Tokenizer.from_dir(args.main_dir)
spec = SpeculativeGenerator(
    Generator(load_model(args.main_dir, device="cuda"), tokenizer, max_seq_len=2048),
    Generator(load_model(args.draft_dir, device="cuda"), tokenizer, max_seq_len=2048),
    draft_tokens=args.draft_tokens,
)
ids = tokenizer.encode(humaneval_prompts(1)[0])
greedy = SamplerSettings(temperature=0.0)
spec.generate(ids, sampler=greedy, max_new_tokens=16, eos_ids=[])  # warm-up: kernels, graphs
profile = cProfile.Profile()
start = time.perf_counter()
profile.enable()
result = spec.generate(ids, sampler=greedy, max_new_tokens=args.max_new_tokens, eos_ids=[])
profile.disable()
print(f"{result.new_tokens} tokens in {time.perf_counter() - start:.2f} s")
stats = pstats.Stats(profile)
stats.sort_stats("tottime").print_stats(14)
stats.sort_stats("cumulative").print_stats(22)
