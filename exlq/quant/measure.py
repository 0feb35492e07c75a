"""Measurement: what each quantization option costs (bits) and breaks (error), per matrix.

Options are measured per matrix, not as joint rows of a layer table: each matrix is quantized
alone with every candidate spec (GPTQ with its layer's Hessian) and the error is the relative
squared error of the *decoder layer's output* on calibration states, ‖Δy‖²/‖y‖², so matrices
whose errors matter more downstream (through attention or the MLP) are seen as such. States come
from the unquantized model; the measurement is independent of the target bitrate and is reused
for any `--bpw`.

JSON schema (`measurement.json`, "format": "exlq-measurement", "version": 1):
    {"format", "version", "exlq_version", "model": {"path", "architecture"},
     "calibration": {"description", "fingerprint", "rows", "length"},
     "error_metric": str, "rotation": {"seed": int} or null (measured on the rotated model),
     "matrices": [{"name": "model.layers.0.self_attn.q_proj", "in_features": K, "out_features": N,
                   "bias": bool, "options": [{"key": "4b100%g128", "bits": [4], "proportions": [1.0],
                   "group_sizes": [128], "total_bits": int, "error": float}, ...]}, ...]}
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from exlq import __version__
from exlq.errors import ExlqError
from exlq.eval.perplexity import window_kl
from exlq.quant.calibration import Calibration
from exlq.quant.gptq import QuantSpec, quantize_gptq_many
from exlq.quant.hessian import LayerRunner, linear_modules
from exlq.quant.job import Job
from exlq.quant.options import candidate_specs, grid_digest, total_bits
from exlq.runtime.model import DecoderOnlyLM

FORMAT = "exlq-measurement"
VERSION = 1
ERROR_METRIC = "relative squared error of the decoder layer output, ||dy||^2/||y||^2, this matrix alone quantized"


def padded(n: int) -> int:
    """EXL2 stores output columns padded to a multiple of 32 (spec §3.5)."""
    return (n + 31) // 32 * 32


@dataclass
class OptionResult:
    key: str
    bits: list[int]
    proportions: list[float]
    group_sizes: list[int]
    total_bits: int
    error: float

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(tuple(self.bits), tuple(self.proportions), tuple(self.group_sizes))

    @classmethod
    def of(cls, spec: QuantSpec, bits: int, error: float) -> OptionResult:
        return cls(spec.describe(), list(spec.bits), list(spec.proportions), list(spec.group_sizes), bits, error)


@dataclass
class MatrixResult:
    name: str
    in_features: int
    out_features: int
    bias: bool
    options: list[OptionResult] = field(default_factory=list)
    # KL of the model's final output per unit of this layer's summed measured error: converts
    # layer-local errors into what they cost at the output (1.0 = unknown, errors used as they are).
    sensitivity: float = 1.0


def matrix_to_json(matrix: MatrixResult) -> dict:
    return asdict(matrix)


def matrix_from_json(data: dict) -> MatrixResult:
    return MatrixResult(**{**data, "options": [OptionResult(**o) for o in data["options"]]})


@dataclass
class Measurement:
    model: dict
    calibration: dict
    matrices: list[MatrixResult]
    error_metric: str = ERROR_METRIC
    rotation: dict | None = None  # the rotation applied to the model before measuring (exlq.quant.rotate)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "exlq_version": __version__, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> Measurement:
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ExlqError(f"not an exlq measurement (format {FORMAT!r} version {VERSION} expected)")
        matrices = [matrix_from_json(m) for m in data["matrices"]]
        return cls(
            data["model"], data["calibration"], matrices, data.get("error_metric", ERROR_METRIC), data.get("rotation")
        )


def dense_weight(module: nn.Module, name: str) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ExlqError(f"{name} is not an unquantized linear layer: quantize from an FP16/BF16/FP32 model")
    return weight


@contextmanager
def substituted_weight(module: nn.Module, weight: torch.Tensor):
    """Temporarily run `module` with another weight (same shape and dtype)."""
    original = module.weight.data
    module.weight.data = weight
    try:
        yield
    finally:
        module.weight.data = original


def relative_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """‖Δy‖²/‖y‖² over the chunks, summed in float64 on the device (one host sync, not two a chunk)."""
    num = sum((o.double() - r.double()).pow(2).sum() for o, r in zip(outputs, reference))
    den = sum(r.double().pow(2).sum() for r in reference)
    return float(num) / max(float(den), 1e-30)


SpecsFor = Callable[[str], list[QuantSpec]]


def distinct_layouts(specs: list[QuantSpec], in_features: int) -> list[QuantSpec]:
    """One spec per distinct group layout: at small K several specs cut the same groups."""
    seen: dict[tuple, QuantSpec] = {}
    for spec in specs:
        seen.setdefault(tuple(spec.group_layout(in_features)), spec)
    return list(seen.values())


MEASURE_ROWS = 16  # calibration rows whose layer outputs score each option (Hessians use all rows)
HOLDOUT_ERROR_METRIC = ERROR_METRIC + ", scored on calibration rows the Hessians did not see"


def holds_out(rows: int, holdout: bool) -> bool:
    """Whether a measurement asked for `holdout` can have it: the Hessians need at least one row the scoring leaves."""
    return holdout and rows >= 2


# The only measurement there was before `grid` and `holdout` existed: fingerprints leave these settings out, so work
# directories of such measurements stay valid.
FORMER_MEASURE_SETTINGS = {"grid": "reference", "holdout": False}


def measure_settings(grid: str, holdout: bool, rows: int) -> dict:
    """What a measurement's options and scoring depend on besides model and calibration, for job fingerprints
    (empty for FORMER_MEASURE_SETTINGS); grids other than the reference converter's also name their contents."""
    settings = {"grid": grid, "holdout": holds_out(rows, holdout)}
    if settings == FORMER_MEASURE_SETTINGS:
        return {}
    return settings if grid == FORMER_MEASURE_SETTINGS["grid"] else {**settings, "grid_digest": grid_digest(grid)}


def scoring_rows(rows: int, holdout: bool) -> int:
    """How many calibration rows (the first ones) score the options. Held out from the Hessians, they are at most a
    quarter of the rows (at least one), so a small calibration keeps most of its rows for the fit."""
    return min(MEASURE_ROWS, max(1, rows // 4)) if holds_out(rows, holdout) else MEASURE_ROWS


def measure_layer(
    runner: LayerRunner,
    layer: nn.Module,
    *,
    specs_for: SpecsFor = candidate_specs,
    damp: float = 0.01,
    measure_rows: int = MEASURE_ROWS,
    probe: Callable[[], float] | None = None,
    holdout: bool = False,
) -> list[MatrixResult]:
    """Every candidate option of every linear in `layer`, on the runner's current states.

    With `probe` (the model's output KL vs FP16 as the layer currently stands), the whole layer is
    also quantized with each matrix's middle option to calibrate the layer's `sensitivity`. With `holdout`, the
    Hessians leave out the `measure_rows` rows that score the options: an option with many parameters (small groups)
    fits the rows it is fitted on better than new ones, and scoring it on them would flatter it.
    """
    prefix = f"model.layers.{runner.layer_index}"
    hessians = runner.collect_hessians(layer, skip=measure_rows if holdout else 0)
    reference = runner.outputs(layer, rows=measure_rows)
    results = []
    probe_weights: dict[nn.Module, torch.Tensor] = {}
    probe_error = 0.0
    for name, module in linear_modules(layer).items():
        weight = dense_weight(module, f"{prefix}.{name}")
        result = MatrixResult(f"{prefix}.{name}", module.in_features, module.out_features, module.bias is not None)
        specs = distinct_layouts(specs_for(name.rsplit(".", 1)[-1]), module.in_features)
        middle = len(specs) // 2
        quantized_all = quantize_gptq_many(weight.float(), hessians.hessian(name), specs, damp=damp, name=result.name)
        for index, (spec, quantized) in enumerate(zip(specs, quantized_all)):
            dequantized = quantized.dequantize().to(weight.dtype)
            with substituted_weight(module, dequantized):
                error = relative_error(runner.outputs(layer, rows=measure_rows), reference)
            bits = total_bits(spec, module.in_features, padded(module.out_features), result.bias)
            result.options.append(OptionResult.of(spec, bits, error))
            if index == middle and probe is not None:
                probe_weights[module], probe_error = dequantized, probe_error + error
        results.append(result)
    if probe is not None:
        sensitivity = layer_sensitivity(probe, probe_weights, probe_error)
        for result in results:
            result.sensitivity = sensitivity
    return results


def layer_sensitivity(probe: Callable[[], float], weights: dict[nn.Module, torch.Tensor], error: float) -> float:
    """Output KL caused by quantizing the whole layer at once, per unit of its summed layer errors."""
    originals = {module: module.weight.data for module in weights}
    try:
        for module, weight in weights.items():
            module.weight.data = weight
        kl = probe()
    finally:
        for module, weight in originals.items():
            module.weight.data = weight
    return max(kl, 0.0) / max(error, 1e-30)


PROBE_ROWS, PROBE_LENGTH = 4, 256


def output_kl_probe(model: DecoderOnlyLM, calibration: Calibration) -> Callable[[], float]:
    """A function giving the model's mean KL(P_fp16 ‖ P_now) on a few calibration rows."""
    ids = calibration.ids[:PROBE_ROWS, :PROBE_LENGTH].to(model.device)
    reference = model(ids, max_output_len=None)

    def probe() -> float:
        return window_kl(model(ids, max_output_len=None), reference)[0] / ids.numel()

    return probe


def measure_model(
    model: DecoderOnlyLM,
    calibration: Calibration,
    *,
    done: dict[int, list[MatrixResult]] | None = None,
    on_layer: Callable[[int, list[MatrixResult]], None] | None = None,
    batch_rows: int = 8,
    specs_for: SpecsFor = candidate_specs,
    rotation: dict | None = None,
    holdout: bool = True,
) -> Measurement:
    """Measure every decoder layer; `done` holds layers measured by an earlier (interrupted) run. `holdout` (the
    default; off with a single calibration row): score the options on calibration rows the Hessians leave out
    (measure_layer)."""
    done = dict(done or {})
    holdout = holds_out(calibration.ids.shape[0], holdout)
    runner = LayerRunner(model, calibration.ids, batch_rows=batch_rows)
    probe = output_kl_probe(model, calibration) if len(done) < len(model.model.layers) else None
    measure_rows = scoring_rows(calibration.ids.shape[0], holdout)
    for i, layer in enumerate(model.model.layers):
        if i not in done:
            done[i] = measure_layer(runner, layer, specs_for=specs_for, probe=probe, measure_rows=measure_rows,
                                    holdout=holdout)
            if on_layer is not None:
                on_layer(i, done[i])
        runner.advance(layer)
    return Measurement(
        model={"path": str(getattr(model, "model_dir", "")), "architecture": type(model).__name__},
        calibration={
            "description": calibration.description,
            "fingerprint": calibration.fingerprint,
            "rows": calibration.ids.shape[0],
            "length": calibration.ids.shape[1],
        },
        matrices=[m for i in sorted(done) for m in done[i]],
        error_metric=HOLDOUT_ERROR_METRIC if holdout else ERROR_METRIC,
        rotation=rotation,
    )


def measure_resumable(
    model: DecoderOnlyLM,
    calibration: Calibration,
    job: Job,
    *,
    batch_rows: int = 8,
    specs_for: SpecsFor = candidate_specs,
    progress: Callable[[str, int, int], None] | None = None,
    rotation: dict | None = None,
    holdout: bool = True,
) -> Measurement:
    """measure_model with every layer's results checkpointed in `job` (a rerun resumes; `holdout` belongs in the
    job's fingerprint)."""
    layers = len(model.model.layers)
    saved = {i: job.load_json(f"measure-{i}") for i in range(layers) if job.done(f"measure-{i}")}
    done = {i: [matrix_from_json(m) for m in data] for i, data in saved.items() if data is not None}

    def checkpoint(i: int, results: list[MatrixResult]) -> None:
        job.save_json(f"measure-{i}", [matrix_to_json(m) for m in results])
        job.mark_done(f"measure-{i}")
        if progress is not None:
            progress("measure", i + 1, layers)

    return measure_model(
        model, calibration, done=done, on_layer=checkpoint, batch_rows=batch_rows, specs_for=specs_for, rotation=rotation,
        holdout=holdout,
    )
