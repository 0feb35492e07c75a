"""The linear-layer protocol: model code calls `layer(x)` and never knows the storage format.

A format is a class with `can_load(store, prefix)` and `load(...)`; `load_linear` asks each
registered format in turn, so a checkpoint can mix formats per module (e.g. EXL2 decoder
layers with an FP16 `lm_head`). The quantizer swaps implementations the same way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from exlq.errors import ExlqError
from exlq.runtime import kernels
from exlq.runtime.exl2 import Exl2Linear
from exlq.runtime.kernels.fused_ops import Deferred, PendingNorm, as_tensor, silu_mul
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


def project_each(layers: Sequence[nn.Module], x: torch.Tensor | PendingNorm,
                 deferred: bool = False) -> list[torch.Tensor | Deferred]:
    """[layer(x) for layer in layers] (e.g. q/k/v of one input). Layers of one format that has
    `forward_many(layers, x)` run through it (EXL2 on the GPU: one launch instead of one per layer, which takes a
    PendingNorm x as is), unless a module hook must see each call (the quantizer's Hessian and input recorders).
    `deferred`: outputs may come back Deferred, for the launch that reads them next to produce (read them with
    `as_tensor`)."""
    kind = type(layers[0])
    many = getattr(kind, "forward_many", None)
    if many is None or len(layers) < 2 or any(type(layer) is not kind or _hooked(layer) for layer in layers):
        x = as_tensor(x)
        return [layer(x) for layer in layers]
    return many(list(layers), x, deferred=True) if deferred else many(list(layers), x)


def project_gated(layer: nn.Module, gate: torch.Tensor | Deferred, up: torch.Tensor | Deferred,
                  unfinished: bool = False) -> torch.Tensor | Deferred:
    """layer(silu(gate) * up), a gated MLP's down projection; gate and up may be Deferred (project_each's). A format
    with `forward_gated(gate, up, unfinished)` forms the input itself (EXL2 on the GPU: inside the GEMV, no separate
    launch, from gate/up's unfinished sums where it can), unless a module hook must see that input.
    `unfinished`: the output may come back Deferred, as project_to_residual's."""
    gated = getattr(type(layer), "forward_gated", None)
    if gated is not None and not _hooked(layer):
        return gated(layer, gate, up, unfinished)
    gate, up = as_tensor(gate), as_tensor(up)
    return layer(silu_mul(gate, up) if kernels.applies(gate) else F.silu(gate) * up)


#: Where GatedMLP aligns gate/up's outputs with down_proj's input order (align_gated), and DecoderLayer each norm's
#: output with its readers' (align_norm): "auto" where the kernels run (elsewhere it would change only the rounding of
#: the products' sums), "1" everywhere, "0" nowhere. On the H100 the norms' alignment gives the 8B's decode +2.3 %,
#: Llama-3.2-1B's +8 %, Qwen2.5-0.5B's +2.6 % (docs/benchmarks.md, session 57).
ALIGN_GATED = os.environ.get("EXLQ_ALIGN_GATED", "auto")
ALIGN_NORMS = os.environ.get("EXLQ_ALIGN_NORMS", "auto")


def _aligning(setting: str, layer: nn.Module) -> bool:
    """Whether an ALIGN_* setting aligns `layer` where it lies ("auto": where the kernels run)."""
    tensor = next(iter(layer.buffers()), None)
    return setting == "1" or (setting != "0" and tensor is not None and kernels.enabled(tensor.device))


def _stored_order(layer: nn.Module) -> torch.Tensor | None:
    """The permuted order `layer` reads its input in, where its format can be told to read it in order instead."""
    if not hasattr(layer, "read_stored_order"):
        return None
    return getattr(layer, "stored_input_order", lambda: None)()


def align_gated(gate: nn.Module, up: nn.Module, down: nn.Module) -> bool:
    """Give gate and up the output order in which down reads its input, where their formats allow it (each of
    gate/up has `reorder_outputs(order)` and down has `stored_input_order()` and `read_stored_order()`: EXL2) and down
    reads it permuted (act-order): the same products, but down_proj's GEMV then reads silu(gate)·up from consecutive
    addresses rather than one 32-byte sector per activation (on the 8B, its one-row gather 4.1 -> 1.0 µs, decode
    +3.5 % on the H100: docs/benchmarks.md, session 55). Only where the kernels run, unless ALIGN_GATED says otherwise
    (EXLQ_ALIGN_GATED=0 leaves the layers as stored everywhere). Returns whether it did."""
    if any(not hasattr(layer, "reorder_outputs") for layer in (gate, up)) or not _aligning(ALIGN_GATED, down):
        return False
    order = _stored_order(down)
    if order is None:
        return False
    gate.reorder_outputs(order)
    up.reorder_outputs(order)
    down.read_stored_order()
    return True


def align_norm(norm: nn.Module, readers: Sequence[nn.Module]) -> bool:
    """Give the norm's output in the order its readers store their input rows, where they all share one act-order
    permutation (a conversion sorts the one Hessian of their common input) and can read it in order (EXL2); the norm
    can (layers.RMSNorm.put_output_in_order). The same products, but their GEMVs gather the input from consecutive
    addresses (the register kernel from the norm's output, a folded norm from residual + delta, which
    exl2_finish_norm also writes in that order). Where the kernels run, unless ALIGN_NORMS says otherwise
    (EXLQ_ALIGN_NORMS=0: the norms' own order everywhere). Returns whether it did."""
    if not hasattr(norm, "put_output_in_order") or not _aligning(ALIGN_NORMS, readers[0]):
        return False
    orders = [_stored_order(layer) for layer in readers]
    if orders[0] is None or any(o is None or not torch.equal(o, orders[0]) for o in orders[1:]):
        return False
    norm.put_output_in_order(orders[0])
    for layer in readers:
        layer.read_stored_order()
    return True


def project_to_residual(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | Deferred:
    """layer(x) for an output the residual stream adds next: a format with `forward_unfinished` may leave it
    unfinished (EXL2 on the GPU: the sums of a one-row product, ended with the residual add by the next norm's
    launch), unless a module hook must see it. Read it with `as_tensor`."""
    unfinished = getattr(type(layer), "forward_unfinished", None)
    if unfinished is not None and not _hooked(layer):
        return unfinished(layer, x)
    return layer(x)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


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
