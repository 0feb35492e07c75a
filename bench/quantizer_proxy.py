"""A quick CPU proxy for quantizer changes: uniform GPTQ of every decoder matrix, KL vs the FP32 model.

    python bench/quantizer_proxy.py MODEL_DIR 3:128 4:128 [--no-rotate] [--rows 16]
    python bench/quantizer_proxy.py MODEL_DIR 3:128 --asym gptaq --asym-lambda 0.1 --asym-alpha 0.25

No measurement or allocation: every matrix gets the same spec (BITS:GROUP_SIZE), so a change to the
quantizer itself (rotation, scale search, damping) shows up directly, in minutes on a laptop CPU.
Calibration: built-in mix, ROWS x 1024 tokens; scoring: 8 x 512 tokens of WikiText-2 (needs ../shared).

--asym (experiment, not in the library): quantize each linear toward the FP model's output instead of its own
output on the quantized model's states. With X_fp the linear's inputs in the FP model, X_q in the model whose
earlier layers are quantized, H = X_qᵀX_q, C = X_fpᵀX_q (means over calibration tokens), λ = LAMBDA·mean(diag H):
    ls     W' = W·C·(H + λI)⁻¹            least squares min ‖X_fp Wᵀ − X_q W'ᵀ‖², ridge toward 0
    gptaq  W' = W·(C + λI)·(H + λI)⁻¹     = W + W·dXᵀX_q·(H + λI)⁻¹ (GPTQv2/GPTAQ), ridge toward W
then GPTQ of W + ALPHA·(W' − W) with Hessian H (solve in float64, in the rotated basis when rotating).
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
from exlq.quant.gptq import QuantSpec, quantize_gptq  # noqa: E402
from exlq.quant.hessian import LayerRunner, linear_modules  # noqa: E402
from exlq.quant.measure import dense_weight  # noqa: E402
from exlq.quant.rotate import apply_rotation, rotation_for  # noqa: E402
from exlq.runtime.loader import load_model  # noqa: E402
from exlq.runtime.tokenizer import Tokenizer  # noqa: E402


def _capture(layer: torch.nn.Module, h: torch.Tensor, runner: LayerRunner):
    """Run `layer` on chunk h; the input of each linear (modules fed one tensor share it) and the output."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, n=n: seen.__setitem__(n, args[0]))
        for n, m in linear_modules(layer).items()
    ]
    try:
        out = layer(h, runner.model.attention_batch(h.shape[0], runner.length), None, runner.layer_index)
    finally:
        for handle in handles:
            handle.remove()
    return seen, out


OUT_LINEARS = ("self_attn.o_proj", "mlp.down_proj")


def quantize_layer_asym(runner, fp_runner, layer, fp_layer, specs, damp, mode, lam, alpha, only="all") -> str:
    """Like exlq.quant.convert.quantize_layer (same H, accumulated the same way), on corrected targets;
    also advances fp_runner through the FP layer. Returns a one-line summary of the corrections."""
    prefix = f"model.layers.{runner.layer_index}"
    hess: dict[str, torch.Tensor] = {}
    cross: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    owner: dict[str, str] = {}
    fp_out = []
    with torch.inference_mode():
        for hq, hf in zip(runner.chunks, fp_runner.chunks):
            xf, out = _capture(fp_layer, hf, fp_runner)
            fp_out.append(out)
            xq, _ = _capture(layer, hq, runner)
            firsts: dict[int, str] = {}
            for name, x in xq.items():
                owner[name] = firsts.setdefault(id(x), name)
                if owner[name] != name:
                    continue
                q = x.reshape(-1, x.shape[-1]).float()
                f = xf[name].reshape(-1, x.shape[-1]).double()
                if name not in hess:
                    hess[name] = torch.zeros(q.shape[1], q.shape[1])
                    cross[name] = torch.zeros(q.shape[1], q.shape[1], dtype=torch.float64)
                    rows[name] = 0
                hess[name].addmm_(q.T, q)
                cross[name].addmm_(f.T, q.double())
                rows[name] += q.shape[0]
    fp_runner.chunks = fp_out
    fp_runner.layer_index += 1
    changes = []
    for name, module in linear_modules(layer).items():
        o = owner[name]
        h = hess[o] / rows[o]
        w = dense_weight(module, f"{prefix}.{name}").float()
        target = w
        if alpha and (only == "all" or (name in OUT_LINEARS) == (only == "out")):
            h64, c64 = h.double(), cross[o] / rows[o]
            eye = torch.eye(h64.shape[0], dtype=torch.float64)
            reg = lam * float(torch.mean(torch.diag(h64)))
            m = c64 + reg * eye if mode == "gptaq" else c64
            factor = torch.linalg.cholesky(h64 + reg * eye)
            corrected = torch.cholesky_solve((w.double() @ m).T, factor).T  # W·M·(H + λI)⁻¹
            target = (w.double() + alpha * (corrected - w.double())).float()
            changes.append(f"{name.split('.')[-1]} {float((target - w).norm() / w.norm()):.3f}")
        quantized = quantize_gptq(target, h, specs[f"{prefix}.{name}"], damp=damp, name=f"{prefix}.{name}")
        module.weight.data = quantized.dequantize().to(module.weight.dtype)
    return f"{prefix} |dW|/|W|: " + ", ".join(changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("specs", nargs="+", help="BITS:GROUP_SIZE, e.g. 3:128")
    parser.add_argument("--no-rotate", action="store_true")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--asym", choices=("ls", "gptaq"), help="correct targets toward the FP inputs (see above)")
    parser.add_argument("--asym-lambda", type=float, default=0.1, help="ridge, relative to mean(diag H)")
    parser.add_argument("--asym-alpha", type=float, default=1.0, help="share of the correction applied")
    parser.add_argument("--asym-only", choices=("all", "out", "in"), default="all",
                        help="correct all linears, only o/down (write the residual stream) or only q/k/v/gate/up")
    args = parser.parse_args()

    tokenizer = Tokenizer.from_dir(args.model_dir)
    text = torch.tensor(tokenizer.encode(load_text("wikitext2").text[:100_000]))
    reference = load_model(args.model_dir, device="cpu")
    calibration = load_calibration(tokenizer, rows=args.rows, length=1024)
    rotation = rotation_for(not args.no_rotate)
    fp_model = None
    if args.asym:
        fp_model = load_model(args.model_dir, device="cpu")
        apply_rotation(fp_model, rotation)
    for text_spec in args.specs:
        bits, group_size = map(int, text_spec.split(":"))
        spec = QuantSpec.uniform(bits, group_size)
        model = load_model(args.model_dir, device="cpu")
        apply_rotation(model, rotation)
        started = time.perf_counter()
        runner = LayerRunner(model, calibration.ids)
        fp_runner = None if fp_model is None else LayerRunner(fp_model, calibration.ids)
        for i, layer in enumerate(model.model.layers):
            specs = {f"model.layers.{i}.{name}": spec for name in linear_modules(layer)}
            if fp_runner is None:
                quantize_layer(runner, layer, specs, args.damp)
            else:
                summary = quantize_layer_asym(runner, fp_runner, layer, fp_model.model.layers[i], specs, args.damp,
                                              args.asym, args.asym_lambda, args.asym_alpha, args.asym_only)
                print(summary, file=sys.stderr, flush=True)
            runner.advance(layer)
        result = evaluate_perplexity(model, text, length=512, rows=8, reference=reference)
        variant = f" asym {args.asym} lambda {args.asym_lambda} alpha {args.asym_alpha} only {args.asym_only}" if args.asym else ""
        print(f"{'rotated' if rotation else 'unrotated'}{variant} {text_spec}: ppl {result.perplexity:.3f} "
              f"KL {result.kl_divergence:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
