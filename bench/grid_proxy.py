"""Does a larger option grid help the allocation? One measurement over the largest of the grids asked for (each of
`options.GRIDS` holds the one before it: reference ⊂ dense ⊂ fine), then `convert` at each bpw once per grid,
allocating over that grid's options only; KL of each against the FP model.

    python bench/grid_proxy.py MODEL_DIR --out-root DIR --bpw 3.0 5.0 [--grids reference dense] [--rows 8 --length 256]
    python bench/grid_proxy.py MODEL_DIR --out-root DIR --grids dense fine --bpw 6.0 --holdout
    python bench/grid_proxy.py MODEL_DIR --out-root DIR --measure-only     # the measurement alone (resumable)

Every convert of a bpw reads the same measurement (same errors, same layer sensitivities), so the difference is the
grid alone. Scoring: the first WINDOWS non-overlapping 1024-token windows of WikiText-2 test (the issue's harness
uses 20), KL(P_fp ‖ P_quant) per token. Runs on the CPU (a small calibration: no asymmetric correction, sweeps or
tuning, which need 64 k tokens) or with --device cuda.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exlq.data.text_sources import load_text  # noqa: E402
from exlq.eval.perplexity import evaluate_perplexity  # noqa: E402
from exlq.quant.calibration import load_calibration  # noqa: E402
from exlq.quant.convert import ConvertOptions, convert_model  # noqa: E402
from exlq.quant.job import Job, fingerprint  # noqa: E402
from exlq.quant.measure import Measurement, measure_resumable, measure_settings  # noqa: E402
from exlq.quant.options import GRIDS, OptionTable, candidate_specs, grid_specs  # noqa: E402
from exlq.quant.rotate import apply_rotation, rotation_for  # noqa: E402
from exlq.runtime.loader import load_model  # noqa: E402
from exlq.runtime.tokenizer import Tokenizer  # noqa: E402


def restricted(measurement: Measurement, tables: tuple[OptionTable, ...]) -> Measurement:
    """The measurement with each matrix's options cut to those of a smaller grid."""
    matrices = []
    for matrix in measurement.matrices:
        short = matrix.name.rsplit(".", 1)[-1]
        keep = {spec.describe() for spec in candidate_specs(short, tables)}
        matrices.append(dataclasses.replace(matrix, options=[o for o in matrix.options if o.key in keep]))
    return dataclasses.replace(measurement, matrices=matrices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--out-root", type=Path, required=True)
    parser.add_argument("--bpw", type=float, nargs="*", default=[3.0, 5.0])
    parser.add_argument("--grids", nargs="+", default=["reference", "dense"], choices=tuple(GRIDS))
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--measure-only", action="store_true")
    parser.add_argument("--holdout", action="store_true",
                        help="score the measured options on calibration rows the Hessians leave out (a new measurement; "
                             "convert's default since session 13; off here unless given)")
    args = parser.parse_args()

    device = torch.device(args.device)
    args.out_root.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_dir(args.model_dir)
    calibration = load_calibration(tokenizer, rows=args.rows, length=args.length)
    rotation = rotation_for(True)
    started = time.perf_counter()
    model = load_model(args.model_dir, device=device)
    apply_rotation(model, rotation)
    largest = max(args.grids, key=list(GRIDS).index)  # measured: each grid of GRIDS holds the ones before it
    key = fingerprint(args.model_dir, {"calibration": calibration.fingerprint, "rotation": rotation,
                                       **measure_settings(largest, args.holdout, calibration.ids.shape[0])})
    with Job(args.out_root / "measure-work", key, restart=False) as job:
        measurement = measure_resumable(
            model, calibration, job, rotation=rotation, specs_for=grid_specs(largest),
            progress=lambda stage, done, total: print(f"  {stage} {done}/{total}", flush=True), holdout=args.holdout,
        )
    print(f"measured in {time.perf_counter() - started:.0f} s", flush=True)
    del model
    if args.measure_only:
        return

    text_ids = torch.tensor(tokenizer.encode(load_text("wikitext2").text[:400_000]), dtype=torch.long)
    reference = load_model(args.model_dir, device=device)
    for bpw in args.bpw:
        for grid in args.grids:
            out = args.out_root / f"{args.model_dir.name}-{bpw}-{grid}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            summary = convert_model(
                load_model(args.model_dir, device=device), args.model_dir, out, calibration,
                ConvertOptions(bpw=bpw, head_bits=6), work_dir=args.out_root / f"work-{bpw}-{grid}",
                measurement=measurement if grid == largest else restricted(measurement, GRIDS[grid]), restart=True,
            )
            seconds = time.perf_counter() - t0
            result = evaluate_perplexity(load_model(out, device=device), text_ids, length=1024, rows=args.windows,
                                         reference=reference)  # fmt: skip
            row = {"bpw": bpw, "grid": grid, "decoder_bpw": round(summary.decoder_bpw, 4), "kl": round(result.kl_divergence, 5),
                   "ppl": round(result.perplexity, 3), "top1": round(result.top1_agreement, 4), "windows": args.windows,
                   "calibration": f"{args.rows}x{args.length}", "convert_s": round(seconds, 1),
                   "holdout": args.holdout}  # fmt: skip
            print(json.dumps(row), flush=True)
            with open(args.out_root / "grid.jsonl", "a") as log:
                log.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
