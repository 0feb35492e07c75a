"""Synthetic models of real shapes with random weights, for speed measurements without real weights.

`SyntheticStore` stands in for a checkpoint's `WeightStore`: every tensor is made on request, directly
on the target device. Decoder linears are EXL2 at a target bpw (or dense fp16 for bpw 16), built from
uniformly random codes and scale codes. That is what plain rounding of random weights produces, and a
kernel's speed does not depend on the values, only on the layout, which is the converter's (§2.6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from exlq.errors import ExlqError
from exlq.quant.exl2_pack import converter_layout, pack_exl2
from exlq.runtime.exl2 import SUPPORTED_BITS

#: Named shapes (the HF config.json fields that matter for speed).
SHAPES: dict[str, dict] = {
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=500000.0, tie_word_embeddings=False),
    "llama3.2-1b": dict(architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                        rope_theta=500000.0, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(architectures=["Qwen2ForCausalLM"], hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(architectures=["Qwen2ForCausalLM"], hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         rope_theta=1000000.0, tie_word_embeddings=True),  # Qwen2.5-Coder-1.5B's too
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       rope_theta=1000000.0, tie_word_embeddings=False),  # Qwen2.5-Coder-7B's too
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         rope_theta=100000.0, tie_word_embeddings=True),
}
GROUP_SIZE = 128
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def layer_linears(config: dict) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each decoder layer's linear (LINEARS) for a config's sizes."""
    c = config
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    q, kv, h, i = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim, c["hidden_size"], c["intermediate_size"]
    return dict(zip(LINEARS, [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]))


def synthetic_config(shape: str) -> dict:
    if shape not in SHAPES:
        raise ExlqError(f"unknown synthetic shape {shape!r}; known: {', '.join(SHAPES)}")
    return {"model_type": "llama", "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, **SHAPES[shape]}


def check_bpw(bpw: float, fp16: bool = True) -> None:
    """A synthetic model's --bpw: 2-8 for EXL2 decoder linears, or (`fp16`) 16 and above for FP16 ones."""
    if not (2.0 <= bpw <= 8.0 or (fp16 and bpw >= 16)):
        raise ExlqError(f"--bpw must be in [2, 8] for EXL2 (or 16 for FP16), got {bpw}")


def bit_mix(bpw: float, out_features: int, group_size: int = GROUP_SIZE) -> tuple[list[int], list[float]]:
    """Two neighbouring EXL2 widths (descending) averaging `bpw` once scales and permutation are counted.

    Overhead per weight: 4-bit scale codes per group of `group_size` rows, and a 32-bit permutation entry
    per input row shared by the N columns (spec §13).
    """
    check_bpw(bpw, fp16=False)
    target = max(2.0, bpw - 4 / group_size - 32 / out_features)
    lo = max(b for b in SUPPORTED_BITS if b <= target)
    hi = min((b for b in SUPPORTED_BITS if b > lo), default=lo)
    if hi == lo or math.isclose(target, lo):
        return [lo], [1.0]
    p_hi = (target - lo) / (hi - lo)
    return [hi, lo], [p_hi, 1.0 - p_hi]


@dataclass
class SyntheticStore:
    """A `WeightStore` look-alike that makes random tensors of `config`'s shapes on `device`."""

    config: dict
    bpw: float
    device: torch.device
    seed: int = 0
    group_size: int = GROUP_SIZE  # of the decoder linears (real conversions use 32 for many matrices)

    def __post_init__(self) -> None:
        self._pending: dict[str, torch.Tensor] = {}
        self._perms: dict[str, torch.Tensor] = {}  # the act-order permutation of each shared input (_shared_input)
        self._generator = torch.Generator(device=self.device).manual_seed(self.seed)
        c = self.config
        h, shapes = c["hidden_size"], layer_linears(c)
        self._linears = {f"model.layers.{n}.{name}": s for n in range(c["num_hidden_layers"]) for name, s in shapes.items()}
        if self.bpw < 16 or not c.get("tie_word_embeddings"):
            # EXL2: quantized as the converter's default head (6 bits), which it writes for tied models too (spec
            # §10.1), so a tied shape is timed with the head a conversion gives it, not with the fp16 embedding.
            self._linears["lm_head"] = (c["vocab_size"], h)
        self._plain = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
        for n in range(c["num_hidden_layers"]):
            for norm in ("input_layernorm", "post_attention_layernorm"):
                self._plain[f"model.layers.{n}.{norm}.weight"] = (h,)
        self._suffixes = ("weight",) if self.bpw >= 16 else ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")
        qwen2 = c["architectures"][0] == "Qwen2ForCausalLM"  # the one family here with q/k/v biases
        self._biased = {p for p in self._linears if qwen2 and p.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")}

    def names(self) -> list[str]:
        biases = [f"{p}.bias" for p in self._biased]
        return list(self._plain) + [f"{p}.{s}" for p in self._linears for s in self._suffixes] + biases

    def __contains__(self, name: str) -> bool:
        prefix, _, suffix = name.rpartition(".")
        return name in self._plain or (prefix in self._linears and suffix in self._suffixes) or (
            suffix == "bias" and prefix in self._biased
        )

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._plain:
            return self._plain[name]
        prefix, _, suffix = name.rpartition(".")
        if suffix == "weight":
            return self._linears[prefix]
        return tuple(self._pending_tensor(name).shape)

    def get(self, name: str, dtype=None, device=None, shape=None) -> torch.Tensor:
        if name in self._plain:
            size = self._plain[name]
            if len(size) == 1:
                return torch.ones(size, dtype=dtype or torch.float16, device=device)
            return (torch.randn(size, device=self.device, generator=self._generator) * 0.02).to(device=device, dtype=dtype or torch.float16)
        prefix, _, suffix = name.rpartition(".")
        if suffix == "bias" and self.bpw >= 16:
            return torch.zeros(self._linears[prefix][0], dtype=dtype or torch.float16, device=device)
        if suffix == "weight":
            out_features, in_features = self._linears[prefix]
            w = torch.randn(out_features, in_features, device=self.device, generator=self._generator)
            return (w / math.sqrt(in_features)).to(device=device, dtype=dtype or torch.float16)
        tensor = self._pending_tensor(name)
        del self._pending[name]
        return tensor.to(device=device, dtype=dtype) if dtype is not None else tensor.to(device)

    def _pending_tensor(self, name: str) -> torch.Tensor:
        if name not in self._pending:
            prefix = name.rpartition(".")[0]
            out_features, in_features = self._linears[prefix]
            head = prefix == "lm_head"
            source = _shared_input(prefix)
            if source is not None and source not in self._perms:
                self._perms[source] = torch.randperm(in_features, device=self.device, generator=self._generator)
            packed = random_exl2(in_features, out_features, 6.0 if head else self.bpw, self._generator,
                                 bias=prefix in self._biased, group_size=GROUP_SIZE if head else self.group_size,
                                 perm=self._perms.get(source))
            self._pending.update(packed.state_dict(prefix))
        return self._pending[name]


#: The matrices that read one input (a norm's output): a conversion gives them one act-order permutation, the sort of
#: their common Hessian's diagonal, and so does this store (runtime.linear.align_norm relies on it).
_SHARED_INPUTS = {"q_proj": "q/k/v", "k_proj": "q/k/v", "v_proj": "q/k/v", "gate_proj": "gate/up", "up_proj": "gate/up"}


def _shared_input(prefix: str) -> str | None:
    """A name for the input matrix `prefix` shares with others of its module, or None where it reads its own."""
    module, _, name = prefix.rpartition(".")
    return f"{module}.{_SHARED_INPUTS[name]}" if name in _SHARED_INPUTS else None


def random_exl2(
    in_features: int, out_features: int, bpw: float, generator: torch.Generator, *, bias: bool = False,
    group_size: int = GROUP_SIZE, perm: torch.Tensor | None = None,
):
    """Exl2Tensors of uniformly random codes at `bpw`, in the converter's layout, on `generator`'s device.
    `group_size` 32 gives the small groups real conversions choose for many matrices (e.g. "4b100%g32").
    `perm`: the act-order permutation (stored row r holds input channel perm[r]); a random one by default."""
    bits, props = bit_mix(bpw, out_features, group_size)
    layout = converter_layout(in_features, bits, props, group_size)
    device = generator.device
    codes = torch.cat([torch.randint(0, 1 << b, (r, out_features), device=device, generator=generator) for b, r in layout])
    scale_codes = torch.randint(1, 17, (len(layout), out_features), device=device, generator=generator)
    q_scale_max = torch.full((len(layout),), 0.01, dtype=torch.float16, device=device)
    if perm is None:
        perm = torch.randperm(in_features, device=device, generator=generator)
    zeros = torch.zeros(out_features, device=device) if bias else None
    return pack_exl2(codes, scale_codes, q_scale_max, layout, perm, zeros)
