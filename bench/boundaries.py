"""What a kernel boundary costs in the decode step: the small kernels each timed in a chain of their own launches.

    python3 bench/boundaries.py [--hidden 4096 896 576]

(finish_add_rms_norm: add_rms_norm whose delta is a product's unfinished fp32 sums, ended and re-zeroed in the same
launch; the 8B's norm before gate/up, 5.05 µs a call in session 32's profile against add_rms_norm's 3.35.)

Each op is captured PER_GRAPH times in one CUDA graph and replayed (bench/gemv.py's `graph_seconds`), with
programmatic dependent launch on and then off (EXLQ_PDL, read at each launch), so the µs a call are what one more
such launch adds to a graph step. `silu_mul` over 8 values is the floor: a launch that does nothing worth the name.
With these, a fusion that removes N launches a step can be priced before it is written (docs/benchmarks.md,
session 25: the 8B's step runs ~390 launches, ~12 a layer).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv import graph_seconds  # noqa: E402

from exlq.runtime.kernels import fused_ops, sampling_ops  # noqa: E402


def ops(hidden: int, device: torch.device) -> dict:
    """The decode step's small kernels at one hidden size (heads of 128 dimensions, 4 query heads a KV head)."""
    residual = torch.randn(1, hidden, device=device)
    delta = torch.randn(1, hidden, device=device, dtype=torch.float16)
    weight = torch.rand(hidden, device=device, dtype=torch.float16)
    intermediate = torch.randn(1, 7 * hidden // 2, device=device, dtype=torch.float16)
    kv_heads = max(1, hidden // 512)
    q = torch.randn(1, 1, 4 * kv_heads, 128, device=device, dtype=torch.float16)
    k = torch.randn(1, 1, kv_heads, 128, device=device, dtype=torch.float16)
    cos, sin = torch.rand(1, 128, device=device, dtype=torch.float16), torch.rand(1, 128, device=device, dtype=torch.float16)
    caches = [torch.zeros(1, kv_heads, 1024, 128, device=device, dtype=torch.float16) for _ in range(2)]
    position = torch.tensor([100], device=device)
    sums = fused_ops.UnfinishedSums(torch.zeros(hidden, device=device), None)  # re-zeroed by every launch
    new_residual = torch.empty_like(residual)
    return {
        f"silu_mul, {intermediate.shape[1]} values": lambda: fused_ops.silu_mul(intermediate, intermediate),
        f"add_rms_norm, {hidden}": lambda: fused_ops.add_rms_norm(residual, delta, weight, 1e-5),
        f"finish_add_rms_norm, {hidden}": lambda: fused_ops.add_rms_norm(residual, None, weight, 1e-5, new_residual, sums),
        f"rope_store, {4 * kv_heads}+{kv_heads} heads": lambda: fused_ops.rope_store(q, k, k, cos, sin, *caches, position),
    }


def fixed_ops(device: torch.device) -> dict:
    """The ones that do not depend on the hidden size."""
    tiny = torch.randn(8, device=device, dtype=torch.float16)
    logits = torch.randn(1, 128256, device=device, dtype=torch.float16)
    return {"silu_mul, 8 values (the floor)": lambda: fused_ops.silu_mul(tiny, tiny),
            "argmax, 128256 logits": lambda: sampling_ops.argmax(logits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096, 896, 576])
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}: µs a call in a graph of its own launches, PDL on / off")
    for table in [fixed_ops(device), *(ops(hidden, device) for hidden in args.hidden)]:
        for name, fn in table.items():
            times = []
            for pdl in ("1", "0"):
                os.environ["EXLQ_PDL"] = pdl
                times.append(graph_seconds(fn) * 1e6)
            print(f"  {name:40s} {times[0]:6.2f} / {times[1]:6.2f}")
    os.environ.pop("EXLQ_PDL", None)


if __name__ == "__main__":
    main()
