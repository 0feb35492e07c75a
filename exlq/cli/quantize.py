"""`exlq measure` and `exlq convert`: calibrate, measure, allocate and write EXL2 models."""

from __future__ import annotations

import resource
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from exlq.cli.common import DeviceOpt, DtypeOpt, JsonOpt, ModelArg, load_model_and_tokenizer, print_json, stderr
from exlq.cli.progress import Report, stage_progress
from exlq.errors import ExlqError

CALIBRATION = "Calibration"
CalibrationOpt = Annotated[str, typer.Option("--calibration", help="Calibration text: 'builtin' (an offline mix of web text, code, multilingual, technical and story text shipped with exlq) or a .txt/.jsonl/.parquet file.", rich_help_panel=CALIBRATION)]
RowsOpt = Annotated[int, typer.Option("--rows", help="Calibration rows.", rich_help_panel=CALIBRATION)]
LengthOpt = Annotated[int, typer.Option("--length", help="Tokens per calibration row.", rich_help_panel=CALIBRATION)]
WorkDirOpt = Annotated[Optional[Path], typer.Option("--work-dir", help="Where checkpoints go (default: a hidden folder beside the output, removed after success). Rerunning the same command resumes.", show_default=False)]
RotateOpt = Annotated[bool, typer.Option("--rotate/--no-rotate", help="Rotate the residual stream and value heads by a fixed random orthogonal matrix folded into the weights (same model function, outliers spread out, lower quantization error). The output stores embedding and lm_head separately and all-ones norms.")]
GridOpt = Annotated[str, typer.Option("--grid", help="Options measured per matrix: 'dense' (the reference converter's grid plus plain 3-, 5- and 6-bit and half-and-half mixes that fill its gaps; with held-out scoring it lowered KL at every bitrate on smollm2), 'reference' (the reference converter's own) or 'fine' (dense plus 8/6-bit mixes between 6.2 and 7.4 bpw; experimental).", rich_help_panel=CALIBRATION)]
HoldoutOpt = Annotated[bool, typer.Option("--holdout/--no-holdout", help="Score each measured option on calibration rows its Hessians leave out (a quarter of the rows, at most 16), so options with many parameters are not flattered by the rows they were fitted on.", rich_help_panel=CALIBRATION)]
RestartOpt = Annotated[bool, typer.Option("--restart", help="Discard the work directory's progress (also when it belongs to another conversion).")]


def peak_memory() -> str:
    import torch

    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB
    text = f"peak RAM {host:.1f} GB"
    if torch.cuda.is_available():
        text += f", VRAM {torch.cuda.max_memory_allocated() / 2**30:.1f} GB"
    return text


@contextmanager
def layer_progress() -> Iterator[Report]:
    """Per stage (measure, quantize, tune): layer i/N, elapsed, ETA, peak memory; in logs a line per step."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("[dim]{task.fields[memory]}"))
    with stage_progress(*columns, every=0.0, memory=peak_memory) as report:
        yield report


def _prepare(model_dir: Path, calibration: str, rows: int, length: int, device: str, dtype: str):
    from exlq.quant.calibration import load_calibration

    model, tokenizer = load_model_and_tokenizer(model_dir, device, dtype)
    with stderr.status("tokenizing calibration text", spinner="dots"):
        calib = load_calibration(tokenizer, calibration, rows=rows, length=length)
    stderr.print(f"[dim]calibration: {calib.description}[/dim]")
    return model, calib


def _work_dir(given: Path | None, output: Path) -> tuple[Path, bool]:
    if given is not None:
        return given, False
    return output.parent / f".{output.name}.exlq-work", True


def _overlap(a: Path, b: Path) -> bool:
    """Whether one of two paths is the other or inside it."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _check_not_in_input(name: str, path: Path, model_dir: Path) -> None:
    if _overlap(path, model_dir):
        raise ExlqError(f"{name} {path} overlaps the input model directory {model_dir}, which is never written; "
                        "choose another")


def _check_work_dir(work: Path, model_dir: Path, output: Path) -> None:
    """Refuse, before any work, a work directory that would write into the input model, or that the output would
    replace (or the reverse): found at the end, that cost the whole job."""
    _check_not_in_input("--work-dir", work, model_dir)
    if _overlap(work, output):
        raise ExlqError(f"--work-dir {work} overlaps the output {output}; choose a work directory outside it")


def measure(
    model_dir: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write measurement.json.")],
    calibration: CalibrationOpt = "builtin",
    rows: RowsOpt = 100,
    length: LengthOpt = 2048,
    work_dir: WorkDirOpt = None,
    restart: RestartOpt = False,
    rotate: RotateOpt = True,
    grid: GridOpt = "dense",
    holdout: HoldoutOpt = True,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """Measure every quantization option of every decoder linear (bits and output error).

    The measurement does not depend on the target bitrate: pass it to `exlq convert
    --measurement` to convert to any --bpw without measuring again.
    """
    from exlq.quant.calibration import check_calibration_request
    from exlq.quant.job import Job, fingerprint, write_json_file
    from exlq.quant.measure import measure_resumable, measure_settings
    from exlq.quant.options import grid_specs
    from exlq.quant.rotate import apply_rotation, rotation_for

    if output.exists() and not output.is_file():
        raise ExlqError(f"--output {output} is not a file")
    specs_for = grid_specs(grid)
    work, default_work = _work_dir(work_dir, output)
    _check_not_in_input("--output", output, model_dir)
    _check_work_dir(work, model_dir, output)
    check_calibration_request(calibration, rows, length)
    model, calib = _prepare(model_dir, calibration, rows, length, device, dtype)
    rotation = rotation_for(rotate)
    apply_rotation(model, rotation)
    options = {"task": "measure", "calibration": calib.fingerprint, "rotation": rotation}
    options.update(measure_settings(grid, holdout, calib.ids.shape[0]))
    with layer_progress() as report, Job(work, fingerprint(model_dir, options), restart=restart) as job:
        result = measure_resumable(model, calib, job, specs_for=specs_for, progress=report, rotation=rotation, holdout=holdout)
    write_json_file(output, result.to_json())
    if default_work:
        shutil.rmtree(work, ignore_errors=True)
    summary = {"model": str(model_dir), "output": str(output), "matrices": len(result.matrices), "calibration": calib.description, "memory": peak_memory()}
    if json_output:
        print_json(summary)
    else:
        sys.stdout.write(f"measured {len(result.matrices)} matrices -> {output}\n")


def convert(
    model_dir: ModelArg,
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="New folder for the EXL2 model (must not exist or be empty).", show_default=False)],
    bpw: Annotated[float, typer.Option("--bpw", help="Target bits per weight of the decoder linears (2 to 8).")] = 4.0,
    head_bits: Annotated[int, typer.Option("--head-bits", help="lm_head bits: 2, 3, 4, 5, 6 or 8, or 16 to keep it FP16.")] = 6,
    measurement: Annotated[Optional[Path], typer.Option("--measurement", help="Reuse a measurement.json from `exlq measure` (skips measuring).", show_default=False)] = None,
    calibration: CalibrationOpt = "builtin",
    rows: RowsOpt = 100,
    length: LengthOpt = 2048,
    work_dir: WorkDirOpt = None,
    restart: RestartOpt = False,
    rotate: RotateOpt = True,
    grid: GridOpt = "dense",
    holdout: HoldoutOpt = True,
    asym_alpha: Annotated[Optional[float], typer.Option("--asym-alpha", help="Asymmetric calibration (0 to 1; 0: off): quantize each linear toward the unquantized model's outputs, moving its target by this share of the GPTAQ-form correction W·(C−H)·(H+λI)⁻¹ before GPTQ. Default: 0.25 when the calibration has at least 16 k tokens (the built-in default has 205 k; on smollm2 it lowered KL by 2-15 % at every bitrate), else off (with 2 k tokens it overfits). Costs one more layer forward per layer and one more copy of the calibration states.", rich_help_panel=CALIBRATION, show_default=False)] = None,
    asym_lambda: Annotated[float, typer.Option("--asym-lambda", help="Ridge of the asymmetric correction, relative to the mean diagonal of H (> 0; 0.001 to 0.1 measured).", rich_help_panel=CALIBRATION)] = 0.01,
    refine_sweeps: Annotated[Optional[int], typer.Option("--refine-sweeps", help="Coordinate-descent sweeps over each matrix's codes after GPTQ (0 to 16; 0: plain GPTQ): with its scales fixed, every code is re-chosen in turn to minimize the layer's output error given all the others, which GPTQ's one forward pass cannot. Default: 2 when the calibration has at least 64 k tokens (the built-in default has 205 k; on smollm2 they lowered KL by 4 % at 3.0 and 4.0 bpw), else 0 (with 16 k tokens they overfit). Each sweep costs about one more GPTQ: 0 converts faster.", rich_help_panel=CALIBRATION, show_default=False)] = None,
    tune_epochs: Annotated[Optional[int], typer.Option("--tune-epochs", help="Epochs of end-to-end tuning after all layers are quantized (0 to 64; 0: off): the norms' weights and every group's q_scale_max (the format's free fp16 fields; codes stay) are fitted by Adam to minimize KL(FP model ‖ quantized model) of next-token distributions over the calibration. One row in 8 is held out: the epoch with the lowest held-out KL is kept, and only if it beats the untuned model, so it cannot make the model worse on its own calibration. Default: 4 with at least 64 k calibration tokens (the built-in calibration has 205 k), else 0 (on smollm2 with the built-in calibration, 4 epochs lowered KL on WikiText-2 by 14 % at 3.0 bpw and 2 % at 4.0; with 8 k tokens by 18 % at 2.5, 13 % at 3.0 and 2 % at 4.0). If the device runs out of memory for it (it holds the decoder in fp32), the model is written untuned. Each epoch costs about three forward passes of the whole model over the calibration; resumable per epoch, and a finished conversion's work directory is tuned without redoing its layers.", rich_help_panel=CALIBRATION, show_default=False)] = None,
    tune_lr: Annotated[Optional[float], typer.Option("--tune-lr", help="Adam step size of --tune-epochs on the log multipliers (above 0, at most 1), decayed by a cosine to 0 over all epochs. Default: 0.002 at 3.0 bpw, halved per extra bit of --bpw (0.001 at 4.0).", rich_help_panel=CALIBRATION, show_default=False)] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """Quantize a Hugging Face model to EXL2 at a target bits per weight.

    Measures every option per matrix (or reuses --measurement), picks the options that minimize
    the measured error within the bit budget, quantizes layer by layer with GPTQ on calibration
    states that went through the already quantized layers, and writes the model atomically.
    Interrupted conversions resume when the same command is run again. The input is never written.
    """
    from exlq.quant.calibration import check_calibration_request
    from exlq.quant.convert import ConvertOptions, convert_model
    from exlq.quant.measure import Measurement
    from exlq.quant.writer import check_out_dir
    from exlq.runtime.config import read_json

    options = ConvertOptions(
        bpw=bpw, head_bits=head_bits, rotate=rotate, asym_alpha=asym_alpha, asym_lambda=asym_lambda, refine_sweeps=refine_sweeps,
        tune_epochs=tune_epochs, tune_lr=tune_lr, grid=grid, holdout=holdout,
    )
    options.validate()
    check_out_dir(out_dir, model_dir)
    work, default_work = _work_dir(work_dir, out_dir)
    _check_work_dir(work, model_dir, out_dir)
    check_calibration_request(calibration, rows, length)
    loaded = Measurement.from_json(read_json(measurement)) if measurement is not None else None
    model, calib = _prepare(model_dir, calibration, rows, length, device, dtype)
    with layer_progress() as report:
        summary = convert_model(
            model, model_dir, out_dir, calib, options, work_dir=work, measurement=loaded, restart=restart, progress=report
        )
    if default_work:
        shutil.rmtree(work, ignore_errors=True)
    payload = {
        "model": str(model_dir),
        "output": summary.out_dir,
        "target_bpw": summary.target_bpw,
        "decoder_bpw": round(summary.decoder_bpw, 4),
        "head_bits": summary.head_bits,
        "calibration": calib.description,
        "calibration_perplexity": round(summary.calibration_perplexity, 4),
        "seconds": round(summary.seconds, 1),
        "memory": peak_memory(),
        "choices": summary.choices,
    }
    if summary.tune is not None:
        payload["tune"] = summary.tune
    if json_output:
        print_json(payload)
    else:
        sys.stdout.write(
            f"wrote {out_dir}: {summary.decoder_bpw:.3f} bpw in the decoder (target {bpw}), head {head_bits} bits, "
            f"calibration perplexity {summary.calibration_perplexity:.3f}, {summary.seconds:.0f} s\n"
        )
        tune = summary.tune or {}
        if "heldout_kl_before" in tune:
            verdict = "kept" if tune["applied"] else "not kept"
            sys.stdout.write(
                f"end-to-end tuning {verdict}: held-out calibration KL {tune['heldout_kl_before']:.4f} -> "
                f"{tune['heldout_kl_after']:.4f} (best epoch {tune['best_epoch']})\n"
            )
        elif tune.get("reason"):
            sys.stdout.write(f"end-to-end tuning not run: {tune['reason']}\n")
