"""Foundation benchmark: eval-ppl vs transformers on the same windows, and chat decode speed.

    python bench/foundation.py MODEL_DIR [--device cpu|cuda] [--rows 5 --length 1024] [--json-out FILE]

Perplexity: exlq's `eval-ppl` convention (first ROWS non-overlapping LENGTH-token windows of the
WikiText-2 test text, no special tokens) in the device's default dtype and in fp32, and
transformers in fp32 on the same token windows. Speed: batch-1 greedy chat generation of 128
tokens (EOS ignored, so every run decodes the same count), median of 3 runs after a warm-up;
achieved GB/s = bytes of weights read per decoded token (every parameter once; the tied
embedding counts once, as the head) × tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exlq.data.text_sources import load_text  # noqa: E402
from exlq.eval.perplexity import evaluate_perplexity  # noqa: E402
from exlq.runtime.generator import Generator  # noqa: E402
from exlq.runtime.loader import load_model, resolve_device  # noqa: E402
from exlq.runtime.prompt_format import format_prompt, prompt_encoding  # noqa: E402
from exlq.runtime.sampler import SamplerSettings  # noqa: E402
from exlq.runtime.tokenizer import Tokenizer  # noqa: E402

CHAT = [{"role": "user", "content": "Explain in a short paragraph why the sky is blue."}]


def transformers_ppl(model_dir: Path, ids: torch.Tensor, rows: int, length: int, device: str) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in range(rows):
            x = ids[w * length : (w + 1) * length][None].to(device)
            logp = torch.log_softmax(model(x).logits.float()[0, :-1], dim=-1)
            nll -= logp.gather(1, x[0, 1:, None]).sum().item()
            n += length - 1
    return math.exp(nll / n)


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def decode_speed(model, tokenizer, new_tokens: int = 128, runs: int = 3) -> dict:
    prompt = format_prompt(CHAT, "auto", tokenizer)
    add_bos, special = prompt_encoding("auto", tokenizer, prompt)
    ids = tokenizer.encode(prompt, add_bos=add_bos, encode_special_tokens=special)
    results = []
    for i in range(runs + 1):  # the first run warms up kernels and allocators
        generator = Generator(model, tokenizer, max_seq_len=1024)
        result = generator.generate(ids, sampler=SamplerSettings(), max_new_tokens=new_tokens, eos_ids=[])
        if i:
            results.append(result)
    tps = statistics.median(r.decode_tokens_per_second for r in results)
    bytes_per_token = weight_bytes(model)
    return {
        "prompt_tokens": len(ids),
        "new_tokens": new_tokens,
        "decode_tokens_per_second": round(tps, 1),
        "time_to_first_token_s": round(statistics.median(r.time_to_first_token for r in results), 4),
        "weight_bytes_per_token": bytes_per_token,
        "achieved_GBps": round(bytes_per_token * tps / 1e9, 2),
        "sample": results[0].text[:300],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", type=int, default=5)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    device = resolve_device(args.device)
    tokenizer = Tokenizer.from_dir(args.model_dir)
    text = load_text("wikitext2").text
    ids = torch.tensor(tokenizer.encode(text[: args.rows * args.length * 8]), dtype=torch.long)

    report: dict = {
        "model": args.model_dir.name,
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "host": platform.node(),
        "torch": torch.__version__,
        "windows": f"{args.rows}x{args.length}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
    }
    for dtype in ("auto", "fp32"):
        model = load_model(args.model_dir, device=device, dtype=dtype)
        name = str(model.dtype).removeprefix("torch.")
        if f"ppl_exlq_{name}" in report:
            continue
        result = evaluate_perplexity(model, ids, length=args.length, rows=args.rows)
        report[f"ppl_exlq_{name}"] = round(result.perplexity, 4)
        report[f"ppl_seconds_{name}"] = round(result.seconds, 2)
        report[f"speed_{name}"] = decode_speed(model, tokenizer)
        del model
    report["ppl_transformers_fp32"] = round(transformers_ppl(args.model_dir, ids, args.rows, args.length, device), 4)
    report["ppl_rel_diff_fp32"] = abs(report["ppl_exlq_float32"] / report["ppl_transformers_fp32"] - 1)
    out = json.dumps(report, indent=2)
    print(out)
    if args.json_out:
        args.json_out.write_text(out)


if __name__ == "__main__":
    main()
