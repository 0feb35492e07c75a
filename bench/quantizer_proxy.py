"""A quick CPU proxy for quantizer changes: uniform GPTQ of every decoder matrix, KL vs the FP32 model.

    python bench/quantizer_proxy.py MODEL_DIR 3:128 4:128 [--no-rotate] [--rows 16]
    python bench/quantizer_proxy.py MODEL_DIR 3:128 --asym gptaq --asym-lambda 0.1 --asym-alpha 0.25
    python bench/quantizer_proxy.py MODEL_DIR fp 8:32 --head 6     # what a 6-bit head alone costs, and with 8-bit layers

No measurement or allocation: every matrix gets the same spec (BITS:GROUP_SIZE), so a change to the
quantizer itself (rotation, scale search, damping) shows up directly, in minutes on a laptop CPU. The spec `fp`
leaves the decoder unquantized; `--head BITS` also quantizes lm_head as `convert --head-bits` does.
Calibration: built-in mix, ROWS x 1024 tokens; scoring: 8 x 512 tokens of WikiText-2 (needs ../shared).

--asym gptaq: convert's asymmetric calibration (exlq.quant.asymmetric, `exlq convert --asym-alpha`): each linear
is quantized toward the FP model's output, GPTQ of W + α·W·(C − H)·(H + λI)⁻¹ with H = X_qᵀX_q, C = X_fpᵀX_q and
λ = LAMBDA·mean(diag H). Dropped from the first experiment (code in commit 0acd1da): `--asym ls` (W·C·(H + λI)⁻¹,
ridge toward 0: worse than no correction, docs/benchmarks.md) and `--asym-only` (correct only o/down or only
q/k/v/gate/up; no result recorded).
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
from exlq.quant.asymmetric import Asymmetric  # noqa: E402
from exlq.quant.calibration import load_calibration  # noqa: E402
from exlq.quant.convert import head_weight, quantize_head, quantize_layer  # noqa: E402
from exlq.quant.gptq import QuantSpec  # noqa: E402
from exlq.quant.hessian import LayerRunner, linear_modules  # noqa: E402
from exlq.quant.rotate import apply_rotation, rotation_for  # noqa: E402
from exlq.runtime.linear import DenseLinear  # noqa: E402
from exlq.runtime.loader import load_model  # noqa: E402
from exlq.runtime.tokenizer import Tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("specs", nargs="+", help="BITS:GROUP_SIZE, e.g. 3:128, or fp (decoder unquantized)")
    parser.add_argument("--head", type=int, default=16, help="lm_head bits as in convert --head-bits (16: FP)")
    parser.add_argument("--no-rotate", action="store_true")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--cd", type=int, default=0, help="coordinate-descent sweeps after GPTQ (refine_codes)")
    parser.add_argument("--asym", choices=("gptaq",), help="correct targets toward the FP model's outputs (see above)")
    parser.add_argument("--asym-lambda", type=float, default=0.01, help="ridge, relative to mean(diag H)")
    parser.add_argument("--asym-alpha", type=float, default=0.25, help="share of the correction applied")
    args = parser.parse_args()

    tokenizer = Tokenizer.from_dir(args.model_dir)
    text = torch.tensor(tokenizer.encode(load_text("wikitext2").text[:100_000]))
    reference = load_model(args.model_dir, device="cpu")
    calibration = load_calibration(tokenizer, rows=args.rows, length=1024)
    rotation = rotation_for(not args.no_rotate)
    for text_spec in args.specs:
        spec = None if text_spec == "fp" else QuantSpec.uniform(*map(int, text_spec.split(":")))
        model = load_model(args.model_dir, device="cpu")
        apply_rotation(model, rotation)
        started = time.perf_counter()
        runner = LayerRunner(model, calibration.ids)
        asymmetric = Asymmetric(LayerRunner(model, calibration.ids), args.asym_lambda, args.asym_alpha) if args.asym else None
        for i, layer in enumerate(model.model.layers):
            if spec is not None:
                specs = {f"model.layers.{i}.{name}": spec for name in linear_modules(layer)}
                quantize_layer(runner, layer, specs, args.damp, asymmetric, args.cd)
            runner.advance(layer)
        if args.head != 16:
            head = DenseLinear(head_weight(model, quantize_head(model, runner, args.head, args.damp, args.cd)))
            model.replace_module("lm_head", head)  # a new module: a tied embedding keeps its weights
        result = evaluate_perplexity(model, text, length=512, rows=8, reference=reference)
        variant = f" asym {args.asym} lambda {args.asym_lambda} alpha {args.asym_alpha}" if args.asym else ""
        variant += f" head {args.head}" if args.head != 16 else ""
        variant += f" cd {args.cd}" if args.cd else ""
        print(f"{'rotated' if rotation else 'unrotated'}{variant} {text_spec}: ppl {result.perplexity:.3f} "
              f"KL {result.kl_divergence:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
