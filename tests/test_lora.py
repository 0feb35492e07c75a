"""PEFT LoRA adapters: applied on the fly they equal merging them into the FP16 weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from exlq.errors import ExlqError
from exlq.runtime.lora import load_lora, set_loras
from exlq.runtime.loader import load_model
from test_cli import cli
from test_exl2_format import exl2_and_reference_dirs

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.o_proj",
           "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]  # fmt: skip


def write_adapter(directory: Path, model, *, rank=4, alpha=8, seed=0, modules=MODULES, extra=None, config=None) -> Path:
    """A random adapter in PEFT's on-disk layout."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in modules:
        module = model.get_submodule(name)
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.3
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.3
    tensors.update(extra or {})
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    settings = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
                "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, **(config or {})}  # fmt: skip
    (directory / "adapter_config.json").write_text(json.dumps(settings))
    return directory


def merge_into(model, adapter_dir: Path, scale: float, rank: int, alpha: float, rslora=False, alpha_pattern=None):
    """The reference: W += s · B A in float64, from the files directly."""
    from safetensors.torch import load_file

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        a, b = tensors[key].double(), tensors[key.replace("lora_A", "lora_B")].double()
        module_alpha = (alpha_pattern or {}).get(name.rsplit(".", 1)[-1], alpha)
        s = scale * (module_alpha / math.sqrt(rank) if rslora else module_alpha / rank)
        weight = model.get_submodule(name).weight
        weight.data = (weight.double() + s * b @ a).to(weight.dtype)


def test_adapters_equal_merged_weights_and_unset_restores(tiny_model_dirs, tmp_path):
    source = tiny_model_dirs["llama-linear-rope-bias"]
    model = load_model(source, device="cpu", dtype=torch.float64)
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    plain = model(ids, max_output_len=None)
    first = write_adapter(tmp_path / "a", model, rank=4, alpha=8, seed=1)
    second = write_adapter(tmp_path / "b", model, rank=2, alpha=4, seed=2, modules=MODULES[:2],
                           config={"use_rslora": True, "alpha_pattern": {"v_proj": 16}})  # fmt: skip
    revision = model.revision
    set_loras(model, [load_lora(first, 0.5), load_lora(second)])
    assert model.revision > revision  # a Generator's cached keys and values are then stale (test_generator)
    got = model(ids, max_output_len=None)

    merged = load_model(source, device="cpu", dtype=torch.float64)
    merge_into(merged, first, 0.5, rank=4, alpha=8)
    merge_into(merged, second, 1.0, rank=2, alpha=4, rslora=True, alpha_pattern={"v_proj": 16})
    expected = merged(ids, max_output_len=None)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert (got - plain).abs().max() > 1e-2  # the adapters do something

    set_loras(model, [])
    assert torch.equal(model(ids, max_output_len=None), plain)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "DenseLinear"


def test_replacement_head_and_embedding(tiny_model_dirs, tmp_path):
    source = tiny_model_dirs["qwen2"]
    model = load_model(source, device="cpu")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    plain = model(ids, max_output_len=None)
    gen = torch.Generator().manual_seed(5)
    head = torch.randn(model.config.vocab_size, model.config.hidden_size, generator=gen)
    embed = torch.randn(model.config.vocab_size, model.config.hidden_size, generator=gen)
    adapter = write_adapter(tmp_path / "h", model, modules=MODULES[:1], extra={
        "base_model.model.lm_head.modules_to_save.weight": head, "base_model.model.model.embed_tokens.weight": embed})  # fmt: skip
    set_loras(model, [load_lora(adapter)])
    merged = load_model(source, device="cpu")
    merge_into(merged, adapter, 1.0, rank=4, alpha=8)
    merged.lm_head.weight.data = head.clone()
    merged.model.embed_tokens.weight.data = embed.clone()
    torch.testing.assert_close(model(ids, max_output_len=None), merged(ids, max_output_len=None), rtol=1e-5, atol=1e-5)
    set_loras(model, [])
    assert torch.equal(model(ids, max_output_len=None), plain)


def test_adapter_on_exl2_layers(tmp_path):
    _source, exl2_dir, reference_dir = exl2_and_reference_dirs(tmp_path)
    quantized = load_model(exl2_dir, device="cpu", dtype="float32")
    dense = load_model(reference_dir, device="cpu", dtype="float32")  # the same weights, stored dense
    adapter = load_lora(write_adapter(tmp_path / "a", dense, seed=3))
    set_loras(quantized, [adapter])
    set_loras(dense, [adapter])
    assert type(quantized.model.layers[0].self_attn.q_proj.base).__name__ == "Exl2Linear"
    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])
    torch.testing.assert_close(quantized(ids, max_output_len=None), dense(ids, max_output_len=None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "config, extra, needle",
    [
        ({"use_dora": True}, None, "DoRA"),
        ({"fan_in_fan_out": True}, None, "fan_in_fan_out"),
        ({"bias": "lora_only"}, None, "biases"),
        ({"peft_type": "IA3"}, None, "only LORA"),
        ({}, {"base_model.model.model.layers.0.input_layernorm.weight": torch.ones(64)}, "not supported"),
        ({}, {"base_model.model.model.layers.0.self_attn.rotary.lora_A.weight": torch.ones(2, 64),
              "base_model.model.model.layers.0.self_attn.rotary.lora_B.weight": torch.ones(64, 2)}, "LoRA on"),  # fmt: skip
    ],
)
def test_unsupported_adapters_are_refused(tiny_model_dirs, tmp_path, config, extra, needle):
    model = load_model(tiny_model_dirs["llama"], device="cpu")
    with pytest.raises(ExlqError, match=needle):
        load_lora(write_adapter(tmp_path / "x", model, config=config, extra=extra))


def test_mismatched_adapter_is_refused_and_the_model_left_clean(tiny_model_dirs, tmp_path):
    model = load_model(tiny_model_dirs["llama"], device="cpu")
    bigger = load_model(tiny_model_dirs["llama"], device="cpu")
    adapter = write_adapter(tmp_path / "a", bigger, rank=2)
    # Rewrite one pair with the wrong input width.
    from safetensors.torch import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"] = torch.zeros(2, 7)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ExlqError, match="down_proj expects"):
        set_loras(model, [load_lora(adapter)])
    assert not any(type(m).__name__ == "LoraLinear" for m in model.modules())
    with pytest.raises(ExlqError, match="not a PEFT adapter"):
        load_lora(tmp_path)


def test_cli_lora(capsys, tiny_model_dirs, tmp_path):
    source = tiny_model_dirs["llama"]
    model = load_model(source, device="cpu")
    adapter = write_adapter(tmp_path / "a", model, seed=4)
    args = ("infer", source, "-p", "hello", "--greedy", "--max-new-tokens", 6, "--format", "raw", "--json")
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    base_text = json.loads(out)["text"]
    code, out, err = cli(capsys, *args, "--lora", adapter, "--lora-scale", 4.0)
    assert code == 0, err
    assert json.loads(out)["text"] != base_text
    code, out, err = cli(capsys, *args, "--lora", adapter, "--lora", adapter, "--lora-scale", 1, "--lora-scale", 2, "--lora-scale", 3)
    assert code == 2 and "one --lora-scale" in err
    code, out, err = cli(capsys, *args, "--lora", tmp_path)
    assert code == 2 and "not a PEFT adapter" in err


def test_rotated_conversions_refuse_adapters(tiny_model_dirs, tmp_path):
    import shutil

    rotated = tmp_path / "rotated"
    shutil.copytree(tiny_model_dirs["llama"], rotated)
    config = json.loads((rotated / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "exl2", "rotation": {"seed": 0}}
    (rotated / "config.json").write_text(json.dumps(config))
    model = load_model(rotated, device="cpu")
    with pytest.raises(ExlqError, match="--no-rotate"):
        set_loras(model, [load_lora(write_adapter(tmp_path / "a", model))])
