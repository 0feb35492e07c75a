"""GPU vs host time of an eager multi-token forward (speculative verification): torch.profiler table.

    python3 bench/profile_verify.py MODEL [--tokens 5] [--past 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from exlq.runtime.loader import load_model  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("model", type=Path)
parser.add_argument("--tokens", type=int, default=5)
parser.add_argument("--past", type=int, default=200)
args = parser.parse_args()
model = load_model(args.model, device="cuda")
cache = model.new_cache(2048)
ids = torch.randint(0, 1000, (1, args.past), device="cuda")
step = torch.randint(0, 1000, (1, args.tokens), device="cuda")
model(ids, cache)
for tokens in (args.tokens, 1):
    for _ in range(3):
        model(step[:, :tokens], cache)
        cache.truncate(args.past)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        model(step[:, :tokens], cache)
        cache.truncate(args.past)
    torch.cuda.synchronize()
    print(f"{tokens}-token eager forward: {(time.perf_counter() - start) * 100:.2f} ms")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        model(step, cache)
        cache.truncate(args.past)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
