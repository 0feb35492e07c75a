"""The quantized KV cache: the quantize/dequantize math, byte accounting, every forward mode, the CLI.

The tiny test models have head_dim 16, so model tests use group 16 and a dense prefix of 2
(the defaults, 32 and 16, would leave nothing to quantize in short sequences); the CLI tests use
a tiny model with head_dim 32 so the defaults apply.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from exlq.errors import ExlqError
from exlq.eval.perplexity import evaluate_perplexity
from exlq.runtime.cache import KVCache
from exlq.runtime.generator import Generator
from exlq.runtime.kv_quant import (
    CacheType,
    dequantize_kv,
    hadamard,
    key_channel_scales,
    pack_codes,
    parse_cache_type,
    quantize_kv,
    unpack_codes,
)
from exlq.runtime.loader import load_model
from exlq.runtime.sampler import SamplerSettings
from exlq.runtime.tokenizer import Tokenizer
from test_cli import assert_usage_error, cli
from tiny_models import _TRAINING_TEXT, make_tiny_model_dir

TINY = dict(group=16, dense_prefix=2)
Q8, Q4 = CacheType(8, 8, **TINY), CacheType(4, 4, **TINY)


def outlier_data(shape, seed=0) -> torch.Tensor:
    """Gaussian keys with a few large channels, like real attention keys."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 3] += 40.0
    x[..., 17] *= 25.0
    return x


# --- the math ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 16, 32, 64, 128])
def test_hadamard_is_orthogonal_and_symmetric(size):
    h = hadamard(size).double()
    assert torch.allclose(h @ h.T, torch.eye(size, dtype=torch.float64), atol=1e-6)
    assert torch.equal(h, h.T)


def test_hadamard_rejects_other_sizes():
    with pytest.raises(ExlqError, match="power-of-2"):
        hadamard(24)


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_round_trip_is_dense(bits):
    codes = torch.randint(0, 1 << bits, (3, 2, 5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 64 * bits // 8
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_pack_layout_is_little_endian():
    codes = torch.tensor([[1, 2, 3, 0, 0, 0, 0, 5]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x03, 0x00, 0x50]]
    assert pack_codes(codes, 2).tolist() == [[0b00111001, 0b01000000]]
    # 3 bits: code 7 (5) sits at bits 21..23 of the 24-bit word
    assert pack_codes(codes, 3).tolist() == [[1 | 2 << 3 | (3 & 3) << 6, 3 >> 2, 5 << 5]]


def reference_round_trip(x: torch.Tensor, bits: int, group: int, scales: torch.Tensor):
    """The same math in float64 against the given fp16 scales: (exact max-abs scales, codes, dequantized x)."""
    h = hadamard(group, dtype=torch.float64)
    y = x.double().reshape(*x.shape[:-1], -1, group) @ h
    half = ((1 << bits) - 1) / 2
    exact_scales = y.abs().amax(-1) / half
    s = scales.double()[..., None]
    codes = torch.round(y / s + half).clamp(0, 2 * half)
    back = ((codes - half) * s) @ h
    return exact_scales, codes.reshape(x.shape), back.reshape(x.shape)


@pytest.mark.parametrize("bits", range(2, 9))
def test_quantize_matches_float64_reference_and_error_bound(bits):
    group = 32
    x = outlier_data((2, 3, 40, 64), seed=bits)
    codes, scales = quantize_kv(x, bits, group)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 3, 40, 64 * bits // 8)
    assert scales.dtype == torch.float16 and scales.shape == (2, 3, 40, 2)
    exact_scales, ref_codes, ref_back = reference_round_trip(x, bits, group, scales)
    assert torch.allclose(scales.double(), exact_scales, rtol=2**-11, atol=0)  # fp16 rounding of the max-abs scale
    unpacked = unpack_codes(codes, bits).double()
    assert (unpacked != ref_codes).float().mean() < 1e-3  # float32 vs float64 only flips near-ties
    assert ((unpacked - ref_codes).abs() <= 1).all()
    back = dequantize_kv(codes, scales, bits, group, torch.float32)
    # Orthogonal rotation: per group, ‖x - x̂‖ ≤ √group · scale / 2 (half a step per rotated element,
    # a little more where the fp16 scale rounded below the max and the top code clipped).
    err = (back.double() - x.double()).reshape(2, 3, 40, 2, group).norm(dim=-1)
    assert (err <= math.sqrt(group) * scales.double() * (0.5 + 2**-10) + 1e-5).all()
    same = (unpacked == ref_codes).all(-1)  # positions without a flipped code match the reference closely
    assert same.float().mean() > 0.9
    assert torch.allclose(back.double()[same], ref_back[same], atol=1e-4, rtol=1e-5)


def relative_mse(bits: int, group: int = 32) -> float:
    x = outlier_data((4, 2, 64, 64))
    back = dequantize_kv(*quantize_kv(x, bits, group), bits, group, torch.float32)
    return float(((back - x) ** 2).mean() / (x**2).mean())


def test_error_falls_with_bits_and_8_bit_is_nearly_exact():
    errors = [relative_mse(b) for b in range(2, 9)]
    assert all(a > 2 * b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4


def test_quantize_keeps_fp16_and_bf16_inputs():
    x = outlier_data((1, 2, 5, 32))
    for dtype in (torch.float16, torch.bfloat16):
        codes, scales = quantize_kv(x.to(dtype), 6)
        assert dequantize_kv(codes, scales, 6, 32, dtype).dtype == dtype


def test_key_channel_scales_weigh_query_energy_against_key_spread():
    g = torch.Generator().manual_seed(0)
    centered = torch.randn(2, 3, 16, 64, generator=g)
    centered -= centered.mean(-2, keepdim=True)
    scales = key_channel_scales(centered)
    assert scales.shape == (2, 3, 1, 64)
    assert torch.allclose(scales.pow(2).mean(-1), torch.ones(2, 3, 1))  # RMS 1 over the channels
    assert torch.allclose(key_channel_scales(centered, torch.ones(2, 3, 16, 64)), scales)  # flat queries = no queries
    # s² ∝ rms(q) / rms(k): 4x the query energy (2x rms) and 4x the key spread cancel; each alone moves s by √2
    energy = torch.ones(2, 3, 16, 64)
    energy[..., 7] = 4.0
    wide = centered.clone()
    wide[..., 7] *= 4.0
    base = scales[..., 7] / scales[..., 8]
    assert torch.allclose(key_channel_scales(centered, energy)[..., 7] / key_channel_scales(centered, energy)[..., 8], base * 2**0.5, rtol=1e-4)
    assert torch.allclose(key_channel_scales(wide)[..., 7] / key_channel_scales(wide)[..., 8], base / 2, rtol=1e-4)
    # a channel constant over the prefix is floored at 0.1x the mean spread instead of getting an unbounded weight
    flat = centered.clone()
    flat[..., 7] = 0.0
    floored = key_channel_scales(flat)
    assert torch.isfinite(floored).all() and (floored[..., 7] / floored.median(-1).values < 4).all()
    assert torch.isfinite(key_channel_scales(torch.zeros(1, 1, 16, 64))).all()


def outlier_channel_head(seed: int = 0, length: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [1, 1, length, 64] and queries [1, 2, length, 64] shaped like a Qwen2.5-0.5B head: channel 5's
    keys sit on a large constant (the k_proj bias) and barely vary, while the queries are large there."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 1, length, 64, generator=g)
    keys[..., 5] = 100.0 + 0.05 * keys[..., 5]
    queries = torch.randn(1, 2, length, 64, generator=g)
    queries[..., 5] += 30.0
    return keys, queries


def logit_error_through_cache(cache_type: CacheType, show_queries: bool) -> float:
    """RMS error of the logits q·k of the positions after the dense prefix, keys read back from a q4 cache."""
    keys, queries = outlier_channel_head()
    cache = KVCache(num_layers=1, num_kv_heads=1, head_dim=64, max_seq_len=80, dtype=torch.float32, cache_type=cache_type)
    for start in range(0, 80, 8):  # chunked, as a prefill then decode steps would write it
        if show_queries:
            cache.observe_queries(0, queries[:, :, start : start + 8], start)
        cache.store(0, keys[:, :, start : start + 8], keys[:, :, start : start + 8], start)
    read = cache.keys.read(0, 1, 80)
    prefix = cache_type.dense_prefix
    errors = queries[..., prefix:, :] @ (read - keys)[..., prefix:, :].transpose(-1, -2)
    return float(errors.pow(2).mean().sqrt())


def test_key_channel_scales_cut_the_logit_error_where_queries_are_large():
    plain = logit_error_through_cache(CacheType(4, 4, key_scales=False), show_queries=True)
    keys_only = logit_error_through_cache(CacheType(4, 4), show_queries=False)
    query_aware = logit_error_through_cache(CacheType(4, 4), show_queries=True)
    assert query_aware < keys_only < plain / 2 and query_aware < plain / 3, (plain, keys_only, query_aware)


def test_key_channel_scales_are_fixed_by_the_prefix_and_rewrite_identically():
    keys, queries = outlier_channel_head(seed=1, length=40)
    cache = KVCache(num_layers=1, num_kv_heads=1, head_dim=64, max_seq_len=40, dtype=torch.float32, cache_type="q4")

    def run(start: int, step: int) -> list[torch.Tensor]:
        for i in range(start, 40, step):
            cache.observe_queries(0, queries[:, :, i : i + step], i)
            cache.store(0, keys[:, :, i : i + step], keys[:, :, i : i + step], i)
        cache.seq_len = 40
        return [cache.keys.multipliers[0].clone(), cache.keys.codes[0].clone(), cache.keys.scales[0].clone()]

    first = run(0, 4)
    for keep in (20, 3):  # rewind inside the quantized part, inside the dense prefix
        cache.truncate(keep)
        assert all(torch.equal(a, b) for a, b in zip(run(keep, 4), first))
    cache.truncate(0)
    at_once = run(0, 40)  # chunking changes only float summation order
    assert torch.allclose(at_once[0], first[0], rtol=1e-5)
    assert (at_once[1] != first[1]).float().mean() < 0.01


# --- cache types, parsing, bytes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "cache, bits, expected",
    [("fp16", None, (None, None)), ("q4", None, (4, 4)), ("Q6", None, (6, 6)), ("q8", None, (8, 8)),
     ("fp16", "4,2", (4, 2)), ("q8", " 2 , 4 ", (2, 4)), ("q4", "8,8", (8, 8))],
)  # fmt: skip
def test_parse_cache_type(cache, bits, expected):
    parsed = parse_cache_type(cache, bits)
    assert (parsed.key_bits, parsed.value_bits) == expected and parsed.group == 32


@pytest.mark.parametrize(
    "cache, bits, needle",
    [("q5", None, "q5"), ("int4", None, "fp16, q4, q6, q8"), ("q4", "9,4", "between 2 and 8"), ("q4", "1,4", "between 2 and 8"),
     ("q4", "x", "two integers"), ("q4", "4", "two integers"), ("q4", "4,4,4", "two integers"), ("q4", "4,-2", "two integers")],
)  # fmt: skip
def test_parse_cache_type_rejects(cache, bits, needle):
    with pytest.raises(ExlqError, match=needle):
        parse_cache_type(cache, bits)


def test_cache_type_names():
    assert [CacheType(*b).name for b in [(None, None), (4, 4), (8, 8), (4, 2), (4, None)]] == ["fp16", "q4", "q8", "k4v2", "k4v16"]
    assert CacheType(4, 4, group=64, dense_prefix=0).name == "q4g64p0"
    assert CacheType(4, 4, key_scales=False).name == "q4s0" and CacheType(None, 4, key_scales=False).name == "k16v4"


@pytest.mark.parametrize(
    "cache_type, per_head_side",
    [(CacheType(), (64 * 4, 64 * 4)), (CacheType(8, 8), (64 + 2 * 2, 64 + 2 * 2)), (CacheType(6, 6), (48 + 4, 48 + 4)),
     (CacheType(4, 4), (32 + 4, 32 + 4)), (CacheType(4, 2), (32 + 4, 16 + 4)), (CacheType(2, 4, group=64), (16 + 2, 32 + 2)),
     (CacheType(3, None), (24 + 4, 64 * 4))],
)  # fmt: skip
def test_bytes_per_token_is_exact(cache_type, per_head_side):
    layers, heads, batch = 3, 2, 2
    cache = KVCache(num_layers=layers, num_kv_heads=heads, head_dim=64, max_seq_len=40, batch_size=batch,
                    dtype=torch.float32, cache_type=cache_type)  # fmt: skip
    assert cache.bytes_per_token == layers * heads * sum(per_head_side) * batch
    # what is really allocated per position past the dense prefix
    cache.store(0, torch.zeros(batch, heads, 1, 64), torch.zeros(batch, heads, 1, 64), 0)
    stored = 0
    for store in (cache.keys, cache.values):
        tensors = [store.codes[0], store.scales[0]] if hasattr(store, "codes") else [store.data[0]]
        stored += sum(t[0, :, 0].numel() * t.element_size() for t in tensors)
    assert stored * layers * batch == cache.bytes_per_token
    prefix = 0 if not cache_type.quantized else cache_type.dense_prefix
    dense_side = layers * heads * 64 * 4
    quant_sides = [(b, s) for b, s in zip((cache_type.key_bits, cache_type.value_bits), per_head_side)]
    expected = sum((prefix if b is not None else 0) * dense_side + (30 - (prefix if b is not None else 0)) * layers * heads * s for b, s in quant_sides)
    assert cache.bytes_for(30) == expected


def test_head_dim_must_fit_the_group():
    with pytest.raises(ExlqError, match="head_dim=48.*multiple of 32.*--cache fp16"):
        KVCache(num_layers=1, num_kv_heads=1, head_dim=48, max_seq_len=8, cache_type="q4")
    KVCache(num_layers=1, num_kv_heads=1, head_dim=48, max_seq_len=8, cache_type=CacheType(4, 4, group=16))


# --- in the model -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tiny_model_dirs):
    return load_model(tiny_model_dirs[request.param], device="cpu", dtype="fp32")


def random_ids(model, batch, length, seed=0):
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode_logits(model, ids, cache_type, prefill=6):
    """Prefill `prefill` tokens, then decode the rest one at a time: every position's logits."""
    cache = KVCache.for_model(model, ids.shape[1], ids.shape[0], cache_type=cache_type)
    out = [model(ids[:, :prefill], cache, max_output_len=None)]
    out += [model(ids[:, i : i + 1], cache) for i in range(prefill, ids.shape[1])]
    return torch.cat(out, dim=1)


def relative_logit_error(a, b):
    return float((a - b).norm() / b.norm())


def test_quantized_decode_is_close_to_fp16(model):
    ids = random_ids(model, 1, 40)
    reference = decode_logits(model, ids, None)
    q8 = relative_logit_error(decode_logits(model, ids, Q8), reference)
    q4 = relative_logit_error(decode_logits(model, ids, Q4), reference)
    q2 = relative_logit_error(decode_logits(model, ids, CacheType(2, 2, **TINY)), reference)
    assert q8 < 0.03 and q4 < 0.3 and q8 < q4 < q2, (q8, q4, q2)


def test_fp16_cache_type_is_the_plain_cache(model):
    ids = random_ids(model, 1, 20)
    assert torch.equal(decode_logits(model, ids, "fp16"), decode_logits(model, ids, None))


def codes_of(cache: KVCache, layer: int, end: int):
    return [t[layer][:, :, :end].clone() for store in (cache.keys, cache.values) for t in (store.codes, store.scales, store.dense.data)]


def test_rewind_then_same_input_rewrites_identical_codes(model):
    ids = random_ids(model, 1, 24)
    cache = KVCache.for_model(model, 32, cache_type=Q4)
    model(ids[:, :10], cache, max_output_len=0)
    first = [model(ids[:, i : i + 1], cache) for i in range(10, 24)]
    snapshot = [codes_of(cache, layer, 24) for layer in range(cache.num_layers)]
    for keep in (15, 1, 0):  # inside the quantized part, inside the dense prefix, everything
        cache.truncate(keep)
        if keep < 10:
            model(ids[:, keep:10], cache, max_output_len=0) if keep else model(ids[:, :10], cache, max_output_len=0)
        again = [model(ids[:, i : i + 1], cache) for i in range(max(keep, 10), 24)]
        assert all(torch.equal(a, b) for a, b in zip(again, first[max(keep, 10) - 10 :]))
        for layer in range(cache.num_layers):
            assert all(torch.equal(a, b) for a, b in zip(codes_of(cache, layer, 24), snapshot[layer]))


def test_quantized_cache_does_not_depend_on_chunking_beyond_float_noise(model):
    """A position's codes depend on its own vector and the dense prefix only."""
    ids = random_ids(model, 1, 30)
    one = decode_logits(model, ids, Q8, prefill=30)[:, -1]
    steps = decode_logits(model, ids, Q8, prefill=2)[:, -1]
    assert relative_logit_error(steps, one) < 1e-3


def test_batch_with_left_padding(model):
    """A left-padded row is quantized as if it ran alone: its offset and key scales come from its own first
    positions, not from the padding (the padding's keys made Qwen2.5-0.5B's q4 KL 9x worse, docs/benchmarks.md)."""
    rows = [random_ids(model, 1, 20, seed=1)[0], random_ids(model, 1, 14, seed=2)[0]]
    pad = torch.tensor([0, 6])
    ids = torch.stack([rows[0], torch.cat([torch.zeros(6, dtype=torch.long), rows[1]])])
    for cache_type, tolerance in ((Q8, 0.03), (Q4, 0.3)):
        cache = KVCache.for_model(model, 24, batch_size=2, cache_type=cache_type)
        model(ids[:, :16], cache, pad_lengths=pad, max_output_len=0)
        batched = torch.cat([model(ids[:, 16:19], cache, max_output_len=None), model(ids[:, 19:], cache)], dim=1)
        assert relative_logit_error(batched[:1], model(rows[0][None], max_output_len=4)) < tolerance  # no cache at all
        solo = KVCache.for_model(model, 24, cache_type=cache_type)  # the padded row's prompt alone, same cache type
        model(rows[1][None, :10], solo, max_output_len=0)
        alone = torch.cat([model(rows[1][None, 10:13], solo, max_output_len=None), model(rows[1][None, 13:], solo)], dim=1)
        # Layer 0 sees the same keys either way (later layers differ a little: their inputs went through the cache).
        for side in ("offsets", "multipliers"):
            torch.testing.assert_close(getattr(cache.keys, side)[0][1], getattr(solo.keys, side)[0][0])
        torch.testing.assert_close(cache.values.offsets[0][1], solo.values.offsets[0][0])
        # Not identical: alone, its first positions are the dense prefix; padded, the padding is.
        assert relative_logit_error(batched[1:], alone) < tolerance / 3, cache_type.name


def test_layer_repetition_gets_a_quantized_slot_per_position(tiny_model_dirs):
    model = load_model(tiny_model_dirs["llama"], device="cpu", dtype="fp32")
    model.set_layer_order([0, 1, 0, 1, 1])
    ids = random_ids(model, 1, 24)
    cache = KVCache.for_model(model, 24, cache_type=Q8)
    assert cache.num_layers == 5
    assert relative_logit_error(decode_logits(model, ids, Q8), decode_logits(model, ids, None)) < 0.03


def test_generator_prefix_reuse_with_quantized_cache(tiny_llama_dir):
    model = load_model(tiny_llama_dir, device="cpu", dtype="fp32")
    tokenizer = Tokenizer.from_dir(tiny_llama_dir)
    generator = Generator(model, tokenizer, max_seq_len=96, cache_type=Q8)
    assert generator.cache.cache_type == Q8
    first = tokenizer.encode(_TRAINING_TEXT[0][:60], add_bos=True)
    greedy = SamplerSettings(temperature=0.0)
    generator.generate(first, sampler=greedy, max_new_tokens=8)
    second = first + tokenizer.encode(" Paris is")
    reused = generator.generate(second, sampler=greedy, max_new_tokens=8)
    assert reused.reused_tokens == len(first)
    fresh = Generator(model, tokenizer, max_seq_len=96, cache_type=Q8).generate(second, sampler=greedy, max_new_tokens=8)
    assert reused.token_ids == fresh.token_ids


def test_generator_accepts_a_cache_name(tiny_llama_dir):
    model = load_model(tiny_llama_dir, device="cpu", dtype="fp32")
    with pytest.raises(ExlqError, match="head_dim=16"):  # q4 means group 32; the tiny model's heads are 16 wide
        Generator(model, Tokenizer.from_dir(tiny_llama_dir), max_seq_len=32, cache_type="q4")


def test_token_by_token_perplexity(model):
    ids = random_ids(model, 1, 70)[0]
    full = evaluate_perplexity(model, ids, length=32, rows=2)
    plain = evaluate_perplexity(model, ids, length=32, rows=2, chunk=1)
    chunked = evaluate_perplexity(model, ids, length=32, rows=2, chunk=5, batch_size=2)
    q4 = evaluate_perplexity(model, ids, length=32, rows=2, chunk=1, cache_type=Q4)
    assert full.mode == "full-window" and plain.mode == "token-by-token" and plain.chunk == 1
    assert math.isclose(plain.perplexity, full.perplexity, rel_tol=1e-5)
    assert math.isclose(chunked.perplexity, full.perplexity, rel_tol=1e-5)
    assert q4.cache_type == "q4g16p2" and q4.perplexity != plain.perplexity
    assert math.isclose(q4.perplexity, full.perplexity, rel_tol=0.1)
    assert "one token per step" in q4.convention and "no KV cache" in full.convention
    sliding = evaluate_perplexity(model, ids, length=32, stride=16)
    assert math.isclose(evaluate_perplexity(model, ids, length=32, stride=16, chunk=3).perplexity, sliding.perplexity, rel_tol=1e-5)
    with pytest.raises(ExlqError, match="chunk"):
        evaluate_perplexity(model, ids, length=32, rows=1, cache_type=Q4)


# --- the CLI ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_head_dir(tmp_path_factory):
    """A tiny model whose heads are 32 wide, so the default group of 32 applies."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("wide-head"), "qwen2", seed=7, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("kv-text") / "text.txt"
    path.write_text("\n".join(_TRAINING_TEXT * 3), encoding="utf-8")
    return path


def test_cli_infer_with_quantized_cache(capsys, wide_head_dir):
    args = ("infer", wide_head_dir, "-p", "The quick brown fox", "--format", "raw", "--greedy", "--max-new-tokens", 6, "--json")
    code, out, err = cli(capsys, *args, "--cache", "q4")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["cache"] == "q4" and payload["new_tokens"] >= 1
    code, out, err = cli(capsys, *args, "--cache-bits", "4,2")
    assert code == 0 and json.loads(out)["cache"] == "k4v2", err


def test_cli_eval_ppl_token_by_token(capsys, wide_head_dir, text_file):
    args = ("eval-ppl", wide_head_dir, "--data", text_file, "--rows", 2, "--length", 24)
    code, out, err = cli(capsys, *args, "--json")
    full = json.loads(out)
    assert code == 0 and full["mode"] == "full-window" and "cache" not in full
    code, out, err = cli(capsys, *args, "--token-by-token", "--json")
    fp16 = json.loads(out)
    assert fp16["mode"] == "token-by-token" and fp16["chunk"] == 1 and fp16["cache"] == "fp16"
    assert math.isclose(fp16["perplexity"], full["perplexity"], rel_tol=1e-5)
    code, out, err = cli(capsys, *args, "--token-by-token", "--cache", "q4", "--json")
    q4 = json.loads(out)
    assert code == 0 and q4["cache"] == "q4" and q4["cache_bytes_per_token"] == 2 * 2 * (16 + 2)  # 2 layers, 1 head, K+V
    assert q4["cache_mb_per_window"] == round((16 * 2 * 2 * 32 * 4 + 8 * q4["cache_bytes_per_token"]) / 1e6, 3)
    assert math.isclose(q4["perplexity"], full["perplexity"], rel_tol=0.2)
    code, out, err = cli(capsys, *args, "--token-by-token", "--chunk", 5, "--cache", "q8")
    assert code == 0 and out.startswith("perplexity ") and "q8 KV cache (5 tokens per step)" in out and "bytes per token" in out


@pytest.mark.parametrize(
    "command, extra, needles",
    [("infer", ["--cache", "q5"], ["q5", "fp16, q4, q6, q8"]), ("infer", ["--cache-bits", "9,4"], ["--cache-bits", "between 2 and 8"]),
     ("infer", ["--cache-bits", "x"], ["--cache-bits", "two integers"]), ("eval-ppl", ["--cache", "q5", "--token-by-token"], ["q5"]),
     ("eval-ppl", ["--cache-bits", "9,4", "--token-by-token"], ["between 2 and 8"]), ("eval-ppl", ["--cache-bits", "x"], ["two integers"]),
     ("eval-ppl", ["--cache", "q4"], ["--token-by-token"]), ("eval-ppl", ["--chunk", "4"], ["--token-by-token"]),
     ("eval-ppl", ["--token-by-token", "--chunk", "0"], ["--chunk"])],
)  # fmt: skip
def test_cli_bad_cache_options(capsys, wide_head_dir, text_file, command, extra, needles):
    args = ["-p", "hi"] if command == "infer" else ["--data", text_file, "--rows", 1, "--length", 16]
    code, out, err = cli(capsys, command, wide_head_dir, *args, *extra)
    assert_usage_error(code, out, err, *needles)


def test_cli_head_dim_error_after_load(capsys, tiny_llama_dir):
    code, out, err = cli(capsys, "infer", tiny_llama_dir, "-p", "hi", "--cache", "q4")
    assert_usage_error(code, out, err, "head_dim=16", "--cache fp16", after_load=True)
