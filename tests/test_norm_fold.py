"""The residual add + RMSNorm left pending for the next GEMV (fused_ops.PendingNorm): when a layer defers it, and
how a consumer that cannot fold it gets the plain norm (CPU; the kernels' fold is tested in test_kernels_gpu.py)."""

from __future__ import annotations

import torch

from exlq.runtime.kernels import exl2_stream_ops, fused_ops
from exlq.runtime.layers import RMSNorm
from exlq.runtime.linear import DenseLinear, project_each


def torch_add_rms_norm(residual, delta, weight, eps, new_residual=None):
    total = residual + delta.float()
    if new_residual is not None:
        new_residual.copy_(total)
    return total, RMSNorm(weight, eps)(total)


def pending(hidden: int = 64, rows: int = 1) -> fused_ops.PendingNorm:
    gen = torch.Generator().manual_seed(hidden + rows)
    residual = torch.randn(1, rows, hidden, generator=gen)
    delta = torch.randn(1, rows, hidden, generator=gen).half()
    weight = torch.randn(hidden, generator=gen).half()
    return fused_ops.PendingNorm(residual, delta, weight, 1e-6, torch.full_like(residual, float("nan")))


def test_a_norm_is_deferred_only_for_one_row_of_a_foldable_width(monkeypatch):
    p = pending()
    assert fused_ops.PendingNorm.possible(p.residual, p.delta, p.weight)
    wide = pending(rows=2)
    assert not fused_ops.PendingNorm.possible(wide.residual, wide.delta, wide.weight)
    odd = pending(hidden=66)
    assert not fused_ops.PendingNorm.possible(odd.residual, odd.delta, odd.weight)
    monkeypatch.setattr(fused_ops, "NORM_FOLD", False)
    assert not fused_ops.PendingNorm.possible(p.residual, p.delta, p.weight)


def test_on_the_cpu_a_deferred_norm_is_computed_at_once():
    p = pending()
    norm = RMSNorm(p.weight, p.eps)
    residual, normed = norm.add_and_norm(p.residual, p.delta, defer=True)
    expected_residual, expected = norm.add_and_norm(p.residual, p.delta)
    assert isinstance(normed, torch.Tensor) and torch.equal(normed, expected) and torch.equal(residual, expected_residual)


def test_layers_that_cannot_fold_a_pending_norm_get_its_output_and_the_residual_is_written(monkeypatch):
    monkeypatch.setattr(fused_ops, "add_rms_norm", torch_add_rms_norm)
    p = pending()
    layers = [DenseLinear(torch.randn(n, 64).half()) for n in (32, 48)]
    got = project_each(layers, p)
    expected_residual, normed = torch_add_rms_norm(p.residual, p.delta, p.weight, p.eps)
    assert torch.equal(p.new_residual, expected_residual)
    for y, layer in zip(got, layers):
        assert torch.equal(y, layer(normed))
    assert p.shape == p.residual.shape and p.dtype == torch.float16 and p.device == p.residual.device


def test_the_kernel_descriptor_points_at_the_pending_tensors():
    p = pending()
    fold = exl2_stream_ops.NormFold.of(p)
    assert (fold.residual, fold.delta, fold.weight, fold.new_residual) == tuple(
        t.data_ptr() for t in (p.residual, p.delta, p.weight, p.new_residual))
    assert abs(fold.eps - p.eps) < 1e-12
    assert exl2_stream_ops.NormFold.of(None).residual == 0
