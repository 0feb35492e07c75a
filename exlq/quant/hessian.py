"""Calibration activations, one decoder layer at a time, and the Hessians XᵀX of each linear's input.

The quantizer runs the model through the runtime: `LayerRunner` holds the calibration batch's
residual stream and advances it layer by layer. Advancing through the already *quantized* layer
means every later layer is calibrated on the states the quantized model will really produce, so
errors are compensated where they arise instead of compounding unseen.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from exlq.errors import ExlqError
from exlq.runtime.model import DecoderOnlyLM


class HessianCollector:
    """Accumulates Σ xᵀx over every input row that reaches the given linear modules.

    Modules fed the very same tensor (q/k/v after the input norm, gate/up after the post-attention
    norm) share one accumulator: `owner[name]` says whose Hessian a module uses.
    """

    def __init__(self, modules: dict[str, nn.Module], layer_name: str):
        self.modules = modules
        self.layer_name = layer_name
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.owner: dict[str, str] = {}
        self._last: tuple[torch.Tensor, str] | None = None

    def _hook(self, name: str):
        def accumulate(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self._last is not None and self._last[0] is x:
                self.owner[name] = self._last[1]
                return
            if not torch.isfinite(x).all():
                raise ExlqError(f"non-finite activations (NaN/Inf) reach {self.layer_name}.{name}")
            self.add(name, x.reshape(-1, x.shape[-1]))
            self.owner[name] = name
            self._last = (x, name)

        return accumulate

    def add(self, name: str, x: torch.Tensor) -> None:
        """Accumulate the rows x [rows, K] of module `name`'s input (its own, not a shared one)."""
        flat = x.float()
        if name not in self.sums:
            self.sums[name] = torch.zeros(flat.shape[1], flat.shape[1], device=flat.device)
            self.rows[name] = 0
        self.sums[name].addmm_(flat.T, flat)
        self.rows[name] += flat.shape[0]

    @contextmanager
    def active(self) -> Iterator[HessianCollector]:
        handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._last = None

    def hessian(self, name: str) -> torch.Tensor:
        """Mean xᵀx [K, K] (float32) of the input of module `name`."""
        owner = self.owner[name]
        return self.sums[owner] / self.rows[owner]


def linear_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """The layer's linear submodules by dotted name (anything with in_/out_features), in execution order."""
    return {
        name: module
        for name, module in layer.named_modules()
        if name and hasattr(module, "in_features") and hasattr(module, "out_features")
    }


class LayerRunner:
    """The calibration batch's residual stream, advanced through the model one decoder layer at a time."""

    def __init__(self, model: DecoderOnlyLM, calibration_ids: torch.Tensor, *, batch_rows: int = 8):
        self.model = model
        self.chunks = [model.embed(ids) for ids in calibration_ids.split(batch_rows)]
        self.length = calibration_ids.shape[1]
        self.layer_index = 0

    def _attention_batch(self, rows: int):
        return self.model.attention_batch(rows, self.length)

    @torch.inference_mode()
    def forward(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """`layer` (the current one) on one chunk of states."""
        return layer(h, self._attention_batch(h.shape[0]), None, self.layer_index)

    @torch.inference_mode()
    def outputs(self, layer: nn.Module, rows: int | None = None, skip: int = 0) -> list[torch.Tensor]:
        """The layer's outputs on the current states (without advancing): calibration rows [skip, rows), all by
        default."""
        chunks, start = [], 0
        for h in self.chunks:
            stop = start + h.shape[0]
            lo, hi = max(skip, start), stop if rows is None else min(rows, stop)
            if lo < hi:
                chunks.append(self.forward(layer, h[lo - start : hi - start]))
            start = stop
        return chunks

    def collect_hessians(self, layer: nn.Module, skip: int = 0) -> HessianCollector:
        """XᵀX of every linear's input over the calibration rows from `skip` on."""
        collector = HessianCollector(linear_modules(layer), f"model.layers.{self.layer_index}")
        with collector.active():
            self.outputs(layer, skip=skip)
        return collector

    def advance(self, layer: nn.Module) -> None:
        """Replace the states by `layer`'s outputs (call it with the layer as it will be saved)."""
        self.advance_to(self.outputs(layer))

    def advance_to(self, chunks: list[torch.Tensor]) -> None:
        """Replace the states by the current layer's outputs, computed by the caller chunk by chunk."""
        self.chunks = chunks
        self.layer_index += 1
