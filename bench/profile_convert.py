"""Where a conversion's time goes: measure + convert of one model with the quantizer's main steps timed.

    python bench/profile_convert.py MODEL_DIR [--bpw 4.0] [--rows 100 --length 2048] [--device cuda] [--skip-measure]

Each listed function is wrapped by a timer that synchronizes the GPU before and after the call, so the
times are the work of the call itself (inclusive: a timed function called inside another counts in both).
Prints one table per stage (measure, convert) and, with --json-out, writes the rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exlq.quant import asymmetric, convert, gptq, hessian, measure, tune, writer  # noqa: E402
from exlq.quant.calibration import load_calibration  # noqa: E402
from exlq.quant.convert import ConvertOptions, convert_model  # noqa: E402
from exlq.quant.job import Job  # noqa: E402
from exlq.quant.rotate import apply_rotation, rotation_for  # noqa: E402
from exlq.runtime.kernels import gptq_ops  # noqa: E402
from exlq.runtime.loader import load_model, resolve_device  # noqa: E402
from exlq.runtime.tokenizer import Tokenizer  # noqa: E402

# (owner, attribute): module functions are replaced wherever a module imported them by name.
TIMED = [
    (gptq, "quantize_gptq_many"), (gptq, "refine_codes"), (gptq, "search_group_scales_many"), (gptq, "_gptq_rows"),
    (gptq, "_refine_rows"), (gptq_ops, "gptq_block"), (gptq_ops, "refine_block"),
    (gptq, "inverse_cholesky_upper"), (gptq.QuantizedMatrix, "dequantize"),
    (hessian.LayerRunner, "collect_hessians"), (hessian.LayerRunner, "outputs"), (hessian.LayerRunner, "advance"),
    (measure, "measure_layer"), (measure, "layer_sensitivity"), (measure, "relative_error"),
    (convert, "quantize_layer"), (convert, "quantize_head"), (convert, "run_tuning"),
    (convert, "calibration_perplexity"), (writer, "write_model_dir"),
    (asymmetric.Asymmetric, "collect"), (asymmetric.Asymmetric, "target"), (tune, "tune"),
    (tune.Student, "final_states"), (tune, "kl_sum"), (torch.autograd, "backward"), (torch.optim.Adam, "step"),
    (tune.Student, "set_weights"),
]


class Timers:
    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1

        return timed

    def install(self) -> None:
        for owner, attribute in TIMED:
            original = getattr(owner, attribute)
            name = f"{owner.__name__.rsplit('.', 1)[-1]}.{attribute}"
            wrapped = self.wrap(name, original)
            setattr(owner, attribute, wrapped)
            for module in list(sys.modules.values()):  # `from exlq.quant.gptq import quantize_gptq_many` copies
                if getattr(module, "__name__", "").startswith("exlq.") and getattr(module, attribute, None) is original:
                    setattr(module, attribute, wrapped)

    def report(self, stage: str, total: float) -> list[dict]:
        rows = [{"stage": stage, "function": n, "seconds": round(s, 2), "calls": self.calls[n],
                 "share": round(s / total, 3)} for n, s in sorted(self.seconds.items(), key=lambda kv: -kv[1])]
        print(f"\n{stage}: {total:.1f} s")
        print("| function | s | calls | share |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['function']} | {r['seconds']} | {r['calls']} | {r['share']:.1%} |")
        self.seconds.clear()
        self.calls.clear()
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--bpw", type=float, default=4.0)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--layers", type=int, default=None, help="only the first N decoder layers (a quick look)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    device = resolve_device(args.device)
    timers = Timers(device)
    timers.install()
    calibration = load_calibration(Tokenizer.from_dir(args.model_dir), rows=args.rows, length=args.length)
    rotation = rotation_for(True)

    def fresh_model():
        model = load_model(args.model_dir, device=device)
        if args.layers is not None:
            del model.model.layers[args.layers:]
            model.layer_order = model.layer_order[: args.layers]
        apply_rotation(model, rotation)
        return model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = fresh_model()
        t0 = time.perf_counter()
        with Job(Path(tmp) / "measure", "profile", restart=True) as job:
            measurement = measure.measure_resumable(model, calibration, job, rotation=rotation)
        rows += timers.report("measure", time.perf_counter() - t0)
        del model
        model = fresh_model()
        options = ConvertOptions(bpw=args.bpw)
        t0 = time.perf_counter()
        convert_model(model, args.model_dir, Path(tmp) / "out", calibration, options, work_dir=Path(tmp) / "work",
                      measurement=measurement, restart=True)
        rows += timers.report("convert", time.perf_counter() - t0)
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
