"""PEFT LoRA adapters on top of any linear format (FP16 or EXL2), switchable without reloading.

An adapter adds scale · B·A to a decoder linear: y = base(x) + s · (x Aᵀ) Bᵀ, with
s = lora_alpha / r (or / √r with rsLoRA) times the user's scale. The base layer is never
modified, so adapters work on quantized layers and can be set and unset between generations.
Adapters may also carry full replacements of `embed_tokens` / `lm_head` (PEFT's modules_to_save).

Files read: `adapter_config.json` and `adapter_model.safetensors`, keys as PEFT saves them,
e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from exlq.errors import ExlqError
from exlq.runtime.config import read_json, read_model_config
from exlq.runtime.layers import Embedding
from exlq.runtime.linear import DenseLinear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REPLACEABLE = ("model.embed_tokens", "lm_head")
PREFIX = "base_model.model."
LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])\.weight")


@dataclass
class LoraAdapter:
    """One adapter as read from disk: low-rank pairs per module and whole-module replacements."""

    path: Path
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)  # name -> (A, B, scale)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)  # "lm_head" / "model.embed_tokens" -> weight


def load_lora(path: str | Path, scale: float = 1.0) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder; refuse what this runtime cannot apply faithfully."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise ExlqError(f"{path} is not a PEFT adapter folder (needs adapter_config.json and adapter_model.safetensors)")
    config = read_json(config_file)
    _check_supported(config, path)
    tensors = {name.removeprefix(PREFIX): t for name, t in load_file(str(weights_file)).items()}
    adapter = LoraAdapter(path)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = LORA_KEY.fullmatch(name)
        if match:
            halves.setdefault(match["module"], {})[match["which"]] = tensor
            continue
        module = name.removesuffix(".weight").replace(".modules_to_save", "")
        if module not in REPLACEABLE or not name.endswith(".weight"):
            raise ExlqError(f"{path}: tensor {name!r} is not supported (LoRA on {', '.join(TARGETS)}, replacements of embed_tokens/lm_head)")
        adapter.replacements[module] = tensor
    for module, pair in halves.items():
        if module.rsplit(".", 1)[-1] not in TARGETS:
            raise ExlqError(f"{path}: LoRA on {module!r} is not supported (targets: {', '.join(TARGETS)})")
        if set(pair) != {"A", "B"}:
            raise ExlqError(f"{path}: {module} has lora_{'A' if 'A' not in pair else 'B'} missing")
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank:
            raise ExlqError(f"{path}: {module} has mismatched LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        base = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        adapter.pairs[module] = (a, b, base * scale)
    if not adapter.pairs and not adapter.replacements:
        raise ExlqError(f"{path}: the adapter holds no LoRA weights")
    return adapter


def _check_supported(config: dict, path: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ExlqError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    unsupported = {
        "use_dora": "DoRA",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights)",
        "layer_replication": "layer_replication",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise ExlqError(f"{path}: {what} adapters are not supported")
    if config.get("bias", "none") != "none":
        raise ExlqError(f"{path}: adapters that train biases (bias={config['bias']!r}) are not supported")


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """PEFT's per-module overrides: a key matches a module name ending in it (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


class LoraLinear(nn.Module):
    """A linear layer of any format plus the active adapters' low-rank terms."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.terms: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for a, b, scale in self.terms:
            y = y + scale * F.linear(F.linear(x, a), b)
        return y


def set_loras(model: nn.Module, adapters: list[LoraAdapter]) -> None:
    """Make exactly `adapters` active on `model` (an empty list removes them all)."""
    _remove_all(model)
    if not adapters:
        return
    rotation = read_model_config(model.model_dir).get("quantization_config", {}).get("rotation") if hasattr(model, "model_dir") else None
    if rotation:
        raise ExlqError(
            "this model was converted with rotation (its weights live in a rotated basis), so adapters trained on the "
            "original model do not apply; convert it again with --no-rotate"
        )
    try:
        _apply(model, adapters)
    except ExlqError:
        _remove_all(model)  # all or nothing: a refused adapter leaves the model as it was
        raise


def _apply(model: nn.Module, adapters: list[LoraAdapter]) -> None:
    replaced: dict[str, Path] = {}
    for adapter in adapters:
        for name, (a, b, scale) in adapter.pairs.items():
            module = _module(model, name, adapter.path)
            if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
                raise ExlqError(f"{adapter.path}: {name} expects {module.in_features} -> {module.out_features}, the adapter has {a.shape[1]} -> {b.shape[0]}")
            if not isinstance(module, LoraLinear):
                module = LoraLinear(module)
                model.replace_module(name, module)
            a, b = _in_layer_order(module.base, a, b)
            module.terms.append((a.to(model.device, model.dtype), b.to(model.device, model.dtype), scale))
        for name, weight in adapter.replacements.items():
            if name in replaced:
                raise ExlqError(f"{adapter.path} and {replaced[name]} both replace {name}; use one of them")
            replaced[name] = adapter.path
            _replace_whole(model, name, weight.to(model.device, model.dtype))


def _in_layer_order(base: nn.Module, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A pair for a layer whose features were reordered after loading (linear.align_gated: its inputs or outputs in
    the order feature_order_in / feature_order_out of the file's), in that order."""
    order_in, order_out = getattr(base, "feature_order_in", None), getattr(base, "feature_order_out", None)
    return (a if order_in is None else a[:, order_in]), (b if order_out is None else b[order_out])


def _module(model: nn.Module, name: str, path: Path) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ExlqError(f"{path}: the model has no module {name!r} (an adapter for another architecture?)") from None


def _replace_whole(model: nn.Module, name: str, weight: torch.Tensor) -> None:
    old = model.get_submodule(name)
    expected = tuple(old.weight.shape) if isinstance(old, Embedding) else (old.out_features, old.in_features)
    if tuple(weight.shape) != expected:
        raise ExlqError(f"replacement {name} has shape {tuple(weight.shape)}, the model's is {expected}")
    new = Embedding(weight) if name == "model.embed_tokens" else DenseLinear(weight)
    originals = model.__dict__.setdefault("_lora_originals", {})
    originals.setdefault(name, old)
    model.replace_module(name, new)


def _remove_all(model: nn.Module) -> None:
    """Unwrap every LoraLinear and put replaced modules back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            model.replace_module(name, module.base)
    for name, original in model.__dict__.pop("_lora_originals", {}).items():
        model.replace_module(name, original)
