"""A left-padded batch row through a quantized KV cache against the same text alone, unquantized.

    python bench/kv_padding.py MODEL [--caches q4 q6 q8] [--device cpu]

Row 0 holds 384 WikiText-2 test tokens, row 1 another 192 left-padded to 384; both are prefilled (256 positions)
and then run 16 tokens per step through the cache. KL = mean over row 1's last 128 positions of
KL(P_alone ‖ P_batched), P_alone from one cache-less forward of row 1's tokens in fp32. Checks that a row's
quantization statistics come from its own tokens, not from its padding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exlq.data.text_sources import load_text  # noqa: E402
from exlq.runtime.kv_quant import parse_cache_type  # noqa: E402
from exlq.runtime.loader import load_model  # noqa: E402
from exlq.runtime.tokenizer import Tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--caches", nargs="+", default=["q4", "q6", "q8"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = load_model(args.model, device=args.device, dtype="fp32")
    ids = Tokenizer.from_dir(args.model).encode(load_text("wikitext2").text[:20000])
    first, second = ids[:384], ids[2000:2192]
    pad = len(first) - len(second)
    batch = torch.tensor([first, [0] * pad + second])
    reference = model(torch.tensor([second]), max_output_len=None)[0, -128:].float().log_softmax(-1)
    for name in args.caches:
        cache = model.new_cache(len(first), batch_size=2, cache_type=parse_cache_type(name))
        model(batch[:, :256], cache, pad_lengths=torch.tensor([0, pad]), max_output_len=0)
        steps = [model(batch[:, i : i + 16], cache, max_output_len=None) for i in range(256, len(first), 16)]
        got = torch.cat(steps, 1)[1].float().log_softmax(-1)
        kl = (reference.exp() * (reference - got)).sum(-1).mean().item()
        print(f"{args.model.name} {name}: padded row KL vs alone (fp32, no cache) {kl:.5f}")


if __name__ == "__main__":
    main()
