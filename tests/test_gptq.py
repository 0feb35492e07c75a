"""GPTQ quantizer core: group layout per the format, error compensation beats rounding."""

from __future__ import annotations

import pytest
import torch

from exlq.errors import ExlqError
from exlq.quant.gptq import QuantSpec, effective_scales, hessian_weighted_error, quantize_gptq, quantize_gptq_many


def test_group_layout_matches_the_reference_example():
    spec = QuantSpec((6, 3, 2), (0.05, 0.2, 0.75), (32, 64, 64))
    layout = spec.group_layout(14336)
    assert layout[:23] == [(6, 32)] * 23
    assert layout[23:68] == [(3, 64)] * 45
    assert layout[68:] == [(2, 64)] * 167 + [(2, 32)]
    assert sum(rows for _, rows in layout) == 14336


def test_layout_rules():
    assert QuantSpec.uniform(4, 128).group_layout(320) == [(4, 128), (4, 128), (4, 64)]
    assert QuantSpec.uniform(4, 32).group_layout(48) == [(4, 32), (2, 16)]  # a 16-row tail must be 2-bit
    with pytest.raises(ExlqError):
        QuantSpec.uniform(4).group_layout(100)
    with pytest.raises(ExlqError):
        QuantSpec((2, 4), (0.5, 0.5), (32, 32))  # ascending bits are unreadable by the runtime
    with pytest.raises(ExlqError):
        QuantSpec((7,), (1.0,), (32,))


def correlated_problem(n_out=64, k_in=256, samples=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k_in, k_in, generator=g) / k_in**0.5 + torch.eye(k_in)
    scale = torch.exp(torch.randn(k_in, generator=g))  # channels of very different magnitude
    x = torch.randn(samples, k_in, generator=g) @ mix * scale
    weight = torch.randn(n_out, k_in, generator=g) / k_in**0.5
    return weight, x.T.double() @ x.double()


@pytest.mark.parametrize("spec", [QuantSpec.uniform(4, 64), QuantSpec.uniform(3, 32), QuantSpec((4, 2), (0.25, 0.75), (32, 32))])
def test_gptq_beats_round_to_nearest_on_hessian_weighted_error(spec):
    weight, hessian = correlated_problem()
    gptq = quantize_gptq(weight, hessian, spec).dequantize()
    rtn = quantize_gptq(weight, None, spec).dequantize()
    e_gptq = hessian_weighted_error(weight, gptq, hessian)
    e_rtn = hessian_weighted_error(weight, rtn, hessian)
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)


def test_more_bits_less_error_and_8_bit_is_nearly_lossless():
    weight, hessian = correlated_problem(seed=1)
    errors = [
        hessian_weighted_error(weight, quantize_gptq(weight, hessian, QuantSpec.uniform(b, 64)).dequantize(), hessian)
        for b in (2, 3, 4, 5, 6, 8)
    ]
    assert errors == sorted(errors, reverse=True)
    reference = hessian_weighted_error(weight, torch.zeros_like(weight), hessian)
    assert errors[-1] / reference < 1e-4


def test_codes_scales_and_act_order():
    weight, hessian = correlated_problem(seed=2)
    spec = QuantSpec((5, 3), (0.25, 0.75), (32, 64))
    q = quantize_gptq(weight, hessian, spec)
    start = 0
    for bits, rows in q.groups:
        block = q.codes[start : start + rows]
        assert block.min() >= 0 and block.max() <= 2**bits - 1
        start += rows
    assert q.scale_codes.min() >= 1 and q.scale_codes.max() <= 16
    assert q.q_scale_max.dtype == torch.float16
    diag = torch.diag(hessian)[q.perm]
    assert torch.all(diag[:-1] >= diag[1:])  # most salient channels first: they get the 5-bit group
    assert sorted(q.perm.tolist()) == list(range(weight.shape[1]))


def test_effective_scales_use_fp16_roundings():
    """q_scale_max in the fp16 subnormal range after /256: the spec's worked example (§4.3)."""
    q_scale_max = torch.tensor([0x1A25], dtype=torch.int16).view(torch.float16)
    s = effective_scales(torch.tensor([[7]]), q_scale_max)
    assert s.view(torch.int16).item() == 0x10B7


def test_nan_weights_are_refused():
    weight, hessian = correlated_problem(n_out=8, k_in=64, samples=128)
    weight[3, 5] = float("nan")
    with pytest.raises(ExlqError, match="NaN"):
        quantize_gptq(weight, hessian, QuantSpec.uniform(4, 32))


def test_batched_specs_equal_one_at_a_time():
    weight, hessian = correlated_problem(n_out=48, k_in=192, seed=3)
    specs = [QuantSpec.uniform(2, 32), QuantSpec((6, 3, 2), (0.05, 0.2, 0.75), (32, 64, 64)), QuantSpec.uniform(8, 128)]
    for spec, batched in zip(specs, quantize_gptq_many(weight, hessian, specs)):
        single = quantize_gptq(weight, hessian, spec)
        assert torch.equal(batched.codes, single.codes) and torch.equal(batched.scale_codes, single.scale_codes)
        assert torch.equal(batched.q_scale_max, single.q_scale_max) and batched.groups == single.groups


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("weighted", [False, True])
def test_each_column_gets_its_least_squares_scale_code(bits, weighted):
    """Brute force over the 16 codes per column, with the group's q_scale_max and the runtime's fp16 roundings;
    with row weights (GPTQ's output saliency of each input row) the weighted squared error."""
    from exlq.quant.gptq import dequantize_codes, quantize_codes, search_group_scales

    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(40, 32, generator=gen) * torch.linspace(0.1, 3.0, 40)[:, None]
    weights = torch.rand(32, generator=gen) * 10 if weighted else None
    codes, q_scale_max, scales = search_group_scales(w, bits, weights)
    assert torch.equal(scales, effective_scales(codes[None], q_scale_max[None])[0])
    for column in range(w.shape[0]):
        row = w[column : column + 1]
        errors = []
        for code in range(1, 17):
            s = effective_scales(torch.tensor([[code]]), q_scale_max[None])[0]
            error = (dequantize_codes(quantize_codes(row, s, bits), s, bits) - row).pow(2)
            errors.append(float((error if weights is None else error * weights).sum()))
        assert errors[int(codes[column]) - 1] <= min(errors) * (1 + 1e-6)


@pytest.mark.parametrize("spec", [QuantSpec.uniform(3, 128), QuantSpec((4, 3), (0.3, 0.7), (32, 128)), QuantSpec.uniform(2, 64)])
def test_coordinate_descent_lowers_the_hessian_weighted_error_every_sweep(spec):
    """refine_codes only moves codes (scales, groups and order stay), and each sweep can only lower
    the damped objective GPTQ minimizes; on a correlated Hessian the first sweep takes 10-20 % off."""
    from exlq.quant.gptq import prepare_hessian, refine_codes

    gen = torch.Generator().manual_seed(1)
    k, n = 256, 96
    x = torch.randn(2048, k, generator=gen) @ (torch.randn(k, k, generator=gen) * 0.2 + torch.eye(k))
    h = x.T @ x / x.shape[0]
    w = torch.randn(n, k, generator=gen)
    gptq = quantize_gptq(w, h, spec)
    damped, target = prepare_hessian(h, w, 0.01)
    stored_h, stored_w = damped[gptq.perm][:, gptq.perm].float(), target[:, gptq.perm]
    errors = [hessian_weighted_error(w, gptq.dequantize(), damped)]
    matrix = gptq
    for _ in range(3):
        matrix = refine_codes(matrix, stored_w, stored_h, 1)
        errors.append(hessian_weighted_error(w, matrix.dequantize(), damped))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:])), errors
    assert errors[1] < 0.92 * errors[0], errors
    assert torch.equal(matrix.scale_codes, gptq.scale_codes) and torch.equal(matrix.q_scale_max, gptq.q_scale_max)
    assert torch.equal(matrix.perm, gptq.perm) and matrix.groups == gptq.groups
    start = 0
    for bits, rows in matrix.groups:
        block = matrix.codes[start : start + rows]
        assert block.min() >= 0 and block.max() < 2**bits
        start += rows
    # Through the public entry point: the same result as refining by hand.
    assert torch.equal(quantize_gptq(w, h, spec, refine_sweeps=3).codes, matrix.codes)


@pytest.mark.parametrize("weighted", [False, True])
def test_groups_searched_together_get_what_each_gets_alone(weighted):
    """GPTQ searches the scales of every option's group that starts at one block in one batch (mixed widths, equal
    rows): each group's codes, q_scale_max and scales must be exactly those of its search alone."""
    from exlq.quant.gptq import search_group_scales, search_group_scales_many

    gen = torch.Generator().manual_seed(7)
    widths = (8, 4, 4, 2, 6, 3)
    w = torch.randn(len(widths), 96, 64, generator=gen) * torch.linspace(0.05, 2.0, 96)[:, None]
    weights = torch.rand(64, generator=gen) * 5 if weighted else None
    codes, q_scale_max, scales = search_group_scales_many(w, widths, weights)
    for i, bits in enumerate(widths):
        alone = search_group_scales(w[i], bits, weights)
        assert torch.equal(codes[i], alone[0]) and torch.equal(q_scale_max[i], alone[1])
        assert torch.equal(scales[i], alone[2])
