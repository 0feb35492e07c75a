"""Qwen2 / Qwen2.5: Llama with biases on q/k/v (not o) and optional per-layer sliding windows."""

from __future__ import annotations

from dataclasses import dataclass

from exlq.runtime.architectures.llama import LlamaConfig, LlamaForCausalLM


@dataclass
class Qwen2Config(LlamaConfig):
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: list[str] | None = None  # transformers 5.x spells the windows out per layer

    @property
    def qkv_bias(self) -> bool:
        return True

    @property
    def o_bias(self) -> bool:
        return False

    def attention_window(self, layer: int) -> int | None:
        if self.layer_types is not None:
            sliding = self.layer_types[layer] == "sliding_attention"
        else:
            sliding = self.use_sliding_window and layer >= self.max_window_layers
        return self.sliding_window if sliding else None


class Qwen2ForCausalLM(LlamaForCausalLM):
    config_class = Qwen2Config
