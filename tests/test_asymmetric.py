"""Asymmetric (GPTAQ-form) calibration: the target correction, its statistics and `convert --asym-alpha`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from exlq.quant.asymmetric import Asymmetric, asymmetric_target, captured_inputs
from exlq.quant.convert import ConvertOptions, convert_model, job_options
from exlq.quant.hessian import LayerRunner, linear_modules
from exlq.quant.options import grid_digest
from exlq.quant.rotate import rotation_for
from exlq.runtime.loader import load_model
from test_cli_quantize import SMALL, cli
from test_convert import calibration_for, file_hashes, grid


def random_statistics(n: int = 12, k: int = 16, rows: int = 400, noise: float = 0.3, seed: int = 0):
    """W [n, k] and inputs X_q, X_fp = X_q·(I + noise·E) [rows, k] with H, C as the collectors average them."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g)
    x_q = torch.randn(rows, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64)
    x_fp = x_q @ (torch.eye(k, dtype=torch.float64) + noise * torch.randn(k, k, generator=g, dtype=torch.float64))
    return weight, x_q, x_fp, x_q.T @ x_q / rows, x_fp.T @ x_q / rows


def test_target_matches_the_closed_form():
    weight, _, _, h, c = random_statistics()
    lam, alpha = 0.05, 0.25
    ridge = lam * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    expected = weight.double() + alpha * weight.double() @ (c - h) @ torch.linalg.inv(h + ridge)
    got = asymmetric_target(weight, h.float(), c, lam, alpha)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert float((got - weight).norm() / weight.norm()) > 0.01  # a real correction, not W again


def test_target_is_w_when_off_or_when_inputs_agree():
    weight, _, _, h, c = random_statistics()
    assert torch.equal(asymmetric_target(weight, h, c, 0.01, 0.0), weight)
    assert torch.equal(asymmetric_target(weight, h, h.clone(), 0.01, 0.25), weight)
    # The ridge pulls toward W: a huge λ leaves (almost) nothing of the correction.
    assert torch.allclose(asymmetric_target(weight, h, c, 1e6, 1.0), weight, atol=1e-5)


def test_full_correction_with_tiny_ridge_is_the_least_squares_fit_to_the_fp_outputs():
    weight, x_q, x_fp, h, c = random_statistics()
    got = asymmetric_target(weight, h, c, 1e-12, 1.0).double()
    expected = torch.linalg.lstsq(x_q, x_fp @ weight.double().T).solution.T  # min ‖X_fp Wᵀ − X_q W'ᵀ‖
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
    residual = lambda w: float((x_fp @ weight.double().T - x_q @ w.T).norm())  # noqa: E731
    assert residual(got) < 0.5 * residual(weight.double())


def test_collect_gives_chunked_statistics_shared_like_h_and_advances_the_fp_stream(tiny_llama_dir):
    model = load_model(tiny_llama_dir, device="cpu")
    ids = calibration_for(model, rows=4, length=16).ids
    runner = LayerRunner(model, ids, batch_rows=2)  # two chunks
    runner.chunks = [h + 0.1 * torch.randn(h.shape, generator=torch.Generator().manual_seed(1)) for h in runner.chunks]
    asymmetric = Asymmetric(LayerRunner(model, ids, batch_rows=2), lam=0.01, alpha=0.25)
    layer = model.model.layers[0]
    fp_expected = asymmetric.fp.outputs(layer)
    modules = linear_modules(layer)
    with captured_inputs(modules) as fp_inputs:
        asymmetric.fp.forward(layer, torch.cat(asymmetric.fp.chunks))
        fp_x = dict(fp_inputs)
    with captured_inputs(modules) as q_inputs:
        runner.forward(layer, torch.cat(runner.chunks))
        q_x = dict(q_inputs)

    collector = asymmetric.collect(runner, layer)
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        fp, q = (x[name].reshape(-1, x[name].shape[-1]).double() for x in (fp_x, q_x))
        assert torch.allclose(collector.cross(name), fp.T @ q / q.shape[0], rtol=1e-4, atol=1e-6)
        assert torch.allclose(collector.hessian(name).double(), q.T @ q / q.shape[0], rtol=1e-4, atol=1e-6)
    assert collector.owner["self_attn.v_proj"] == "self_attn.q_proj" and collector.owner["mlp.up_proj"] == "mlp.gate_proj"
    assert torch.equal(collector.cross("self_attn.k_proj"), collector.cross("self_attn.q_proj"))
    assert asymmetric.fp.layer_index == 1 and all(torch.equal(a, b) for a, b in zip(asymmetric.fp.chunks, fp_expected))


def kl_on(reference, model, ids: torch.Tensor) -> float:
    expected = torch.log_softmax(reference(ids, max_output_len=None).double(), -1)
    got = torch.log_softmax(model(ids, max_output_len=None).double(), -1)
    return float((expected.exp() * (expected - got)).sum(-1).mean())


def test_convert_with_asymmetric_calibration(tiny_model_dirs, tmp_path):
    """On the tiny random models the correction lowers the KL on the calibration rows by 8-16 % (every
    variant, 3 and 4 bpw, two calibration seeds); the test asks only that it does not raise it."""
    source = tiny_model_dirs["qwen2"]
    reference = load_model(source, device="cpu")
    outputs = {}
    for alpha in (0.0, 0.25):
        model = load_model(source, device="cpu")
        calibration = calibration_for(model, rows=8)
        outputs[alpha] = tmp_path / f"alpha-{alpha}"
        convert_model(model, source, outputs[alpha], calibration, ConvertOptions(bpw=4.0, head_bits=16, batch_rows=4, asym_alpha=alpha),
                      work_dir=tmp_path / f"work-{alpha}", specs_for=grid)
    assert file_hashes(outputs[0.0])["model.safetensors"] != file_hashes(outputs[0.25])["model.safetensors"]
    config = json.loads((outputs[0.25] / "config.json").read_text())["quantization_config"]
    assert config["calibration"]["asymmetric"] == {"alpha": 0.25, "lambda": 0.01}
    assert "asymmetric" not in json.loads((outputs[0.0] / "config.json").read_text())["quantization_config"]["calibration"]

    converted = {alpha: load_model(out, device="cpu") for alpha, out in outputs.items()}
    assert type(converted[0.25].model.layers[1].mlp.down_proj).__name__ == "Exl2Linear"
    ids = calibration.ids[:4]
    expected = reference(ids, max_output_len=None)
    rel = float((converted[0.25](ids, max_output_len=None) - expected).norm() / expected.norm())
    assert rel < 0.5, rel
    assert kl_on(reference, converted[0.25], calibration.ids) < kl_on(reference, converted[0.0], calibration.ids)


def test_off_is_the_plain_code_path_and_fingerprint(tiny_model_dirs, tmp_path, monkeypatch):
    import exlq.quant.convert as convert_module

    def refuse(*args, **kwargs):
        raise AssertionError("the asymmetric path ran with asym_alpha = 0")

    monkeypatch.setattr(convert_module, "Asymmetric", refuse)
    source = tiny_model_dirs["llama"]
    model = load_model(source, device="cpu")
    calibration = calibration_for(model)
    options = ConvertOptions(bpw=3.0, asym_alpha=0.0, asym_lambda=0.5)  # λ is ignored while off
    convert_model(model, source, tmp_path / "out", calibration, options, work_dir=tmp_path / "w", specs_for=grid)
    # The fingerprint's options are the ones of conversions before the option existed (work dirs stay valid); so are
    # those of a measurement made as before the measurement's own options existed.
    former = {"grid": "reference", "holdout": False}
    plain = job_options(replace(options, **former), rotation_for(True), calibration, None)
    assert set(plain) == {"bpw", "head_bits", "damp", "kl_aware", "rotation", "calibration", "measurement", "exlq"}
    on = job_options(ConvertOptions(bpw=3.0, asym_alpha=0.25, **former), rotation_for(True), calibration, None)
    assert on == {**plain, "asymmetric": {"alpha": 0.25, "lambda": 0.01}}
    default = job_options(options, rotation_for(True), calibration, None)
    assert default == {**plain, "measure": {"grid": "dense", "holdout": True, "grid_digest": grid_digest("dense")}}


def test_undecided_options_cannot_reach_a_fingerprint():
    """(The default's dependence on the calibration size: test_convert.test_defaults_that_need_enough_calibration.)"""
    with pytest.raises(ValueError):
        ConvertOptions(bpw=3.0).asymmetric()


@pytest.mark.parametrize(
    "args, needle",
    [(["--asym-alpha", 1.5], "--asym-alpha"), (["--asym-alpha", -0.1], "--asym-alpha"), (["--asym-lambda", 0], "--asym-lambda")],
)
def test_cli_refuses_bad_asymmetric_options(capsys, tiny_llama_dir, tmp_path, args, needle):
    code, out, err = cli(capsys, "convert", tiny_llama_dir, tmp_path / "out", *args, *SMALL)
    assert code == 2 and out == "" and needle in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
