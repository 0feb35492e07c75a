"""exlq's torch runtime against transformers on tiny random models, in fp32."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_VARIANTS
from exlq.runtime.loader import load_model


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_logits_match_transformers(tiny_model_dirs, variant):
    import transformers

    model_dir = tiny_model_dirs[variant]
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = load_model(model_dir, device="cpu", dtype="fp32")
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
    logits = model(ids, max_output_len=None)
    assert logits.shape == expected.shape
    assert relative_error(logits, expected) < 1e-4
    assert expected.std() > 0.5  # random weights were scaled: logits are not all ~0


def test_sliding_window_is_applied(tiny_model_dirs):
    """Without its window the Mistral model would give different logits past position 8."""
    model = load_model(tiny_model_dirs["mistral-window"], device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    windowed = model(ids, max_output_len=None)
    for layer in model.model.layers:
        layer.self_attn.window = None
    full = model(ids, max_output_len=None)
    assert torch.allclose(windowed[:, :8], full[:, :8], atol=1e-5)
    assert relative_error(windowed[:, 9:], full[:, 9:]) > 1e-2


def test_config_from_transformers4_layout_matches_5(tiny_model_dirs, tmp_path):
    """rope_theta/rope_scaling at the top level (4.x) reads the same as rope_parameters (5.x)."""
    import json
    import shutil

    source = tiny_model_dirs["llama-tied-llama3rope"]
    target = tmp_path / "v4"
    shutil.copytree(source, target)
    raw = json.loads((target / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = params
    (target / "config.json").write_text(json.dumps(raw))
    a, b = load_model(source, device="cpu"), load_model(target, device="cpu")
    assert torch.equal(a.rotary.inv_freq, b.rotary.inv_freq)
    assert not torch.equal(a.rotary.inv_freq, load_model(tiny_model_dirs["llama"], device="cpu").rotary.inv_freq)


def test_tied_head_shares_embedding_storage(tiny_model_dirs):
    model = load_model(tiny_model_dirs["qwen2-tied"], device="cpu")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_state_dict_uses_hf_names(tiny_model_dirs):
    from safetensors import safe_open

    model_dir = tiny_model_dirs["qwen2"]
    model = load_model(model_dir, device="cpu")
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names <= set(model.state_dict())


def test_stale_index_falls_back_to_the_directory_files(tiny_model_dirs, tmp_path):
    """EXL2 folders made by ExLlamaV2 keep the source's index naming shards that are not there."""
    import json
    import shutil

    target = tmp_path / "stale"
    shutil.copytree(tiny_model_dirs["llama"], target)
    (target / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}})
    )
    model = load_model(target, device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.equal(model(ids), load_model(tiny_model_dirs["llama"], device="cpu")(ids))
