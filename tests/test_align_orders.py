"""linear.align_gated: gate/up's outputs put in the order down_proj reads its input (its act-order permutation), so
that down_proj's GEMV reads silu(gate)·up from consecutive addresses; linear.align_norm: a norm's output put in the
order its readers (q/k/v, gate/up) share. The products, and so the model, are the same."""

from __future__ import annotations

import torch

from exlq.quant.exl2_pack import quantize_rtn
from exlq.runtime import linear
from exlq.runtime.exl2 import Exl2Linear, perm_from_invperm
from exlq.runtime.layers import RMSNorm
from exlq.runtime.loader import load_model
from test_exl2_format import TINY_LAYOUTS, exl2_and_reference_dirs


def _packed(rows: int, columns: int, seed: int, bias: bool):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(columns, rows, generator=gen)
    return quantize_rtn(weight, TINY_LAYOUTS[rows], torch.randperm(rows, generator=gen),
                        torch.randn(columns, generator=gen) if bias else None)


def test_reordered_tensors_hold_the_same_weights_moved():
    """with_output_order moves whole columns (words, scale nibbles, bias; 80 outputs padded to 96, the padding last)
    and with_stored_input_order leaves the stored rows as they are, now read for input perm[j]: both bit for bit."""
    packed = _packed(80, 80, seed=1, bias=True)
    order = torch.randperm(80, generator=torch.Generator().manual_seed(2))
    moved = packed.with_output_order(order)
    assert torch.equal(moved.weight(80), packed.weight(80)[order])
    assert torch.equal(moved.bias[:80], packed.bias[order]) and torch.equal(moved.bias[80:], packed.bias[80:])
    assert torch.equal(moved.q_weight[:, 80:], packed.q_weight[:, 80:])
    perm = perm_from_invperm(packed.q_invperm)
    stored = packed.with_stored_input_order()
    assert torch.equal(stored.q_weight, packed.q_weight) and torch.equal(stored.weight(80), packed.weight(80)[:, perm])


def test_gated_mlp_layers_are_aligned_and_the_model_unchanged(tmp_path, monkeypatch):
    """An EXL2 model loads with every MLP aligned (gate/up's outputs in down_proj's stored order, down_proj's
    permutation the identity, the moves recorded for adapters) where asked to (EXLQ_ALIGN_GATED=1; by default only
    where the kernels run, so not on this CPU), and its logits equal those of the same model loaded without the
    alignment and of its dense twin."""
    _source, exl2_dir, reference_dir = exl2_and_reference_dirs(tmp_path)
    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])
    stored = load_model(exl2_dir, device="cpu", dtype="float32")  # the default: the kernels do not run here
    monkeypatch.setattr(linear, "ALIGN_GATED", "1")
    model = load_model(exl2_dir, device="cpu", dtype="float32")
    for mlp, plain in zip((layer.mlp for layer in model.model.layers), (layer.mlp for layer in stored.model.layers)):
        perm = perm_from_invperm(plain.down_proj.q_invperm)
        assert not torch.equal(perm, torch.arange(perm.numel()))  # the file's down_proj is act-ordered
        assert mlp.down_proj.stored_input_order() is None and torch.equal(mlp.down_proj.feature_order_in, perm)
        for name in ("gate_proj", "up_proj"):
            moved, kept = getattr(mlp, name), getattr(plain, name)
            assert torch.equal(moved.feature_order_out, perm) and kept.feature_order_out is None
            assert torch.equal(moved.dequantized_weight(), kept.dequantized_weight()[perm])
    logits = model(ids, max_output_len=None)
    torch.testing.assert_close(logits, stored(ids, max_output_len=None), rtol=1e-5, atol=1e-5)
    dense = load_model(reference_dir, device="cpu", dtype="float32")
    torch.testing.assert_close(logits, dense(ids, max_output_len=None), rtol=1e-5, atol=1e-5)


def test_only_act_ordered_exl2_down_projections_are_aligned(monkeypatch):
    """Nothing moves where down_proj reads its input in order already, or where a layer is not EXL2."""
    monkeypatch.setattr(linear, "ALIGN_GATED", "1")
    gate, up = (Exl2Linear(_packed(64, 80, seed, bias=False), 64, 80) for seed in (3, 4))
    down_packed = _packed(80, 64, seed=5, bias=False)
    in_order = Exl2Linear(down_packed.with_stored_input_order(), 80, 64)
    assert not linear.align_gated(gate, up, in_order) and gate.feature_order_out is None
    assert not linear.align_gated(gate, linear.DenseLinear(torch.randn(80, 64)), Exl2Linear(down_packed, 80, 64))
    assert gate.feature_order_out is None
    assert linear.align_gated(gate, up, Exl2Linear(down_packed, 80, 64))
    assert torch.equal(gate.feature_order_out, perm_from_invperm(down_packed.q_invperm))


def test_norms_are_aligned_with_their_readers_and_the_model_unchanged(tmp_path, monkeypatch):
    """Where q/k/v (and gate/up) share one act-order permutation, as conversions write them, an EXL2 model loads
    with each norm's output in that order and its readers reading it in order (EXLQ_ALIGN_NORMS=1; by default only
    where the kernels run), the file's norm weight kept; its logits equal those of the same model loaded without and
    of its dense twin."""
    _source, exl2_dir, reference_dir = exl2_and_reference_dirs(tmp_path, shared_perms=True)
    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])
    stored = load_model(exl2_dir, device="cpu", dtype="float32")
    monkeypatch.setattr(linear, "ALIGN_NORMS", "1")
    model = load_model(exl2_dir, device="cpu", dtype="float32")
    for layer, plain in zip(model.model.layers, stored.model.layers):
        for norm, readers in ((layer.input_layernorm, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                              (layer.post_attention_layernorm, ("mlp.gate_proj", "mlp.up_proj"))):
            perm = perm_from_invperm(plain.get_submodule(readers[0]).q_invperm)
            assert not torch.equal(perm, torch.arange(perm.numel()))
            assert torch.equal(norm.output_order.long(), perm) and torch.equal(norm.output_slot.long(), perm.argsort())
            assert torch.equal(norm.output_weight, norm.weight[perm]) and "output_order" not in norm.state_dict()
            for name in readers:
                reader = layer.get_submodule(name)
                assert reader.stored_input_order() is None and torch.equal(reader.feature_order_in, perm)
        assert layer.self_attn.o_proj.feature_order_in is None  # its input is laid out by heads
    logits = model(ids, max_output_len=None)
    torch.testing.assert_close(logits, stored(ids, max_output_len=None), rtol=1e-5, atol=1e-5)
    dense = load_model(reference_dir, device="cpu", dtype="float32")
    torch.testing.assert_close(logits, dense(ids, max_output_len=None), rtol=1e-5, atol=1e-5)


def test_norms_stay_in_order_unless_every_reader_shares_one_permutation(monkeypatch):
    """No norm moves where its readers' permutations differ, where one reads in order already or is not EXL2; an
    aligned norm gives the same values moved, bit for bit."""
    monkeypatch.setattr(linear, "ALIGN_NORMS", "1")
    q_packed, k_packed = _packed(64, 64, seed=6, bias=False), _packed(64, 32, seed=7, bias=False)
    same_perm = k_packed.with_stored_input_order()
    same_perm.q_invperm = q_packed.q_invperm
    norm = RMSNorm(torch.randn(64, generator=torch.Generator().manual_seed(8)), 1e-5)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    expected = norm(x)

    def readers(*packs):
        return [Exl2Linear(p, 64, p.q_weight.shape[1]) for p in packs]

    assert not linear.align_norm(norm, readers(q_packed, k_packed)) and norm.output_order is None
    assert not linear.align_norm(norm, readers(q_packed, q_packed.with_stored_input_order()))
    assert not linear.align_norm(norm, [*readers(q_packed), linear.DenseLinear(torch.randn(32, 64))])
    assert linear.align_norm(norm, readers(q_packed, same_perm))
    perm = perm_from_invperm(q_packed.q_invperm)
    assert torch.equal(norm(x), expected[:, perm])
    monkeypatch.setattr(linear, "ALIGN_NORMS", "auto")  # the default: the kernels do not run on this CPU
    assert not linear.align_norm(RMSNorm(torch.ones(64), 1e-5), readers(q_packed, same_perm))


def test_adapters_follow_the_aligned_layers(tmp_path, monkeypatch):
    """LoRA pairs on aligned layers (gate/up/down, and the readers of aligned norms) are moved with them: the aligned
    EXL2 model with an adapter gives the logits of its dense twin with the same adapter."""
    from exlq.runtime.lora import load_lora, set_loras
    from test_lora import write_adapter

    _source, exl2_dir, reference_dir = exl2_and_reference_dirs(tmp_path, shared_perms=True)
    monkeypatch.setattr(linear, "ALIGN_GATED", "1")
    monkeypatch.setattr(linear, "ALIGN_NORMS", "1")
    quantized = load_model(exl2_dir, device="cpu", dtype="float32")
    dense = load_model(reference_dir, device="cpu", dtype="float32")
    assert quantized.model.layers[1].mlp.down_proj.feature_order_in is not None
    assert quantized.model.layers[1].self_attn.v_proj.feature_order_in is not None
    adapter = load_lora(write_adapter(tmp_path / "a", dense, seed=3))
    set_loras(quantized, [adapter])
    set_loras(dense, [adapter])
    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])
    torch.testing.assert_close(quantized(ids, max_output_len=None), dense(ids, max_output_len=None), rtol=1e-5, atol=1e-5)
