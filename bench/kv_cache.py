"""Quantized KV cache: perplexity through the cache, token by token, and bytes per token.

    python bench/kv_cache.py MODEL [MODEL ...] [--rows 2] [--length 512] [--chunk 1] [--device cpu]
        [--caches fp16,q8,q6,q4,k4v2,k2v4] [--rounding] [--json-out FILE]

Each model scores the first ROWS non-overlapping LENGTH-token windows of the WikiText-2 test text
(exactly `exlq eval-ppl MODEL --rows R --length L --token-by-token --cache C`): every window runs
through the cache CHUNK tokens per step (1: a one-token prefill, then decode steps). Δ is against
the fp16 row (the unquantized cache in the compute dtype). Cache names: fp16, q8, q6, q4, kKvV
(e.g. k4v2), with optional g<group>, p<dense prefix> and s0 (no per-channel key scales) suffixes
(q4g64, q4p0, q4s0).

--rounding also prints, for one window's keys and values (fp16 cache, all layers), the relative
squared error (over the energy around the dense-prefix mean) of the rounding choices kv_quant.py's docstring compares: mid-rise vs
mid-tread, with and without the Hadamard rotation, with and without the dense-prefix offset.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exlq.data.text_sources import load_text  # noqa: E402
from exlq.eval.perplexity import evaluate_perplexity  # noqa: E402
from exlq.runtime.cache import KVCache  # noqa: E402
from exlq.runtime.kv_quant import CacheType, hadamard, parse_cache_type  # noqa: E402
from exlq.runtime.loader import load_model  # noqa: E402
from exlq.runtime.tokenizer import Tokenizer  # noqa: E402


def cache_type(name: str) -> CacheType:
    """fp16 / q4 / k4v2, optionally followed by g<group>, p<dense prefix> and s0 (no per-channel key scales)."""
    match = re.fullmatch(r"(fp16|q\d|k(\d)v(\d))(?:g(\d+))?(?:p(\d+))?(s0)?", name)
    if not match:
        raise SystemExit(f"bad cache name {name!r}")
    base, k, v, group, prefix, unscaled = match.groups()
    parsed = parse_cache_type("fp16", f"{k},{v}") if k else parse_cache_type(base)
    group, prefix = int(group or parsed.group), int(prefix if prefix is not None else parsed.dense_prefix)
    return CacheType(parsed.key_bits, parsed.value_bits, group, prefix, key_scales=not unscaled)


def rounding_errors(model, ids: torch.Tensor, bits_list=(2, 4, 8)) -> list[str]:
    """Relative MSE of each rounding variant on one window's keys and values (group 32)."""
    cache = KVCache.for_model(model, ids.numel())
    model(ids[None].to(model.device), cache, max_output_len=0)
    lines = []
    for side, store in (("keys", cache.keys), ("values", cache.values)):
        x = torch.stack(store.data).float()  # [L, B, H, T, D]
        offset = x[..., :16, :].mean(-2, keepdim=True)
        energy = ((x - offset) ** 2).mean()  # what attention can tell apart: the part that varies
        for bits in bits_list:
            row = []
            for centered in (False, True):
                y = x - offset if centered else x
                for rotate in (False, True):
                    for mode in ("tread", "rise"):
                        err = ((round_variant(y, bits, rotate, mode) - y) ** 2).mean() / energy
                        row.append(f"{'offset ' if centered else ''}{'H ' if rotate else ''}{mode} {err:.2e}")
            lines.append(f"{side} {bits} bit: " + "; ".join(row))
    return lines


def round_variant(x: torch.Tensor, bits: int, rotate: bool, mode: str, group: int = 32) -> torch.Tensor:
    groups = x.reshape(*x.shape[:-1], -1, group)
    h = hadamard(group, x.device)
    if rotate:
        groups = groups @ h
    if mode == "rise":  # codes 0..2^b-1 around (2^b-1)/2, all levels used
        half = ((1 << bits) - 1) / 2
        scale = groups.abs().amax(-1, keepdim=True).clamp(min=1e-12) / half
        out = (torch.round(groups / scale + half).clamp(0, 2 * half) - half) * scale
    else:  # codes ±(2^(b-1)-1) with an exact zero
        top = (1 << (bits - 1)) - 1
        scale = groups.abs().amax(-1, keepdim=True).clamp(min=1e-12) / top
        out = torch.round(groups / scale).clamp(-top, top) * scale
    if rotate:
        out = out @ h
    return out.reshape(x.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1)
    parser.add_argument("--caches", default="fp16,q8,q6,q4,k4v2,k2v4")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounding", action="store_true")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    text = load_text("wikitext2").text
    records = []
    for model_dir in args.models:
        model = load_model(model_dir, device=args.device)
        ids = torch.tensor(Tokenizer.from_dir(model_dir).encode(text), dtype=torch.long)
        if args.rounding:
            print("\n".join(f"{model_dir.name} {line}" for line in rounding_errors(model, ids[: args.length])), flush=True)
        base = None
        for name in args.caches.split(","):
            kind = cache_type(name)
            started = time.perf_counter()
            result = evaluate_perplexity(model, ids, length=args.length, rows=args.rows, chunk=args.chunk, cache_type=kind)
            seconds = time.perf_counter() - started
            base = result.perplexity if base is None and not kind.quantized else base
            record = {
                "model": model_dir.name, "cache": kind.name, "bytes_per_token": result.cache_bytes_per_token,
                "mb_per_window": round(result.cache_bytes_per_window / 1e6, 3), "perplexity": round(result.perplexity, 4),
                "delta_pct": None if base is None else round(100 * (result.perplexity / base - 1), 2),
                "tokens_scored": result.tokens_scored, "chunk": args.chunk, "seconds": round(seconds, 1),
                "dtype": str(model.dtype).removeprefix("torch."),
            }  # fmt: skip
            records.append(record)
            print(json.dumps(record), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
