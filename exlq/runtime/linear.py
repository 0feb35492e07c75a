"""The linear-layer protocol: model code calls `layer(x)` and never knows the storage format.

A format is a class with `can_load(store, prefix)` and `load(...)`; `load_linear` asks each
registered format in turn, so a checkpoint can mix formats per module (e.g. EXL2 decoder
layers with an FP16 `lm_head`). The quantizer swaps implementations the same way.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from exlq.errors import ExlqError
from exlq.runtime.exl2 import Exl2Linear
from exlq.runtime.weights import WeightStore


@runtime_checkable
class LinearLayer(Protocol):
    """y = x @ Wᵀ + b for x [..., in_features] -> [..., out_features], in the model's compute dtype."""

    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class LinearFormat(Protocol):
    @classmethod
    def can_load(cls, store: WeightStore, prefix: str) -> bool: ...

    @classmethod
    def load(
        cls,
        store: WeightStore,
        prefix: str,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> nn.Module: ...


class DenseLinear(nn.Module):
    """Unquantized weight [out_features, in_features] (+ bias), the `nn.Linear` layout of HF checkpoints."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def can_load(cls, store: WeightStore, prefix: str) -> bool:
        return f"{prefix}.weight" in store

    @classmethod
    def load(cls, store, prefix, in_features, out_features, bias, dtype, device) -> DenseLinear:
        weight = store.get(f"{prefix}.weight", dtype, device, shape=(out_features, in_features))
        bias_name = f"{prefix}.bias"
        if bias and bias_name not in store:
            raise ExlqError(f"tensor {bias_name} is missing, but config.json says the layer has a bias")
        b = store.get(bias_name, dtype, device, shape=(out_features,)) if bias_name in store else None
        return cls(weight, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# Formats tried in order; later issues register quantized formats ahead of DenseLinear.
LINEAR_FORMATS: list[type] = [Exl2Linear, DenseLinear]


def load_linear(
    store: WeightStore,
    prefix: str,
    in_features: int,
    out_features: int,
    *,
    bias: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """Load module `prefix` in whichever registered format its tensors are stored."""
    for fmt in LINEAR_FORMATS:
        if fmt.can_load(store, prefix):
            return fmt.load(store, prefix, in_features, out_features, bias, dtype, device)
    raise ExlqError(f"no weights for layer {prefix} in {store.model_dir} (expected {prefix}.weight)")
