"""Asymmetric (GPTAQ-form) calibration: quantize each linear toward the unquantized model's outputs.

GPTQ of a linear with H = X_qᵀX_q (X_q: its inputs on the states of the already quantized layers)
reproduces what W computes on those states, so the error earlier layers left in X_q passes on
untouched. Aiming at the FP model's outputs instead, min ‖X_fp Wᵀ − X_q W'ᵀ‖² (X_fp: the same
linear's inputs in the FP model), lets every layer undo part of it. The exact solution W·C·H⁻¹
(C = X_fpᵀX_q) overfits the calibration rows and diverges over a deep model; what helped on the
CPU proxy (docs/benchmarks.md, "How we got here"; `bench/quantizer_proxy.py --asym gptaq`) is
the GPTAQ form, a ridge toward W, applied only in part:

    W' = W + α · W·(C − H)·(H + λ̄ I)⁻¹,   λ̄ = λ · mean(diag H)

then GPTQ of W' with H as usual (uniform 3-bit g128 KL 0.730 → 0.61–0.69, 4-bit 0.196 →
0.17–0.19 at α = 0.25; α = 1 diverges). The FP stream (`Asymmetric.fp`) is a second copy of the
calibration states, advanced through every layer with its original weights: one more layer
forward per layer and one more copy of the states.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from exlq.errors import ExlqError
from exlq.quant.hessian import HessianCollector, LayerRunner, linear_modules


def asymmetric_target(
    weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, lam: float, alpha: float
) -> torch.Tensor:
    """W + α·W·(C − H)·(H + λ̄I)⁻¹ with λ̄ = lam·mean(diag H), in float64; returned as float32.

    weight W [N, K]; hessian H = mean X_qᵀX_q and cross C = mean X_fpᵀX_q, both [K, K] over the
    same calibration rows. Written as a correction of W so that α = 0 or C = H give W back
    exactly, and the ridge λ̄ pulls toward W (not toward 0, which shrinks every layer).
    """
    if alpha == 0:
        return weight.float()
    h = hessian.double()
    reg = lam * float(torch.mean(torch.diag(h)))
    if reg <= 0:  # no input ever reaches the linear: nothing to correct
        return weight.float()
    w = weight.double()
    factor, info = torch.linalg.cholesky_ex(h + reg * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
    if int(info) != 0:
        raise ExlqError("the asymmetric correction's H + λI is not positive definite (raise --asym-lambda)")
    correction = torch.cholesky_solve((w @ (cross.double() - h)).T, factor).T  # W·(C − H)·(H + λ̄I)⁻¹
    return (w + alpha * correction).float()


@contextmanager
def captured_inputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """While active, the dict holds the latest input of each module (modules fed one tensor share it)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0]))
        for name, module in modules.items()
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


class CrossCollector(HessianCollector):
    """HessianCollector that also accumulates Σ (x_fp − x_q)ᵀx_q, from the same rows and with the same
    sharing between modules fed one tensor.

    Set `fp_inputs` to the FP stream's inputs of the same chunk before running the quantized one.
    The difference is accumulated rather than C itself so that C − H is exact where x_fp = x_q
    (the first layer): C = H + mean (x_fp − x_q)ᵀx_q.
    """

    def __init__(self, modules: dict[str, nn.Module], layer_name: str):
        super().__init__(modules, layer_name)
        self.fp_inputs: dict[str, torch.Tensor] = {}
        self.difference_sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        super().add(name, x)
        fp = self.fp_inputs[name]
        if not torch.isfinite(fp).all():
            raise ExlqError(f"non-finite activations (NaN/Inf) reach {self.layer_name}.{name} in the FP model")
        q = x.double()
        difference = fp.reshape(q.shape).double() - q
        if name not in self.difference_sums:
            self.difference_sums[name] = torch.zeros(q.shape[1], q.shape[1], dtype=torch.float64, device=q.device)
        self.difference_sums[name].addmm_(difference.T, q)

    def cross(self, name: str) -> torch.Tensor:
        """Mean x_fpᵀx_q [K, K] (float64) of the input of module `name`."""
        owner = self.owner[name]
        return self.hessian(name).double() + self.difference_sums[owner] / self.rows[owner]


@dataclass
class Asymmetric:
    """The FP stream and the correction's settings (α = `alpha`, λ = `lam`), for `quantize_layer`."""

    fp: LayerRunner
    lam: float
    alpha: float

    def collect(self, runner: LayerRunner, layer: nn.Module) -> CrossCollector:
        """H and C of every linear of `layer` (still with its FP weights), chunk by chunk; the FP
        stream advances through the layer on the way."""
        modules = linear_modules(layer)
        collector = CrossCollector(modules, f"model.layers.{runner.layer_index}")
        fp_outputs = []
        for quantized_states, fp_states in zip(runner.chunks, self.fp.chunks, strict=True):
            with captured_inputs(modules) as fp_inputs:
                fp_outputs.append(self.fp.forward(layer, fp_states))
            collector.fp_inputs = fp_inputs
            with collector.active():
                runner.forward(layer, quantized_states)
        collector.fp_inputs = {}
        self.fp.advance_to(fp_outputs)
        return collector

    def skip(self, layer: nn.Module) -> None:
        """Advance the FP stream through a layer that is not collected (call it while its weights are FP)."""
        self.fp.advance(layer)

    def target(self, collector: CrossCollector, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The corrected weight of linear `name` to hand to GPTQ."""
        return asymmetric_target(weight, collector.hessian(name), collector.cross(name), self.lam, self.alpha)
