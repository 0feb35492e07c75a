"""Measurement on a tiny model: every matrix and option measured, errors ordered by bits, JSON round trip."""

from __future__ import annotations

import json

import torch

from exlq.quant.calibration import Calibration
from exlq.quant.gptq import QuantSpec
from exlq.quant.measure import Measurement, measure_model

# A small grid keeps these tests fast; the full per-matrix grid is exercised by the option tests.
SMALL_GRID = [QuantSpec.uniform(2, 32), QuantSpec((4, 3), (0.25, 0.75), (32, 32)), QuantSpec.uniform(8, 64)]


def small_grid(_name: str) -> list[QuantSpec]:
    return SMALL_GRID
from exlq.runtime.loader import load_model


def test_measure_tiny_model_and_round_trip(tiny_model_dirs, tmp_path):
    model = load_model(tiny_model_dirs["qwen2"], device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    calibration = Calibration(ids, "random ids")
    seen = []
    measurement = measure_model(model, calibration, on_layer=lambda i, r: seen.append(i), batch_rows=2, specs_for=small_grid)
    assert seen == [0, 1]
    names = [m.name for m in measurement.matrices]
    assert names[:7] == [f"model.layers.0.{n}" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert len(names) == 14
    for matrix in measurement.matrices:
        assert len(matrix.options) == 3
        cheapest = min(matrix.options, key=lambda o: o.total_bits)
        dearest = max(matrix.options, key=lambda o: o.total_bits)
        assert 0 < dearest.error < cheapest.error, matrix.name
        assert matrix.bias == matrix.name.endswith(("q_proj", "k_proj", "v_proj"))  # Qwen2's qkv bias
    path = tmp_path / "measurement.json"
    path.write_text(json.dumps(measurement.to_json()))
    again = Measurement.from_json(json.loads(path.read_text()))
    assert again == measurement


def test_measure_resumes_from_done_layers(tiny_model_dirs):
    model = load_model(tiny_model_dirs["llama"], device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    calibration = Calibration(ids, "random ids")
    full = measure_model(model, calibration, specs_for=small_grid)
    first_layer = [m for m in full.matrices if m.name.startswith("model.layers.0.")]
    measured = []
    resumed = measure_model(
        model, calibration, done={0: first_layer}, on_layer=lambda i, r: measured.append(i), specs_for=small_grid
    )
    assert measured == [1]
    assert resumed == full


def test_layer_sensitivities_are_measured(tiny_model_dirs):
    model = load_model(tiny_model_dirs["llama"], device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(2))
    measurement = measure_model(model, Calibration(ids, "random ids"), specs_for=small_grid)
    per_layer = {m.name.split(".")[2]: m.sensitivity for m in measurement.matrices}
    assert len(per_layer) == 2 and all(0 < s < float("inf") for s in per_layer.values())
    for m in measurement.matrices:
        assert m.sensitivity == per_layer[m.name.split(".")[2]]  # one factor per layer
    again = Measurement.from_json(json.loads(json.dumps(measurement.to_json())))
    assert [m.sensitivity for m in again.matrices] == [m.sensitivity for m in measurement.matrices]


def test_kl_aware_allocation_favours_sensitive_layers():
    from exlq.quant.convert import allocate_options
    from exlq.quant.measure import MatrixResult, OptionResult

    def matrix(name, sensitivity):
        options = [OptionResult.of(spec, bits, error) for spec, bits, error in
                   [(SMALL_GRID[0], 2 * 64 * 64, 1.0), (SMALL_GRID[2], 8 * 64 * 64, 0.01)]]
        return MatrixResult(name, 64, 64, False, options, sensitivity)

    measurement = Measurement({}, {}, [matrix("model.layers.0.a", 10.0), matrix("model.layers.1.a", 1.0)])
    chosen, _ = allocate_options(measurement, 5.0)  # room for one 8-bit matrix
    assert chosen["model.layers.0.a"] == SMALL_GRID[2] and chosen["model.layers.1.a"] == SMALL_GRID[0]
    flipped = Measurement({}, {}, [matrix("model.layers.0.a", 1.0), matrix("model.layers.1.a", 10.0)])
    chosen, _ = allocate_options(flipped, 5.0)
    assert chosen["model.layers.1.a"] == SMALL_GRID[2]


def test_holdout_scores_options_on_rows_the_hessians_leave_out(tiny_model_dirs):
    """measure_model (holdout by default): a quarter of the rows (at most MEASURE_ROWS) score the options, the rest fit them;
    the errors then differ from those scored on rows the fit saw, and the measurement says which it holds."""
    from exlq.quant.measure import ERROR_METRIC, HOLDOUT_ERROR_METRIC, MEASURE_ROWS, scoring_rows

    assert scoring_rows(8, True) == 2 and scoring_rows(100, True) == MEASURE_ROWS and scoring_rows(3, True) == 1
    assert scoring_rows(8, False) == MEASURE_ROWS
    model = load_model(tiny_model_dirs["llama"], device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(3))
    calibration = Calibration(ids, "random ids")
    plain = measure_model(model, calibration, batch_rows=3, specs_for=small_grid, holdout=False)
    held = measure_model(model, calibration, batch_rows=3, specs_for=small_grid)  # the default
    assert plain.error_metric == ERROR_METRIC and held.error_metric == HOLDOUT_ERROR_METRIC
    one_row = measure_model(model, Calibration(ids[:1], "one row"), specs_for=small_grid)
    assert one_row.error_metric == ERROR_METRIC  # nothing to hold out: the Hessians need the row
    for a, b in zip(plain.matrices, held.matrices):
        assert a.name == b.name and [o.key for o in a.options] == [o.key for o in b.options]
        assert all(o.error > 0 for o in b.options)
        assert any(abs(x.error - y.error) > 1e-6 * x.error for x, y in zip(a.options, b.options)), a.name
