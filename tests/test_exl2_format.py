"""EXL2 on-disk format: golden vectors from ExLlamaV2's own kernels (bit-exact), round trips, the runtime layer.

The golden vectors live in ../shared/specs (EXLQ_SHARED_DIR); tests that need them skip without them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import SHARED
from exlq.errors import ExlqError
from exlq.quant.exl2_pack import (
    converter_layout,
    encode_q_groups,
    invperm_from_perm,
    pack_exl2,
    pack_q_scale,
    pack_q_weight,
    quantize_rtn,
    validate_layout,
)
from exlq.runtime.exl2 import (
    Exl2Linear,
    Exl2Tensors,
    decode_q_groups,
    dequantize,
    dequantize_stored,
    effective_scales,
    scale_multipliers,
    unpack_q_scale,
    unpack_q_weight,
)
from exlq.runtime.linear import LINEAR_FORMATS, DenseLinear, project_each, project_gated
from exlq.runtime.loader import load_model
from exlq.runtime.weights import WeightStore
from tiny_models import make_tiny_model_dir

GOLDEN = SHARED / "specs" / "exl2-golden-vectors.npz"
VALID_CASES = [
    "A_example", "B_2bit", "B_3bit", "B_4bit", "B_5bit", "B_6bit", "B_8bit",
    "C_mixed", "D_down", "D_head6", "E_noperm", "F_prescale", "G_tail16",
]  # fmt: skip
BAD_ORDER = "N_order_bad"  # 2-bit group before a 4-bit one: ExLlamaV2's `recon` is wrong by design
ALL_CASES = VALID_CASES + [BAD_ORDER]
TENSOR_FIELDS = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.exists():
        pytest.skip(f"EXL2 golden vectors not found at {GOLDEN} (set EXLQ_SHARED_DIR to the shared dir)")
    with np.load(GOLDEN) as data:
        return {key: data[key] for key in data.files}


class Case:
    """One golden case: its fields as torch tensors (codes widened to int64), plus its layout."""

    def __init__(self, golden: dict, name: str):
        self.name = name
        self.raw = {k.split("__", 1)[1]: v for k, v in golden.items() if k.startswith(f"{name}__")}
        self.layout = [tuple(row) for row in self.raw["layout"].tolist()]
        self.prescale = float(self.raw["prescale"])
        self.use_perm = bool(self.raw["use_perm"])

    def __getitem__(self, field: str) -> torch.Tensor:
        value = self.raw[field]
        return torch.from_numpy(value.astype(np.int64) if value.dtype == np.uint16 else np.array(value))

    def stored(self) -> Exl2Tensors:
        return Exl2Tensors(*(self[f] for f in TENSOR_FIELDS))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of fp16 tensors (distinguishes -0/+0, treats equal NaNs as equal)."""
    return a.dtype == b.dtype == torch.float16 and torch.equal(a.view(torch.int16), b.view(torch.int16))


# ----- golden vectors: reader -----


@pytest.mark.parametrize("name", ALL_CASES)
def test_golden_unpack(golden, name):
    case = Case(golden, name)
    assert decode_q_groups(case["q_groups"], case["q_weight"].shape[0]) == case.layout
    assert torch.equal(unpack_q_weight(case["q_weight"], case.layout).long(), case["codes"])
    assert torch.equal(unpack_q_scale(case["q_scale"]).long(), case["scodes"].long())
    assert same_bits(scale_multipliers(case["q_scale_max"], case.prescale), case["loaded_qsm"])


@pytest.mark.parametrize("name", VALID_CASES)
def test_golden_dequantize_is_bit_exact(golden, name):
    case = Case(golden, name)
    args = (case["q_weight"], case["q_scale"], case["q_scale_max"], case["q_groups"])
    if case.use_perm:
        out = dequantize(*args, case["q_invperm"], prescale=case.prescale)
    else:
        out = dequantize_stored(*args, prescale=case.prescale)
    assert out.shape == case["recon"].shape
    assert same_bits(out, case["recon"])


def test_golden_wrong_group_order_is_rejected(golden):
    case = Case(golden, BAD_ORDER)
    with pytest.raises(ExlqError, match="descending"):
        case.stored().dequantize()
    with pytest.raises(ExlqError, match="descending"):
        pack_exl2(case["codes"], case["scodes"], case["q_scale_max"], case.layout, case["perm"])


# ----- golden vectors: writer -----


@pytest.mark.parametrize("name", ALL_CASES)
def test_golden_pack_pieces(golden, name):
    """Every case, the wrongly ordered one too: ExLlamaV2 packs any layout the same way."""
    case = Case(golden, name)
    assert torch.equal(pack_q_weight(case["codes"], case.layout), case["q_weight"])
    assert torch.equal(pack_q_scale(case["scodes"]), case["q_scale"])
    assert torch.equal(encode_q_groups(case.layout), case["q_groups"])
    assert torch.equal(invperm_from_perm(case["perm"], len(case["perm"])), case["q_invperm"])


@pytest.mark.parametrize("name", VALID_CASES)
def test_golden_pack_exl2(golden, name):
    case = Case(golden, name)
    packed = pack_exl2(case["codes"], case["scodes"], case["q_scale_max"], case.layout, case["perm"])
    for field in TENSOR_FIELDS:
        expected = case[field]
        assert getattr(packed, field).dtype == expected.dtype, field
        assert torch.equal(getattr(packed, field), expected), field
    assert packed.bias is None


def test_worked_example_payload(golden):
    """Spec §8: the K=64, N=32 example stores 8544 bits (4.17 bpw), exactly `total_bits`."""
    stored = Case(golden, "A_example").stored()
    assert stored.total_bits() == 8544
    assert stored.bits_per_weight() == pytest.approx(8544 / (64 * 32))


@pytest.mark.parametrize(
    "name, k, qparams",
    [("D_head6", 1024, ([8, 6], [0.15, 0.85], 128)), ("D_down", 5632, ([6, 3, 2], [0.05, 0.2, 0.75], [32, 64, 64]))],
)
def test_converter_layout_matches_golden(golden, name, k, qparams):
    assert converter_layout(k, *qparams) == Case(golden, name).layout


def test_converter_layout_spec_example():
    layout = converter_layout(14336, [6, 3, 2], [0.05, 0.2, 0.75], [32, 64, 64])
    assert layout == [(6, 32)] * 23 + [(3, 64)] * 45 + [(2, 64)] * 167 + [(2, 32)]


# ----- round trips on random data -----

LAYOUTS = {
    **{f"{b}bit": [(b, 64), (b, 32), (b, 32)] for b in (2, 3, 4, 5, 6, 8)},
    "mixed": [(8, 32), (6, 64), (5, 32), (4, 32), (3, 64), (2, 32), (2, 16), (2, 16)],
    "tail16": [(4, 32), (3, 32), (2, 16)],  # K = 80 = 32·2 + 16, allowed only with a 2-bit last group
}


def random_inputs(layout, n: int, seed: int = 0):
    """Codes [K, n], scale codes [G, n], q_scale_max [G] and a permutation, all valid for `layout`."""
    gen = torch.Generator().manual_seed(seed)
    row_bits = torch.tensor([b for b, r in layout for _ in range(r)])
    codes = (torch.rand(len(row_bits), n, generator=gen) * (2**row_bits)[:, None]).long()
    scale_codes = torch.randint(1, 17, (len(layout), n), generator=gen)
    q_scale_max = (torch.rand(len(layout), generator=gen) * 2).half()
    perm = torch.randperm(len(row_bits), generator=gen)
    return codes, scale_codes, q_scale_max, perm


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("n", [32, 40])  # 40: padded to 64 on disk
def test_pack_unpack_round_trip(name, n):
    layout = LAYOUTS[name]
    codes, scale_codes, q_scale_max, perm = random_inputs(layout, n)
    packed = pack_exl2(codes, scale_codes, q_scale_max, layout, perm)
    assert packed.q_weight.shape == (sum(r * b // 32 for b, r in layout), 64 if n == 40 else 32)
    assert decode_q_groups(packed.q_groups, packed.q_weight.shape[0]) == layout
    stored_codes = unpack_q_weight(packed.q_weight, layout).long()
    assert torch.equal(stored_codes[:, :n], codes)
    stored_scales = unpack_q_scale(packed.q_scale).long()
    assert torch.equal(stored_scales[:, :n], scale_codes)
    # Padding columns hold zero weights the way ExLlamaV2's converter writes them: code 2^(b−1), scale code 1.
    zero_codes = torch.tensor([1 << (b - 1) for b, r in layout for _ in range(r)])
    assert torch.equal(stored_codes[:, n:], zero_codes[:, None].expand(-1, stored_codes.shape[1] - n))
    assert bool((stored_scales[:, n:] == 1).all())
    assert not packed.dequantize()[:, n:].any()


@pytest.mark.parametrize("name", ["mixed", "tail16"])
def test_act_order_puts_stored_rows_back(name):
    layout = LAYOUTS[name]
    codes, scale_codes, q_scale_max, perm = random_inputs(layout, 32, seed=1)
    packed = pack_exl2(codes, scale_codes, q_scale_max, layout, perm)
    stored = dequantize_stored(packed.q_weight, packed.q_scale, packed.q_scale_max, packed.q_groups)
    original = packed.dequantize()
    assert same_bits(original[perm], stored)  # stored row i holds original channel perm[i]
    # Each stored weight is (q − 2^(b−1))·S of its group and column.
    scales = effective_scales(scale_codes, q_scale_max)
    group_of_row = torch.repeat_interleave(torch.arange(len(layout)), torch.tensor([r for _, r in layout]))
    zero = torch.tensor([1 << (b - 1) for b, r in layout for _ in range(r)])[:, None]
    assert same_bits(stored, ((codes - zero).float() * scales[group_of_row].float()).half())


@pytest.mark.parametrize(
    "layout, message",
    [
        ([(2, 32), (4, 32)], "descending"),
        ([(4, 16), (2, 16)], "multiple of 32"),
        ([(2, 8)], "multiple of 16"),
        ([(7, 32)], "7 bits"),
        ([(2, 32)] * 2050, "at most 65536"),
    ],
)
def test_writer_rejects_bad_layouts(layout, message):
    with pytest.raises(ExlqError, match=message):
        validate_layout(layout)


def test_writer_rejects_bad_inputs():
    layout = [(4, 32)]
    codes, scale_codes, q_scale_max, perm = random_inputs(layout, 32)
    with pytest.raises(ExlqError, match="0..15"):
        pack_exl2(codes + 16, scale_codes, q_scale_max, layout)
    with pytest.raises(ExlqError, match="1..16"):
        pack_exl2(codes, scale_codes * 0, q_scale_max, layout)
    with pytest.raises(ExlqError, match="permutation"):
        pack_exl2(codes, scale_codes, q_scale_max, layout, torch.zeros(32, dtype=torch.long))
    with pytest.raises(ExlqError, match="covers 32 rows"):
        pack_exl2(codes[:16], scale_codes, q_scale_max, layout)


# ----- round-to-nearest quantization -----


def test_quantize_rtn_error_is_bounded():
    torch.manual_seed(0)
    weight, bias = torch.randn(40, 96), torch.randn(40)
    weight[3] = 0.0  # an all-zero output channel stays exactly zero
    layout = [(8, 32), (4, 32), (2, 32)]
    perm = torch.randperm(96)
    packed = quantize_rtn(weight, layout, perm, bias)
    assert packed.bias.dtype == torch.float16 and packed.bias.shape == (64,)
    assert torch.equal(packed.bias[:40], bias.half()) and not packed.bias[40:].any()
    deq = packed.dequantize()[:, :40].T.float()  # [N, K], original channel order
    assert not deq[3].any()
    # Round to nearest on each column's grid (q − z)·S, q − z ∈ [−z, z−1]: half a step, plus any clipping,
    # plus the final fp16 rounding of the product (half an ulp).
    scales = effective_scales(unpack_q_scale(packed.q_scale), packed.q_scale_max).float()[:, :40]
    group_of_row = torch.repeat_interleave(torch.arange(3), torch.tensor([32, 32, 32]))
    step = scales[group_of_row][torch.argsort(perm)].T  # [N, K] in original order
    zero = torch.tensor([1 << (b - 1) for b, r in layout for _ in range(r)])[torch.argsort(perm)].float()
    clipped = weight - torch.minimum(torch.maximum(weight, -zero * step), (zero - 1) * step)
    assert bool(((deq - weight).abs() <= step / 2 + clipped.abs() + deq.abs() * 2**-11 + 1e-6).all())
    groups = [perm[a : a + 32] for a in (0, 32, 64)]
    rel = [((deq - weight)[:, rows].norm() / weight[:, rows].norm()).item() for rows in groups]
    assert rel[0] < 0.03 < rel[1] < 0.2 < rel[2] < 0.6, rel  # 8-bit ≪ 4-bit ≪ 2-bit


# ----- the runtime layer -----


def test_exl2_linear_forward_matches_dequantized_weight():
    torch.manual_seed(1)
    layout = [(6, 32), (3, 32)]
    packed = quantize_rtn(torch.randn(40, 64), layout, torch.randperm(64), torch.randn(40))
    layer = Exl2Linear(packed, 64, 40, dtype=torch.float32)
    x = torch.randn(3, 5, 64)
    weight = layer.dequantized_weight()
    assert weight.shape == (40, 64) and weight.dtype == torch.float16
    expected = x @ weight.float().T + packed.bias[:40].float()
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    # The packed form is what the module stores; the dense cache is not part of its state.
    assert set(layer.state_dict()) == {"q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm", "bias"}
    assert layer._dense is not None and layer(x).shape == (3, 5, 40)
    assert layer.bits_per_weight == pytest.approx(packed.total_bits() / (64 * 64 + 64))
    assert LINEAR_FORMATS[0] is Exl2Linear and LINEAR_FORMATS[-1] is DenseLinear


def test_project_each_groups_one_format_unless_hooked(monkeypatch):
    """q/k/v-style projections of one input go through the format's `forward_many` (one GPU launch), but a
    module hook (the quantizer's recorders) or a mix of formats gets one call per layer."""
    torch.manual_seed(2)
    layers = [Exl2Linear(quantize_rtn(torch.randn(n, 64), [(4, 64)], torch.randperm(64)), 64, n, dtype=torch.float32)
              for n in (40, 24, 24)]
    x = torch.randn(1, 3, 64)
    expected = [layer(x) for layer in layers]
    grouped = []
    many = Exl2Linear.forward_many
    monkeypatch.setattr(Exl2Linear, "forward_many", staticmethod(lambda ls, v: grouped.append(len(ls)) or many(ls, v)))
    for y, ref in zip(project_each(layers, x), expected, strict=True):
        assert torch.equal(y, ref)
    assert grouped == [3]
    seen = []
    layers[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    assert all(torch.equal(y, ref) for y, ref in zip(project_each(layers, x), expected))
    assert grouped == [3] and seen == [x.shape]
    dense = DenseLinear(layers[0].dequantized_weight().float())
    assert torch.allclose(project_each([dense, layers[2]], x)[0], expected[0], atol=1e-5) and grouped == [3]


def test_project_gated_forms_the_input_unless_hooked():
    """down(silu(gate) * up): through the format's `forward_gated` where it has one, else (dense layers, a module hook
    that must see the input) by forming the input and calling the layer; the same values either way."""
    torch.manual_seed(3)
    down = Exl2Linear(quantize_rtn(torch.randn(48, 64), [(4, 64)], torch.randperm(64)), 64, 48, dtype=torch.float32)
    gate, up = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    expected = down(F.silu(gate) * up)
    assert torch.equal(project_gated(down, gate, up), expected)
    seen = []
    down.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    assert torch.equal(project_gated(down, gate, up), expected)
    assert len(seen) == 1 and torch.equal(seen[0], F.silu(gate) * up)
    dense = DenseLinear(down.dequantized_weight().float())
    assert torch.allclose(project_gated(dense, gate, up), expected, atol=1e-5)


def write_layer(directory: Path, tensors: dict[str, torch.Tensor]) -> WeightStore:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "output.safetensors"))
    return WeightStore(directory)


def _drop(name):
    return lambda t: {k: v for k, v in t.items() if k != f"layer.{name}"}


def _replace(name, fn):
    return lambda t: {**t, f"layer.{name}": fn(t[f"layer.{name}"])}


BAD_CHECKPOINTS = {
    "missing q_scale": (_drop("q_scale"), "layer.q_scale is missing"),
    "missing q_invperm": (_drop("q_invperm"), "layer.q_invperm is missing"),
    "q_weight extra row": (_replace("q_weight", lambda w: torch.cat([w, w[:1]])), "of layer.q_weight"),
    "q_weight 3 extra rows": (_replace("q_weight", lambda w: torch.cat([w, w[:3]])), "layer.q_weight has 12 word rows"),
    "q_weight narrow": (_replace("q_weight", lambda w: w[:, :32].contiguous()), "layer.q_weight has shape"),
    "q_weight int16": (_replace("q_weight", lambda w: w.to(torch.int16)), "layer.q_weight has dtype"),
    "q_scale_max fp32": (_replace("q_scale_max", lambda s: s.float()), "layer.q_scale_max has dtype"),
    "q_scale short": (_replace("q_scale", lambda s: s[:, :4].contiguous()), "layer.q_scale has shape"),
    "q_groups 7 bits": (_replace("q_groups", lambda g: torch.where(g == 6, 7, g).to(torch.int16)), "7 bits"),
    "q_invperm repeated": (_replace("q_invperm", torch.zeros_like), "layer.q_invperm is not a permutation"),
    "bias missing": (_drop("bias"), "layer.bias is missing"),
    "bias short": (_replace("bias", lambda b: b[:40].contiguous()), "layer.bias has shape"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_names_the_tensor(tmp_path, case):
    corrupt, message = BAD_CHECKPOINTS[case]
    torch.manual_seed(2)
    packed = quantize_rtn(torch.randn(40, 64), [(6, 32), (3, 32)], bias=torch.randn(40))
    store = write_layer(tmp_path, corrupt(packed.state_dict("layer")))
    assert Exl2Linear.can_load(store, "layer") and not DenseLinear.can_load(store, "layer")
    with pytest.raises(ExlqError, match=message):
        Exl2Linear.load(store, "layer", 64, 40, True, torch.float32, torch.device("cpu"))


def test_good_checkpoint_loads(tmp_path):
    torch.manual_seed(2)
    packed = quantize_rtn(torch.randn(40, 64), [(6, 32), (3, 32)], bias=torch.randn(40))
    store = write_layer(tmp_path, packed.state_dict("layer"))
    layer = Exl2Linear.load(store, "layer", 64, 40, True, torch.float32, torch.device("cpu"))
    assert same_bits(layer.dequantized_weight(), packed.dequantize()[:, :40].T)


# ----- a whole model stored as EXL2 -----

# Per input width: a mixed layout in descending bits (K = 80 ends in a 16-row 2-bit group).
TINY_LAYOUTS = {64: [(8, 32), (4, 32)], 80: [(5, 32), (3, 32), (2, 16)]}
LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def exl2_and_reference_dirs(tmp_path: Path, shared_perms: bool = False) -> tuple[Path, Path, Path]:
    """A tiny Llama (biases, intermediate 80 → padded gate/up, K=80 down) as EXL2, and its dequantized twin.

    The EXL2 directory is laid out like the converter's output: `output-0000i-of-00002.safetensors`
    shards, no index, every decoder linear and `lm_head` as EXL2 tensors, everything else fp16. Each matrix has a
    random act-order permutation; `shared_perms`: one for q/k/v and one for gate/up of a layer, as conversions give
    the matrices of one input.
    """
    source = make_tiny_model_dir(tmp_path / "source", "llama", seed=3, attention_bias=True, intermediate_size=80)
    tensors = load_file(str(source / "model.safetensors"))
    prefixes = [f"model.layers.{i}.{n}" for i in range(2) for n in LINEAR_NAMES] + ["lm_head"]
    exl2, dense = {}, {}
    gen = torch.Generator().manual_seed(4)
    shared = {}
    for prefix in prefixes:
        weight, bias = tensors.pop(f"{prefix}.weight"), tensors.pop(f"{prefix}.bias", None)
        perm = torch.randperm(weight.shape[1], generator=gen)
        reads = "q/k/v" if prefix.endswith(("q_proj", "k_proj", "v_proj")) else "gate/up" if prefix.endswith(
            ("gate_proj", "up_proj")) else None
        if shared_perms and reads:  # the layer's first matrix of that input gives its permutation to the others
            perm = shared.setdefault((prefix.rsplit(".", 2)[0], reads), perm)
        packed = quantize_rtn(weight, TINY_LAYOUTS[weight.shape[1]], perm, bias)
        exl2.update(packed.state_dict(prefix))
        dense[f"{prefix}.weight"] = packed.dequantize()[:, : weight.shape[0]].T.float().contiguous()
        if bias is not None:
            dense[f"{prefix}.bias"] = bias.half().float()
    plain = {k: v.half() for k, v in tensors.items()}
    dirs = []
    for name in ("exl2", "reference"):
        target = tmp_path / name
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
        dirs.append(target)
    names = sorted(plain) + sorted(exl2)
    halves = (names[: len(names) // 2], names[len(names) // 2 :])
    for i, part in enumerate(halves, 1):
        save_file({k: {**plain, **exl2}[k] for k in part}, str(dirs[0] / f"output-0000{i}-of-00002.safetensors"))
    save_file({**plain, **dense}, str(dirs[1] / "model.safetensors"))
    return source, dirs[0], dirs[1]


def test_tiny_model_stored_as_exl2(tmp_path):
    source, exl2_dir, reference_dir = exl2_and_reference_dirs(tmp_path)
    quantized = load_model(exl2_dir, device="cpu", dtype="float32")
    reference = load_model(reference_dir, device="cpu", dtype="float32")
    layer = quantized.model.layers[1]
    assert isinstance(layer.self_attn.q_proj, Exl2Linear) and isinstance(layer.mlp.down_proj, Exl2Linear)
    assert isinstance(quantized.lm_head, Exl2Linear)
    assert isinstance(reference.lm_head, DenseLinear)
    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64], [1, 5, 6, 7, 8, 9, 10, 11]])
    logits = quantized(ids, max_output_len=None)
    torch.testing.assert_close(logits, reference(ids, max_output_len=None), rtol=1e-5, atol=1e-5)
    # And the quantized model is still close to the unquantized one (RTN at 8/4 and 5/3/2 bits).
    original = load_model(source, device="cpu", dtype="float32")(ids, max_output_len=None)
    assert (logits - original).norm() / original.norm() < 0.3
