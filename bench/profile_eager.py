"""Where the host time of one eager (no CUDA graph) decode step goes: cProfile over a few steps.

    EXLQ_CUDA_GRAPHS=0 python3 bench/profile_eager.py MODEL
"""

from __future__ import annotations

import cProfile
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from exlq.runtime.loader import load_model  # noqa: E402

model = load_model(sys.argv[1], device="cuda", dtype="fp16")
cache = model.new_cache(256)
token = model(torch.tensor([[1, 2, 3, 4]], device="cuda"), cache).argmax(-1)
for _ in range(3):
    token = model(token, cache).argmax(-1)
torch.cuda.synchronize()
profile = cProfile.Profile()
profile.enable()
for _ in range(10):
    token = model(token, cache).argmax(-1)
    token.item()
profile.disable()
pstats.Stats(profile).sort_stats("tottime").print_stats(18)
