"""End-to-end tuning of norms and group scales (exlq.quant.tune) inside `convert`, on tiny models (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from exlq.quant.convert import ConvertOptions, convert_model, head_weight
from exlq.runtime.loader import load_model
from test_convert import calibration_for, file_hashes, grid

ROWS, LENGTH = 8, 64  # one row of the 8 is held out of the tuning


def convert(source, out, work, *, calibration=None, progress=None, **options):
    model = load_model(source, device="cpu")
    calibration = calibration or calibration_for(model, rows=ROWS, length=LENGTH)
    options = ConvertOptions(bpw=3.0, head_bits=4, **options)
    summary = convert_model(model, source, out, calibration, options, work_dir=work, specs_for=grid, progress=progress)
    return model, calibration, summary


def kl_to_reference(reference, quantized, ids) -> float:
    """Mean KL(P_ref ‖ P_quant) over every position of `ids` (full vocabulary, float64)."""
    ref = torch.log_softmax(reference(ids, max_output_len=None).double(), -1)
    got = torch.log_softmax(quantized(ids, max_output_len=None).double(), -1)
    return float((ref.exp() * (ref - got)).sum(-1).mean())


def safetensors_of(directory) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def test_tuning_lowers_kl_and_writes_only_norms_and_group_scales(tiny_model_dirs, tmp_path):
    source = tiny_model_dirs["llama"]
    _, calibration, plain = convert(source, tmp_path / "plain", tmp_path / "w0")
    _, _, tuned = convert(source, tmp_path / "tuned", tmp_path / "w1", tune_epochs=4, tune_lr=0.01)
    assert plain.tune is None
    info = tuned.tune
    assert info["applied"] and info["heldout_rows"] == [4]
    assert info["heldout_kl_after"] < info["heldout_kl_before"]
    assert [h["epoch"] for h in info["history"]] == list(range(1, len(info["history"]) + 1))
    # On the training rows, measured independently on the written models against the original one.
    reference = load_model(source, device="cpu")
    train = calibration.ids[[r for r in range(ROWS) if r not in info["heldout_rows"]]]
    before = kl_to_reference(reference, load_model(tmp_path / "plain", device="cpu"), train)
    after = kl_to_reference(reference, load_model(tmp_path / "tuned", device="cpu"), train)
    assert after < 0.95 * before, (before, after)
    # Only norms and q_scale_max differ; they keep the format's dtypes and shapes.
    a, b = safetensors_of(tmp_path / "plain"), safetensors_of(tmp_path / "tuned")
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith(("norm.weight", ".q_scale_max")) for k in changed)
    assert not any(k.startswith("lm_head.") for k in changed)
    for k in changed:
        assert b[k].dtype == torch.float16 and b[k].shape == a[k].shape and torch.isfinite(b[k]).all()
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())["quantization_config"]["calibration"]
    assert config["tune"]["applied"] is True and config["tune"]["settings"]["epochs"] == 4
    assert "tune" not in json.loads((tmp_path / "plain" / "config.json").read_text())["quantization_config"]["calibration"]


def test_written_model_computes_exactly_what_was_tuned(tiny_model_dirs, tmp_path):
    """The model left in memory (tuned norms, weights dequantized from the tuned q_scale_max) and the written
    files give bit-identical logits: what the tuning measured is what is written."""
    source = tiny_model_dirs["qwen2"]  # q/k/v biases
    model, calibration, summary = convert(source, tmp_path / "out", tmp_path / "w", tune_epochs=3, tune_lr=0.01)
    assert summary.tune["applied"]
    written = safetensors_of(tmp_path / "out")
    head = head_weight(model, {k: v for k, v in written.items() if k.startswith("lm_head.")})
    ids = calibration.ids[:2]
    with torch.inference_mode():
        hidden = model.embed(ids)
        batch = model.attention_batch(*ids.shape)
        for i, layer in enumerate(model.model.layers):
            hidden = layer(hidden, batch, None, i)
        in_memory = torch.nn.functional.linear(model.model.norm(hidden), head)
    assert torch.equal(load_model(tmp_path / "out", device="cpu")(ids, max_output_len=None), in_memory)
    # The summary's calibration perplexity is the written model's.
    converted = load_model(tmp_path / "out", device="cpu")
    logp = torch.log_softmax(converted(calibration.ids, max_output_len=None)[:, :-1].double(), -1)
    nll = -logp.gather(2, calibration.ids[:, 1:, None]).mean().item()
    assert summary.calibration_perplexity == pytest.approx(torch.tensor(nll).exp().item(), rel=1e-3)


def test_more_rows_make_larger_steps_not_more(tiny_model_dirs, tmp_path, monkeypatch):
    """With more training rows than STEPS_PER_EPOCH, each Adam step accumulates several rows."""
    from exlq.quant import tune

    steps = []
    original = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: steps.append(1) or original(self, *a, **k))
    source = tiny_model_dirs["llama"]
    model = load_model(source, device="cpu")
    calibration = calibration_for(model, rows=40, length=16)  # 5 held out, 35 trained on: 3 rows a step
    _, _, summary = convert(source, tmp_path / "o", tmp_path / "w", calibration=calibration, tune_epochs=2, tune_lr=0.01)
    assert len(summary.tune["heldout_rows"]) == 5
    assert len(steps) == 2 * -(-35 // -(-35 // tune.STEPS_PER_EPOCH)) == 24
    assert summary.tune["applied"]
    steps.clear()  # tune_steps at least the training rows: one row a step
    convert(source, tmp_path / "o1", tmp_path / "w1", calibration=calibration, tune_epochs=2, tune_lr=0.01, tune_steps=10**5)
    assert len(steps) == 2 * 35


def test_group_scales_alone(tiny_model_dirs, tmp_path):
    source = tiny_model_dirs["llama"]
    convert(source, tmp_path / "plain", tmp_path / "w0")
    _, _, summary = convert(source, tmp_path / "scales", tmp_path / "w1", tune_epochs=3, tune_lr=0.01, tune_norms=False)
    assert summary.tune["applied"] and summary.tune["settings"]["norms"] is False
    a, b = safetensors_of(tmp_path / "plain"), safetensors_of(tmp_path / "scales")
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith(".q_scale_max") for k in changed)


def test_tuning_that_cannot_help_changes_nothing(tiny_model_dirs, tmp_path):
    """A step size that only makes the model worse: no epoch beats the untuned model on the held-out row, so
    every tensor is written exactly as without tuning."""
    source = tiny_model_dirs["llama"]
    convert(source, tmp_path / "plain", tmp_path / "w0")
    _, _, summary = convert(source, tmp_path / "tuned", tmp_path / "w1", tune_epochs=2, tune_lr=1.0)
    info = summary.tune
    assert not info["applied"] and info["best_epoch"] == 0
    assert info["heldout_kl_after"] == info["heldout_kl_before"]
    assert all(h["heldout_kl"] > info["heldout_kl_before"] for h in info["history"])
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == (tmp_path / "tuned" / "model.safetensors").read_bytes()
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())["quantization_config"]["calibration"]
    assert config["tune"]["applied"] is False


def test_out_of_memory_in_the_tuning_writes_the_untuned_model(tiny_model_dirs, tmp_path, monkeypatch):
    """A device too small for the fp32 student must not cost the conversion: the tuning stops, the model is
    written exactly as without it, and the summary says why."""
    import exlq.quant.convert as convert_module

    source = tiny_model_dirs["llama"]
    convert(source, tmp_path / "plain", tmp_path / "w0")
    original = convert_module.run_tuning

    def tune_then_run_out(model, *args, **kwargs):
        original(model, *args, **kwargs)  # leaves the model tuned (weights, norms) before the failure
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(convert_module, "run_tuning", tune_then_run_out)
    _, _, summary = convert(source, tmp_path / "tuned", tmp_path / "w1", tune_epochs=2, tune_lr=0.01)
    assert summary.tune["applied"] is False and "out of memory" in summary.tune["reason"]
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == (tmp_path / "tuned" / "model.safetensors").read_bytes()


def test_one_calibration_row_is_not_tuned(tiny_model_dirs, tmp_path):
    source = tiny_model_dirs["llama"]
    model = load_model(source, device="cpu")
    _, _, summary = convert(source, tmp_path / "o", tmp_path / "w", calibration=calibration_for(model, rows=1), tune_epochs=2)
    assert summary.tune["applied"] is False and "2 calibration rows" in summary.tune["reason"]


@pytest.mark.parametrize("asym_alpha", [0.0, 0.25])  # the teacher comes from the asymmetric FP stream when it runs
def test_resume_mid_tuning_gives_identical_files(tiny_model_dirs, tmp_path, monkeypatch, asym_alpha):
    import exlq.quant.convert as convert_module

    source = tiny_model_dirs["llama"]
    options = dict(tune_epochs=3, tune_lr=0.01, asym_alpha=asym_alpha)
    convert(source, tmp_path / "straight", tmp_path / "work-straight", **options)

    def crash_after_first_epoch(stage, done, total):
        if stage == "tune" and done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(source, tmp_path / "resumed", tmp_path / "work-resumed", progress=crash_after_first_epoch, **options)
    assert not (tmp_path / "resumed").exists()
    layers_quantized, epochs_seen = [], []
    original = convert_module.quantize_layer
    monkeypatch.setattr(convert_module, "quantize_layer", lambda *a, **k: layers_quantized.append(1) or original(*a, **k))
    _, _, summary = convert(
        source, tmp_path / "resumed", tmp_path / "work-resumed",
        progress=lambda stage, done, total: epochs_seen.append(done) if stage == "tune" else None, **options,
    )
    assert not layers_quantized and epochs_seen[0] == 2  # no layer redone; the tuning went on from epoch 1
    assert summary.tune["applied"]
    assert file_hashes(tmp_path / "resumed") == file_hashes(tmp_path / "straight")
    # Rerunning the finished command neither quantizes nor tunes again, and writes the same model.
    epochs_seen.clear()
    convert(source, tmp_path / "again", tmp_path / "work-resumed", progress=lambda s, d, t: epochs_seen.append(d) if s == "tune" else None, **options)
    assert not layers_quantized and not epochs_seen
    assert file_hashes(tmp_path / "again") == file_hashes(tmp_path / "straight")


def test_a_finished_conversion_is_tuned_without_requantizing(tiny_model_dirs, tmp_path, monkeypatch):
    """The tuning's settings are not part of the job's fingerprint: its work directory is reused as it is."""
    import exlq.quant.convert as convert_module

    source = tiny_model_dirs["llama"]
    convert(source, tmp_path / "plain", tmp_path / "work")
    calls = []
    original = convert_module.quantize_layer
    monkeypatch.setattr(convert_module, "quantize_layer", lambda *a, **k: calls.append(1) or original(*a, **k))
    _, _, summary = convert(source, tmp_path / "tuned", tmp_path / "work", tune_epochs=2, tune_lr=0.01)
    assert not calls and summary.tune["applied"]
    convert(source, tmp_path / "tuned-fresh", tmp_path / "fresh", tune_epochs=2, tune_lr=0.01)
    assert file_hashes(tmp_path / "tuned") == file_hashes(tmp_path / "tuned-fresh")


def test_recomputed_activations_give_the_same_model(tiny_model_dirs, tmp_path, monkeypatch):
    """Per-layer activation checkpointing (the default on CUDA) changes memory, not the result."""
    from exlq.quant import tune

    source = tiny_model_dirs["llama"]
    convert(source, tmp_path / "plain", tmp_path / "w0", tune_epochs=2, tune_lr=0.01)
    monkeypatch.setattr(tune, "CHECKPOINT_LAYERS", True)
    convert(source, tmp_path / "recomputed", tmp_path / "w1", tune_epochs=2, tune_lr=0.01)
    assert file_hashes(tmp_path / "plain") == file_hashes(tmp_path / "recomputed")


def test_kl_is_chunked_over_tokens(monkeypatch):
    from exlq.quant import tune

    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(37, 16, generator=generator), torch.randn(37, 16, generator=generator)
    heads = torch.randn(50, 16, generator=generator), torch.randn(50, 16, generator=generator)
    whole = tune.kl_sum(student, teacher, *heads)
    monkeypatch.setattr(tune, "LOGIT_ELEMENTS", 50 * 5)  # 5 tokens a chunk
    assert torch.allclose(tune.kl_sum(student, teacher, *heads), whole, rtol=1e-5)
    p = torch.log_softmax(teacher @ heads[0].T, -1)
    q = torch.log_softmax(student @ heads[1].T, -1)
    assert torch.allclose(whole, (p.exp() * (p - q)).sum(), rtol=1e-5)


def test_holdout_rows_are_spread():
    from exlq.quant.tune import holdout_rows

    assert holdout_rows(2) == [1]
    assert holdout_rows(8) == [4]
    assert holdout_rows(16) == [4, 12]
    assert len(holdout_rows(100)) == 12 and holdout_rows(100)[0] > 0 and holdout_rows(100)[-1] < 99


def test_tuning_options_are_validated():
    """(Its default by calibration size: test_convert.test_defaults_that_need_enough_calibration.)"""
    from exlq.errors import ExlqError

    assert ConvertOptions(bpw=3.0, tune_epochs=2).resolved(10).tuning().epochs == 2
    assert ConvertOptions(bpw=3.0, tune_epochs=0).resolved(10**6).tuning() is None
    # The step size halves per extra bit unless given.
    assert ConvertOptions(bpw=3.0, tune_epochs=1).resolved(10).tuning().lr == pytest.approx(2e-3)
    assert ConvertOptions(bpw=4.0, tune_epochs=1).resolved(10).tuning().lr == pytest.approx(1e-3)
    assert ConvertOptions(bpw=4.0, tune_epochs=1, tune_lr=0.05).resolved(10).tuning().lr == 0.05
    for options, flag in [(dict(tune_epochs=-1), "--tune-epochs"), (dict(tune_epochs=65), "--tune-epochs"),
                          (dict(tune_lr=0.0), "--tune-lr"), (dict(tune_lr=2.0), "--tune-lr"),
                          (dict(tune_steps=0), "Adam step")]:
        with pytest.raises(ExlqError, match=flag):
            ConvertOptions(bpw=3.0, **options).validate()



@pytest.mark.gpu
def test_tuning_on_cuda_writes_what_it_measured(tiny_model_dirs, tmp_path):
    """The same code on a GPU: fp16 model, fp32 tuning with recomputed activations, kernels off while tuning; the
    tuned held-out KL is lower and the written model loads back on the GPU and the CPU alike."""
    source = tiny_model_dirs["qwen2"]
    model = load_model(source, device="cuda")
    calibration = calibration_for(model, rows=ROWS, length=LENGTH)
    summary = convert_model(
        model, source, tmp_path / "out", calibration, ConvertOptions(bpw=3.0, head_bits=4, tune_epochs=3, tune_lr=0.01),
        work_dir=tmp_path / "w", specs_for=grid,
    )
    assert summary.tune["applied"] and summary.tune["heldout_kl_after"] < summary.tune["heldout_kl_before"]
    ids = calibration.ids[:2]
    on_cpu = load_model(tmp_path / "out", device="cpu")(ids, max_output_len=None)
    on_gpu = load_model(tmp_path / "out", device="cuda")(ids, max_output_len=None).float().cpu()
    assert ((on_gpu - on_cpu).norm() / on_cpu.norm()).item() < 1e-2
