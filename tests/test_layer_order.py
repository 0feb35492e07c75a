"""Layer repetition: run decoder layers in any order, repeats sharing weights, each with its own cache slot."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from exlq.errors import ExlqError
from exlq.runtime.layer_order import parse_layer_list
from exlq.runtime.loader import load_model
from test_cli import cli
from test_exl2_format import exl2_and_reference_dirs


def test_parse_layer_list():
    assert parse_layer_list("0-3,2-5,7", 8) == [0, 1, 2, 3, 2, 3, 4, 5, 7]
    assert parse_layer_list(" 1 , 0 ", 2) == [1, 0]
    for bad in ("", "1,,2", "3-1", "-1", "a-b", "1-2-3"):
        with pytest.raises(ExlqError, match="bad layer list"):
            parse_layer_list(bad, 8)
    with pytest.raises(ExlqError, match=r"names layers \[8, 9\]"):
        parse_layer_list("6-9", 8)


def duplicated_model_dir(source: Path, order: list[int], target: Path) -> Path:
    """The model with its layers physically copied into `order` (the reference for repetition)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {k: v for f in sorted(source.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    out = {k: v for k, v in tensors.items() if not k.startswith("model.layers.")}
    for slot, layer in enumerate(order):
        for name, value in tensors.items():
            match = re.match(rf"model\.layers\.{layer}\.(.+)", name)
            if match:
                out[f"model.layers.{slot}.{match.group(1)}"] = value.clone()
    save_file(out, str(target / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = len(order)
    if config.get("layer_types"):  # per-layer attention kinds travel with their layers
        config["layer_types"] = [config["layer_types"][i] for i in order]
    (target / "config.json").write_text(json.dumps(config))
    return target


def logits_full_and_cached(model, ids):
    full = model(ids, max_output_len=None)
    cache = model.new_cache(ids.shape[1] + 4, batch_size=ids.shape[0])
    model(ids[:, :-3], cache, max_output_len=0)
    steps = [model(ids[:, t : t + 1], cache) for t in range(ids.shape[1] - 3, ids.shape[1])]
    return full, torch.cat(steps, dim=1)


@pytest.mark.parametrize("variant", ["llama", "mistral-window", "qwen2-tied"])
def test_repeated_layers_equal_physically_duplicated_weights(tiny_model_dirs, tmp_path, variant):
    source = tiny_model_dirs[variant]
    order = [0, 1, 1, 0, 1]
    model = load_model(source, device="cpu")
    weights_before = sum(p.numel() for p in model.parameters())
    model.set_layer_order(order)
    assert sum(p.numel() for p in model.parameters()) == weights_before  # shared, not copied
    assert model.num_cache_layers == len(order)
    twin = load_model(duplicated_model_dir(source, order, tmp_path / "dup"), device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    full, cached = logits_full_and_cached(model, ids)
    twin_full, twin_cached = logits_full_and_cached(twin, ids)
    torch.testing.assert_close(full, twin_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached, twin_cached, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached, full[:, -3:], rtol=1e-4, atol=1e-4)


def test_identity_order_equals_the_model(tiny_model_dirs):
    model = load_model(tiny_model_dirs["qwen2"], device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    expected = model(ids, max_output_len=None)
    model.set_layer_order([1, 0])
    assert not torch.allclose(model(ids, max_output_len=None), expected)  # the order matters
    model.set_layer_order(list(range(len(model.model.layers))))
    assert torch.equal(model(ids, max_output_len=None), expected)
    model.set_layer_order(None)
    assert torch.equal(model(ids, max_output_len=None), expected)


def test_exl2_model_repeats_layers(tmp_path):
    _source, exl2_dir, _reference = exl2_and_reference_dirs(tmp_path)
    order = [1, 0, 1]
    model = load_model(exl2_dir, device="cpu", dtype="float32")
    model.set_layer_order(order)
    twin = load_model(duplicated_model_dir(exl2_dir, order, tmp_path / "dup"), device="cpu", dtype="float32")
    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])
    torch.testing.assert_close(model(ids, max_output_len=None), twin(ids, max_output_len=None), rtol=1e-5, atol=1e-5)


def test_bad_orders_and_stale_caches_are_refused(tiny_model_dirs):
    model = load_model(tiny_model_dirs["llama"], device="cpu")
    for bad in ([], [0, 2], [-1]):
        with pytest.raises(ExlqError, match="layer order"):
            model.set_layer_order(bad)
    cache = model.new_cache(16)
    model.set_layer_order([0, 1, 1])
    with pytest.raises(ExlqError, match="make a new cache"):
        model(torch.tensor([[1, 2, 3]]), cache)


def test_cli_layers(capsys, tiny_model_dirs, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a little model that could count tokens. " * 40)
    source = tiny_model_dirs["llama"]
    args = ("eval-ppl", source, "--data", text, "--rows", 1, "--length", 64, "--json")
    code, out, err = cli(capsys, *args, "--layers", "0-1,1")
    assert code == 0, err
    repeated = json.loads(out)
    assert repeated["layer_order"] == [0, 1, 1]
    twin = duplicated_model_dir(source, [0, 1, 1], tmp_path / "dup")
    code, out, _ = cli(capsys, "eval-ppl", twin, *args[2:])
    assert code == 0 and json.loads(out)["perplexity"] == pytest.approx(repeated["perplexity"], rel=1e-5)
    code, out, err = cli(capsys, *args, "--layers", "0-5")
    assert code == 2 and out == "" and "0..1" in err and err.count("\n") == 1
    code, out, err = cli(capsys, "infer", source, "-p", "hi", "--max-new-tokens", 2, "--layers", "1-0")
    assert code == 2 and "bad layer list" in err
