"""End-to-end conversion of tiny random models on CPU: EXL2 out, loaded back by the runtime."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from exlq.errors import ExlqError
from exlq.quant.calibration import Calibration
from exlq.quant.convert import ConvertOptions, convert_model
from exlq.quant.gptq import QuantSpec
from exlq.runtime.loader import load_model

GRID = [QuantSpec.uniform(2, 32), QuantSpec((4, 3), (0.25, 0.75), (32, 32)), QuantSpec.uniform(4, 32), QuantSpec.uniform(8, 32)]


def grid(_name: str) -> list[QuantSpec]:
    return GRID


def calibration_for(model, rows=4, length=64, seed=0) -> Calibration:
    ids = torch.randint(0, model.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))
    return Calibration(ids, "random ids")


def file_hashes(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    "variant,bpw,head_bits,max_error",
    [("llama-tied-llama3rope", 4.0, 6, 0.5), ("qwen2", 4.0, 16, 0.5), ("qwen2", 8.0, 8, 0.1)],
)
def test_convert_and_load_back(tiny_model_dirs, tmp_path, variant, bpw, head_bits, max_error):
    """Random tiny weights quantize badly at 4 bpw (logit error ~0.3); at 8 bpw (mostly 8-bit groups: their
    scale overhead puts an all-8-bit model just above 8.0) the error is several times smaller (~0.05)."""
    source = tiny_model_dirs[variant]
    before = file_hashes(source)
    model = load_model(source, device="cpu")
    reference = load_model(source, device="cpu")
    calibration = calibration_for(model)
    out = tmp_path / "out"
    summary = convert_model(
        model, source, out, calibration, ConvertOptions(bpw=bpw, head_bits=head_bits),
        work_dir=tmp_path / "work", specs_for=grid,
    )
    assert file_hashes(source) == before  # the input is never written
    assert bpw - 0.6 <= summary.decoder_bpw <= bpw
    # Calibration perplexity of the converted model, recomputed independently from the written files.
    import math

    converted = load_model(out, device="cpu")
    rows = calibration.ids[:8]
    logp = torch.log_softmax(converted(rows, max_output_len=None)[:, :-1].double(), -1)
    nll = -logp.gather(2, rows[:, 1:, None]).mean().item()
    assert summary.calibration_perplexity == pytest.approx(math.exp(nll), rel=1e-3)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "exl2"
    assert config["quantization_config"]["head_bits"] == head_bits
    # Rotated by default: embedding and head are stored apart (the source may tie them).
    assert config["quantization_config"]["rotation"] == {"seed": 0} and config["tie_word_embeddings"] is False
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()

    quantized = load_model(out, device="cpu")
    assert type(quantized.model.layers[0].self_attn.q_proj).__name__ == "Exl2Linear"
    assert type(quantized.lm_head).__name__ == ("DenseLinear" if head_bits == 16 else "Exl2Linear")
    ids = calibration.ids[:2]
    expected = reference(ids, max_output_len=None)
    got = quantized(ids, max_output_len=None)
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < max_error, rel
    # The runtime's reading of the files equals what the quantizer computed with (same dequantization).
    assert torch.allclose(quantized.model.layers[1].mlp.down_proj(torch.eye(96)),
                          model.model.layers[1].mlp.down_proj(torch.eye(96)), atol=1e-3)


def test_unrotated_conversion_keeps_the_tied_head(tiny_model_dirs, tmp_path):
    source = tiny_model_dirs["qwen2-tied"]
    model = load_model(source, device="cpu")
    out = tmp_path / "out"
    convert_model(model, source, out, calibration_for(model), ConvertOptions(bpw=4.0, rotate=False), work_dir=tmp_path / "w", specs_for=grid)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "rotation" not in config["quantization_config"]
    converted = load_model(out, device="cpu")
    assert torch.equal(converted.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight.half().float())


@pytest.mark.parametrize("asym_alpha", [0.0, 0.25])  # with asymmetric calibration the FP stream must resume too
def test_resume_after_interruption_gives_identical_files(tiny_model_dirs, tmp_path, asym_alpha):
    source = tiny_model_dirs["llama"]
    options = ConvertOptions(bpw=3.0, head_bits=4, asym_alpha=asym_alpha)

    def run(out, work, progress=None):
        model = load_model(source, device="cpu")
        return convert_model(model, source, out, calibration_for(model), options, work_dir=work, specs_for=grid, progress=progress)

    run(tmp_path / "straight", tmp_path / "work-straight")

    def crash_after_first_layer(stage, done, total):
        if stage == "quantize" and done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", tmp_path / "work-resumed", crash_after_first_layer)
    assert not (tmp_path / "resumed").exists()
    run(tmp_path / "resumed", tmp_path / "work-resumed")
    assert file_hashes(tmp_path / "resumed") == file_hashes(tmp_path / "straight")


def test_bad_options(tiny_model_dirs, tmp_path):
    source = tiny_model_dirs["llama"]
    model = load_model(source, device="cpu")
    for options, message in [(ConvertOptions(bpw=1.5), "--bpw"), (ConvertOptions(bpw=4.0, head_bits=7), "--head-bits")]:
        with pytest.raises(ExlqError, match=message):
            convert_model(model, source, tmp_path / "o", calibration_for(model), options, work_dir=tmp_path / "w", specs_for=grid)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExlqError):
        convert_model(model, source, tmp_path / "full", calibration_for(model), ConvertOptions(bpw=4.0), work_dir=tmp_path / "w", specs_for=grid)


def test_output_folder_has_ordinary_permissions(tiny_model_dirs, tmp_path):
    import os
    import stat

    source = tiny_model_dirs["llama"]
    model = load_model(source, device="cpu")
    out = tmp_path / "perm"
    convert_model(model, source, out, calibration_for(model), ConvertOptions(bpw=4.0), work_dir=tmp_path / "w", specs_for=grid)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask for p in out.iterdir())


def test_nan_weights_name_the_layer(tiny_model_dirs, tmp_path):
    source = tiny_model_dirs["llama"]
    model = load_model(source, device="cpu")
    model.model.layers[1].mlp.up_proj.weight.data[3, 5] = float("nan")
    with pytest.raises(ExlqError, match="model.layers.1"):
        convert_model(model, source, tmp_path / "o", calibration_for(model), ConvertOptions(bpw=4.0), work_dir=tmp_path / "w", specs_for=grid)


@pytest.mark.parametrize("field, constants", [("asym_alpha", ("ASYM_ALPHA", "ASYM_MIN_TOKENS")),
                                               ("refine_sweeps", ("REFINE_SWEEPS", "REFINE_MIN_TOKENS")),
                                               ("tune_epochs", ("TUNE_EPOCHS", "TUNE_MIN_TOKENS"))])
def test_defaults_that_need_enough_calibration(field, constants):
    """The asymmetric correction, the refinement sweeps and the end-to-end tuning fit the calibration closely: on
    by default only with enough of it (the built-in 100 × 2048 tokens; not e.g. --rows 8 --length 256), and an
    explicit value stands."""
    from exlq.quant import convert

    on, min_tokens = (getattr(convert, name) for name in constants)
    default = ConvertOptions(bpw=3.0)
    assert getattr(default.resolved(100 * 2048), field) == on > 0
    assert getattr(default.resolved(min_tokens - 1), field) == 0
    assert getattr(ConvertOptions(bpw=3.0, **{field: 0}).resolved(10**6), field) == 0
    assert getattr(ConvertOptions(bpw=3.0, **{field: 0.5 if field == "asym_alpha" else 3}).resolved(10), field) > 0


def test_refine_sweeps_change_the_codes_and_are_recorded(tiny_model_dirs, tmp_path):
    """--refine-sweeps reaches every matrix (decoder and head), joins the fingerprint and the config."""
    from exlq.quant.convert import job_options
    from exlq.quant.rotate import rotation_for

    source = tiny_model_dirs["llama"]
    outputs = {}
    for sweeps in (0, 2):
        model = load_model(source, device="cpu")
        calibration = calibration_for(model)
        outputs[sweeps] = tmp_path / f"sweeps-{sweeps}"
        options = ConvertOptions(bpw=3.0, head_bits=4, refine_sweeps=sweeps)
        convert_model(model, source, outputs[sweeps], calibration, options, work_dir=tmp_path / f"w{sweeps}", specs_for=grid)
    from safetensors.torch import load_file

    plain, refined = (load_file(outputs[s] / "model.safetensors") for s in (0, 2))
    assert not torch.equal(plain["lm_head.q_weight"], refined["lm_head.q_weight"])
    assert not torch.equal(plain["model.layers.0.mlp.down_proj.q_weight"], refined["model.layers.0.mlp.down_proj.q_weight"])
    assert torch.equal(plain["model.layers.0.mlp.down_proj.q_scale"], refined["model.layers.0.mlp.down_proj.q_scale"])
    config = json.loads((outputs[2] / "config.json").read_text())["quantization_config"]["calibration"]
    assert config["refine_sweeps"] == 2
    assert "refine_sweeps" not in json.loads((outputs[0] / "config.json").read_text())["quantization_config"]["calibration"]
    keys = job_options(ConvertOptions(bpw=3.0, refine_sweeps=2).resolved(0), rotation_for(True), calibration, None)
    assert keys["refine_sweeps"] == 2


@pytest.mark.parametrize("order", ["option first", "option last"])
def test_head_takes_the_candidate_with_least_output_error(tiny_model_dirs, monkeypatch, order):
    """quantize_head tries every layout options.head_candidates offers and keeps the one with the least
    tr(ΔW H ΔWᵀ) on the calibration states, wherever it sits in the list."""
    import exlq.quant.convert as convert_module
    from exlq.quant.hessian import LayerRunner
    from exlq.quant.options import HEAD_OPTIONS
    from exlq.runtime.exl2 import decode_q_groups

    model = load_model(tiny_model_dirs["llama"], device="cpu")
    runner = LayerRunner(model, calibration_for(model).ids, batch_rows=4)
    for layer in model.model.layers:
        runner.advance(layer)
    worse = QuantSpec.uniform(2, 32)  # far more error than the 6-bit option
    candidates = [HEAD_OPTIONS[6], worse] if order == "option first" else [worse, HEAD_OPTIONS[6]]
    monkeypatch.setattr(convert_module, "head_candidates", lambda bits, k, n: candidates)
    errors = []
    monkeypatch.setattr(convert_module, "hessian_weighted_error", lambda w, a, h: errors.append(((a - w) ** 2).sum().item()) or errors[-1])
    head = convert_module.quantize_head(model, runner, 6, 0.01)
    layout = decode_q_groups(head["lm_head.q_groups"], head["lm_head.q_weight"].shape[0])
    hidden = model.config.hidden_size
    assert len(errors) == 2 and layout == HEAD_OPTIONS[6].group_layout(hidden) != worse.group_layout(hidden)
