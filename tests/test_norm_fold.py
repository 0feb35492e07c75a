"""The residual add + RMSNorm left pending for the next GEMV (fused_ops.PendingNorm) and products left unfinished for
it: when a layer defers them, and how a reader that cannot take them gets plain values (CPU; the kernels' side is
tested in test_kernels_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from exlq.runtime.kernels import exl2_ops, exl2_stream_ops, fused_ops
from exlq.runtime.layers import RMSNorm
from exlq.runtime.linear import DenseLinear, project_each, project_gated, project_to_residual


def torch_add_rms_norm(residual, delta, weight, eps, new_residual=None, sums=None, order=None):
    """fused_ops.add_rms_norm in torch: with `sums`, the delta is T(sums + bias), and the sums are re-zeroed; with
    `order`, output i is channel order[i]."""
    if sums is not None:
        assert delta is None
        ended = sums.sums[: weight.numel()] + (0 if sums.bias is None else sums.bias[: weight.numel()])
        delta = ended.to(weight.dtype).view(residual.shape)
        sums.sums.zero_()
    total = residual + delta.float()
    if new_residual is not None:
        new_residual.copy_(total)
    norm = RMSNorm(weight, eps)
    if order is not None:
        norm.put_output_in_order(order)
    return total, norm(total)


def pending(hidden: int = 64, rows: int = 1) -> fused_ops.PendingNorm:
    gen = torch.Generator().manual_seed(hidden + rows)
    residual = torch.randn(1, rows, hidden, generator=gen)
    delta = torch.randn(1, rows, hidden, generator=gen).half()
    weight = torch.randn(hidden, generator=gen).half()
    return fused_ops.PendingNorm(residual, delta, weight, 1e-6, torch.full_like(residual, float("nan")))


def test_a_norm_is_deferred_only_for_one_row_of_a_foldable_width(monkeypatch):
    p = pending()
    assert fused_ops.PendingNorm.possible(p.residual, p.weight)
    wide = pending(rows=2)
    assert not fused_ops.PendingNorm.possible(wide.residual, wide.weight)
    assert not fused_ops.PendingNorm.possible(torch.randn(1, 1, 128)[..., ::2], p.weight)  # not contiguous
    monkeypatch.setattr(fused_ops, "NORM_FOLD", False)
    assert not fused_ops.PendingNorm.possible(p.residual, p.weight)


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


class LaterDelta(fused_ops.Deferred):
    """A delta some kernel has yet to produce (as exl2_ops.PendingSums), produced on request."""

    def __init__(self, value: torch.Tensor):
        self.value, self.produced = value, 0

    def _shaped(self) -> torch.Tensor:
        return self.value

    def tensor(self) -> torch.Tensor:
        self.produced += 1
        return self.value


def test_a_pending_norm_over_a_deferred_delta_produces_it_once(monkeypatch):
    monkeypatch.setattr(fused_ops, "add_rms_norm", torch_add_rms_norm)
    p = pending()
    later = LaterDelta(p.delta)
    deferred = fused_ops.PendingNorm(p.residual, later, p.weight, p.eps, p.new_residual)
    out = fused_ops.as_tensor(deferred)
    assert fused_ops.as_tensor(deferred) is out and later.produced == 1
    expected_residual, expected = torch_add_rms_norm(p.residual, p.delta, p.weight, p.eps)
    assert torch.equal(out, expected) and torch.equal(p.new_residual, expected_residual)
    norm = RMSNorm(p.weight, p.eps)
    residual, normed = norm.add_and_norm(p.residual, LaterDelta(p.delta))  # on the CPU: computed at once
    assert torch.equal(normed, expected) and torch.equal(residual, expected_residual)


def test_formats_without_unfinished_outputs_return_tensors():
    layer = DenseLinear(torch.randn(48, 64).half())
    x = torch.randn(1, 1, 64).half()
    assert torch.equal(project_to_residual(layer, x), layer(x))
    gate, up = torch.randn(1, 1, 64).half(), torch.randn(1, 1, 64).half()
    assert torch.equal(project_gated(layer, gate, up, unfinished=True), project_gated(layer, gate, up))


class LaterSums(LaterDelta):
    """A delta left as a product's unfinished sums (exl2_ops.PendingSums), which the norm's launch can end."""

    def __init__(self, sums: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype):
        super().__init__((sums + bias).to(dtype))
        self.sums, self.bias, self.taken = sums, bias, 0

    def take_sums(self) -> fused_ops.UnfinishedSums | None:
        self.taken += 1
        return fused_ops.UnfinishedSums(self.sums, self.bias) if self.taken == 1 else None


def test_a_pending_norm_over_unfinished_sums_ends_them_in_the_norm(monkeypatch):
    monkeypatch.setattr(fused_ops, "add_rms_norm", torch_add_rms_norm)
    p = pending()
    gen = torch.Generator().manual_seed(7)
    sums, bias = torch.randn(96, generator=gen), torch.randn(96, generator=gen)  # padded past the 64 columns
    later = LaterSums(sums.clone(), bias, torch.float16)
    deferred = fused_ops.PendingNorm(p.residual, later, p.weight, p.eps, p.new_residual)
    out = fused_ops.as_tensor(deferred)
    expected_residual, expected = torch_add_rms_norm(p.residual, (sums + bias)[:64].half().view(1, 1, 64), p.weight, p.eps)
    assert torch.equal(out, expected) and torch.equal(p.new_residual, expected_residual)
    assert later.taken == 1 and later.produced == 0, "the sums were ended by the norm, not by a finish of their own"
    assert not later.sums.any(), "the sums are re-zeroed, padding included"


class _Routed(Exception):
    """Raised by a stand-in where the register GEMV would launch a kernel (no GPU here)."""


@pytest.mark.parametrize("streamed, fold", [(True, True), (True, False), (False, True)])
def test_gemv_routes_a_pending_norm_once(streamed, fold, monkeypatch):
    """exl2_ops.gemv asks once whether the streamed kernel takes a launch: there a pending norm is folded
    (exl2_finish_norm, then the gather; x is left unread), unless EXLQ_FOLD_STREAM=0; for the register kernel, and
    without the fold, the norm is computed first and the GEMV reads its output."""
    p = pending()
    asked, streamed_calls, folded = [], [], []
    monkeypatch.setattr(exl2_stream_ops, "applies", lambda plans, rows, dtype, device: asked.append(rows) or streamed)
    monkeypatch.setattr(exl2_ops, "streamed_gemv", lambda *args: streamed_calls.append(args))
    monkeypatch.setattr(exl2_ops, "norm_fold", lambda pending: folded.append(pending) or "the fold")
    monkeypatch.setattr(exl2_ops, "FOLD_STREAM", fold)

    def route(plans, rows, dtype):
        raise _Routed(rows, dtype)

    monkeypatch.setattr(exl2_ops, "gemv_route", route)
    monkeypatch.setattr(fused_ops, "add_rms_norm", torch_add_rms_norm)
    if streamed:
        exl2_ops.gemv(["plan"], p, ["out"])
        (plans, x, outs, up, how, unfinished), = streamed_calls
        assert (plans, outs, up, unfinished) == (["plan"], ["out"], None, False)
        if fold:
            assert how == "the fold" and folded == [p] and p._out is None, "no norm kernel: the GEMV forms it"
        else:
            assert how is exl2_stream_ops.NO_FOLD and not folded and torch.equal(x.view(-1), p.tensor().view(-1))
    else:
        with pytest.raises(_Routed) as routed:
            exl2_ops.gemv(["plan"], p, ["out"])
        assert routed.value.args == (1, torch.float16)
        assert not folded and p._out is not None, "computed by the norm before the register kernel"
    assert asked == [1]


@pytest.fixture
def tensor_cores(monkeypatch):
    """Whether launches of 4-16 rows find a tensor-core kernel (set .on), instead of the tables and the GPU deciding."""
    from types import SimpleNamespace

    state = SimpleNamespace(on=False)

    def route(plans, rows, dtype):
        return state.on and 4 <= rows <= 16, 1

    monkeypatch.setattr(exl2_ops, "gemv_route", route)
    monkeypatch.setattr(exl2_stream_ops, "applies_rows", lambda plans, rows, dtype, device: False)
    return state


def test_matmul_many_hands_a_pending_norm_to_the_gemv_as_is(tensor_cores, monkeypatch):
    """One launch a group of ≤ MAX_GROUP matrices: a pending norm (one row) whole, tensor rows cut into GEMV_ROWS
    pieces (13 rows: 8 + 4 + 1), `up` cut alike."""
    from types import SimpleNamespace

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


@pytest.mark.parametrize("rows, cuts, cuts_with_tensor_cores", [
    (5, [4, 1], [5]), (7, [4, 3], [7]), (8, [8], [8]), (9, [8, 1], [9]), (13, [8, 4, 1], [13]), (16, [8, 8], [16]),
    (20, [8, 8, 4], [16, 4]), (31, [8, 8, 8, 4, 3], [16, 15]), (32, [8, 8, 8, 8], [16, 16]), (3, [3], [3]),
])
def test_rows_are_cut_into_as_few_launches_as_the_kernels_allow(rows, cuts, cuts_with_tensor_cores, tensor_cores,
                                                                monkeypatch):
    """A tensor-core kernel takes any 4-16 rows in one launch (its mma holds 8, twice above 8), so 5-7 and 9-16 rows
    read the weights once; the register kernel has instances for GEMV_ROWS only (5 rows: 4 + 1)."""
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(exl2_ops, "gemv", lambda plans, x, outs, up=None: calls.append(x.shape[0]))
    plans = [SimpleNamespace(in_features=64, out_features=32)]
    x = torch.randn(rows, 64).half()
    exl2_ops.matmul_many(plans, x)
    assert calls == cuts
    calls.clear()
    tensor_cores.on = True
    exl2_ops.matmul_many(plans, x)
    assert calls == cuts_with_tensor_cores


def test_rows_are_cut_so_that_every_group_of_matrices_takes_them(monkeypatch):
    """More than MAX_GROUP matrices are launched in groups, each routed on its own: 7 rows are one launch only where
    every group's matrices find a tensor-core kernel, else 4 + 3 for all (the register kernel has no 7-row instance)."""
    from types import SimpleNamespace

    monkeypatch.setattr(exl2_ops, "gemv_route", lambda plans, rows, dtype: (all(p.tc for p in plans) and 4 <= rows <= 8, 1))
    monkeypatch.setattr(exl2_stream_ops, "applies_rows", lambda plans, rows, dtype, device: False)
    calls = []
    monkeypatch.setattr(exl2_ops, "gemv", lambda plans, x, outs, up=None: calls.append((len(plans), x.shape[0])))
    x = torch.randn(7, 64).half()
    for last, cuts in ((True, [(4, 7), (1, 7)]), (False, [(4, 4), (1, 4), (4, 3), (1, 3)])):
        calls.clear()
        plans = [SimpleNamespace(in_features=64, out_features=32, tc=True) for _ in range(4)]
        exl2_ops.matmul_many(plans + [SimpleNamespace(in_features=64, out_features=32, tc=last)], x)
        assert calls == cuts


@pytest.mark.parametrize("unfinished, gated", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("ordered", [False, True])
def test_norm_fold_launches_one_finish_that_ends_unfinished_sums(unfinished, gated, ordered, monkeypatch):
    """exl2_ops.norm_fold launches exl2_finish_norm once per pending norm: over a product's unfinished sums (their
    matrix, no delta tensor, enough blocks to re-zero the padding, the product then ended; `gated`: also the gate/up
    sums its input was gathered from, to re-zero), or over a finished delta; `ordered` (a norm whose output has an
    order): the launch also lays residual + delta out in it, and the fold reads that."""
    from types import SimpleNamespace

    launches = []
    monkeypatch.setattr(exl2_ops, "kernel", lambda source, instances, name, device: name)
    monkeypatch.setattr(exl2_ops, "launch", lambda function, grid, block, args, device, overlap: launches.append(
        (function, grid, args)))
    hidden, n_pad = 600, 1024  # 3 pieces of FINISH_THREADS values; the sums padded to 4
    p = pending(hidden)
    if unfinished:
        group = exl2_ops.GemvGroup(count=1)
        group.m[0] = exl2_ops.GemvMatrix(n_pad=n_pad)
        extra = torch.zeros(3000) if gated else None
        delta = exl2_ops.PendingSums(group, SimpleNamespace(bias=None, n_pad=n_pad), torch.empty(1, 1, hidden).half(),
                                     torch.zeros(n_pad), extra=extra)
        p = fused_ops.PendingNorm(p.residual, delta, p.weight, p.eps, p.new_residual)
    if ordered:
        order = torch.randperm(hidden, generator=torch.Generator().manual_seed(1)).int()
        output = fused_ops.OutputOrder(order, order.argsort().int(), p.weight[order])
        p = fused_ops.PendingNorm(p.residual, p.delta, p.weight, p.eps, p.new_residual, output)
    fold = exl2_ops.norm_fold(p)
    assert exl2_ops.norm_fold(p) is fold, "once per pending norm"
    (function, grid, args), = launches
    assert function == "exl2_finish_norm<fp16_t>" and args[2:6] == (p.residual, p.new_residual, p.fold[1], hidden)
    assert args[6:8] == ((extra, 3000) if gated else (None, 0))
    stored = p.fold[2]
    assert (stored is not None) == ordered and args[8:] == (stored, p.ordered.slot if ordered else None)
    read, weight = (stored, p.ordered.weight) if ordered else (p.new_residual, p.weight)
    assert (fold.count, fold.residual, fold.weight) == (3, read.data_ptr(), weight.data_ptr())
    if unfinished:
        assert grid == (4, 1, 1) and args[1] is None and args[0].n_pad == n_pad
        assert delta.ended and delta.take_sums() is None, "ended by that launch"
    else:
        assert grid == (3, 1, 1) and args[1] is p.delta and args[0].n_pad == 0


def test_matmul_unfinished_gives_the_gemv_outputs_of_the_input_shape(monkeypatch):
    """One row: the GEMV (one launch for every matrix) writes into outputs of x's leading shape and may hand back
    their sums unfinished; more rows, or more matrices than a launch takes: matmul_many."""
    from types import SimpleNamespace

    handed, launches = [None], []
    monkeypatch.setattr(exl2_ops, "gemv", lambda plans, x, ys, up=None, unfinished=False: launches.append(
        (len(plans), ys, unfinished)) or handed[0])
    plans = [SimpleNamespace(in_features=64, out_features=n) for n in (48, 16)]
    x = torch.randn(1, 1, 64).half()
    ys = exl2_ops.matmul_unfinished(plans, x)
    (count, outs, unfinished), = launches
    assert ys == outs and count == 2 and unfinished
    assert [y.shape for y in ys] == [(1, 1, 48), (1, 1, 16)] and ys[0].dtype == torch.float16
    handed[0] = ["sums", "sums"]
    assert exl2_ops.matmul_unfinished(plans, x) == ["sums", "sums"] and launches[1][1][0].shape == (1, 1, 48)
    monkeypatch.setattr(exl2_ops, "matmul_many", lambda plans, x, up=None: ["many"] * len(plans))
    assert exl2_ops.matmul_unfinished(plans, torch.randn(1, 3, 64).half()) == ["many", "many"]
    assert exl2_ops.matmul_unfinished(plans * 3, x) == ["many"] * 6, "more than MAX_GROUP matrices"


def qkv_products(widths=(96, 32, 32)) -> list[exl2_ops.PendingSums]:
    """One launch's q/k/v-like products left as sums (exl2_ops.pending_products), without a GPU."""
    from types import SimpleNamespace

    group = exl2_ops.GemvGroup(count=len(widths))
    for i, n in enumerate(widths):
        group.m[i] = exl2_ops.GemvMatrix(N=n, n_pad=n, splits=2)
    plans = [SimpleNamespace(n_pad=n, bias=None if i else torch.randn(n)) for i, n in enumerate(widths)]
    outs = [torch.empty(1, 1, n).half() for n in widths]
    return exl2_ops.pending_products(group, plans, outs, torch.randn(sum(widths) + 8))


def test_one_finish_ends_the_products_of_a_launch_that_no_launch_took(monkeypatch):
    """A launch's products left as sums are siblings: reading one (`tensor()`) ends all those not taken by another
    launch in one exl2_finish, whose group holds just them; a taken product is never finished again."""
    finishes = []
    monkeypatch.setattr(exl2_ops, "finish_sums", lambda group, plans, rows, dtype, device, extra=None: finishes.append(
        ([group.m[i].n_pad for i in range(group.count)], [p.n_pad for p in plans], rows)))
    q, k, v = qkv_products()
    assert all(p.unfinished() for p in (q, k, v)) and (q.matrix.n_pad, k.matrix.n_pad) == (96, 32)
    taken = q.take_sums()
    assert taken.sums is q.sums and taken.bias is q.plan.bias and not q.unfinished() and q.take_sums() is None
    assert k.tensor() is k.out and finishes == [([32, 32], [32, 32], 1)], "k and v in one launch, q not"
    assert v.tensor() is v.out and q.tensor() is q.out and len(finishes) == 1
    assert v.take_sums() is None and not v.unfinished()
    q, k, v = qkv_products()
    v.tensor()
    assert finishes[-1] == ([96, 32, 32], [96, 32, 32], 1) and not any(p.unfinished() for p in (q, k, v))


@pytest.mark.parametrize("case", ["sums", "switched off", "one taken", "tensors", "two tokens"])
def test_rope_store_ends_qkv_sums_in_its_own_launch(case, monkeypatch):
    """fused_ops.rope_store takes one token's q, k and v, all three left as their GEMV's sums, in finish_rope_store
    (the sums and biases by address, no exl2_finish); anything else (EXLQ_ROPE_FINISH=0, a product already ended,
    finished tensors, more tokens) is read as values by rope_store."""
    launches, finishes = [], []
    monkeypatch.setattr(fused_ops, "kernel", lambda source, instances, name, device: name)
    monkeypatch.setattr(fused_ops, "launch", lambda function, grid, block, args, device, overlap: launches.append(
        (function, grid, block, args)))
    monkeypatch.setattr(exl2_ops, "finish_sums",
                        lambda group, plans, rows, dtype, device, extra=None: finishes.append(group.count))
    monkeypatch.setattr(fused_ops, "ROPE_FINISH", case != "switched off")
    tokens, dim = (2 if case == "two tokens" else 1), 16
    qkv = qkv_products()
    if case == "one taken":
        qkv[2].take_sums()
    if case in ("tensors", "two tokens"):
        qkv = [torch.randn(1, tokens, n).half() for n in (96, 32, 32)]
    cos = sin = torch.randn(1, tokens, dim).half()
    cache = torch.empty(1, 2, 8, dim).half()
    q_out = fused_ops.rope_store(*qkv, cos, sin, cache, cache, torch.tensor([3]))
    assert q_out.shape == (1, 6, tokens, dim) and q_out.dtype == torch.float16
    (function, grid, block, args), = launches
    assert grid == (tokens, 6 + 2, 1) and block == (dim // 2, 1, 1) and args[-4:] == (6, 2, dim, 8)
    if case == "sums":
        assert function == "finish_rope_store<fp16_t>" and finishes == []
        assert args[:6] == (qkv[0].sums, qkv[0].plan.bias, qkv[1].sums, None, qkv[2].sums, None)
        assert not any(p.unfinished() for p in qkv)
    else:
        assert function == "rope_store<fp16_t>" and args[-5] == tokens
        assert finishes == ([3] if case == "switched off" else [2] if case == "one taken" else [])


@pytest.mark.parametrize("case", ["sums", "switched off", "rope finish off", "one taken", "tensors", "padded"])
def test_attention_takes_qkv_sums_in_one_launch_only_where_it_can(case, monkeypatch):
    """AttentionBatch.attention hands one token's q, k and v, all three their GEMV's unfinished sums, to
    rope_decode_attention over the cache's attended rows (the sums and biases by address; no exl2_finish, no
    rope_store), with EXLQ_ROPE_ATTENTION; anything else (the switch or EXLQ_ROPE_FINISH off, a product already
    ended, finished tensors, a padded batch) takes rope_store (or finish_rope_store), then decode_attention."""
    from exlq.runtime import attention as attention_module
    from exlq.runtime.attention import AttentionBatch
    from exlq.runtime.cache import KVCache
    from exlq.runtime.kernels import attention_ops

    launches, finishes = [], []
    monkeypatch.setattr(attention_module.kernels, "applies", lambda t: True)
    for module in (fused_ops, attention_ops):
        monkeypatch.setattr(module, "kernel", lambda source, instances, name, device: name)
        monkeypatch.setattr(module, "launch", lambda function, grid, block, args, device, overlap, cluster=None:
                            launches.append((function, grid, args)))
    monkeypatch.setattr(attention_ops, "ranks", lambda device, span: 8)
    monkeypatch.setattr(exl2_ops, "finish_sums",
                        lambda group, plans, rows, dtype, device, extra=None: finishes.append(group.count))
    monkeypatch.setattr(attention_ops, "ROPE_ATTENTION", case != "switched off")
    monkeypatch.setattr(fused_ops, "ROPE_FINISH", case != "rope finish off")
    dim, position = 64, 5
    qkv = qkv_products((4 * dim, dim, dim))
    if case == "one taken":
        qkv[2].take_sums()
    if case == "tensors":
        qkv = [torch.randn(1, 1, n).half() for n in (4 * dim, dim, dim)]
    cache = KVCache(num_layers=2, num_kv_heads=1, head_dim=dim, max_seq_len=16)
    cos = sin = torch.randn(1, 1, dim).half()
    pad = torch.zeros(1, dtype=torch.long) if case == "padded" else None
    batch = AttentionBatch(position, 1, cos, sin, pad)
    out = batch.attention(cache, 1, *qkv, dim, None)
    assert out.shape == (1, 4, 1, dim) and out.dtype == torch.float16
    keys, values = cache.keys.data[1], cache.values.data[1]
    if case == "sums":
        (function, grid, args), = launches
        assert function == "rope_decode_attention<fp16_t, 64, 4, 64>" and grid == (1, 8, 1) and finishes == []
        assert args[:8] == (qkv[0].sums, qkv[0].plan.bias, qkv[1].sums, None, qkv[2].sums, None, cos, sin)
        assert args[8].data_ptr() == keys.data_ptr() and args[9].data_ptr() == values.data_ptr()
        assert args[8].shape == (1, 1, position + 1, dim) and args[10:16] == (16 * dim, 1, None, position, 0, args[15])
        assert args[-2] is out and args[-1] == attention_ops.pushes(dim, 8) and not any(p.unfinished() for p in qkv)
    else:
        rope = "finish_rope_store" if case in ("switched off", "padded") else "rope_store"
        assert [(f, g) for f, g, _ in launches] == [(f"{rope}<fp16_t>", (1, 5, 1)),
                                                   ("decode_attention<fp16_t, 64, 4, 64>", (1, 8, 1))]
        assert finishes == ([3] if case == "rope finish off" else [2] if case == "one taken" else [])


@pytest.mark.parametrize("case, takes", [
    ("register", True), ("switched off", False), ("biased", False), ("three products", False), ("one taken", False),
    ("one split", False), ("streamed", False), ("streamed, switched on", True), ("multi-row kernel", False)])
def test_down_takes_gate_up_sums_only_where_its_launch_ends_them(case, takes, monkeypatch):
    """exl2_ops.gathers_sums: down_proj's GEMV gathers from gate/up's sums where both are one unbiased launch's only
    products, still unfinished, and down_proj's product is left as sums whose end re-zeroes them: split along K on
    the register kernel, or on the streamed kernel with EXLQ_GATED_SUMS_STREAM; not on the multi-row one."""
    from types import SimpleNamespace

    widths = (64, 64, 32) if case == "three products" else (64, 64)
    gate, up, *_ = qkv_products(widths)
    gate.plan.bias = torch.randn(64) if case == "biased" else None
    if case == "one taken":
        up.take_sums()
    splits = 1 if case == "one split" else 4
    plan = SimpleNamespace(n_pad=32, gather=None, splits=lambda columns: torch.zeros(splits + 1))
    monkeypatch.setattr(exl2_ops, "GATED_SUMS", case != "switched off")
    monkeypatch.setattr(exl2_ops, "GATED_SUMS_STREAM", case == "streamed, switched on")
    monkeypatch.setattr(exl2_stream_ops, "applies", lambda *args: case.startswith("streamed"))
    monkeypatch.setattr(exl2_stream_ops, "applies_rows", lambda *args: case == "multi-row kernel")
    assert exl2_ops.gathers_sums(plan, gate, up) is takes
    assert not exl2_ops.gathers_sums(plan, gate.out, up.out), "finished tensors are read as they are"
