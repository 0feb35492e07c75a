"""Mistral: Llama plus an optional sliding attention window (Mistral-7B v0.1 uses 4096)."""

from __future__ import annotations

from dataclasses import dataclass

from exlq.runtime.architectures.llama import LlamaConfig, LlamaForCausalLM


@dataclass
class MistralConfig(LlamaConfig):
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-6
    sliding_window: int | None = None

    def attention_window(self, layer: int) -> int | None:
        return self.sliding_window


class MistralForCausalLM(LlamaForCausalLM):
    config_class = MistralConfig
