"""Which model class reads which `architectures` entry of config.json."""

from __future__ import annotations

from typing import Any

from exlq.errors import ExlqError
from exlq.runtime.architectures.llama import LlamaForCausalLM
from exlq.runtime.architectures.mistral import MistralForCausalLM
from exlq.runtime.architectures.qwen2 import Qwen2ForCausalLM
from exlq.runtime.model import DecoderOnlyLM

ARCHITECTURES: dict[str, type[DecoderOnlyLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}

# config.json files without an `architectures` list still name their `model_type`.
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def architecture_of(raw_config: dict[str, Any]) -> str:
    names = raw_config.get("architectures") or []
    if isinstance(names, list) and names:
        return str(names[0])
    return MODEL_TYPES.get(str(raw_config.get("model_type")), f"model_type={raw_config.get('model_type')!r}")


def model_class_for(raw_config: dict[str, Any]) -> type[DecoderOnlyLM]:
    name = architecture_of(raw_config)
    if name not in ARCHITECTURES:
        raise ExlqError(f"unsupported architecture {name}; exlq supports: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]
