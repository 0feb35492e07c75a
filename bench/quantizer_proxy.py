"""A quick CPU proxy for quantizer changes: uniform GPTQ of every decoder matrix, KL vs the FP32 model.

    python bench/quantizer_proxy.py MODEL_DIR 3:128 4:128 [--no-rotate] [--rows 16]

No measurement or allocation: every matrix gets the same spec (BITS:GROUP_SIZE), so a change to the
quantizer itself (rotation, scale search, damping) shows up directly, in minutes on a laptop CPU.
Calibration: built-in mix, ROWS x 1024 tokens; scoring: 8 x 512 tokens of WikiText-2 (needs ../shared).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exlq.data.text_sources import load_text  # noqa: E402
from exlq.eval.perplexity import evaluate_perplexity  # noqa: E402
from exlq.quant.calibration import load_calibration  # noqa: E402
from exlq.quant.convert import quantize_layer  # noqa: E402
from exlq.quant.gptq import QuantSpec  # noqa: E402
from exlq.quant.hessian import LayerRunner, linear_modules  # noqa: E402
from exlq.quant.rotate import apply_rotation, rotation_for  # noqa: E402
from exlq.runtime.loader import load_model  # noqa: E402
from exlq.runtime.tokenizer import Tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("specs", nargs="+", help="BITS:GROUP_SIZE, e.g. 3:128")
    parser.add_argument("--no-rotate", action="store_true")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--damp", type=float, default=0.01)
    args = parser.parse_args()

    tokenizer = Tokenizer.from_dir(args.model_dir)
    text = torch.tensor(tokenizer.encode(load_text("wikitext2").text[:100_000]))
    reference = load_model(args.model_dir, device="cpu")
    calibration = load_calibration(tokenizer, rows=args.rows, length=1024)
    rotation = rotation_for(not args.no_rotate)
    for text_spec in args.specs:
        bits, group_size = map(int, text_spec.split(":"))
        spec = QuantSpec.uniform(bits, group_size)
        model = load_model(args.model_dir, device="cpu")
        apply_rotation(model, rotation)
        started = time.perf_counter()
        runner = LayerRunner(model, calibration.ids)
        for i, layer in enumerate(model.model.layers):
            specs = {f"model.layers.{i}.{name}": spec for name in linear_modules(layer)}
            quantize_layer(runner, layer, specs, args.damp)
            runner.advance(layer)
        result = evaluate_perplexity(model, text, length=512, rows=8, reference=reference)
        print(f"{'rotated' if rotation else 'unrotated'} {text_spec}: ppl {result.perplexity:.3f} "
              f"KL {result.kl_divergence:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
