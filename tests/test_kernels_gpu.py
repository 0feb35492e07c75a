"""CUDA kernels against their torch reference paths (marker `gpu`: skipped without a GPU).

Kernel outputs are poisoned with NaN before each launch, so an element a kernel fails to write shows up.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import forget_kernel_architecture, real_model_dir
from exlq.quant.exl2_pack import converter_layout, pack_exl2
from exlq.runtime.exl2 import MAX_IN_FEATURES, Exl2Linear, dequantize, dequantize_stored
from exlq.runtime.generator import Generator
from exlq.runtime.kernels import ACTIVATION_TAGS, enabled, exl2_ops, exl2_stream_ops, fused_ops
from exlq.runtime.kernels.launch import blocks_per_sm, hopper_or_newer, kernel, pdl_enabled
from exlq.runtime.layers import RMSNorm
from exlq.runtime.linear import project_each, project_gated
from exlq.runtime.loader import load_model
from exlq.runtime.sampler import SamplerSettings
from exlq.runtime.tokenizer import Tokenizer
from test_exl2_format import VALID_CASES, Case, exl2_and_reference_dirs, golden, same_bits  # noqa: F401

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")

# (K, bits, proportions, group sizes): odd K, 16-row 2-bit tails, every width, mixed layouts.
LAYOUTS = [
    (64, [8], [1.0], 32),
    (96, [6], [1.0], 32),
    (160, [5], [1.0], 32),
    (256, [4], [1.0], 128),
    (288, [3], [1.0], 32),
    (592, [2], [1.0], 64),  # 9 groups of 64 and a 16-row tail
    (576, [8, 4, 3], [0.1, 0.4, 0.5], [32, 64, 64]),
    (976, [6, 5, 4, 3, 2], [0.05, 0.1, 0.25, 0.3, 0.3], [32, 32, 64, 64, 64]),  # every width, 2-bit tail
    (4096, [5, 4], [0.25, 0.75], 128),
]


# fp16 products of whole 32-row blocks are summed in fp16 over up to 32 weights (half2 math, activations prescaled),
# short tails in fp32; bf16 outputs carry 8 mantissa bits.
TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 1e-2}


def random_exl2(k: int, n: int, bits, props, group_size, *, seed: int, bias: bool = False):
    gen = torch.Generator().manual_seed(seed)
    layout = converter_layout(k, bits, props, group_size)
    codes = torch.cat([torch.randint(0, 1 << b, (r, n), generator=gen) for b, r in layout])
    scale_codes = torch.randint(1, 17, (len(layout), n), generator=gen)
    q_scale_max = (torch.rand(len(layout), generator=gen) * 0.02 + 0.001).half()
    perm = torch.randperm(k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    return pack_exl2(codes, scale_codes, q_scale_max, layout, perm, b), layout


def on_gpu(tensors):
    """An EXL2 layer's tensors (random_exl2's) on the GPU."""
    return type(tensors)(**{f: None if v is None else v.to(CUDA) for f, v in vars(tensors).items()})


def stored_weight(layer) -> torch.Tensor:
    """W [K, N_pad] by the torch reference (`dequantize`), of an Exl2Tensors or an Exl2Linear."""
    return dequantize(*(getattr(layer, f) for f in ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")))


def workspace_of(store) -> tuple[torch.Tensor, torch.Tensor]:
    """A Workspace's (sums, counters) on the GPU, under the key the ops use: a tensor's device, "cuda:0" (a get with
    torch.device("cuda") would make a new, zeroed pair, and a check of it could never fail)."""
    return store.get(torch.device("cuda", torch.cuda.current_device()), 0, 0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.setenv("EXLQ_KERNELS", "1")
    assert enabled(CUDA), "a GPU test without kernels: is CuPy installed on this machine?"


@pytest.mark.parametrize("name", VALID_CASES)
def test_dequant_kernel_is_bit_exact_on_golden_vectors(golden, name):  # noqa: F811
    case = Case(golden, name)
    tensors = case.stored()
    tensors = type(tensors)(**{f: getattr(tensors, f).to(CUDA) if getattr(tensors, f) is not None else None
                               for f in ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm", "bias")})
    from exlq.runtime.exl2 import decode_q_groups

    layout = decode_q_groups(tensors.q_groups.cpu(), tensors.q_weight.shape[0])
    plan = exl2_ops.build_plan(tensors, layout, tensors.q_weight.shape[1], case.prescale)
    stored = exl2_ops.dequantize_stored(plan, torch.float16).cpu()
    if case.use_perm:
        out = torch.empty_like(stored)
        out[plan.perm.long().cpu()] = stored
    else:
        out = stored
    assert same_bits(out, case["recon"])


@pytest.mark.parametrize("k, bits, props, group", LAYOUTS)
@pytest.mark.parametrize("n", [32, 200, 4160])
def test_dequant_kernel_matches_torch(k, bits, props, group, n):
    tensors, layout = random_exl2(k, n, bits, props, group, seed=k + n)
    reference = dequantize_stored(tensors.q_weight, tensors.q_scale, tensors.q_scale_max, tensors.q_groups)
    cuda = on_gpu(tensors)
    plan = exl2_ops.build_plan(cuda, layout, n)
    assert same_bits(exl2_ops.dequantize_stored(plan, torch.float16).cpu(), reference)
    in_order = torch.empty_like(reference)
    in_order[plan.perm.long().cpu()] = reference  # stored row r is input channel perm[r]
    assert same_bits(exl2_ops.dequantize_stored(plan, torch.float16, input_order=True).cpu(), in_order)
    bf16 = exl2_ops.dequantize_stored(plan, torch.bfloat16).cpu()
    assert torch.equal(bf16, reference.float().to(torch.bfloat16)) or rel(bf16, reference) < 4e-3


# The GEMV kernels: the tensor-core one (fp16, 4 to 16 rows, layers of whole 32-row blocks; all rows below 40 reach it),
# the one-column-a-thread one, and its wide instances (2 columns a thread, 1-3 rows; here for every width), whose
# split products end in exl2_finish unless "-inline" (each K split's last block writes the outputs; "mma-inline": the
# tensor-core kernel's too), the streamed one (one fp16 row, layers of whole 32-row blocks; other launches of that
# kind take the narrow kernel) and, with "stream-rows", the streamed multi-row one too (4 to 16 fp16 rows, where it
# fits).
KERNELS = [(torch.float16, "mma"), (torch.float16, "mma-inline"), (torch.float16, "narrow"), (torch.float16, "wide"),
           (torch.float16, "wide-inline"), (torch.float16, "stream"), (torch.float16, "stream-rows"),
           (torch.bfloat16, "narrow"), (torch.bfloat16, "wide")]


def use_gemv(kind: str, monkeypatch) -> None:
    """Route GEMV launches to one kernel: "mma" (where it applies), "narrow" or "wide" (1-3 rows), "stream" (one fp16
    row, where it applies), "stream-rows" (that, and 4 to 16 fp16 rows where the multi-row streamed kernel applies),
    and "-inline" to the in-kernel end of split products instead of exl2_finish."""
    monkeypatch.setattr(exl2_ops, "FINISH_KERNEL", not kind.endswith("-inline"))
    kind = kind.removesuffix("-inline")
    if kind.startswith("stream") and not hopper_or_newer(CUDA):  # an Ampere/Ada GPU, or EXLQ_ARCH standing in for one
        pytest.skip("the streamed GEMVs need sm_90 or newer (bulk copies)")
    monkeypatch.setattr(exl2_stream_ops, "ENABLED", kind in ("stream", "stream-rows"))
    monkeypatch.setattr(exl2_stream_ops, "ROWS", exl2_stream_ops.DEFAULT_ROWS if kind == "stream-rows" else ())
    monkeypatch.setattr(exl2_stream_ops, "MAX_BYTES", 1 << 40)  # every size, whatever the speed rule
    monkeypatch.setattr(exl2_ops, "MMA", kind == "mma")
    monkeypatch.setattr(exl2_ops, "WIDE_MIN_COLUMNS", 0 if kind == "wide" else 1 << 62)


@pytest.mark.parametrize("k, bits, props, group", LAYOUTS)
@pytest.mark.parametrize("n, rows", [(32, 1), (200, 3), (4160, 8), (544, 13), (160, 7), (800, 10), (352, 12), (224, 15),
                                     (288, 16), (1024, 32), (96, 40)])
@pytest.mark.parametrize("dtype, kind", KERNELS)
def test_exl2_matmul_kernel_matches_reference(k, bits, props, group, n, rows, dtype, kind, monkeypatch):
    use_gemv(kind, monkeypatch)
    tensors, layout = random_exl2(k, n, bits, props, group, seed=3 * k + n, bias=rows % 2 == 1)
    cuda = on_gpu(tensors)
    layer = Exl2Linear(cuda, k, n, dtype=dtype)
    x = torch.randn(rows, k, device=CUDA).to(dtype)
    weight = stored_weight(cuda)
    expected = x.double() @ weight[:, :n].double()
    if cuda.bias is not None:
        expected += cuda.bias[:n].double()
    plan = layer.kernel_plan()
    assert (plan.gather is None) == any(r % 32 for _, r in layout)  # the tensor-core GEMV takes whole 32-row blocks
    if exl2_ops.launch_rows([plan], rows, dtype, x.device) == rows:  # one launch takes them: the raw kernel, poisoned output
        out = torch.full((rows, n), float("nan"), dtype=dtype, device=CUDA)
        exl2_ops.gemv([plan], x, [out])
        assert torch.isfinite(out).all()
        assert rel(out, expected) < TOLERANCE[dtype]
    y = layer(x[None])[0]
    assert y.shape == (rows, n) and y.dtype == dtype and torch.isfinite(y).all()
    assert rel(y, expected) < TOLERANCE[dtype]
    workspace, counters = workspace_of(exl2_ops._workspace)
    assert not workspace.any() and not counters.any(), "the GEMV must leave its workspace zeroed"


# The streamed GEMV's layers: the ones above that it takes (whole 32-row groups), and 32/64/128-row groups cut into
# units of 64, 96 and 128 rows, K up to 14336.
STREAM_LAYOUTS = [layout for layout in LAYOUTS if exl2_stream_ops.eligible(converter_layout(*layout))] + [
    (576, [2], [1.0], 64),
    (960, [6, 5, 4, 3, 2], [0.05, 0.1, 0.25, 0.3, 0.3], [32, 32, 64, 64, 128]),
    (4096, [8, 6, 5, 4], [0.1, 0.2, 0.2, 0.5], 128),
    (14336, [4, 3], [0.96, 0.04], 128),
]


@pytest.mark.parametrize("k, bits, props, group", STREAM_LAYOUTS)
@pytest.mark.parametrize("n", [32, 200, 576, 4160])
@pytest.mark.parametrize("grid, stages, columns", [(None, 4, 1), (None, 4, 2), (7, 2, 2), (3, 8, 1)])
def test_streamed_gemv_matches_reference(k, bits, props, group, n, grid, stages, columns, monkeypatch):
    """One fp16 row through the streamed kernel (one or two columns a consumer thread) into a poisoned output: the
    float64 product of the torch dequantization (+bias), and a clean workspace. Small grids make each block walk many
    units across strips (its activation rows then wrap around K) and reuse every stage many times."""
    use_gemv("stream", monkeypatch)
    monkeypatch.setattr(exl2_stream_ops, "MAX_GRID", grid)
    monkeypatch.setattr(exl2_stream_ops, "STAGES", stages)
    monkeypatch.setattr(exl2_stream_ops, "THREAD_COLUMNS", columns)
    tensors, layout = random_exl2(k, n, bits, props, group, seed=5 * k + n, bias=n % 3 == 0)
    cuda = on_gpu(tensors)
    layer = Exl2Linear(cuda, k, n, dtype=torch.float16)
    plan = layer.kernel_plan()
    x = torch.randn(1, k, device=CUDA).half()
    assert exl2_stream_ops.applies([plan], 1, x.dtype, x.device)
    expected = x.double() @ stored_weight(cuda)[:, :n].double()
    if cuda.bias is not None:
        expected += cuda.bias[:n].double()
    out = torch.full((1, n), float("nan"), dtype=torch.float16, device=CUDA)
    exl2_ops.gemv([plan], x, [out])
    assert torch.isfinite(out).all()
    assert rel(out, expected) < TOLERANCE[torch.float16]
    gate = (4 * torch.randn(1, k, device=CUDA)).half()  # down_proj's form: silu(gate) * up gathered in the kernel
    gated = torch.full((1, n), float("nan"), dtype=torch.float16, device=CUDA)
    exl2_ops.gemv([plan], gate, [gated], up=x)
    reference = fused_ops.silu_mul(gate, x).double() @ stored_weight(cuda)[:, :n].double()
    if cuda.bias is not None:
        reference += cuda.bias[:n].double()
    assert torch.isfinite(gated).all() and rel(gated, reference) < TOLERANCE[torch.float16]
    workspace, _ = workspace_of(exl2_ops._workspace)
    assert not workspace.any(), "the GEMV must leave its workspace zeroed"


@pytest.mark.parametrize("grid", [None, 5])
@pytest.mark.parametrize("rows", [1, 4, 8, 16])
def test_streamed_group_launch_matches_each_layer(grid, rows, monkeypatch):
    """Four matrices of one input with their own permutations, layouts and widths in one streamed launch, of one row
    or of 4, 8 or 16 (the multi-row kernel; a block may start in one matrix and end in the next, gathering the
    activations again): each gets its own product."""
    use_gemv("stream-rows", monkeypatch)
    monkeypatch.setattr(exl2_stream_ops, "MAX_GRID", grid)
    k = 1024
    shapes = [(4160, [4], [1.0], 128), (576, [8, 4], [0.2, 0.8], 32), (200, [5, 3], [0.5, 0.5], 64), (1024, [6], [1.0], 32)]
    layers = [Exl2Linear(on_gpu(random_exl2(k, n, b, p, g, seed=90 + i, bias=i % 2 == 0)[0]), k, n, dtype=torch.float16)
              for i, (n, b, p, g) in enumerate(shapes)]
    x = torch.randn(rows, k, device=CUDA).half()
    plans = [layer.kernel_plan() for layer in layers]
    assert (exl2_stream_ops.applies if rows == 1 else exl2_stream_ops.applies_rows)(plans, rows, x.dtype, x.device)
    outs = [torch.full((rows, layer.out_features), float("nan"), dtype=torch.float16, device=CUDA) for layer in layers]
    exl2_ops.gemv(plans, x, outs)
    for layer, out in zip(layers, outs):
        ref = x.double() @ stored_weight(layer)[:, : layer.out_features].double()
        if layer.bias is not None:
            ref += layer.bias[: layer.out_features].double()
        assert torch.isfinite(out).all() and rel(out, ref) < TOLERANCE[torch.float16]
    workspace, _ = workspace_of(exl2_ops._workspace)
    assert not workspace.any()


@pytest.mark.parametrize("k, bits, props, group", STREAM_LAYOUTS)
@pytest.mark.parametrize("n", [32, 200, 4160])
@pytest.mark.parametrize("grid, stages", [(None, 4), (7, 2), (3, 8)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16])  # one row tile and two, each partly or wholly used
def test_multi_row_streamed_gemv_matches_reference(k, bits, props, group, n, grid, stages, rows, monkeypatch):
    """1 to 16 fp16 rows through the streamed tensor-core kernel into a poisoned output: the float64 product of the
    torch dequantization (+bias), and a clean workspace; small grids walk many units, strips and stages a block (and
    hold much of K, or all). Where the block does not fit, the launch must not take it."""
    use_gemv("stream-rows", monkeypatch)
    monkeypatch.setattr(exl2_stream_ops, "ROWS", exl2_stream_ops.ROW_COUNTS)  # 1-3 rows too
    monkeypatch.setattr(exl2_stream_ops, "MAX_BYTES", 0)  # one row: past the one-row streamed kernel's launches
    monkeypatch.setattr(exl2_stream_ops, "MAX_GRID", grid)
    monkeypatch.setattr(exl2_stream_ops, "ROWS_STAGES", stages)
    tensors, layout = random_exl2(k, n, bits, props, group, seed=7 * k + n + rows, bias=n % 3 == 0)
    cuda = on_gpu(tensors)
    layer = Exl2Linear(cuda, k, n, dtype=torch.float16)
    plan = layer.kernel_plan()
    x = torch.randn(rows, k, device=CUDA).half()
    # a block holds the activations of the rows its units cover, 128 a unit (all of K past two strips: a small grid's
    # blocks take many units); the launch takes it where that window fits beside 2 stages (8 rows of all of K 14336:
    # 229 KB, no), always with the automatic grid (one unit a block to start with)
    blocks = min(grid or 1 << 30, exl2_stream_ops.plan_units(plan))
    window = min(k, -(-exl2_stream_ops.plan_units(plan) // blocks) * 128)
    limit = exl2_stream_ops.block_shared_limit(exl2_stream_ops.device_index(x.device))
    fits = grid is None or exl2_stream_ops.rows_shared_bytes(window, rows, 2) <= limit
    assert exl2_stream_ops.applies_rows([plan], rows, x.dtype, x.device) == fits
    expected = x.double() @ stored_weight(cuda)[:, :n].double()
    if cuda.bias is not None:
        expected += cuda.bias[:n].double()
    out = torch.full((rows, n), float("nan"), dtype=torch.float16, device=CUDA)
    if fits or rows in exl2_ops.GEMV_ROWS:  # one launch: the multi-row kernel, else the register kernel's instance
        exl2_ops.gemv([plan], x, [out])
    else:  # no other kernel takes these rows in one launch: the cut matmul_many makes (16 rows: 8 + 8)
        out = exl2_ops.matmul_many([plan], x)[0]
    assert torch.isfinite(out).all()
    assert rel(out, expected) < TOLERANCE[torch.float16]
    workspace, _ = workspace_of(exl2_ops._workspace)
    assert not workspace.any(), "the GEMV must leave its workspace zeroed"


@pytest.mark.parametrize("bits", [3, 5, 6, 8])
@pytest.mark.parametrize("kind", ["narrow", "wide", "stream"])
def test_fp16_pair_path_keeps_small_activations(bits, kind, monkeypatch):
    """The fp16 pair path prescales activations by 2^-(b+3) (2^-9 at 6 and 8 bits), which puts small ones near fp16's
    subnormals: activations of rms 0.01 (as a down_proj's input can be) must still give the float64 product within
    the fp16 tolerance."""
    use_gemv(kind, monkeypatch)
    k, n = 1024, 256
    tensors, _ = random_exl2(k, n, [bits], [1.0], 32, seed=bits)
    cuda = on_gpu(tensors)
    layer = Exl2Linear(cuda, k, n, dtype=torch.float16)
    weight = stored_weight(cuda)
    x = (0.01 * torch.randn(1 if kind == "stream" else 2, k, device=CUDA)).half()
    assert rel(layer(x[None])[0], x.double() @ weight[:, :n].double()) < TOLERANCE[torch.float16]


def test_one_row_matmul_at_the_largest_input_size():
    """The one-row GEMV keeps an input channel in 17 bits of its gather table: the format's largest K (every channel
    index up to 65535, in a random permutation) must come through whole."""
    k = MAX_IN_FEATURES
    tensors, _ = random_exl2(k, 64, [4, 3], [0.5, 0.5], 32, seed=7)
    cuda = on_gpu(tensors)
    layer = Exl2Linear(cuda, k, 64, dtype=torch.float16)
    x = torch.randn(1, k, device=CUDA).half()
    weight = stored_weight(cuda)
    assert rel(layer(x[None])[0], x.double() @ weight[:, :64].double()) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 8, 13, 40])
@pytest.mark.parametrize("dtype, kind", KERNELS)
def test_gated_gemv_equals_silu_mul_then_gemv(rows, dtype, kind, monkeypatch):
    """down_proj's GEMV forming silu(gate) * up as it gathers gives silu_mul followed by the plain GEMV (the
    tensor-core kernel and the cuBLAS path: by running exactly that), up to the split-K sum's order: its blocks add
    into the fp32 workspace atomically, so a rare output lands one ulp apart from run to run."""
    use_gemv(kind, monkeypatch)
    k, n = 976, 200  # every width, a 2-bit tail
    tensors, _ = random_exl2(k, n, [6, 5, 4, 3, 2], [0.05, 0.1, 0.25, 0.3, 0.3], [32, 32, 64, 64, 64], seed=rows, bias=True)
    cuda = on_gpu(tensors)
    layer = Exl2Linear(cuda, k, n, dtype=dtype)
    gate, up = (4 * torch.randn(1, rows, k, device=CUDA)).to(dtype), torch.randn(1, rows, k, device=CUDA).to(dtype)
    expected = layer(fused_ops.silu_mul(gate, up))
    got = project_gated(layer, gate, up)
    assert torch.isclose(got.float(), expected.float(), rtol=torch.finfo(dtype).eps, atol=1e-5).all()
    assert (got != expected).float().mean() < 0.01, "activations formed differently, not the sum's order"


# Layers of one input size (as q/k/v or gate/up): different widths, layouts, biases; five of them so one
# call needs two launches (MAX_GROUP is 4).
GROUP_LAYERS = [(576, [4], [1.0], 32, True), (192, [6, 4], [0.2, 0.8], 64, True), (200, [3], [1.0], 32, False),
                (4160, [8, 4, 3], [0.1, 0.4, 0.5], [32, 64, 64]), (96, [2], [1.0], 128, False)]


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 40])
@pytest.mark.parametrize("dtype, kind", KERNELS)
def test_grouped_gemv_matches_each_layer(rows, dtype, kind, monkeypatch):
    """One launch for several matrices of the same x gives each matrix's own product (and a clean workspace)."""
    use_gemv(kind, monkeypatch)
    k = 576
    layers, expected = [], []
    for i, (n, bits, props, group, *bias) in enumerate(GROUP_LAYERS):
        tensors, _ = random_exl2(k, n, bits, props, group, seed=50 + i, bias=bool(bias and bias[0]))
        cuda = on_gpu(tensors)
        layers.append(Exl2Linear(cuda, k, n, dtype=dtype))
    x = torch.randn(rows, k, device=CUDA).to(dtype)
    for layer in layers:
        weight = stored_weight(layer)
        ref = x.double() @ weight[:, : layer.out_features].double()
        expected.append(ref if layer.bias is None else ref + layer.bias[: layer.out_features].double())
    if rows in exl2_ops.GEMV_ROWS:  # the raw group kernel, four matrices, into poisoned outputs
        outs = [torch.full((rows, layer.out_features), float("nan"), dtype=dtype, device=CUDA) for layer in layers[:4]]
        exl2_ops.gemv([layer.kernel_plan() for layer in layers[:4]], x, outs)
        for out, ref in zip(outs, expected):
            assert torch.isfinite(out).all() and rel(out, ref) < TOLERANCE[dtype]
    ys = project_each(layers, x[None])
    for y, layer, ref in zip(ys, layers, expected):
        assert y.shape == (1, rows, layer.out_features) and y.dtype == dtype
        assert torch.isfinite(y).all() and rel(y[0], ref) < TOLERANCE[dtype]
    workspace, counters = workspace_of(exl2_ops._workspace)
    assert not workspace.any() and not counters.any(), "the GEMV must leave its workspace zeroed"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [2048, 1568])  # 4 splits of 512 rows; 3 and a short one
def test_group_launch_on_longer_splits_matches_each_layer(k, dtype, monkeypatch):
    """A one-row wide group launch on 512-row K splits (forced here: a wave of one block an SM, 512 the only longer
    split) gives each matrix's product into poisoned outputs, and leaves the workspace clean."""
    use_gemv("wide", monkeypatch)
    monkeypatch.setattr(exl2_ops, "GROUP_WAVE", True)
    monkeypatch.setattr(exl2_ops, "blocks_per_sm", lambda function, threads: 1)
    monkeypatch.setattr(exl2_ops, "GROUP_SPLIT_ROWS", (512,))
    layers = []
    for i, (n, bits, props, group, *bias) in enumerate(GROUP_LAYERS[:4]):
        tensors, _ = random_exl2(k, n, bits, props, group, seed=70 + i, bias=bool(bias and bias[0]))
        layers.append(Exl2Linear(on_gpu(tensors), k, n, dtype=dtype))
    plans = [layer.kernel_plan() for layer in layers]
    assert exl2_ops.wave_split_rows(plans, torch.cuda.get_device_properties(CUDA).multi_processor_count) == 512
    x = torch.randn(1, k, device=CUDA).to(dtype)
    outs = [torch.full((1, layer.out_features), float("nan"), dtype=dtype, device=CUDA) for layer in layers]
    exl2_ops.gemv(plans, x, outs)
    for out, layer in zip(outs, layers):
        ref = x.double() @ stored_weight(layer)[:, : layer.out_features].double()
        ref = ref if layer.bias is None else ref + layer.bias[: layer.out_features].double()
        assert torch.isfinite(out).all() and rel(out, ref) < TOLERANCE[dtype]
    workspace, counters = workspace_of(exl2_ops._workspace)
    assert not workspace.any() and not counters.any(), "the GEMV must leave its workspace zeroed"


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability(CUDA) != (9, 0),
                    reason="Hopper's 228 KB of shared memory an SM")
def test_wide_group_kernel_runs_seven_blocks_an_sm_on_hopper():
    """The group wave's sizing rests on the driver granting 7 of the one-row wide group kernel's blocks an SM (72
    registers, 20 KB of shared memory): the 8B's gate/up on 512-row splits (896 blocks) then run in one wave on 132 SMs."""
    for dtype, tag in ACTIVATION_TAGS.items():
        function = kernel(exl2_ops.SOURCE, exl2_ops.INSTANCE_SETS[dtype], f"exl2_gemv_group<{tag}, 1, 2>", CUDA)
        assert blocks_per_sm(function, exl2_ops.THREADS) == 7


FOLD_KINDS = [(torch.float16, "narrow"), (torch.float16, "wide"), (torch.float16, "stream"), (torch.bfloat16, "narrow"),
              (torch.bfloat16, "wide")]


@pytest.mark.parametrize("hidden", [576, 592, 4096])  # 592: a 16-row 2-bit tail (no streamed kernel)
@pytest.mark.parametrize("dtype, kind", FOLD_KINDS)
@pytest.mark.parametrize("unfinished", [False, True])  # the delta: a finished output, or o_proj-like sums
@pytest.mark.parametrize("folded", [True, False])  # a streamed GEMV folds the norm, or reads the norm kernel's output
def test_group_gemv_folds_the_pending_norm(hidden, dtype, kind, unfinished, folded, monkeypatch):
    """A one-row residual add + RMSNorm left pending and handed to a group GEMV (q/k/v-like) gives the products of
    add_rms_norm's output (up to the norm's sum order: an activation an ulp apart, rarely) and the whole new residual.
    Folded (the streamed kernel): without an add_rms_norm launch: exl2_finish_norm before the GEMV adds the delta
    (ending its product's sums where they were left unfinished) and sums the squares, and the GEMV forms the normed
    activations as it gathers them. Not folded (EXLQ_FOLD_STREAM=0, and the register kernel always): the norm kernel
    runs first, and ends unfinished sums itself (finish_add_rms_norm)."""
    use_gemv(kind, monkeypatch)
    monkeypatch.setattr(fused_ops, "NORM_FOLD", True)
    monkeypatch.setattr(exl2_ops, "FOLD_STREAM", folded)
    gen = torch.Generator().manual_seed(hidden)
    widths = [(hidden, [4], [1.0], 32), (256, [6, 4], [0.3, 0.7], 32), (4160, [3], [1.0], 32)]
    if hidden % 32:
        widths = [(n, [2], [1.0], 64) for n, *_ in widths]
    layers = [Exl2Linear(on_gpu(random_exl2(hidden, n, bits, props, group, seed=70 + i, bias=i == 0)[0]), hidden, n,
                         dtype=dtype) for i, (n, bits, props, group) in enumerate(widths)]
    residual = (8 * torch.randn(1, 1, hidden, generator=gen)).to(CUDA)
    if unfinished:  # an o_proj-like product of 1024 inputs, split along K, left as sums
        o_proj = Exl2Linear(on_gpu(random_exl2(1024, hidden, [4], [1.0], 32, seed=hidden, bias=True)[0]), 1024, hidden,
                            dtype=dtype)
        x = torch.randn(1, 1, 1024, generator=gen).to(CUDA, dtype)
        delta = o_proj.forward_unfinished(x)
        assert isinstance(delta, exl2_ops.PendingSums)
        finished = o_proj(x)
    else:
        delta = finished = torch.randn(1, 1, hidden, generator=gen).to(CUDA, dtype)
    weight = (1 + 0.2 * torch.randn(hidden, generator=gen)).to(CUDA, dtype)
    new_residual = torch.full_like(residual, float("nan"))
    pending = fused_ops.PendingNorm(residual, delta, weight, 1e-5, new_residual)
    assert fused_ops.PendingNorm.possible(residual, weight)
    got = project_each(layers, pending)
    if folded and kind == "stream" and hidden % 32 == 0:  # the streamed kernel takes whole 32-row blocks only
        assert pending._out is None and pending.fold is not None, "no add_rms_norm: the GEMV formed the norm itself"
    else:
        assert pending._out is not None and pending.fold is None, "the norm kernel ran before the GEMV"
    if unfinished:
        assert delta.ended and delta.take_sums() is None, "the product was ended once, by the norm's launch"
    expected_residual, normed = fused_ops.add_rms_norm(residual, finished, weight, 1e-5)
    if unfinished:  # two runs of a split product: their atomics' order may put a rare output an ulp apart
        assert torch.isfinite(new_residual).all() and rel(new_residual, expected_residual) < 1e-3
    else:
        assert torch.equal(new_residual, expected_residual)
    for g, e in zip(got, project_each(layers, normed)):
        assert g.shape == e.shape and torch.isfinite(g).all() and rel(g, e) < TOLERANCE[dtype] / 4
    for store in (exl2_ops._workspace, exl2_ops._unfinished_workspace):
        workspace, counters = workspace_of(store)
        assert not workspace.any() and not counters.any()


def test_one_row_on_the_multi_row_kernel_is_left_unfinished_as_on_the_register_kernel(monkeypatch):
    """EXLQ_STREAM_ROWS listing 1 sends one-row launches the one-row streamed kernel does not take (above MAX_BYTES)
    to exl2_stream_rows<1>: an o_proj-like product there is still left as sums for the next norm to end (one launch
    fewer), and that norm gives add_rms_norm's residual and output of the finished product."""
    use_gemv("stream-rows", monkeypatch)
    monkeypatch.setattr(exl2_stream_ops, "ROWS", exl2_stream_ops.ROW_COUNTS)
    monkeypatch.setattr(exl2_stream_ops, "MAX_BYTES", 0)
    monkeypatch.setattr(fused_ops, "NORM_FOLD", True)
    hidden, gen = 576, torch.Generator().manual_seed(9)
    o_proj = Exl2Linear(on_gpu(random_exl2(1024, hidden, [4], [1.0], 32, seed=9, bias=True)[0]), 1024, hidden,
                        dtype=torch.float16)
    x = torch.randn(1, 1, 1024, generator=gen).to(CUDA, torch.float16)
    plan = o_proj.kernel_plan()
    assert not exl2_stream_ops.applies([plan], 1, x.dtype, x.device)
    assert exl2_stream_ops.applies_rows([plan], 1, x.dtype, x.device)
    delta = o_proj.forward_unfinished(x)
    assert isinstance(delta, exl2_ops.PendingSums)
    finished = o_proj(x)
    assert rel(finished[0], x[0].double() @ stored_weight(o_proj)[:, :hidden].double() + o_proj.bias[:hidden].double()) \
        < TOLERANCE[torch.float16]
    residual = (8 * torch.randn(1, 1, hidden, generator=gen)).to(CUDA)  # fp32, as a layer's residual stream
    weight = (1 + 0.2 * torch.randn(hidden, generator=gen)).to(CUDA, torch.float16)
    new_residual = torch.full_like(residual, float("nan"))
    normed = fused_ops.PendingNorm(residual, delta, weight, 1e-5, new_residual).tensor()
    assert delta.ended and delta.take_sums() is None, "the product was ended once, by the norm's launch"
    expected_residual, expected = fused_ops.add_rms_norm(residual, finished, weight, 1e-5)
    assert torch.isfinite(new_residual).all() and rel(new_residual, expected_residual) < 1e-3
    assert rel(normed, expected) < 1e-3
    for store in (exl2_ops._workspace, exl2_ops._unfinished_workspace):
        workspace, _ = workspace_of(store)
        assert not workspace.any()


def tiny_decode(tmp_path, seed: int) -> tuple:
    """A tiny EXL2 Llama (exl2_and_reference_dirs) on the GPU, a 9-token prompt and 12 tokens to decode one a step."""
    _, exl2_dir, _ = exl2_and_reference_dirs(tmp_path)
    gen = torch.Generator().manual_seed(seed)
    ids, steps = torch.randint(0, 200, (1, 9), generator=gen), torch.randint(0, 200, (1, 12), generator=gen)
    return load_model(exl2_dir, device="cuda", dtype="fp16"), ids, steps


def synthetic_decode(layers: int, seed: int) -> tuple:
    """A synthetic smollm2-135m-shaped model (4.0 bpw, plain rounding) of `layers` layers on the GPU, a 9-token prompt
    and 10 tokens to decode one a step."""
    from exlq.quant.synthetic import SyntheticStore, synthetic_config
    from exlq.runtime.architectures.registry import model_class_for
    from exlq.runtime.config import config_from_dict

    raw = dict(synthetic_config("smollm2-135m"), num_hidden_layers=layers)
    model_class = model_class_for(raw)
    store = SyntheticStore(raw, 4.0, CUDA, group_size=128)
    model = model_class(config_from_dict(model_class.config_class, raw), store, dtype=torch.float16, device=CUDA).eval()
    gen = torch.Generator().manual_seed(seed)
    ids, steps = (torch.randint(0, 1000, (1, n), generator=gen).to(CUDA) for n in (9, 10))
    return model, ids, steps


def push_at_every_head_size(push: bool, monkeypatch) -> None:
    """The attention's clusters merge by pushing (attention_ops.PUSH_MERGE) at every head size, or by pulling."""
    from exlq.runtime.kernels import attention_ops

    monkeypatch.setattr(attention_ops, "PUSH_MERGE", push)
    monkeypatch.setattr(attention_ops, "PUSH_HEAD_DIMS", attention_ops.HEAD_DIMS)


def decode_steps(model, ids: torch.Tensor, steps: torch.Tensor, graphs: str, monkeypatch, record: list) -> torch.Tensor:
    """The logits of one-token decode steps `steps` after a prefill of `ids` into a fresh cache, eager (graphs "0") or
    with CUDA graphs ("1"); `record` (a test's recorder of launches) is emptied after the prefill."""
    monkeypatch.setenv("EXLQ_CUDA_GRAPHS", graphs)
    model.decode_graphs.clear()
    cache = model.new_cache(32)
    model(ids, cache)
    record.clear()
    out = [model(steps[:, i : i + 1], cache, max_output_len=None) for i in range(steps.shape[1])]
    return torch.cat(out, dim=1).float()


def decode_both_ways(model, ids: torch.Tensor, steps: torch.Tensor, monkeypatch, switch, record: list, check) -> None:
    """One-token decode steps (`steps`, after a prefill of `ids`) give the same logits with a setting on, eager and
    with CUDA graphs, as off, eager (up to the atomics' order: 2e-3): `switch(on)` sets it; `record` (a test's
    recorder of launches) is emptied after each prefill and `check(on, graphs)` runs after each pass's steps."""
    results = {}
    for on, graphs in [(False, "0"), (True, "0"), (True, "1")]:
        switch(on)
        results[on, graphs] = decode_steps(model, ids, steps, graphs, monkeypatch, record)
        check(on, graphs)
    assert torch.isfinite(results[False, "0"]).all()
    assert rel(results[True, "0"], results[False, "0"]) < 2e-3
    assert rel(results[True, "1"], results[False, "0"]) < 2e-3


@pytest.mark.parametrize("dtype, kind", [(torch.float16, "stream"), (torch.float16, "wide"), (torch.float16, "narrow"),
                                         (torch.bfloat16, "narrow")])
@pytest.mark.parametrize("bias", [False, True])  # Qwen2's q/k/v have biases
def test_rope_ends_the_qkv_sums_of_one_token(dtype, kind, bias, monkeypatch):
    """One token's q/k/v left as their group GEMV's sums (project_each, deferred) are ended by finish_rope_store, with
    no exl2_finish launch: its queries and the cache's new key and value rows are rope_store's of the finished products
    (two runs of a split product: rarely an ulp apart), the cache's other rows untouched, the workspace clean."""
    from exlq.runtime.rope import RotaryEmbedding

    use_gemv(kind, monkeypatch)
    k_in, dim, q_heads, kv_heads, length, position = 1024, 64, 8, 2, 32, 13
    layers = [Exl2Linear(on_gpu(random_exl2(k_in, n, [4, 3], [0.5, 0.5], 32, seed=80 + i, bias=bias)[0]), k_in, n,
                         dtype=dtype) for i, n in enumerate((q_heads * dim, kv_heads * dim, kv_heads * dim))]
    x = torch.randn(1, 1, k_in, generator=torch.Generator().manual_seed(8)).to(CUDA, dtype)
    where = torch.tensor([position], device=CUDA)
    cos, sin = RotaryEmbedding(dim, 10000.0, None, CUDA).cos_sin(where[None], dtype)
    caches = {run: [torch.full((1, kv_heads, length, dim), float("nan"), dtype=dtype, device=CUDA) for _ in "kv"]
              for run in ("finished", "sums")}
    expected = fused_ops.rope_store(*project_each(layers, x), cos, sin, *caches["finished"], where)
    finishes = []
    original = exl2_ops.finish_sums
    monkeypatch.setattr(exl2_ops, "finish_sums", lambda *args: (finishes.append(args), original(*args))[1])
    qkv = project_each(layers, x, deferred=True)
    assert all(isinstance(t, exl2_ops.PendingSums) and t.unfinished() for t in qkv), "every product split along K"
    got = fused_ops.rope_store(*qkv, cos, sin, *caches["sums"], where)
    assert finishes == [] and not any(t.unfinished() for t in qkv)
    assert torch.isfinite(got).all() and rel(got, expected) < 1e-3
    for cache, reference in zip(caches["sums"], caches["finished"]):
        row = cache[:, :, position]
        assert torch.isfinite(row).all() and rel(row, reference[:, :, position]) < 1e-3
        assert torch.isnan(cache[:, :, :position]).all() and torch.isnan(cache[:, :, position + 1 :]).all()
    for store in (exl2_ops._workspace, exl2_ops._unfinished_workspace):
        workspace, counters = workspace_of(store)
        assert not workspace.any() and not counters.any()


@pytest.mark.parametrize("dim, q_heads, kv_heads, dtype, kind, bias", [
    (64, 8, 2, torch.float16, "stream", False), (128, 7, 1, torch.float16, "narrow", True),
    (128, 4, 4, torch.bfloat16, "wide", False), (64, 14, 2, torch.float16, "stream", True)])
@pytest.mark.parametrize("span, position, window", [(32, 13, None), (256, 200, None), (1024, 900, 100),
                                                    (1024, 1023, None)])
@pytest.mark.parametrize("ranks, push", [("8", False), ("1", False), ("16", False), ("8", True), ("16", True)])
def test_attention_ends_rotates_and_stores_the_qkv_sums(dim, q_heads, kv_heads, dtype, kind, bias, span, position,
                                                        window, ranks, push, monkeypatch):  # fmt: skip
    """One token's q/k/v left as their group GEMV's sums go to rope_decode_attention as they are: one launch gives
    the attention that rope_store then decode_attention give for the finished products (two runs of a split product:
    rarely an ulp apart), writes the token's key and value rows as rope_store does, and reads no other row past the
    token (NaN there); every rank of a cluster (or the one block a head) reads the sums before rank 0 re-zeroes them,
    so the workspaces are clean, with no exl2_finish. A cluster merges by pulling the others' records or by pushing
    its pieces to their owners (PUSH_MERGE)."""
    from exlq.runtime.kernels import attention_ops
    from exlq.runtime.rope import RotaryEmbedding

    use_gemv(kind, monkeypatch)
    monkeypatch.setenv("EXLQ_ATTENTION_RANKS", ranks)
    push_at_every_head_size(push, monkeypatch)
    k_in = 1024
    layers = [Exl2Linear(on_gpu(random_exl2(k_in, n, [4, 3], [0.5, 0.5], 32, seed=70 + i, bias=bias)[0]), k_in, n,
                         dtype=dtype) for i, n in enumerate((q_heads * dim, kv_heads * dim, kv_heads * dim))]
    gen = torch.Generator().manual_seed(position + dim)
    x = torch.randn(1, 1, k_in, generator=gen).to(CUDA, dtype)
    where = torch.tensor([position], device=CUDA)
    cos, sin = RotaryEmbedding(dim, 10000.0, None, CUDA).cos_sin(where[None], dtype)
    earlier = [torch.randn(1, kv_heads, span + 64, dim, generator=gen).to(CUDA, dtype) for _ in "kv"]
    for buffer in earlier:
        buffer[:, :, position:] = float("nan")  # the token's row is written; those past it are never read
    caches = {run: [b.clone() for b in earlier] for run in ("two launches", "one")}
    queries = fused_ops.rope_store(*project_each(layers, x), cos, sin, *caches["two launches"], where)
    expected = attention_ops.decode_attention(queries, *(c[:, :, :span] for c in caches["two launches"]), where, window)
    finishes = []
    original = exl2_ops.finish_sums
    monkeypatch.setattr(exl2_ops, "finish_sums", lambda *args: (finishes.append(args), original(*args))[1])
    qkv = project_each(layers, x, deferred=True)
    assert all(isinstance(t, exl2_ops.PendingSums) and t.unfinished() for t in qkv), "every product split along K"
    on_device = where if span > 32 else position  # the graph's operand, or a launch argument
    got = attention_ops.rope_attention([t.take_sums() for t in qkv], cos, sin,
                                       *(c[:, :, :span] for c in caches["one"]), on_device, window, q_heads)
    assert finishes == [] and got.shape == expected.shape == (1, q_heads, 1, dim)
    assert torch.isfinite(got).all() and rel(got, expected) < 2e-3
    for cache, reference, before in zip(caches["one"], caches["two launches"], earlier):
        row = cache[:, :, position]
        assert torch.isfinite(row).all() and rel(row, reference[:, :, position]) < 1e-3
        assert torch.equal(cache[:, :, :position], before[:, :, :position])
        assert torch.isnan(cache[:, :, position + 1 :]).all()
    for store in (exl2_ops._workspace, exl2_ops._unfinished_workspace):
        workspace, counters = workspace_of(store)
        assert not workspace.any() and not counters.any()


def test_decode_with_attention_ending_the_qkv_sums_equals_two_launches(monkeypatch):
    """A synthetic 2-layer smollm2-shaped model (head size 64, 3 query heads a KV head) decoding one token a step
    (graphs and eager) gives the same logits with the attention launch ending, rotating and storing q/k/v's sums
    (EXLQ_ROPE_ATTENTION) as with finish_rope_store before the attention, and on sm_90 (q/k/v streamed, left as sums)
    takes them so in every layer of every eager step, with no finish_rope_store."""
    from exlq.runtime.kernels import attention_ops

    model, ids, steps = synthetic_decode(layers=2, seed=8)
    names = []
    for module in (attention_ops, fused_ops):
        original = module.kernel
        monkeypatch.setattr(module, "kernel", lambda source, instances, name, device, original=original: (
            names.append(name.partition("<")[0]), original(source, instances, name, device))[1])

    def check(on: bool, graphs: str) -> None:
        fused = names.count("rope_decode_attention")
        if not on:
            assert fused == 0
        elif graphs == "0" and hopper_or_newer(CUDA):
            assert fused == steps.shape[1] * 2 and "finish_rope_store" not in names
        for workspace_store in (exl2_ops._workspace, exl2_ops._unfinished_workspace):
            assert not workspace_of(workspace_store)[0].any()

    decode_both_ways(model, ids, steps, monkeypatch,
                     lambda on: monkeypatch.setattr(attention_ops, "ROPE_ATTENTION", on), names, check)


def test_decode_with_the_push_merge_equals_the_pull_merge(monkeypatch):
    """The synthetic smollm2-shaped model decoding one token a step (graphs and eager, the attention ending q/k/v's
    sums) gives the same logits with the cluster's ranks pushing their pieces to each output's owner (PUSH_MERGE) as
    with each owner pulling them, and leaves the workspaces clean."""
    from exlq.runtime.kernels import attention_ops

    if not hopper_or_newer(CUDA):
        pytest.skip("clusters (more than one block a head) need sm_90")
    model, ids, steps = synthetic_decode(layers=2, seed=9)

    def check(on: bool, graphs: str) -> None:
        for workspace_store in (exl2_ops._workspace, exl2_ops._unfinished_workspace):
            assert not workspace_of(workspace_store)[0].any()

    decode_both_ways(model, ids, steps, monkeypatch, lambda on: push_at_every_head_size(on, monkeypatch), [], check)


def test_decode_with_rope_ending_the_qkv_sums_equals_exl2_finish(tmp_path, monkeypatch):
    """A tiny EXL2 Llama decoding one token a step (graphs and eager) gives the same logits with RoPE ending q/k/v's
    sums as with exl2_finish before it (EXLQ_ROPE_FINISH=0), and on sm_90 (the streamed GEMV leaves every q/k/v as
    sums) ends them so in every layer of every eager step."""
    model, ids, steps = tiny_decode(tmp_path, seed=6)
    names = []
    original = fused_ops.kernel
    monkeypatch.setattr(fused_ops, "kernel", lambda source, instances, name, device: (
        names.append(name), original(source, instances, name, device))[1])

    def check(ends: bool, graphs: str) -> None:
        ended = names.count("finish_rope_store<fp16_t>")
        if not ends:
            assert ended == 0
        elif graphs == "0" and hopper_or_newer(CUDA):
            assert ended == steps.shape[1] * len(model.model.layers)

    decode_both_ways(model, ids, steps, monkeypatch, lambda on: monkeypatch.setattr(fused_ops, "ROPE_FINISH", on),
                     names, check)


@pytest.mark.parametrize("dtype, kind", [(torch.float16, "wide"), (torch.float16, "narrow"), (torch.bfloat16, "wide"),
                                         (torch.float16, "stream")])
@pytest.mark.parametrize("ender", ["none", "finish", "norm", "fold"])
def test_down_gathers_its_input_from_the_gate_up_sums(dtype, kind, ender, monkeypatch):
    """One row's gate/up left as their group GEMV's sums (project_each, deferred) go to down_proj's register GEMV (or,
    with EXLQ_GATED_SUMS_STREAM, the streamed one) as they are (the SUMS instances): no exl2_finish for them, and the
    same product as from the finished gate and up (two runs of split products: an ulp apart at most, rarely).
    Whatever ends down_proj's product re-zeroes gate/up's sums too: exl2_finish (`none`: a finished product;
    `finish`: an unfinished one read later), finish_add_rms_norm (`norm`) or exl2_finish_norm (`fold`), leaving
    every workspace clean."""
    use_gemv(kind, monkeypatch)
    monkeypatch.setattr(exl2_ops, "GATED_SUMS_STREAM", True)
    gen = torch.Generator().manual_seed(11)
    hidden, inner = 1024, 2048
    gate_proj, up_proj = (Exl2Linear(on_gpu(random_exl2(hidden, inner, [4, 3], [0.5, 0.5], 32, seed=90 + i)[0]), hidden,
                                     inner, dtype=dtype) for i in range(2))
    down_proj = Exl2Linear(on_gpu(random_exl2(inner, hidden, [5, 4], [0.4, 0.6], 32, seed=92, bias=True)[0]), inner,
                           hidden, dtype=dtype)
    x = torch.randn(1, 1, hidden, generator=gen).to(CUDA, dtype)
    expected = project_gated(down_proj, *project_each((gate_proj, up_proj), x))
    assert isinstance(expected, torch.Tensor)
    finishes = []
    original = exl2_ops.finish_sums
    monkeypatch.setattr(exl2_ops, "finish_sums", lambda *args: (finishes.append(args), original(*args))[1])
    gate, up = project_each((gate_proj, up_proj), x, deferred=True)
    assert all(isinstance(t, exl2_ops.PendingSums) and t.unfinished() for t in (gate, up))
    assert exl2_ops.gathers_sums(down_proj.kernel_plan(), gate, up)
    got = project_gated(down_proj, gate, up, unfinished=ender != "none")
    assert not gate.unfinished() and not up.unfinished()
    residual = (8 * torch.randn(1, 1, hidden, generator=gen)).to(CUDA)
    weight = (1 + 0.2 * torch.randn(hidden, generator=gen)).to(CUDA, dtype)
    new_residual = torch.full_like(residual, float("nan"))
    if ender in ("none", "finish"):
        got = fused_ops.as_tensor(got)
        assert torch.isfinite(got).all() and rel(got, expected) < 1e-3
        (*_, extra), = finishes
        assert extra is gate.span, "exl2_finish re-zeroed the gate/up sums"
    else:
        assert isinstance(got, exl2_ops.PendingSums) and got.extra is gate.span
        pending = fused_ops.PendingNorm(residual, got, weight, 1e-5, new_residual)
        expected_residual, expected_normed = fused_ops.add_rms_norm(residual, expected, weight, 1e-5)
        if ender == "norm":
            assert rel(pending.tensor(), expected_normed) < 1e-3
        else:
            exl2_ops.norm_fold(pending)
        assert finishes == [] and torch.isfinite(new_residual).all() and rel(new_residual, expected_residual) < 1e-3
    for store in (exl2_ops._workspace, exl2_ops._unfinished_workspace):
        workspace, counters = workspace_of(store)
        assert not workspace.any() and not counters.any()


@pytest.mark.parametrize("kind", ["wide", "stream"])
def test_decode_with_down_on_the_gate_up_sums_equals_exl2_finish(kind, monkeypatch):
    """A synthetic 2-layer smollm2-shaped model on the register GEMVs (or the streamed ones, with
    EXLQ_GATED_SUMS_STREAM) decoding one token a step (graphs and eager) gives the same logits with down_proj gathering
    from gate/up's sums as with exl2_finish before it (EXLQ_GATED_SUMS=0), and takes the sums in every layer of every
    eager step."""
    use_gemv(kind, monkeypatch)
    monkeypatch.setattr(exl2_ops, "GATED_SUMS_STREAM", True)
    model, ids, steps = synthetic_decode(layers=2, seed=7)
    taken = []
    original = exl2_ops.gathers_sums
    monkeypatch.setattr(exl2_ops, "gathers_sums", lambda *args: (taken.append(original(*args)), taken[-1])[1])

    def check(gated: bool, graphs: str) -> None:
        if graphs == "0":
            assert taken == [gated] * (steps.shape[1] * 2)
        for workspace_store in (exl2_ops._workspace, exl2_ops._unfinished_workspace):
            assert not workspace_of(workspace_store)[0].any()

    decode_both_ways(model, ids, steps, monkeypatch, lambda on: monkeypatch.setattr(exl2_ops, "GATED_SUMS", on),
                     taken, check)


@pytest.mark.parametrize("kind", ["wide", "stream"])
@pytest.mark.parametrize("switch", ["ALIGN_GATED", "ALIGN_NORMS"])
def test_decode_with_aligned_orders_equals_the_stored_order(kind, switch, monkeypatch):
    """A synthetic 2-layer smollm2-shaped model built with gate/up's outputs in down_proj's stored order
    (linear.align_gated: down_proj's GEMV gathers consecutive sums), or with each norm's output in its readers' stored
    order (linear.align_norm: the norm kernels gather their output through the order, a folded norm reads the copy of
    residual + delta exl2_finish_norm lays out in it), decodes one token a step (eager and graphs) to the same logits
    as the same model built without (EXLQ_ALIGN_GATED=0 / EXLQ_ALIGN_NORMS=0), down_proj gathering from gate/up's
    sums (ALIGN_GATED) and the streamed GEMVs folding the ordered norms (ALIGN_NORMS) in every layer of every eager
    step."""
    from exlq.runtime import linear

    use_gemv(kind, monkeypatch)
    monkeypatch.setattr(exl2_ops, "GATED_SUMS_STREAM", True)
    taken = []
    if switch == "ALIGN_GATED":
        original = exl2_ops.gathers_sums
        monkeypatch.setattr(exl2_ops, "gathers_sums", lambda *args: (taken.append(original(*args)), taken[-1])[1])
        per_step = [True] * 2  # 2 layers' down_proj
    else:
        original = exl2_ops.norm_fold
        monkeypatch.setattr(exl2_ops, "norm_fold", lambda p: (taken.append(p.ordered is not None), original(p))[1])
        per_step = [True] * 3 if kind == "stream" else []  # folds: every in-layer norm but the first layer's input one
    results = {}
    for align in (False, True):
        monkeypatch.setattr(linear, switch, "auto" if align else "0")
        model, ids, steps = synthetic_decode(layers=2, seed=7)
        for layer in model.model.layers:
            if switch == "ALIGN_GATED":
                assert (layer.mlp.down_proj.stored_input_order() is None) == align
            else:
                readers = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.up_proj)
                assert all((reader.stored_input_order() is None) == align for reader in readers)
                assert (layer.input_layernorm.output_order is not None) == align
        for graphs in "01":
            results[align, graphs] = decode_steps(model, ids, steps, graphs, monkeypatch, taken)
            if graphs == "0":
                assert taken == [align or switch == "ALIGN_GATED"] * len(per_step) * steps.shape[1]
    assert torch.isfinite(results[False, "0"]).all()
    for key in ((False, "1"), (True, "0"), (True, "1")):
        assert rel(results[key], results[False, "0"]) < 2e-3


def test_decode_with_the_norm_folded_equals_the_norm_kernel(tmp_path, monkeypatch):
    """A tiny EXL2 Llama decoding one token a step (graphs and eager) gives the same logits with its norms folded into
    the q/k/v and gate/up GEMVs as with the norm kernel before them, and folds every in-layer norm of those steps."""
    model, ids, steps = tiny_decode(tmp_path, seed=5)
    folds = []
    original = exl2_ops.norm_fold
    monkeypatch.setattr(exl2_ops, "norm_fold", lambda p: (folds.append(p.fold is None), original(p))[1])

    def check(fold: bool, graphs: str) -> None:
        if fold and graphs == "0":  # eager: every step launches; 2 layers, q/k/v and gate/up, the first norm not folded
            # (only the streamed GEMV folds: below sm_90 none is)
            assert sum(folds) == (steps.shape[1] * (2 * 2 - 1) if hopper_or_newer(CUDA) else 0)

    decode_both_ways(model, ids, steps, monkeypatch, lambda on: monkeypatch.setattr(fused_ops, "NORM_FOLD", on), folds,
                     check)


@pytest.mark.parametrize("bits", [[8], [4], [2], [8, 6, 4, 2]])
@pytest.mark.parametrize("kind", ["mma", "narrow", "wide", "stream", "stream-rows"])
def test_gemv_survives_large_activations(bits, kind, monkeypatch):
    """The fp16 path sums pairs in half precision (and the tensor-core one removes offsets of 1024 x): activations
    in the thousands must not overflow to inf nor lose the product."""
    use_gemv(kind, monkeypatch)
    props = [1.0 / len(bits)] * len(bits)
    tensors, layout = random_exl2(512, 256, bits, props, 32, seed=len(bits))
    cuda = on_gpu(tensors)
    layer = Exl2Linear(cuda, 512, 256, dtype=torch.float16)
    weight = stored_weight(cuda)
    rows = {"mma": 4, "stream": 1, "stream-rows": 8}.get(kind, 3)  # the tensor-core kernels' launches: 4 or 8 rows
    x = torch.randn(rows, 512, device=CUDA)
    x[:, :8] *= 3000 / x[:, :8].abs().max()  # a few channels in the thousands, as real down_proj inputs have
    x = x * min(1.0, 30000 / (x.double() @ weight[:, :256].double()).abs().max().item())  # outputs fit fp16
    x = x.half()
    assert torch.isfinite(x).all() and x.abs().max() > 100
    y = layer(x)
    assert torch.isfinite(y).all()
    assert rel(y, x.double() @ weight[:, :256].double()) < TOLERANCE[torch.float16]


def test_gemv_reaches_torch_path_on_repeated_calls():
    """Every one of repeated calls gives the torch path's product, and the split-K reduction is deterministic enough
    that they agree to fp16 rounding."""
    tensors, layout = random_exl2(4096, 4096, [4], [1.0], 128, seed=1)
    cuda = on_gpu(tensors)
    layer = Exl2Linear(cuda, 4096, 4096, dtype=torch.float16)
    x = torch.randn(1, 4096, device=CUDA, dtype=torch.float16)
    expected = x.double() @ stored_weight(cuda)[:, :4096].double()
    first = layer(x)
    assert torch.isfinite(first).all() and rel(first, expected) < TOLERANCE[torch.float16]
    for _ in range(5):
        assert rel(layer(x), first) < 1e-3


@pytest.mark.parametrize("sweeps", [0, 2])
@pytest.mark.parametrize("k, n", [(576, 200), (592, 96), (1536, 130)])  # 592: a 16-row tail; n: partial blocks
def test_gptq_kernels_equal_the_torch_loops(k, n, sweeps, monkeypatch):
    """cuda/gptq.cu runs GPTQ's column loop and coordinate descent's row loop a block a launch, with the torch path's
    roundings: codes, scale codes and q_scale_max must be the torch loops', bit for bit (several options at once)."""
    from exlq.quant.gptq import QuantSpec, quantize_gptq_many

    gen = torch.Generator().manual_seed(k + n)
    w = (torch.randn(n, k, generator=gen) * torch.rand(k, generator=gen) * 2).to(CUDA)
    x = torch.randn(3 * k, k, generator=gen) @ (torch.eye(k) + 0.1 * torch.randn(k, k, generator=gen))
    h = (x.T @ x / x.shape[0]).to(CUDA)
    specs = [QuantSpec.uniform(4, 128), QuantSpec((8, 4, 3), (0.1, 0.4, 0.5), (32, 64, 64)), QuantSpec.uniform(2, 32),
             QuantSpec((6, 5), (0.5, 0.5), (32, 128))]
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("EXLQ_KERNELS", flag)
        results[flag] = quantize_gptq_many(w, h, specs, refine_sweeps=sweeps)
    for kernel_made, torch_made in zip(results["1"], results["0"]):
        assert torch.equal(kernel_made.codes, torch_made.codes)
        assert torch.equal(kernel_made.scale_codes, torch_made.scale_codes)
        assert torch.equal(kernel_made.q_scale_max, torch_made.q_scale_max)


@pytest.mark.parametrize("graph", [False, True])
def test_programmatic_dependent_launch_equals_plain_launches(monkeypatch, graph):
    """With PDL (default on sm_90+) each GEMV/norm/SiLU kernel starts while the previous one ends and loads its own
    weights before it waits: a chain in which every kernel reads the one before's output must compute what plain
    launches compute (eagerly and replayed from a CUDA graph, where the waits become programmatic edges)."""
    if not hopper_or_newer(CUDA):
        pytest.skip("programmatic dependent launch needs sm_90 or newer")
    use_gemv("wide", monkeypatch)
    layers = []
    for i, (k, n) in enumerate([(4096, 4096), (4096, 14336), (14336, 4096)]):
        tensors, _ = random_exl2(k, n, [4], [1.0], 32, seed=90 + i)
        cuda = on_gpu(tensors)
        layers.append(Exl2Linear(cuda, k, n, dtype=torch.float16))
    norm_weight = torch.rand(4096, device=CUDA, dtype=torch.float16) + 0.5
    x = torch.randn(1, 4096, device=CUDA, dtype=torch.float16)

    def chain():
        h, residual = x, torch.zeros(1, 4096, device=CUDA, dtype=torch.float32)
        for _ in range(4):
            residual, normed = fused_ops.add_rms_norm(residual, layers[0](h), norm_weight, 1e-5)
            up = layers[1](normed)
            h = layers[2](fused_ops.silu_mul(up, up))
            h = (h.float() / h.float().norm().clamp(min=1e-3)).half()  # keep the chain's values in range
        return h

    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("EXLQ_PDL", flag)
        if graph:
            chain()  # the first run compiles and fills the workspace caches
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                out = chain()
            captured.replay()
            results[flag] = [out.clone()]
            captured.replay()
            results[flag].append(out.clone())
        else:
            results[flag] = [chain(), chain()]
        if flag == "1":  # a driver that refused a programmatic launch would compare plain launches with plain ones
            assert pdl_enabled(torch.cuda.current_device()), "the programmatic launches ran"
    for got in results["1"] + results["0"][1:]:  # split-K sums land in any order: fp16 roundings may differ
        assert torch.isfinite(got).all() and rel(got, results["0"][0]) < TOLERANCE[torch.float16]
    workspace, counters = workspace_of(exl2_ops._workspace)
    assert not workspace.any() and not counters.any(), "the GEMV must leave its workspace zeroed"


@pytest.mark.parametrize("hidden", [64, 576, 1000, 4096, 12000, 16384])  # 16384: 16 values a thread
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_add_rms_norm_and_silu_match_torch(hidden, dtype, monkeypatch):
    gen = torch.Generator(device=CUDA).manual_seed(hidden)
    residual = torch.randn(3, 5, hidden, device=CUDA, generator=gen) * 4
    delta = torch.randn(3, 5, hidden, device=CUDA, generator=gen).to(dtype)
    norm = RMSNorm(torch.randn(hidden, device=CUDA, generator=gen).to(dtype), 1e-5)
    new_residual, normed = fused_ops.add_rms_norm(residual, delta, norm.weight, norm.eps)
    monkeypatch.setenv("EXLQ_KERNELS", "0")
    expected_residual = residual + delta.float()
    torch.testing.assert_close(new_residual, expected_residual, rtol=0, atol=0)
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    assert rel(normed, norm(expected_residual)) < tol
    assert rel(fused_ops.add_rms_norm(residual, None, norm.weight, norm.eps)[1], norm(residual)) < tol
    gate, up = delta, torch.randn(3, 5, hidden, device=CUDA, generator=gen).to(dtype)
    assert rel(fused_ops.silu_mul(gate, up), torch.nn.functional.silu(gate) * up) < tol


@pytest.mark.parametrize("hidden", [64, 1000, 4096, 12000, 16384])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_finish_add_rms_norm_ends_the_sums_as_exl2_finish_would(hidden, dtype, with_bias):
    """finish_add_rms_norm (a one-row product's unfinished sums as the delta) gives add_rms_norm's outputs of the
    delta exl2_finish would have written, T(sums + bias), bit for bit, and leaves the sums zeroed, padding included."""
    gen = torch.Generator(device=CUDA).manual_seed(hidden + with_bias)
    n_pad = -(-hidden // 32) * 32 + 32
    residual = torch.randn(1, 1, hidden, device=CUDA, generator=gen) * 4
    sums = torch.randn(n_pad, device=CUDA, generator=gen) * 3
    bias = torch.randn(n_pad, device=CUDA, generator=gen) if with_bias else None
    weight = torch.randn(hidden, device=CUDA, generator=gen).to(dtype)
    delta = (sums[:hidden] + (bias[:hidden] if with_bias else 0)).to(dtype).view(1, 1, hidden)
    expected_residual, expected = fused_ops.add_rms_norm(residual, delta, weight, 1e-5)
    new_residual = torch.full_like(residual, float("nan"))
    got_residual, got = fused_ops.add_rms_norm(residual, None, weight, 1e-5, new_residual,
                                               fused_ops.UnfinishedSums(sums, bias))
    assert got_residual is new_residual and torch.equal(new_residual, expected_residual)
    assert torch.equal(got, expected)
    assert not sums.any(), "the sums are re-zeroed for the next product"


@pytest.mark.parametrize("hidden", [64, 1000, 4096, 16384])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ordered_norms_give_their_output_moved(hidden, dtype, monkeypatch):
    """A norm with an output order (RMSNorm.put_output_in_order: output i is channel order[i]) gives the unordered
    output's channels moved, bit for bit, and the residual in its own order: add_rms_norm (15 rows, with a delta and
    without), finish_add_rms_norm (one row's unfinished sums) and the torch path; exl2_finish_norm (a fold's launch)
    writes residual + delta in the order too, for the fold to read."""
    gen = torch.Generator(device=CUDA).manual_seed(hidden)
    residual = torch.randn(3, 5, hidden, device=CUDA, generator=gen) * 4
    delta = torch.randn(3, 5, hidden, device=CUDA, generator=gen).to(dtype)
    norm = RMSNorm(torch.randn(hidden, device=CUDA, generator=gen).to(dtype), 1e-5)
    plain_residual, plain = fused_ops.add_rms_norm(residual, delta, norm.weight, norm.eps)
    plain_alone = norm(residual)
    order = torch.randperm(hidden, device=CUDA, generator=gen)
    norm.put_output_in_order(order)
    got_residual, got = fused_ops.add_rms_norm(residual, delta, norm.weight, norm.eps, order=norm.output_order)
    assert torch.equal(got_residual, plain_residual) and torch.equal(got, plain[..., order])
    assert torch.equal(norm(residual), plain_alone[..., order])
    n_pad = -(-hidden // 32) * 32 + 32
    sums = torch.randn(n_pad, device=CUDA, generator=gen) * 3
    one, one_delta = residual[:1, :1], sums[:hidden].to(dtype).view(1, 1, hidden)
    expected = fused_ops.add_rms_norm(one, one_delta, norm.weight, norm.eps)[1]
    got = fused_ops.add_rms_norm(one, None, norm.weight, norm.eps, torch.empty_like(one),
                                 fused_ops.UnfinishedSums(sums, None), norm.output_order)[1]
    assert torch.equal(got, expected[..., order])
    ordered = fused_ops.OutputOrder(norm.output_order, norm.output_slot, norm.output_weight)
    pending = fused_ops.PendingNorm(one.contiguous(), one_delta, norm.weight, norm.eps, torch.empty_like(one), ordered)
    fold = exl2_ops.norm_fold(pending)
    stored = pending.fold[2]
    assert torch.equal(pending.new_residual, one + one_delta.float())
    assert torch.equal(stored.view(-1), pending.new_residual.view(-1)[order])
    assert (fold.residual, fold.weight) == (stored.data_ptr(), norm.output_weight.data_ptr())
    monkeypatch.setenv("EXLQ_KERNELS", "0")
    unordered = RMSNorm(norm.weight, norm.eps)
    assert torch.equal(norm(residual), unordered(residual)[..., order])


def argmax_cases(rows: int, vocab: int, dtype, gen: torch.Generator) -> torch.Tensor:
    """Random logits with, row by row in turn: the maximum at two indices (the first must win), a row of zeros, zeros
    of both signs (equal: index 0), two NaNs (the first wins: NaN counts as largest), a row of -inf, plain random."""
    logits = (torch.randn(rows, vocab, device=CUDA, generator=gen) * 4).to(dtype)
    for r in range(rows):
        a, b = sorted(torch.randperm(vocab, device=CUDA, generator=gen)[:2].tolist())
        case = r % 6
        if case == 0:
            logits[r, a] = logits[r, b] = logits[r].float().max() + 1
        elif case == 1:
            logits[r] = 0
        elif case == 2:
            logits[r] = torch.where(torch.rand(vocab, device=CUDA, generator=gen) < 0.5, -0.0, 0.0).to(dtype)
        elif case == 3:
            logits[r, a] = logits[r, b] = float("nan")
        elif case == 4:
            logits[r] = float("-inf")
    return logits


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, vocab", [(1, 128256), (1, 151936), (6, 49152), (32, 32000), (7, 8), (2, 1000)])
def test_argmax_kernel_matches_torch(rows, vocab, dtype):
    from exlq.runtime.kernels import sampling_ops

    gen = torch.Generator(device=CUDA).manual_seed(rows * vocab)
    logits = argmax_cases(rows, vocab, dtype, gen)
    assert sampling_ops.applies(logits)
    assert torch.equal(sampling_ops.argmax_rows(logits), logits.argmax(dim=-1))
    steps = torch.randn(rows, 3, vocab, device=CUDA, generator=gen).to(dtype)  # rows 3·vocab apart, as [:, -1] gives
    steps[:, -1] = logits
    assert sampling_ops.applies(steps[:, -1])
    assert torch.equal(sampling_ops.argmax_rows(steps[:, -1]), logits.argmax(dim=-1))


# (temperature, top-k, top-p, min-p): exlq infer's defaults, top-p alone (a floor from the mass bound), min-p alone,
# neither, a tight top-p, a hot temperature (logits close together: many tokens in the boundary bin); then with top-k:
# llama.cpp's defaults, top-k alone, a small k under top-p, a large k (its cut inside a crowded bin) hot, a k past
# the smaller vocabularies (off there) with min-p.
SAMPLE_SETTINGS = [(0.8, 0, 0.95, 0.05), (1.0, 0, 0.9, 0.0), (0.7, 0, 1.0, 0.1), (1.3, 0, 1.0, 0.0), (0.5, 0, 0.5, 0.0),
                   (8.0, 0, 0.8, 0.0), (0.8, 40, 0.95, 0.05), (1.0, 40, 1.0, 0.0), (0.7, 5, 0.9, 0.0),
                   (8.0, 600, 0.8, 0.0), (1.0, 3000, 1.0, 0.1)]


def sample_reference(logits: torch.Tensor, race: torch.Tensor, settings: SamplerSettings) -> tuple[torch.Tensor, ...]:
    """The torch path's token for `race`, and its filtered probabilities."""
    from exlq.runtime.sampler import Sampler

    probs = Sampler(settings)._filtered_probs(logits.float())
    return (probs / race.clamp_min(1e-30)).argmax(dim=-1), probs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, vocab, scale", [(1, 151936, 3.0), (3, 49152, 2.0), (2, 4096, 0.3), (1, 1000, 5.0)])
@pytest.mark.parametrize("temperature, top_k, top_p, min_p", SAMPLE_SETTINGS)
def test_sample_kernel_draws_the_torch_token(rows, vocab, scale, dtype, temperature, top_k, top_p, min_p):
    """The same race gives the torch path's token, draw after draw (a different one only at a float near-tie, and
    never a token the torch path dropped)."""
    from exlq.runtime.kernels import sampling_ops

    settings = SamplerSettings(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    gen = torch.Generator(device=CUDA).manual_seed(vocab + rows)
    logits = (torch.randn(rows, vocab, device=CUDA, generator=gen) * scale).to(dtype)
    assert sampling_ops.applies(logits)
    different = 0
    for _ in range(16):
        race = torch.empty(rows, vocab, device=CUDA).exponential_(generator=gen)
        expected, probs = sample_reference(logits, race, settings)
        got = sampling_ops.sample_rows(logits, temperature, top_p, min_p, top_k=top_k, race=race)
        # Never below the torch path's cut (by value: which of equal 16-bit logits at the cut stay is the sort's pick).
        lowest_kept = torch.where(probs > 0, logits.float(), torch.inf).amin(dim=-1)
        assert bool((logits.float().gather(1, got[:, None])[:, 0] >= lowest_kept).all()), "drew a dropped token"
        different += int((got != expected).sum())
    assert different <= max(1, rows * 16 // 50), f"{different} of {rows * 16} draws differ"


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", SAMPLE_SETTINGS)
def test_sample_kernel_keeps_exactly_the_torch_set(temperature, top_k, top_p, min_p):
    """At the cut: a race that favours one token picks it if the torch path keeps it, else another (the top token,
    the last two kept and the first two dropped of the sorted order, and the same around the k-th). float32 logits:
    no equal values at the cut."""
    from exlq.runtime.kernels import sampling_ops

    settings = SamplerSettings(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    gen = torch.Generator(device=CUDA).manual_seed(17)
    vocab = 32000
    logits = torch.randn(1, vocab, device=CUDA, generator=gen) * 2.5
    _, probs = sample_reference(logits, torch.ones(1, vocab, device=CUDA), settings)
    order = torch.argsort(logits[0].float(), descending=True)
    kept = int((probs[0] > 0).sum())
    around_k = {top_k - 2, top_k - 1, top_k, top_k + 1} if top_k else set()
    for position in sorted(({0, kept - 2, kept - 1, kept, kept + 1} | around_k) & set(range(vocab))):
        token = int(order[position])
        race = torch.empty(1, vocab, device=CUDA).exponential_(generator=gen)
        race[0, token] = 1e-30  # p / E: far above every other kept token's
        got = int(sampling_ops.sample_rows(logits, temperature, top_p, min_p, top_k=top_k, race=race)[0])
        assert (got == token) == (probs[0, token] > 0).item(), (position, kept, token, got)


def penalty_history(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """History rows that matter to a penalty: the row's 24 largest logits' ids (some twice), random ids, -1 padding
    and ids past the vocabulary (ignored), shuffled."""
    rows, vocab = logits.shape
    top = torch.argsort(logits.float(), dim=-1, descending=True)[:, :24]
    noise = torch.randint(0, vocab, (rows, 16), device=CUDA, generator=gen)
    ignored = torch.tensor([[-1, vocab, vocab + 5, -7]], device=CUDA).expand(rows, 4)
    history = torch.cat([top, top[:, :6], noise, ignored], dim=1)
    return history.gather(1, torch.argsort(torch.rand(history.shape, device=CUDA, generator=gen), dim=1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [151936, 1000])
@pytest.mark.parametrize("penalty, repetition_range", [(1.3, -1), (1.3, 12), (0.7, -1)])
def test_sample_kernels_apply_the_repetition_penalty(dtype, vocab, penalty, repetition_range):
    """With a penalty: the argmax kernel gives the penalized logits' argmax, and the sampling kernels the torch path's
    token for the same race (the penalty in the kernels, from a sliced history as the generators pass it)."""
    from exlq.runtime.kernels import sampling_ops
    from exlq.runtime.sampler import apply_repetition_penalty

    gen = torch.Generator(device=CUDA).manual_seed(vocab)
    rows = 3
    logits = (torch.randn(rows, vocab, device=CUDA, generator=gen) * 2).to(dtype)
    logits[0, :8] = 20.0  # a top token that the penalty moves, whichever sign the others have
    logits[1] -= 30.0  # all negative: the penalty multiplies
    buffer = torch.full((rows, 100), -1, dtype=torch.long, device=CUDA)
    history = penalty_history(logits, gen)
    buffer[:, : history.shape[1]] = history
    window = buffer[:, : history.shape[1]]  # a slice of a longer buffer, as Generator passes it
    given = sampling_ops.Penalty(window, penalty, repetition_range)
    penalized = apply_repetition_penalty(logits.float(), window, penalty, repetition_range)
    assert torch.equal(sampling_ops.argmax_rows(logits, given), penalized.argmax(dim=-1))
    settings = SamplerSettings(temperature=0.9, top_p=0.9, min_p=0.02)
    different = 0
    for _ in range(8):
        race = torch.empty(rows, vocab, device=CUDA).exponential_(generator=gen)
        expected, _ = sample_reference(penalized, race, settings)
        got = sampling_ops.sample_rows(logits, 0.9, 0.9, 0.02, race=race, penalty=given)
        different += int((got != expected).sum())
    assert different <= 1


def test_sampler_kernel_draws_follow_the_distribution():
    """Sampler.sample on the GPU (the kernels, their race hashed from seed and step): a seed repeats its tokens,
    another seed gives others, and the draws' frequencies fit the torch path's distribution (chi-square), with and
    without a repetition penalty and top-k (7: padded to 8 for the kernels; 16), in every row of a batch."""
    from exlq.runtime.kernels import sampling_ops
    from exlq.runtime.sampler import Sampler

    gen = torch.Generator(device=CUDA).manual_seed(3)
    rows, vocab, draws = 64, 48, 200
    logits = (torch.randn(1, vocab, device=CUDA, generator=gen) * 1.5).half().expand(rows, vocab).contiguous()
    history = torch.randint(0, vocab, (rows, 6), device=CUDA, generator=gen)
    history[:] = history[0]
    for penalty, top_k in ((1.0, 0), (1.3, 0), (1.0, 7), (1.2, 16)):
        settings = SamplerSettings(temperature=0.9, top_k=top_k, top_p=0.9, min_p=0.02, repetition_penalty=penalty,
                                   seed=11)
        sampler = Sampler(settings)
        assert sampling_ops.applies(logits)
        tokens = torch.stack([sampler.sample(logits, history) for _ in range(draws)])
        again = Sampler(settings)
        assert torch.equal(torch.stack([again.sample(logits, history) for _ in range(draws)]), tokens)
        other = Sampler(SamplerSettings(**{**settings.__dict__, "seed": 12}))
        assert not torch.equal(torch.stack([other.sample(logits, history) for _ in range(draws)]), tokens)
        probs = Sampler(settings).probabilities(logits[:1], history[:1])[0].double()
        counts = torch.bincount(tokens.flatten(), minlength=vocab).double()
        assert counts[probs == 0].sum() == 0, "a dropped token was drawn"
        expected = probs * tokens.numel()
        kept = probs > 0
        chi2 = float((((counts - expected) ** 2)[kept] / expected[kept]).sum())
        dof = int(kept.sum()) - 1
        assert chi2 < dof + 5 * (2 * dof) ** 0.5 + 10, (chi2, dof)  # ~5 sigma above the mean


# (head size, query heads, KV heads): Llama-3-8B, Qwen2.5-0.5B (7 a group), smollm2 (3), plain multi-head, 8 a group.
ATTENTION_HEADS = [(128, 32, 8), (64, 14, 2), (64, 9, 3), (64, 4, 4), (128, 16, 2)]


@pytest.mark.parametrize("dim, heads, kv_heads", ATTENTION_HEADS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("span, position, window, on_device", [
    (1, 0, None, False), (64, 63, None, False), (65, 64, None, False), (300, 299, None, False),  # eager: all keys
    (256, 37, None, True), (512, 300, None, True), (1024, 1000, 100, True), (256, 200, 64, False),  # graph spans
    (4096, 4095, None, True), (4096, 130, 3, True),
])
@pytest.mark.parametrize("chunk, ranks, push", [("32", "8", False), ("64", "8", False), ("64", "1", False),
                                                ("32", "2", False), ("64", "16", False), ("64", "8", True),
                                                ("32", "16", True)])
def test_decode_attention_matches_sdpa(dim, heads, kv_heads, dtype, span, position, window, on_device, chunk, ranks,
                                       push, monkeypatch):  # fmt: skip
    """The one-token kernel (chunks of 32 and of 64 keys, a cluster of 16, 8 or 2 blocks a head, merged by pulling
    or pushing, or one block walking every chunk, as before sm_90) against SDPA with the mask the torch path builds
    (keys after the position, or `window` or more before it, excluded), for a cache buffer longer than the span and
    two sequences; NaN in every key and value the kernel must not read."""
    from exlq.runtime.attention import attend
    from exlq.runtime.kernels import attention_ops

    if not hopper_or_newer(CUDA) and ranks != "1" and (chunk, ranks, push) != ("32", "8", False):
        pytest.skip("below sm_90 every count is one block a head: (32, 8) and (64, 1) cover both chunk sizes")
    monkeypatch.setenv("EXLQ_ATTENTION_CHUNK", chunk)
    monkeypatch.setenv("EXLQ_ATTENTION_RANKS", ranks)
    push_at_every_head_size(push, monkeypatch)

    gen = torch.Generator(device=CUDA).manual_seed(span + position + dim)
    bsz, capacity = 2, span + 192
    buffers = [torch.randn(bsz, kv_heads, capacity, dim, device=CUDA, generator=gen).to(dtype) for _ in range(2)]
    for buffer in buffers:  # keys and values outside the window must not be read: NaN there would show
        buffer[:, :, position + 1 :] = float("nan")
        if window:
            buffer[:, :, : max(0, position - window + 1)] = float("nan")
    k, v = (b[:, :, :span] for b in buffers)
    q = (torch.randn(bsz, heads, 1, dim, device=CUDA, generator=gen) * 2).to(dtype)
    assert attention_ops.applies(q, k, v)
    keys = torch.arange(span, device=CUDA)
    allowed = (keys <= position) & ((position - keys < window) if window else True)
    clean = [b.nan_to_num(0.0) for b in buffers]
    expected = attend(q, clean[0][:, :, :span], clean[1][:, :, :span],
                      torch.zeros(1, 1, 1, span, device=CUDA, dtype=dtype).masked_fill(~allowed, float("-inf")), False)
    where = torch.tensor([position], device=CUDA) if on_device else position
    got = attention_ops.decode_attention(q, k, v, where, window)
    assert got.shape == expected.shape and torch.isfinite(got).all()
    assert rel(got, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dim, heads, kv_heads", [(128, 32, 8), (64, 14, 2)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("span, position, window, on_device", [
    (64, 40, None, False), (512, 300, None, True), (1024, 1000, 100, True), (4096, 4095, None, True),
])
@pytest.mark.parametrize("chunk, ranks, push", [("32", "8", False), ("64", "8", False), ("64", "1", False),
                                                ("32", "2", False), ("64", "16", False), ("64", "8", True)])
def test_decode_attention_skips_each_rows_left_padding(dim, heads, kv_heads, dtype, span, position, window, on_device,
                                                       chunk, ranks, push, monkeypatch):  # fmt: skip
    """A left-padded batch (BatchGenerator's unequal prompts): row b's first pad[b] keys are padding, NaN here, and
    must not be read (nor, with a window, keys `window` or more before the token); against SDPA with the torch path's
    mask of each row, which lets a row see its own token whatever its padding. Pads from none to all but the token,
    some inside the window, one past its start, one past the token (that row sees the token alone)."""
    from exlq.runtime.attention import attend
    from exlq.runtime.kernels import attention_ops

    monkeypatch.setenv("EXLQ_ATTENTION_CHUNK", chunk)
    monkeypatch.setenv("EXLQ_ATTENTION_RANKS", ranks)
    push_at_every_head_size(push, monkeypatch)
    pads = torch.tensor([0, 17, min(position, 930), position, position + 3], device=CUDA)
    bsz = pads.numel()
    gen = torch.Generator(device=CUDA).manual_seed(span + position)
    buffers = [torch.randn(bsz, kv_heads, span + 64, dim, device=CUDA, generator=gen).to(dtype) for _ in range(2)]
    keys = torch.arange(span + 64, device=CUDA)
    allowed = ((keys <= position) & ((position - keys < window) if window else True)
               & ((keys[None] >= pads[:, None]) | (keys == position)))
    clean = [b.clone() for b in buffers]
    for buffer in buffers:
        buffer.transpose(1, 2)[~allowed] = float("nan")  # every key a row must not read, in all its heads
    k, v = (b[:, :, :span] for b in buffers)
    q = (torch.randn(bsz, heads, 1, dim, device=CUDA, generator=gen) * 2).to(dtype)
    mask = torch.zeros(bsz, 1, 1, span, device=CUDA, dtype=dtype)
    mask.masked_fill_(~allowed[:, None, None, :span], float("-inf"))
    expected = attend(q, clean[0][:, :, :span], clean[1][:, :, :span], mask, False)
    where = torch.tensor([position], device=CUDA) if on_device else position
    got = attention_ops.decode_attention(q, k, v, where, window, pads)
    assert got.shape == expected.shape and torch.isfinite(got).all()
    assert rel(got, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens, position", [(1, 0), (1, 37), (9, 5)])
def test_fused_rope_store_matches_torch(dtype, tokens, position):
    from exlq.runtime.rope import RotaryEmbedding, apply_rotary

    bsz, q_heads, kv_heads, dim, length = 2, 6, 2, 64, 64
    gen = torch.Generator(device=CUDA).manual_seed(tokens + position)
    q, k, v = (torch.randn(bsz, tokens, h, dim, device=CUDA, generator=gen).to(dtype) for h in (q_heads, kv_heads, kv_heads))
    positions = torch.arange(position, position + tokens, device=CUDA)[None].expand(bsz, -1)
    cos, sin = RotaryEmbedding(dim, 10000.0, None, CUDA).cos_sin(positions, dtype)
    keys = torch.full((bsz, kv_heads, length, dim), float("nan"), dtype=dtype, device=CUDA)
    values = keys.clone()
    at = torch.tensor([position], device=CUDA) if tokens == 1 else position
    q_out = fused_ops.rope_store(q, k, v, cos, sin, keys, values, at)
    assert torch.equal(q_out, apply_rotary(q.transpose(1, 2), cos, sin))
    written = slice(position, position + tokens)
    assert torch.equal(keys[:, :, written], apply_rotary(k.transpose(1, 2), cos, sin))
    assert torch.equal(values[:, :, written], v.transpose(1, 2))
    assert torch.isnan(keys[:, :, position + tokens :]).all() and torch.isnan(keys[:, :, :position]).all()


def _logits_both_ways(path, ids, monkeypatch, dtype="fp16"):
    monkeypatch.setenv("EXLQ_KERNELS", "1")
    with_kernels = load_model(path, device="cuda", dtype=dtype)(ids, max_output_len=None).float()
    monkeypatch.setenv("EXLQ_KERNELS", "0")
    torch_path = load_model(path, device="cuda", dtype=dtype)(ids, max_output_len=None).float()
    monkeypatch.setenv("EXLQ_KERNELS", "1")
    return with_kernels, torch_path


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_tiny_exl2_model_logits_kernels_vs_torch(tmp_path, monkeypatch, rows):
    _, exl2_dir, _ = exl2_and_reference_dirs(tmp_path)
    ids = torch.randint(0, 200, (2, rows))
    with_kernels, torch_path = _logits_both_ways(exl2_dir, ids, monkeypatch)
    assert rel(with_kernels, torch_path) < 1e-2


def _converted_model() -> str | None:
    return os.environ.get("EXLQ_TEST_EXL2_MODEL")


def test_real_exl2_model_logits_and_greedy_kernels_vs_torch(monkeypatch):
    path = _converted_model()
    if not path:
        pytest.skip("set EXLQ_TEST_EXL2_MODEL to a converted real model (bench/gpu_session.sh does)")
    tokenizer = Tokenizer.from_dir(path)
    ids = torch.tensor([tokenizer.encode("The history of the Roman Empire begins with")])
    with_kernels, torch_path = _logits_both_ways(path, ids, monkeypatch)
    assert rel(with_kernels, torch_path) < 1e-2
    outputs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("EXLQ_KERNELS", flag)
        model = load_model(path, device="cuda", dtype="fp16")
        result = Generator(model, tokenizer, max_seq_len=256).generate(
            ids[0].tolist(), sampler=SamplerSettings(temperature=0), max_new_tokens=64
        )
        outputs[flag] = result.token_ids
    if outputs["1"] != outputs["0"]:
        # The GEMV's split-K partial sums are added in a run-dependent order, so the paths may part at a near-tie
        # (one run in six did on smollm2, at token 36): only there, and only between the torch path's top two. An
        # exact tie happens too (Qwen2.5-Coder-0.5B, token 39, margin 0): topk may then list the two either way
        # round, so the two paths' tokens are compared with the top two as a set.
        at = next(i for i, (a, b) in enumerate(zip(outputs["1"], outputs["0"])) if a != b)
        prefix = torch.tensor([ids[0].tolist() + outputs["0"][:at]])
        logits = model(prefix, max_output_len=None)[0, -1].float()  # the torch path's model
        top = logits.topk(2)
        margin = float(top.values[0] - top.values[1])
        assert margin < 0.1 and {outputs["1"][at], outputs["0"][at]} == set(top.indices.tolist()), (
            f"greedy tokens differ at {at}: kernels {outputs['1'][at]}, torch {outputs['0'][at]}, "
            f"torch top-2 {top.indices.tolist()}, margin {margin:.3f}"
        )


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("tokens", [1, 5])  # 5: graph_step=True calls, as speculative verification makes them
def test_cuda_graph_step_equals_eager(tiny_model_dirs, monkeypatch, padded, tokens):
    model = load_model(tiny_model_dirs["qwen2"], device="cuda", dtype="fp16")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=gen)
    steps = torch.randint(0, model.config.vocab_size, (2, 20), generator=gen)
    pad = torch.tensor([0, 3]) if padded else None
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("EXLQ_CUDA_GRAPHS", flag)
        model.decode_graphs.clear()
        cache = model.new_cache(64, batch_size=2)
        model(ids, cache, pad_lengths=pad)
        run = lambda chunk: model(chunk, cache, max_output_len=None, graph_step=tokens > 1)  # noqa: E731
        out = [run(steps[:, i : i + tokens]) for i in range(0, steps.shape[1], tokens)]
        cache.truncate(cache.seq_len - 7)  # rewind, then run over the same positions again
        out += [run(steps[:, i : i + tokens]) for i in range(13, 18, tokens)]
        results[flag] = torch.cat(out, dim=1).float()
    assert len(model.decode_graphs._graphs) == 1
    assert rel(results["1"], results["0"]) < 2e-3


def test_prepared_decode_graph_is_the_one_the_steps_replay(tiny_model_dirs, monkeypatch):
    """prepare_decode captures the next step's graph ahead (its warm-up writes placeholder keys where the step will
    write); the steps then replay that graph, and their logits are an eager run's."""
    model = load_model(tiny_model_dirs["qwen2"], device="cuda", dtype="fp16")
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("EXLQ_CUDA_GRAPHS", flag)
        model.decode_graphs.clear()
        cache = model.new_cache(64)
        model(ids[:, :12], cache, max_output_len=0)
        model.prepare_decode(cache)
        prepared = list(model.decode_graphs._graphs.values())
        assert len(prepared) == (flag == "1") and cache.seq_len == 12
        results[flag] = torch.cat([model(ids[:, i : i + 1], cache) for i in range(12, 20)], dim=1).float()
        assert list(model.decode_graphs._graphs.values()) == prepared  # replayed, not captured again
    assert rel(results["1"], results["0"]) < 2e-3


def test_cache_only_one_token_steps_replay_the_graph(tiny_model_dirs, monkeypatch):
    """A one-token step that wants no logits (a speculative draft catching up) is a graph step too, and fills the
    cache as an eager step does."""
    model = load_model(tiny_model_dirs["qwen2"], device="cuda", dtype="fp16")
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(1))
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("EXLQ_CUDA_GRAPHS", flag)
        model.decode_graphs.clear()
        cache = model.new_cache(64)
        model(ids[:, :10], cache, max_output_len=0)
        out = []
        for i in range(10, 30):
            logits = model(ids[:, i : i + 1], cache, max_output_len=0 if i % 3 else 1)
            if i % 3 == 0:
                out.append(logits)
            else:
                assert logits is None
        results[flag] = torch.cat(out, dim=1).float()
        assert len(model.decode_graphs._graphs) == (flag == "1")
    assert rel(results["1"], results["0"]) < 2e-3


def test_attention_kernel_graphs_across_the_long_span(tmp_path, monkeypatch):
    """One-token graph steps on the attention kernel (head size 64) across position LONG_SPAN: the span LONG_SPAN, then
    the whole cache (clusters of 8, then 16 blocks a head), two graphs; the logits of eager steps on SDPA."""
    from tiny_models import make_tiny_model_dir

    from exlq.runtime.kernels import attention_ops

    path = make_tiny_model_dir(tmp_path / "llama", "llama", seed=4, hidden_size=128, num_attention_heads=2,
                               num_key_value_heads=1, max_position_embeddings=4096)
    model = load_model(path, device="cuda", dtype="fp16")
    assert attention_ops.takes_heads(model.config.head_dim, 2, 1)
    first, last, capacity = attention_ops.LONG_SPAN - 8, attention_ops.LONG_SPAN + 16, attention_ops.LONG_SPAN + 52
    ids = torch.randint(0, model.config.vocab_size, (1, last), generator=torch.Generator().manual_seed(3))
    results = {}
    for graphs, kernel in (("0", "0"), ("1", "1")):
        monkeypatch.setenv("EXLQ_CUDA_GRAPHS", graphs)
        monkeypatch.setenv("EXLQ_DECODE_ATTENTION", kernel)
        model.decode_graphs.clear()
        cache = model.new_cache(capacity)
        model(ids[:, :first], cache, max_output_len=0)
        results[graphs] = torch.cat([model(ids[:, i : i + 1], cache) for i in range(first, last)], dim=1).float()
        if graphs == "1":
            assert sorted(key[3] for key in model.decode_graphs._graphs) == [attention_ops.LONG_SPAN, capacity]
    assert rel(results["1"], results["0"]) < 2e-3


def test_left_padded_decode_on_the_attention_kernel_equals_sdpa(tmp_path, monkeypatch):
    """A left-padded batch decodes on the attention kernel (each row's padding skipped; every call gets the pads),
    eager and from one graph for the cache's whole span (steps across position 256, where SDPA's spans end), with the
    logits of eager SDPA steps under the padding mask."""
    from exlq.runtime.kernels import attention_ops
    from tiny_models import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path / "llama", "llama", seed=5, hidden_size=128, num_attention_heads=2,
                               num_key_value_heads=1)
    model = load_model(path, device="cuda", dtype="fp16")
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, model.config.vocab_size, (3, 250), generator=gen)
    steps = torch.randint(0, model.config.vocab_size, (3, 12), generator=gen)
    pad = torch.tensor([0, 9, 231])
    calls = []
    kernel_attention = attention_ops.decode_attention

    def counted(*args, **kwargs):
        calls.append(args[5] if len(args) > 5 else kwargs.get("pad_lengths"))
        return kernel_attention(*args, **kwargs)

    monkeypatch.setattr(attention_ops, "decode_attention", counted)
    results = {}
    for graphs, kernel in (("0", "0"), ("0", "1"), ("1", "1")):
        monkeypatch.setenv("EXLQ_CUDA_GRAPHS", graphs)
        monkeypatch.setenv("EXLQ_DECODE_ATTENTION", kernel)
        model.decode_graphs.clear()
        calls.clear()
        cache = model.new_cache(600, batch_size=3)
        model(ids, cache, max_output_len=0, pad_lengths=pad)
        results[graphs + kernel] = torch.cat([model(steps[:, i : i + 1], cache) for i in range(12)], dim=1).float()
        if kernel == "1":  # eager: every layer of every step; graphs: the captured step's layers
            assert calls and all(p is not None and p.tolist() == pad.tolist() for p in calls)
        else:
            assert not calls
        if graphs == "1":
            assert [key[3] for key in model.decode_graphs._graphs] == [600], "one graph for the whole span"
    assert rel(results["01"], results["00"]) < 2e-3
    assert rel(results["11"], results["00"]) < 2e-3


def test_speculative_with_graphs_equals_plain_greedy(tiny_model_dirs):
    from exlq.runtime.speculative import SpeculativeGenerator

    model = load_model(tiny_model_dirs["llama"], device="cuda", dtype="fp16")
    draft = load_model(tiny_model_dirs["llama-tied-llama3rope"], device="cuda", dtype="fp16")
    tokenizer = Tokenizer.from_dir(tiny_model_dirs["llama"])
    greedy = SamplerSettings(temperature=0)
    prompt = [1, 5, 9, 23, 7]
    plain = Generator(model, tokenizer, max_seq_len=96).generate(prompt, sampler=greedy, max_new_tokens=80, eos_ids=[])
    spec = SpeculativeGenerator(Generator(model, tokenizer, max_seq_len=96), Generator(draft, tokenizer, max_seq_len=96))
    got = spec.generate(prompt, sampler=greedy, max_new_tokens=80, eos_ids=[])
    assert got.token_ids == plain.token_ids and got.stop_reason == plain.stop_reason


def test_cuda_graph_exl2_greedy_generation_equals_eager(tmp_path, monkeypatch):
    _, exl2_dir, _ = exl2_and_reference_dirs(tmp_path)
    tokenizer = Tokenizer.from_dir(exl2_dir)
    model = load_model(exl2_dir, device="cuda", dtype="fp16")
    prompt = [1, 17, 42, 99, 7]
    texts = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("EXLQ_CUDA_GRAPHS", flag)
        generator = Generator(model, tokenizer, max_seq_len=128)
        texts[flag] = generator.generate(prompt, sampler=SamplerSettings(temperature=0), max_new_tokens=64).token_ids
    assert texts["0"] == texts["1"]


def test_kernel_cache_is_fast_when_warm():
    """A cached build comes back within 1 s, for every source, built as the runtime builds it (launch.kernel: each
    instance alone). Whole instance sets are CI's compile check (test_kernel_compile.py): the attention's alone takes
    ~100 s to compile, which pushed this test past the device's time limit (session 50)."""
    import time

    from exlq.runtime.kernels.catalog import SOURCES
    from exlq.runtime.kernels.compiler import compile_source
    from exlq.runtime.kernels.launch import arch_of

    arch = arch_of(CUDA)
    for source, sets in SOURCES.items():
        for instances in sets:
            compile_source(source, arch, [instances[0]])
            start = time.perf_counter()
            compile_source(source, arch, [instances[0]])
            assert time.perf_counter() - start < 1.0, f"cuda/{source}: {instances[0]}"


@pytest.fixture
def ampere_stand_in(monkeypatch):
    """EXLQ_ARCH=sm_80 for one test; yields the architecture of every kernel build it asks for."""
    from exlq.runtime.kernels import launch

    if torch.cuda.get_device_capability(CUDA) <= (8, 0):
        pytest.skip("this GPU is an sm_80 already (or older)")
    built: list[str] = []
    build = launch.compile_source
    monkeypatch.setattr(launch, "compile_source", lambda *args: built.append(args[1]) or build(*args))
    monkeypatch.setenv("EXLQ_ARCH", "sm_80")
    forget_kernel_architecture()
    yield built
    monkeypatch.undo()
    forget_kernel_architecture()


def test_an_older_architecture_stands_in_on_this_gpu(ampere_stand_in):
    """EXLQ_ARCH=sm_80 on a newer GPU: kernels built as compute_80 PTX (the driver compiles them here), routed as on an
    A100 (no programmatic launch, clusters or streamed GEMV; its shared memory), with the torch path's results. The GPU
    suite run so (bench/older_arch.sh) tests the Ampere and Ada code."""
    from exlq.runtime.kernels import attention_ops, target

    assert enabled(CUDA) and not hopper_or_newer(CUDA)
    assert attention_ops.ranks(CUDA, 4096) == 1
    assert target.shared_limits(CUDA.index or 0) <= (163 * 1024, 164 * 1024)
    gen = torch.Generator(device=CUDA).manual_seed(5)
    residual = torch.randn(3, 4096, device=CUDA, generator=gen)
    delta = torch.randn(3, 4096, device=CUDA, generator=gen).half()
    weight = torch.rand(4096, device=CUDA, generator=gen).half() + 0.5
    new_residual, normed = fused_ops.add_rms_norm(residual, delta, weight, 1e-5)
    total = residual + delta.float()
    assert torch.equal(new_residual, total)
    assert rel(normed, total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.float()) < 2e-3
    tensors, _ = random_exl2(4096, 1024, [4, 3], [0.75, 0.25], 128, seed=11)
    cuda = on_gpu(tensors)
    layer = Exl2Linear(cuda, 4096, 1024, dtype=torch.float16)
    assert not exl2_stream_ops.applies([layer.kernel_plan()], 1, torch.float16, CUDA)
    for rows in (1, 4):  # the register GEMV, the tensor-core one
        x = torch.randn(rows, 4096, device=CUDA, generator=gen).half()
        got = layer(x[None])[0]
        assert torch.isfinite(got).all() and rel(got, x.double() @ stored_weight(cuda)[:, :1024].double()) < 4e-3
    assert ampere_stand_in and set(ampere_stand_in) == {"compute_80"}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_kv_quant_kernels_match_torch(bits):
    from exlq.runtime.kernels import kv_ops
    from exlq.runtime.kv_quant import dequantize_kv, quantize_kv, unpack_codes

    gen = torch.Generator(device=CUDA).manual_seed(bits)
    x = torch.randn(3, 2, 37, 64, device=CUDA, generator=gen) * torch.linspace(0.1, 30, 64, device=CUDA)
    codes, scales = kv_ops.quantize(x, bits)
    ref_codes, ref_scales = quantize_kv(x, bits)
    # Same math, other summation order (butterfly vs matmul): scales may differ by an fp16 ulp, codes by one level.
    assert torch.allclose(scales.float(), ref_scales.float(), rtol=2e-3, atol=0)
    diff = (unpack_codes(codes, bits).int() - unpack_codes(ref_codes, bits).int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01
    out = kv_ops.dequantize(codes, scales, bits, torch.float32)
    assert rel(out, dequantize_kv(codes, scales, bits, dtype=torch.float32)) < 1e-5
    assert rel(out, x) < {2: 0.7, 3: 0.3, 4: 0.15, 5: 0.08, 6: 0.04, 7: 0.02, 8: 0.01}[bits]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_multiplier", [False, True])
def test_kv_quantize_at_equals_the_unfused_steps(bits, dtype, with_multiplier):
    """The graph step's fused cache write: bit for bit what offset, channel scale, kv_quantize and index_copy_ give,
    at scattered positions of the first rows, from a non-contiguous input; nothing else written."""
    from exlq.runtime.kernels import kv_ops

    gen = torch.Generator(device=CUDA).manual_seed(bits)
    x = (torch.randn(4, 3, 2, 64, device=CUDA, generator=gen) * 5).to(dtype).transpose(1, 2)[:3]  # [3, 2, 3, 64]
    offset = torch.randn(4, 2, 1, 64, device=CUDA, generator=gen) * 3
    multiplier = torch.rand(4, 2, 1, 64, device=CUDA, generator=gen) + 0.5 if with_multiplier else None
    positions = torch.tensor([7, 2, 11], device=CUDA)
    codes = torch.full((4, 2, 16, 64 * bits // 8), 0xAB, dtype=torch.uint8, device=CUDA)
    scales = torch.full((4, 2, 16, 2), float("nan"), dtype=torch.float16, device=CUDA)
    expected_codes, expected_scales = codes.clone(), scales.clone()
    kv_ops.quantize_at(x, offset, multiplier, positions, codes, scales, bits)
    centered = x.float() - offset[:3]
    if multiplier is not None:
        centered = centered * multiplier[:3]
    new_codes, new_scales = kv_ops.quantize(centered, bits)
    expected_codes[:3].index_copy_(2, positions, new_codes)
    expected_scales[:3].index_copy_(2, positions, new_scales)
    assert torch.equal(codes, expected_codes)
    assert torch.equal(scales.view(torch.int16), expected_scales.view(torch.int16))


def test_kv_dequantize_into_copies_the_dense_prefix():
    """One launch refills the shared scratch: positions below the prefix come from the dense store, the rest dequantized."""
    from exlq.runtime.kernels import kv_ops
    from exlq.runtime.kv_quant import dequantize_kv, quantize_kv

    gen = torch.Generator(device=CUDA).manual_seed(3)
    codes, scales = quantize_kv(torch.randn(3, 2, 40, 64, device=CUDA, generator=gen), 4)
    dense = torch.randn(3, 2, 16, 64, device=CUDA, generator=gen).half()
    offset = torch.randn(3, 2, 1, 64, device=CUDA, generator=gen)
    out = torch.full((3, 2, 40, 64), float("nan"), dtype=torch.float16, device=CUDA)
    kv_ops.dequantize_into(out, codes, scales, offset, None, 4, rows=2, start=0, end=30, dense=dense)
    assert torch.equal(out[:2, :, :16], dense[:2])
    expected = (dequantize_kv(codes[:2, :, 16:30], scales[:2, :, 16:30], 4, dtype=torch.float32) + offset[:2]).half()
    assert rel(out[:2, :, 16:30].float(), expected.float()) < 1e-2
    assert out[:2, :, 30:].isnan().all() and out[2].isnan().all()


def head_dim_32_model(tmp_path, *, seed: int, rows: int, prompt: int, steps: int):
    """A tiny fp16 Qwen2 on the GPU whose head_dim (32) is one KV-kernel group, a prompt and decode tokens."""
    from tiny_models import make_tiny_model_dir

    shape = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
    model = load_model(make_tiny_model_dir(tmp_path / "qwen2", "qwen2", seed=seed, **shape), device="cuda", dtype="fp16")
    gen = torch.Generator().manual_seed(seed + 1)
    draw = lambda length: torch.randint(0, model.config.vocab_size, (rows, length), generator=gen)  # noqa: E731
    return model, draw(prompt), draw(steps)


@pytest.mark.parametrize("cache", ["q4", "q8", "k4v2"])
def test_quantized_cache_decode_kernels_vs_torch(tmp_path, monkeypatch, cache):
    """Prefill, decode and a rewind through a quantized cache: the kernels give the torch path's logits."""
    from exlq.runtime.kv_quant import parse_cache_type

    cache_type = parse_cache_type("q4", "4,2") if cache == "k4v2" else parse_cache_type(cache)
    model, ids, steps = head_dim_32_model(tmp_path, seed=3, rows=2, prompt=40, steps=8)
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("EXLQ_KERNELS", flag)
        kv = model.new_cache(64, batch_size=2, cache_type=cache_type)
        assert kv.keys.uses_kernels == (flag == "1")
        out = [model(ids, kv)[:, -1:]]
        out += [model(steps[:, i : i + 1], kv) for i in range(steps.shape[1])]
        kv.truncate(kv.seq_len - 3)
        out += [model(steps[:, i : i + 1], kv) for i in range(5, 8)]
        results[flag] = torch.cat(out, dim=1).float()
    assert rel(results["1"], results["0"]) < 1e-2


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_divisor", [False, True])
def test_kv_dequantize_into_matches_torch(bits, dtype, with_divisor):
    """The cache's read kernel: a position range of the first rows, offset and channel scale applied, nothing else written."""
    from exlq.runtime.kernels import kv_ops
    from exlq.runtime.kv_quant import dequantize_kv, quantize_kv

    gen = torch.Generator(device=CUDA).manual_seed(bits)
    x = torch.randn(3, 2, 40, 64, device=CUDA, generator=gen)
    codes, scales = quantize_kv(x, bits)
    offset = torch.randn(3, 2, 1, 64, device=CUDA, generator=gen) * 10
    divisor = torch.rand(3, 2, 1, 64, device=CUDA, generator=gen) + 0.5 if with_divisor else None
    out = torch.full((3, 2, 40, 64), float("nan"), dtype=dtype, device=CUDA)
    kv_ops.dequantize_into(out, codes, scales, offset, divisor, bits, rows=2, start=5, end=33)
    expected = dequantize_kv(codes[:2, :, 5:33], scales[:2, :, 5:33], bits, dtype=torch.float32)
    if divisor is not None:
        expected = expected / divisor[:2]
    expected = (expected + offset[:2]).to(dtype)
    assert rel(out[:2, :, 5:33].float(), expected.float()) < 1e-2
    assert out[:2, :, :5].isnan().all() and out[:2, :, 33:].isnan().all() and out[2].isnan().all()


@pytest.mark.parametrize("tokens", [1, 4])
def test_cuda_graph_step_through_a_quantized_cache_equals_eager(tmp_path, monkeypatch, tokens):
    """Past its dense prefix a q4 cache is part of the captured step (quantize on write, dequantize on read)."""
    model, ids, steps = head_dim_32_model(tmp_path, seed=5, rows=1, prompt=20, steps=24)
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("EXLQ_CUDA_GRAPHS", flag)
        model.decode_graphs.clear()
        cache = model.new_cache(96, cache_type="q4")
        model(ids, cache)
        run = lambda chunk: model(chunk, cache, max_output_len=None, graph_step=tokens > 1)  # noqa: E731
        out = [run(steps[:, i : i + tokens]) for i in range(0, 24, tokens)]
        cache.truncate(cache.seq_len - 8)
        out += [run(steps[:, i : i + tokens]) for i in range(16, 24, tokens)]
        results[flag] = torch.cat(out, dim=1).float()
        assert len(model.decode_graphs._graphs) == (flag == "1")
    assert rel(results["1"], results["0"]) < 2e-3
