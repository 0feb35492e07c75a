"""Quantization quality: convert one model at several bitrates and score each against FP16.

    python bench/quality.py MODEL_DIR --out-root DIR [--bpw 2.5 3.0 ...] [--head-bits 6] [--device cuda] [--asym-alpha 0]
                            [--tune-epochs 4 [--tune-lr 0.002] [--tune-steps 100000]]

One measurement (built-in calibration, 100 x 2048 tokens) is reused for every target. Scoring is
the harness of ../shared/tools/README.md: the first 20 non-overlapping 1024-token windows of the
joined WikiText-2 test text, no special tokens; KL = mean over scored tokens of KL(P_fp16 ‖ P_quant)
from fp32 log-softmax of the full vocabulary. Results are appended to OUT_ROOT/quality.jsonl as
they come, and a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
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
from exlq.quant import measure as measure_module  # noqa: E402
from exlq.quant.measure import measure_resumable, measure_settings  # noqa: E402
from exlq.quant.options import DEFAULT_GRID, GRIDS, grid_specs  # noqa: E402
from exlq.quant.rotate import apply_rotation, rotation_for  # noqa: E402
from exlq.runtime.loader import load_model, resolve_device  # noqa: E402
from exlq.runtime.tokenizer import Tokenizer  # noqa: E402

EXLLAMAV2_KL = {2.5: 1.658, 3.0: 0.959, 3.5: 0.504, 4.0: 0.239, 5.0: 0.061, 6.0: 0.019, 8.0: 0.0045}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--out-root", type=Path, required=True)
    parser.add_argument("--bpw", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0])
    parser.add_argument("--head-bits", type=int, nargs="+", default=[6])
    parser.add_argument("--extra", default="4.0:16", help="more bpw:head pairs, comma-separated")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--no-kl-aware", action="store_true", help="allocate on layer-local errors alone")
    parser.add_argument("--no-rotate", action="store_true", help="quantize the model as it is (no incoherence rotation)")
    parser.add_argument("--asym-alpha", type=float, default=None, help="convert --asym-alpha (0: off; default: convert's)")
    parser.add_argument("--asym-lambda", type=float, default=0.01, help="convert --asym-lambda")
    parser.add_argument("--probe", default=None, metavar="ROWSxLENGTH",
                        help="calibration tokens of the measurement's KL probe (default: exlq.quant.measure's 4x256)")
    parser.add_argument("--refine-sweeps", type=int, default=None, help="convert --refine-sweeps (default: convert's)")
    parser.add_argument("--tune-epochs", type=int, default=None, help="convert --tune-epochs (default: convert's)")
    parser.add_argument("--tune-lr", type=float, default=None, help="convert --tune-lr (default: convert's, by bpw)")
    parser.add_argument("--tune-scales-only", action="store_true", help="tune only the group scales, not the norms")
    parser.add_argument("--grid", choices=tuple(GRIDS), default=DEFAULT_GRID,
                        help="options measured (convert's --grid; default: convert's)")
    parser.add_argument("--holdout", action=argparse.BooleanOptionalAction, default=True,
                        help="score the measured options on calibration rows the Hessians leave out (convert's default)")
    parser.add_argument("--tune-steps", type=int, default=ConvertOptions.tune_steps,
                        help="Adam steps per tuning epoch, at most (default: convert's; 100000: one calibration row a step)")
    parser.add_argument("--tag", default="", help="a name for this job's variant: in its output folders and records, "
                        "so jobs of one bitrate with different options can share an out-root and its measurement")
    args = parser.parse_args()

    device = resolve_device(args.device)
    args.out_root.mkdir(parents=True, exist_ok=True)
    log = args.out_root / "quality.jsonl"
    tokenizer = Tokenizer.from_dir(args.model_dir)
    text_ids = torch.tensor(tokenizer.encode(load_text("wikitext2").text[:400_000]), dtype=torch.long)
    reference = load_model(args.model_dir, device=device)
    base = evaluate_perplexity(reference, text_ids, length=1024, rows=20)
    print(f"FP16 ({reference.dtype}) ppl {base.perplexity:.3f} over {base.tokens_scored} tokens", flush=True)

    calibration = load_calibration(tokenizer, rows=args.rows, length=args.length)
    rotation = rotation_for(not args.no_rotate)
    started = time.perf_counter()
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    model = load_model(args.model_dir, device=device)
    apply_rotation(model, rotation)
    # Resumable across calls (the device runs at most 10 minutes per command): same options, same work dir.
    probe = None
    if args.probe:  # a larger probe measures each layer's sensitivity on more tokens (a new measurement)
        probe = tuple(int(v) for v in args.probe.lower().split("x"))
        measure_module.PROBE_ROWS, measure_module.PROBE_LENGTH = probe
    key = fingerprint(args.model_dir, {"calibration": calibration.fingerprint, "rotation": rotation,
                                       **({"probe": list(probe)} if probe else {}),
                                       **measure_settings(args.grid, args.holdout, calibration.ids.shape[0])})
    with Job(args.out_root / "measure-work", key, restart=False) as job:
        measurement = measure_resumable(
            model, calibration, job, rotation=rotation, specs_for=grid_specs(args.grid),
            progress=lambda s, d, t: print(f"  {s} {d}/{t}", flush=True) if d % 10 == 0 else None, holdout=args.holdout,
        )
    measure_seconds = time.perf_counter() - started
    print(f"measured in {measure_seconds:.0f} s", flush=True)
    del model

    pairs = [(b, h) for b in args.bpw for h in args.head_bits]
    pairs += [(float(p.split(":")[0]), int(p.split(":")[1])) for p in args.extra.split(",") if p]
    rows = []
    suffix = f"-{args.tag}" if args.tag else ""
    for bpw, head in pairs:
        out = args.out_root / f"{args.model_dir.name}-{bpw}bpw-h{head}{suffix}"
        work = args.out_root / f"work-{bpw}-{head}{suffix}"
        shutil.rmtree(out, ignore_errors=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model = load_model(args.model_dir, device=device)
        t0 = time.perf_counter()
        options = ConvertOptions(bpw=bpw, head_bits=head, kl_aware=not args.no_kl_aware, rotate=rotation is not None,
                                 asym_alpha=args.asym_alpha, asym_lambda=args.asym_lambda,
                                 refine_sweeps=args.refine_sweeps, tune_epochs=args.tune_epochs,
                                 tune_norms=not args.tune_scales_only,
                                 tune_steps=args.tune_steps,
                                 tune_lr=args.tune_lr).resolved(calibration.ids.numel())
        summary = convert_model(
            model, args.model_dir, out, calibration, options,
            work_dir=work, measurement=measurement, restart=True,
        )
        seconds = time.perf_counter() - t0
        vram = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        del model
        quantized = load_model(out, device=device)
        result = evaluate_perplexity(quantized, text_ids, length=1024, rows=20, reference=reference)
        del quantized
        row = {
            "bpw_target": bpw, "head_bits": head, "tag": args.tag, "kl_aware": not args.no_kl_aware,
            "rotated": rotation is not None,
            "asym_alpha": options.asym_alpha, "asym_lambda": args.asym_lambda, "refine_sweeps": options.refine_sweeps,
            "tune_epochs": options.tune_epochs, "tune_lr": options.tune_lr if options.tune_epochs else None,
            "tune_norms": options.tune_norms if options.tune_epochs else None,
            "tune_steps": options.tune_steps if options.tune_epochs else None, "grid": args.grid, "holdout": args.holdout,
            "tune": None if summary.tune is None else {
                k: summary.tune.get(k) for k in ("applied", "heldout_kl_before", "heldout_kl_after", "best_epoch", "seconds")
            },
            "decoder_bpw": round(summary.decoder_bpw, 4),
            "ppl": round(result.perplexity, 4), "kl": round(result.kl_divergence, 5),
            "top1": round(result.top1_agreement, 4), "file_MB": round(folder_bytes(out) / 1e6, 1),
            "convert_s": round(seconds, 1), "peak_vram_GB": None if vram is None else round(vram, 2),
            # the process's peak so far (measurement, reference model and earlier conversions included)
            "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "exllamav2_kl": EXLLAMAV2_KL.get(bpw) if head == 6 else None,
        }
        rows.append(row)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nmodel {args.model_dir.name}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"FP16 ppl {base.perplexity:.3f}, measurement {measure_seconds:.0f} s ({calibration.description})")
    print("| bpw | head | decoder bpw | ppl | KL | top-1 | ExLlamaV2 KL | size MB | convert s | peak VRAM GB | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bpw_target']} | {r['head_bits']} | {r['decoder_bpw']} | {r['ppl']} | {r['kl']} | {r['top1']} | "
              f"{r['exllamav2_kl'] or ''} | {r['file_MB']} | {r['convert_s']} | {r['peak_vram_GB']} | {r['peak_rss_GB']} |")


if __name__ == "__main__":
    main()
