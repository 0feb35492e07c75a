"""Kernel-level benchmark: one-token attention, the decode kernel (cuda/decode_attention.cu) against SDPA as the
decode graph calls it (the graph's span, an additive mask), per layer shape and context length.

    python3 bench/attention.py [--spans 256 1024 4096] [--dtype fp16] [--json-out FILE]

Like bench/gemv.py, each call is captured PER_GRAPH times in a CUDA graph and replayed; the calls cycle over enough
copies of the cache to exceed twice the L2 cache, as a decode step finds its keys after streaming the weights. The
token sits at the span's last position (every key read), or with --at F at position F·span - 1 (F < 1: as in most
decode steps, where the token lies inside the graph's span and the keys after it are skipped; since session 28 a
graph step's span is the whole cache). The kernel is timed with 32 and 64 keys a chunk and 1, 4, 8 and 16 blocks a head
(one cluster; 1: as before sm_90), the clusters merged by pulling (the default) and by pushing ("_push",
at every head size: attention_ops.PUSH_MERGE), and reported as the runtime launches it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv import copies_beyond_l2, cycling, graph_seconds  # noqa: E402

from exlq.runtime.attention import attend  # noqa: E402
from exlq.runtime.kernels import attention_ops  # noqa: E402

# name: (head size, query heads, KV heads)
SHAPES = {"llama3-8b": (128, 32, 8), "llama3.2-1b": (64, 32, 8), "qwen2.5-0.5b": (64, 14, 2), "smollm2-135m": (64, 9, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    parser.add_argument("--capacity", type=int, default=8192, help="cache length behind the span (max_seq_len)")
    parser.add_argument("--at", type=float, default=1.0, help="the token's position as a fraction of the span")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    pushed = attention_ops.PUSH_MERGE, attention_ops.PUSH_HEAD_DIMS  # the runtime's merge, restored after each sweep
    results = []
    for name in args.shapes:
        dim, heads, kv_heads = SHAPES[name]
        for span in args.spans:
            position = max(0, round(args.at * span) - 1)
            nbytes = 2 * kv_heads * (position + 1) * dim * 2  # keys and values read
            copies = min(50, copies_beyond_l2(nbytes, device))  # a graph of 50 calls uses 50 at most
            caches = [tuple(torch.randn(1, kv_heads, args.capacity, dim, device=device, dtype=dtype) for _ in range(2))
                      for _ in range(copies)]
            views = [(k[:, :, :span], v[:, :, :span]) for k, v in caches]
            q = torch.randn(1, heads, 1, dim, device=device, dtype=dtype)
            where = torch.tensor([position], device=device)
            mask = torch.zeros(1, 1, 1, span, device=device, dtype=dtype)  # the graph step's additive mask
            settings_s = {}
            for chunk in attention_ops.CHUNKS:  # each chunk size and rank count, then the runtime's choice
                for ranks, push in ((1, False), (4, False), (4, True), (8, False), (8, True), (16, False), (16, True)):
                    os.environ["EXLQ_ATTENTION_CHUNK"], os.environ["EXLQ_ATTENTION_RANKS"] = str(chunk), str(ranks)
                    attention_ops.PUSH_MERGE, attention_ops.PUSH_HEAD_DIMS = push, attention_ops.HEAD_DIMS
                    settings_s[f"chunk{chunk}_ranks{ranks}{'_push' if push else ''}"] = graph_seconds(
                        cycling(lambda i: attention_ops.decode_attention(q, *views[i % copies], where, None)),
                        warm_calls=max(50, copies))
            del os.environ["EXLQ_ATTENTION_CHUNK"], os.environ["EXLQ_ATTENTION_RANKS"]
            attention_ops.PUSH_MERGE, attention_ops.PUSH_HEAD_DIMS = pushed
            runtime_ranks = attention_ops.ranks(device, span)
            runtime_push = "_push" if attention_ops.pushes(dim, runtime_ranks) else ""
            kernel_s = settings_s[f"chunk{attention_ops.chunk_size()}_ranks{runtime_ranks}{runtime_push}"]
            sdpa_s = graph_seconds(cycling(lambda i: attend(q, *views[i % copies], mask, False)), warm_calls=max(50, copies))
            got = attention_ops.decode_attention(q, *views[0], position, None)
            # The reference reads keys up to the token only (the timed mask lets SDPA read all, as a graph step's cost).
            causal = mask.masked_fill(torch.arange(span, device=device) > position, float("-inf"))
            error = ((got.float() - attend(q, *views[0], causal, False).float()).norm() / got.float().norm()).item()
            row = {"shape": name, "span": span, "kernel_us": kernel_s * 1e6, "sdpa_us": sdpa_s * 1e6,
                   "kernel_gbps": nbytes / kernel_s / 1e9, "relative_error": error,
                   **{f"{label}_us": t * 1e6 for label, t in settings_s.items()}}
            results.append(row)
            print(f"{name:13s} span {span:5d}: kernel {row['kernel_us']:6.2f} us ({row['kernel_gbps']:6.0f} GB/s; "
                  + ", ".join(f"{label} {t * 1e6:6.2f}" for label, t in settings_s.items())
                  + f") | SDPA {row['sdpa_us']:6.2f} us | rel. error {error:.1e}", flush=True)
            del caches, views
    if args.json_out:
        args.json_out.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "results": results}, indent=1))


if __name__ == "__main__":
    main()
