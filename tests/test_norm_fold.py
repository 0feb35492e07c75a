"""The residual add + RMSNorm left pending for the next GEMV (fused_ops.PendingNorm): when a layer defers it, and
how a consumer that cannot fold it gets the plain norm (CPU; the kernels' fold is tested in test_kernels_gpu.py)."""

from __future__ import annotations

import pytest
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


class _Routed(Exception):
    """Raised by a stand-in where the GEMV would launch a kernel (no GPU here)."""


def test_gemv_routes_a_pending_norm_once(monkeypatch):
    """exl2_ops.gemv asks once whether the streamed kernel takes a launch: a pending norm goes to it whole (the kernel
    folds it), or is computed first for the register kernel, which then sees a [1, K] tensor."""
    from exlq.runtime.kernels import exl2_ops, exl2_stream_ops

    p = pending()
    asked, streamed = [], []
    monkeypatch.setattr(exl2_stream_ops, "applies", lambda plans, rows, dtype, device: asked.append(rows) or fold)
    monkeypatch.setattr(exl2_ops, "streamed_gemv", lambda *args: streamed.append(args))
    monkeypatch.setattr(fused_ops, "add_rms_norm", torch_add_rms_norm)

    def route(plans, rows, dtype):
        raise _Routed(rows, dtype)

    monkeypatch.setattr(exl2_ops, "gemv_route", route)
    fold = True
    exl2_ops.gemv(["plan"], p, ["out"])
    assert asked == [1] and streamed == [(["plan"], None, ["out"], None, p)] and p._out is None
    fold, asked = False, []
    with pytest.raises(_Routed) as routed:
        exl2_ops.gemv(["plan"], p, ["out"])
    assert routed.value.args == (1, torch.float16)
    assert asked == [1] and p._out is not None, "computed by the norm, once asked"


def test_matmul_many_hands_a_pending_norm_to_the_gemv_as_is(monkeypatch):
    """One launch a group of ≤ MAX_GROUP matrices: a pending norm (one row) whole, tensor rows cut into GEMV_ROWS
    pieces (13 rows: 8 + 4 + 1), `up` cut alike."""
    from types import SimpleNamespace

    from exlq.runtime.kernels import exl2_ops

    calls = []
    monkeypatch.setattr(exl2_ops, "gemv", lambda plans, x, outs, up=None: calls.append((len(plans), x, up)))
    plans = [SimpleNamespace(in_features=64, out_features=n) for n in (32, 48, 16, 8, 24)]
    p = pending()
    ys = exl2_ops.matmul_many(plans, p)
    assert [(n, x is p, up) for n, x, up in calls] == [(4, True, None), (1, True, None)]
    assert [y.shape for y in ys] == [(1, 1, plan.out_features) for plan in plans]
    calls.clear()
    x, up = torch.randn(13, 64).half(), torch.randn(13, 64).half()
    exl2_ops.matmul_many(plans[:1], x, up)
    assert [c[1].shape[0] for c in calls] == [8, 4, 1]
    assert all(torch.equal(c[2], u) for c, u in zip(calls, (up[:8], up[8:12], up[12:])))
    calls.clear()
    exl2_ops.matmul_many(plans[:1], x[:1], up[:1])
    assert torch.equal(calls[0][1], x[:1]) and torch.equal(calls[0][2], up[:1])
