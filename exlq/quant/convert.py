"""`convert`: measure (or reuse a measurement), allocate bits, quantize layer by layer, write EXL2.

Layers are quantized in order on calibration states that went through the layers already
quantized (the states the converted model will really see), with each matrix's option chosen by
the allocator from the measurement. Every finished layer is checkpointed in the work directory,
so an interrupted conversion resumes where it stopped; the output directory appears only at the
end, atomically.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from exlq import __version__
from exlq.errors import ExlqError
from exlq.quant.allocate import Option, allocate_to_bpw
from exlq.quant.asymmetric import Asymmetric
from exlq.quant.calibration import Calibration
from exlq.quant.exl2_pack import pack_exl2
from exlq.quant.gptq import QuantSpec, hessian_weighted_error, quantize_gptq, quantize_gptq_many
from exlq.quant.hessian import LayerRunner, linear_modules
from exlq.quant.job import Job, fingerprint
from exlq.quant.measure import Measurement, SpecsFor, dense_weight, measure_resumable, measure_settings, padded
from exlq.quant.options import DEFAULT_GRID, grid_specs, head_candidates
from exlq.quant.rotate import apply_rotation, check_rotation, rotation_for
from exlq.quant.tune import STEPS_PER_EPOCH, Student, TuneCheckpoint, TuneResult, TuneSettings, TuneState, default_lr, tune
from exlq.quant.writer import check_out_dir, quantization_config, write_model_dir
from exlq.runtime.exl2 import Exl2Tensors
from exlq.runtime.model import DecoderOnlyLM

HEAD_BITS = (2, 3, 4, 5, 6, 8, 16)
MIN_BPW, MAX_BPW = 2.0, 8.0
ASYM_ALPHA = 0.25  # the default share of the asymmetric correction (best of 0.25/0.5/1 on the proxy; 1 diverges)
ASYM_MIN_TOKENS = 16_384  # calibration tokens below which the default leaves the correction off
REFINE_SWEEPS = 2  # the default coordinate-descent sweeps after GPTQ (gptq.refine_codes) ...
REFINE_MIN_TOKENS = 65_536  # ... with at least this much calibration (below, they fit its noise)
TUNE_EPOCHS = 4  # the default epochs of end-to-end tuning (exlq.quant.tune; GPU harness, 205 k tokens: KL −14 % at
# 3.0 bpw, −2 % at 4.0; CPU proxy, 8 k tokens: −18 % at 2.5, −13 % at 3.0, −2 % at 4.0) ...
TUNE_MIN_TOKENS = 65_536  # ... with the calibration the GPU confirmed it on (it doubles a quick CPU conversion)
MAX_TUNE_EPOCHS = 64

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class ConvertOptions:
    bpw: float
    head_bits: int = 6
    damp: float = 0.01
    batch_rows: int = 8
    kl_aware: bool = True  # weigh each layer's errors by its measured output sensitivity
    rotate: bool = True  # incoherence processing folded into the weights (exlq.quant.rotate)
    asym_alpha: float | None = None  # share of the asymmetric target correction (exlq.quant.asymmetric); 0: off;
    # None: ASYM_ALPHA when the calibration has at least ASYM_MIN_TOKENS tokens, else off (see `resolved`)
    asym_lambda: float = 0.01  # its ridge, relative to mean(diag H)
    refine_sweeps: int | None = None  # coordinate-descent sweeps over each matrix's codes after GPTQ
    # (gptq.refine_codes); None: REFINE_SWEEPS with at least REFINE_MIN_TOKENS calibration tokens, else 0
    tune_epochs: int | None = None  # epochs of end-to-end tuning of norms and group scales (exlq.quant.tune); 0: off;
    # None: TUNE_EPOCHS with at least TUNE_MIN_TOKENS calibration tokens, else 0
    tune_lr: float | None = None  # its Adam step size on the log multipliers; None: tune.default_lr(bpw)
    tune_norms: bool = True  # it tunes the norms' weights too (else only the group scales)
    tune_steps: int = STEPS_PER_EPOCH  # its Adam steps per epoch, at most (rows accumulated per step: training rows /
    # steps, rounded up; a number ≥ the training rows makes one row a step)
    grid: str = DEFAULT_GRID  # the options measured (options.GRIDS; "reference": the reference converter's)
    holdout: bool = True  # the measurement scores options on calibration rows its Hessians leave out (measure.py)

    def validate(self) -> None:
        if not MIN_BPW <= self.bpw <= MAX_BPW:
            raise ExlqError(f"--bpw must be between {MIN_BPW} and {MAX_BPW} (got {self.bpw})")
        if self.head_bits not in HEAD_BITS:
            raise ExlqError(f"--head-bits must be one of {', '.join(map(str, HEAD_BITS))} (got {self.head_bits})")
        if self.asym_alpha is not None and not 0 <= self.asym_alpha <= 1:
            raise ExlqError(f"--asym-alpha must be between 0 and 1 (got {self.asym_alpha})")
        if not 0 < self.asym_lambda < math.inf:
            raise ExlqError(f"--asym-lambda must be a positive number (got {self.asym_lambda})")
        if self.refine_sweeps is not None and not 0 <= self.refine_sweeps <= 16:
            raise ExlqError(f"--refine-sweeps must be between 0 and 16 (got {self.refine_sweeps})")
        if self.tune_epochs is not None and not 0 <= self.tune_epochs <= MAX_TUNE_EPOCHS:
            raise ExlqError(f"--tune-epochs must be between 0 and {MAX_TUNE_EPOCHS} (got {self.tune_epochs})")
        if self.tune_lr is not None and not 0 < self.tune_lr <= 1:
            raise ExlqError(f"--tune-lr must be above 0 and at most 1 (got {self.tune_lr})")
        if self.tune_steps < 1:
            raise ExlqError(f"tuning needs at least one Adam step an epoch (got {self.tune_steps})")
        grid_specs(self.grid)  # a clear error for an unknown grid

    def resolved(self, calibration_tokens: int) -> ConvertOptions:
        """These options with the asymmetric share and the refinement sweeps decided. The defaults apply
        both only with enough calibration, because both fit it more closely and fit its noise on few
        tokens (measured on smollm2, docs/benchmarks.md: α = 0.25 lowered KL at every bitrate with 205 k
        tokens and at 2.5-4.0 with 16 k, and raised it by 6.5 % with 2 k; two sweeps lowered KL by 4 % at
        3.0 and 4.0 bpw with 205 k tokens, and raised it by 1.6 % at 4 bits with 16 k). The end-to-end
        tuning is on with as much calibration as the sweeps: it was confirmed with 205 k tokens, and it
        doubles the time of a quick conversion."""
        alpha, sweeps, epochs = self.asym_alpha, self.refine_sweeps, self.tune_epochs
        if alpha is None:
            alpha = ASYM_ALPHA if calibration_tokens >= ASYM_MIN_TOKENS else 0.0
        if sweeps is None:
            sweeps = REFINE_SWEEPS if calibration_tokens >= REFINE_MIN_TOKENS else 0
        if epochs is None:
            epochs = TUNE_EPOCHS if calibration_tokens >= TUNE_MIN_TOKENS else 0
        lr = default_lr(self.bpw) if self.tune_lr is None else self.tune_lr
        return replace(self, asym_alpha=alpha, refine_sweeps=sweeps, tune_epochs=epochs, tune_lr=lr)

    def asymmetric(self) -> dict[str, float] | None:
        """The asymmetric correction's settings when it is on (for fingerprints and the config), else None."""
        if self.asym_alpha is None:
            raise ValueError("ConvertOptions.resolved() decides asym_alpha first")
        return {"alpha": self.asym_alpha, "lambda": self.asym_lambda} if self.asym_alpha > 0 else None

    def tuning(self) -> TuneSettings | None:
        """The end-to-end tuning's settings when it is on, else None."""
        if self.tune_epochs is None or self.tune_lr is None:
            raise ValueError("ConvertOptions.resolved() decides tune_epochs and tune_lr first")
        if self.tune_epochs == 0:
            return None
        return TuneSettings(epochs=self.tune_epochs, lr=self.tune_lr, steps=self.tune_steps, norms=self.tune_norms)


@dataclass
class ConvertSummary:
    out_dir: str
    target_bpw: float
    decoder_bpw: float  # achieved, over the decoder linears (padded widths, spec §13 accounting)
    head_bits: int
    choices: dict[str, str] = field(default_factory=dict)  # matrix name -> option key
    seconds: float = 0.0
    calibration_perplexity: float = float("nan")  # the converted model on the first calibration rows
    tune: dict | None = None  # the end-to-end tuning's outcome (held-out KL before/after, ...) when it was on


def allocate_options(measurement: Measurement, bpw: float, kl_aware: bool = True) -> tuple[dict[str, QuantSpec], float]:
    """The option per matrix that minimizes total measured error within bpw (and the bpw reached).

    KL-aware: each matrix's errors are scaled by its layer's sensitivity, so the budget goes where
    errors cost most at the model's output rather than where layer-local errors are largest.
    """
    items = [
        [Option(o.key, o.total_bits, o.error * (m.sensitivity if kl_aware else 1.0)) for o in m.options]
        for m in measurement.matrices
    ]
    weights = [m.in_features * padded(m.out_features) for m in measurement.matrices]
    allocation = allocate_to_bpw(items, weights, bpw)
    chosen = {
        m.name: m.options[choice].spec for m, choice in zip(measurement.matrices, allocation.choices)
    }
    return chosen, allocation.total_bits / sum(weights)


def check_measurement_fits(measurement: Measurement, model: DecoderOnlyLM) -> None:
    """A reused measurement must describe exactly this model's decoder linears."""
    expected = {
        (f"model.layers.{i}.{name}", module.in_features, module.out_features)
        for i, layer in enumerate(model.model.layers)
        for name, module in linear_modules(layer).items()
    }
    if {(m.name, m.in_features, m.out_features) for m in measurement.matrices} != expected:
        raise ExlqError("the measurement was made for another model (its matrices differ from this model's)")


def quantize_layer(
    runner: LayerRunner,
    layer: torch.nn.Module,
    specs: dict[str, QuantSpec],
    damp: float,
    asymmetric: Asymmetric | None = None,
    refine_sweeps: int = 0,
) -> dict[str, torch.Tensor]:
    """GPTQ every linear of `layer` with its chosen spec; the layer then computes with the quantized
    weights (dequantized, for the torch path) and the packed EXL2 tensors are returned.

    With `asymmetric`, each linear is quantized toward its corrected target (and the FP stream
    advances through the layer before its weights are replaced).
    """
    prefix = f"model.layers.{runner.layer_index}"
    hessians = runner.collect_hessians(layer) if asymmetric is None else asymmetric.collect(runner, layer)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in linear_modules(layer).items():
        weight = dense_weight(module, f"{prefix}.{name}")
        target = weight.float() if asymmetric is None else asymmetric.target(hessians, name, weight)
        quantized = quantize_gptq(
            target, hessians.hessian(name), specs[f"{prefix}.{name}"], damp=damp, name=f"{prefix}.{name}",
            refine_sweeps=refine_sweeps,
        )
        bias = None if module.bias is None else module.bias.detach()
        packed = pack_exl2(quantized.codes, quantized.scale_codes, quantized.q_scale_max, quantized.groups, quantized.perm, bias)
        tensors.update(packed.state_dict(f"{prefix}.{name}"))
        module.weight.data = quantized.dequantize().to(weight.dtype)
    return tensors


def quantize_head(
    model: DecoderOnlyLM, runner: LayerRunner, head_bits: int, damp: float, refine_sweeps: int = 0
) -> dict[str, torch.Tensor]:
    """lm_head as EXL2 at `head_bits` (also for tied models: spec §10.1), or fp16. Of the layouts no larger than the
    head option (options.head_candidates), the one with the least output error on the calibration states."""
    weight = dense_weight(model.lm_head, "lm_head")
    if head_bits == 16:
        return {"lm_head.weight": weight.detach().half().contiguous()}
    # The head's input is the final norm's output: no need to compute vocabulary-sized logits.
    hessian = torch.zeros(weight.shape[1], weight.shape[1], device=weight.device)
    rows = 0
    with torch.inference_mode():
        for chunk in runner.chunks:
            x = model.model.norm(chunk).reshape(-1, weight.shape[1]).float()
            hessian.addmm_(x.T, x)
            rows += x.shape[0]
    hessian /= rows
    weight = weight.float()
    specs = head_candidates(head_bits, weight.shape[1], padded(weight.shape[0]))
    candidates = quantize_gptq_many(weight, hessian, specs, damp=damp, name="lm_head", refine_sweeps=refine_sweeps)
    best = min(candidates, key=lambda q: hessian_weighted_error(weight, q.dequantize(), hessian))
    packed = pack_exl2(best.codes, best.scale_codes, best.q_scale_max, best.groups, best.perm)
    return packed.state_dict("lm_head")


CALIBRATION_PPL_ROWS = 8


def head_weight(model: DecoderOnlyLM, head: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head as the converted model computes it: [vocab, hidden] in the compute dtype."""
    if "lm_head.weight" in head:
        return head["lm_head.weight"].to(model.device, model.dtype)
    on_device = {k: v.to(model.device) for k, v in head.items()}
    return Exl2Tensors.from_state_dict(on_device, "lm_head").weight(model.config.vocab_size).to(model.dtype)


@torch.inference_mode()
def calibration_perplexity(model: DecoderOnlyLM, states: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor) -> float:
    """exp(mean NLL) of the converted model (`states`: after all quantized layers, quantized head) on
    the first calibration rows, one row at a time so vocabulary-sized logits stay small."""
    from exlq.eval.perplexity import window_nll

    nll, tokens = 0.0, 0
    states = states[:CALIBRATION_PPL_ROWS]
    for row_states, row_ids in zip(states, ids[:CALIBRATION_PPL_ROWS].to(model.device)):
        logits = torch.nn.functional.linear(model.model.norm(row_states[None, :-1]), weight)
        nll += float(window_nll(logits, row_ids[None, 1:]).sum())
        tokens += row_ids.numel() - 1
    return math.exp(nll / tokens)


def fp16_tensors(model: DecoderOnlyLM) -> dict[str, torch.Tensor]:
    """Embeddings and norms, which stay fp16 in EXL2 models."""
    names = ["model.embed_tokens.weight", *(f"{norm}.weight" for norm in Student.norm_modules(model))]
    state = model.state_dict()
    return {name: state[name].detach().half().contiguous() for name in names}


def convert_model(
    model: DecoderOnlyLM,
    model_dir: Path,
    out_dir: Path,
    calibration: Calibration,
    options: ConvertOptions,
    *,
    work_dir: Path,
    measurement: Measurement | None = None,
    restart: bool = False,
    progress: Progress | None = None,
    specs_for: SpecsFor | None = None,
) -> ConvertSummary:
    """Convert `model` (loaded from `model_dir`) into an EXL2 model directory `out_dir`.

    `model` is consumed: its linear weights are replaced by their quantized (dequantized) values
    as the layers are done, which is what propagates quantized states to the next layer. Load a
    fresh copy for anything else.
    """
    options.validate()
    options = options.resolved(calibration.ids.numel())
    check_out_dir(out_dir, model_dir)
    started = time.perf_counter()
    report = progress or (lambda stage, done, total: None)
    rotation = rotation_for(options.rotate)
    if measurement is not None:
        check_measurement_fits(measurement, model)
        check_rotation(measurement.rotation, rotation)
    apply_rotation(model, rotation)
    job_fingerprint = fingerprint(model_dir, job_options(options, rotation, calibration, measurement))
    with Job(work_dir, job_fingerprint, restart=restart) as job:
        if measurement is None:
            measurement = measure_resumable(
                model, calibration, job, batch_rows=options.batch_rows, specs_for=specs_for or grid_specs(options.grid),
                progress=report, rotation=rotation, holdout=options.holdout,
            )
        specs, achieved = allocate_options(measurement, options.bpw, options.kl_aware)
        runner = LayerRunner(model, calibration.ids, batch_rows=options.batch_rows)
        asymmetric = None
        if options.asymmetric() is not None:
            fp_stream = LayerRunner(model, calibration.ids, batch_rows=options.batch_rows)
            asymmetric = Asymmetric(fp_stream, options.asym_lambda, options.asym_alpha)
        settings = options.tuning()
        tune_step = None if settings is None else settings.key()
        # The tuning's teacher: the FP model's final states (the asymmetric correction keeps them anyway).
        teacher = None
        if tune_step is not None and not job.done(tune_step):
            teacher = asymmetric.fp if asymmetric is not None else LayerRunner(model, calibration.ids, batch_rows=options.batch_rows)
        layers = model.model.layers
        for i, layer in enumerate(layers):
            step = f"layer-{i}"
            saved = job.load_tensors(step) if job.done(step) else None
            if asymmetric is None and teacher is not None:  # while the layer still has its FP weights
                teacher.advance(layer)
            if saved is None:
                job.save_tensors(step, quantize_layer(runner, layer, specs, options.damp, asymmetric, options.refine_sweeps))
                job.mark_done(step)
            else:
                if asymmetric is not None:  # the freshly loaded layer still has its FP weights
                    asymmetric.skip(layer)
                _restore_layer(layer, saved, f"model.layers.{i}")
            runner.advance(layer)
            report("quantize", i + 1, len(layers))
        if not job.done("head"):
            job.save_tensors("head", quantize_head(model, runner, options.head_bits, options.damp, options.refine_sweeps))
            job.mark_done("head")
        head = head_weight(model, job.load_tensors("head"))
        tuned: dict[str, torch.Tensor] = {}
        tune_info = None
        if tune_step is not None:
            if not job.done(tune_step):  # the model comes out of it tuned (when the tuning is kept)
                result = _tune_unless_out_of_memory(model, calibration, teacher, job, head, settings, tune_step, report)
                job.save_tensors(tune_step, result.tensors, metadata=result.info)
                job.mark_done(tune_step, result.info)
                tuned = result.tensors
            else:
                tuned = job.load_tensors(tune_step) or {}
                _apply_tuned(model, job, tuned)
            tune_info = job.step_info(tune_step)
        if tuned:  # the states of the first rows through the tuned layers
            first = LayerRunner(model, calibration.ids[:CALIBRATION_PPL_ROWS], batch_rows=options.batch_rows)
            for layer in layers:
                first.advance(layer)
            states = torch.cat(first.chunks)
        else:
            states = torch.cat(runner.chunks)
        calibration_ppl = calibration_perplexity(model, states, calibration.ids, head)
        config = quantization_config(
            bits=options.bpw,
            head_bits=options.head_bits,
            calibration=calibration_info(calibration, options, tune_info),
        )
        if rotation is not None:  # embedding and head differ once rotated (and norms are all ones)
            config["quantization_config"]["rotation"] = rotation
            config["tie_word_embeddings"] = False
        write_model_dir(out_dir, model_dir, lambda: _output_tensors(model, job, len(layers), tuned), config)
    return ConvertSummary(
        out_dir=str(out_dir),
        target_bpw=options.bpw,
        decoder_bpw=achieved,
        head_bits=options.head_bits,
        choices={name: spec.describe() for name, spec in specs.items()},
        seconds=time.perf_counter() - started,
        calibration_perplexity=calibration_ppl,
        tune=tune_info,
    )


def run_tuning(
    model: DecoderOnlyLM,
    calibration: Calibration,
    teacher: LayerRunner,
    job: Job,
    student_head: torch.Tensor,
    settings: TuneSettings,
    step: str,
    report: Progress,
):
    """The end-to-end tuning stage (exlq.quant.tune) of a converted model, its state checkpointed in `job`
    after every epoch under `<step>-state` (a rerun continues from the last finished epoch).

    `teacher`: the FP model's stream after all layers; `model`: every layer quantized (its weights and
    norms become the tuned ones, exactly as written).
    """
    with torch.no_grad():  # the FP model's normalized final states (the norms are not tuned yet)
        states = torch.cat([model.model.norm(chunk).float() for chunk in teacher.chunks])
    teacher.chunks = []
    linears = _quantized_linears(model, job)
    state_name = f"{step}-state"

    def load() -> TuneState | None:
        meta = job.load_metadata(state_name)
        return None if meta is None else TuneState.from_checkpoint(job.load_tensors(state_name), meta)

    def save(state: TuneState) -> None:
        tensors, meta = state.to_checkpoint()
        job.save_tensors(state_name, tensors, metadata=meta)

    return tune(
        model, calibration.ids, states, model.lm_head.weight, linears, student_head, settings,
        checkpoint=TuneCheckpoint(load, save), progress=lambda done, total: report("tune", done, total),
    )


def _tune_unless_out_of_memory(model: DecoderOnlyLM, calibration: Calibration, teacher: LayerRunner, job: Job,
                               student_head: torch.Tensor, settings: TuneSettings, step: str, report: Progress):
    """run_tuning, or, when the device runs out of memory (the student holds the decoder in fp32: twice the
    fp16 model), the untuned model: a long conversion then finishes, with the reason in its summary and
    config, instead of failing at its last step. What is written comes from the job's layer tensors and
    the model's norms, so putting the norms back is all it takes."""
    norms = {name: norm.weight.detach().clone() for name, norm in Student.norm_modules(model).items()}
    try:
        return run_tuning(model, calibration, teacher, job, student_head, settings, step, report)
    except torch.OutOfMemoryError:
        with torch.no_grad():
            for name, norm in Student.norm_modules(model).items():
                norm.weight.data = norms[name]
        reason = f"out of memory on {model.device} (the tuning holds the decoder in fp32); the model is written untuned"
        return TuneResult(False, {}, {"applied": False, "reason": reason})


def _quantized_linears(model: DecoderOnlyLM, job: Job) -> dict[str, Exl2Tensors]:
    """The packed tensors of every decoder linear, from the job's layer checkpoints."""
    linears = {}
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        saved = job.load_tensors(f"layer-{i}")
        for name in linear_modules(layer):
            linears[f"{prefix}.{name}"] = Exl2Tensors.from_state_dict(saved, f"{prefix}.{name}")
    return linears


def _apply_tuned(model: DecoderOnlyLM, job: Job, tuned: dict[str, torch.Tensor]) -> None:
    """Give a model restored from checkpoints the tuned norms and weights of an earlier run."""
    if tuned:
        Student(model, _quantized_linears(model, job)).set_weights(tuned, model.dtype)


def job_options(
    options: ConvertOptions, rotation: dict | None, calibration: Calibration, measurement: Measurement | None
) -> dict:
    """What decides the work directory's contents (its fingerprint). The asymmetric settings and the
    refinement sweeps join only when used, so work directories of conversions without them stay valid.
    The end-to-end tuning's settings never join: they change no other step, and its checkpoints are
    named by them (TuneSettings.key), so a finished conversion's work directory can be tuned (again,
    with other settings) without redoing its layers."""
    result = {
        "bpw": options.bpw,
        "head_bits": options.head_bits,
        "damp": options.damp,
        "kl_aware": options.kl_aware,
        "rotation": rotation,
        "calibration": calibration.fingerprint,
        "measurement": None if measurement is None else measurement.calibration.get("fingerprint"),
        "exlq": __version__,
    }
    if options.asymmetric() is not None:
        result["asymmetric"] = options.asymmetric()
    if options.refine_sweeps:
        result["refine_sweeps"] = options.refine_sweeps
    measured_here = measure_settings(options.grid, options.holdout, calibration.ids.shape[0])
    if measurement is None and measured_here:  # the work directory's measurement was made with these
        result["measure"] = measured_here
    return result


def calibration_info(calibration: Calibration, options: ConvertOptions, tune_info: dict | None = None) -> dict:
    """The config's `quantization_config.calibration`: the spec's rows/length/dataset, plus the
    asymmetric correction's, the refinement's and the end-to-end tuning's settings when they were used."""
    info = {"rows": calibration.ids.shape[0], "length": calibration.ids.shape[1], "dataset": calibration.description}
    if options.asymmetric() is not None:
        info["asymmetric"] = options.asymmetric()
    if options.refine_sweeps:
        info["refine_sweeps"] = options.refine_sweeps
    if tune_info is not None:
        info["tune"] = {
            key: tune_info[key] for key in ("settings", "applied", "heldout_kl_before", "heldout_kl_after") if key in tune_info
        }
    return info


def _restore_layer(layer: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Give a layer quantized in an earlier run its dequantized weights again (for the states that follow)."""
    for name, module in linear_modules(layer).items():
        weight = Exl2Tensors.from_state_dict(tensors, f"{prefix}.{name}").weight(module.out_features)
        module.weight.data = weight.to(module.weight.device, module.weight.dtype).contiguous()


def _output_tensors(
    model: DecoderOnlyLM, job: Job, num_layers: int, tuned: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors in the order the reference converter writes them (spec §10.2), one layer in memory at a time;
    `tuned` replaces norms and q_scale_max (the end-to-end tuning's result)."""
    plain = fp16_tensors(model) | tuned
    yield "model.embed_tokens.weight", plain["model.embed_tokens.weight"]
    for i in range(num_layers):
        prefix = f"model.layers.{i}"
        yield f"{prefix}.input_layernorm.weight", plain[f"{prefix}.input_layernorm.weight"]
        yield f"{prefix}.post_attention_layernorm.weight", plain[f"{prefix}.post_attention_layernorm.weight"]
        yield from ((name, tuned.get(name, tensor)) for name, tensor in job.load_tensors(f"layer-{i}").items())
    yield "model.norm.weight", plain["model.norm.weight"]
    yield from job.load_tensors("head").items()
