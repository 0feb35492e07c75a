"""Llama (1/2/3.x): the base decoder; Mistral and Qwen2 derive from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exlq.errors import ExlqError
from exlq.runtime.model import DecoderOnlyLM
from exlq.runtime.rope import inverse_frequencies


@dataclass
class LlamaConfig:
    """Fields of a Llama `config.json`, named as there; unknown keys are ignored."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ExlqError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act != "silu":
            raise ExlqError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)  # validates rope_scaling early

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    def attention_window(self, layer: int) -> int | None:
        """Sliding-window size of `layer`'s attention, None for full attention."""
        return None


class LlamaForCausalLM(DecoderOnlyLM):
    config_class = LlamaConfig
