"""Every way of driving forward (cache, chunks, decode, batches, padding) equals one full forward."""

from __future__ import annotations

import pytest
import torch

from exlq.errors import ExlqError
from exlq.runtime.loader import load_model

ATOL = 2e-5


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral-window"])
def model(request, tiny_model_dirs):
    return load_model(tiny_model_dirs[request.param], device="cpu", dtype="fp32")


def random_ids(model, batch, length, seed=0):
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_incremental_decode_equals_full_forward(model):
    ids = random_ids(model, 1, 30)
    full = model(ids, max_output_len=None)
    cache = model.new_cache(64)
    first = model(ids[:, :10], cache, max_output_len=None)
    steps = [model(ids[:, i : i + 1], cache) for i in range(10, 30)]
    assert cache.seq_len == 30
    assert torch.allclose(first, full[:, :10], atol=ATOL)
    assert torch.allclose(torch.cat(steps, dim=1), full[:, 10:], atol=ATOL)


def test_chunked_prefill_equals_full_forward(model):
    ids = random_ids(model, 1, 37)
    full = model(ids, max_output_len=None)
    cache = model.new_cache(64)
    chunks = [model(ids[:, s : s + 8], cache, max_output_len=None) for s in range(0, 37, 8)]
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=ATOL)


def test_prefill_only_returns_no_logits_but_fills_cache(model):
    ids = random_ids(model, 1, 12)
    cache = model.new_cache(32)
    assert model(ids[:, :11], cache, max_output_len=0) is None
    last = model(ids[:, 11:], cache)
    assert torch.allclose(last, model(ids)[:, -1:], atol=ATOL)


def test_max_output_len_selects_last_rows(model):
    ids = random_ids(model, 2, 16)
    full = model(ids, max_output_len=None)
    assert model(ids).shape == (2, 1, model.config.vocab_size)
    assert torch.allclose(model(ids, max_output_len=5), full[:, -5:], atol=ATOL)


def test_batch_of_two_equals_two_single_runs(model):
    ids = random_ids(model, 2, 20)
    cache = model.new_cache(32, batch_size=2)
    batched = torch.cat([model(ids[:, :15], cache, max_output_len=None), model(ids[:, 15:], cache, max_output_len=None)], 1)
    for row in range(2):
        single = model(ids[row : row + 1], max_output_len=None)
        assert torch.allclose(batched[row : row + 1], single, atol=ATOL)


def test_left_padded_batch_equals_unpadded_rows(model):
    short, long = random_ids(model, 1, 9, seed=3), random_ids(model, 1, 14, seed=4)
    padded = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    cache = model.new_cache(32, batch_size=2)
    logits = model(padded, cache, max_output_len=1, pad_lengths=torch.tensor([5, 0]))
    next_tokens = torch.tensor([[7], [11]])
    step = model(next_tokens, cache)
    for row, ids in enumerate((short, long)):
        expected = model(torch.cat([ids, next_tokens[row : row + 1]], 1), max_output_len=2)
        assert torch.allclose(logits[row, -1], expected[0, 0], atol=ATOL)
        assert torch.allclose(step[row, -1], expected[0, 1], atol=ATOL)


def test_pad_lengths_need_one_length_a_row(model):
    """Every consumer of the pad lengths (masks, RoPE positions, the attention kernel) indexes them by row: a
    tensor of another shape is refused, not broadcast."""
    ids = random_ids(model, 2, 6)
    for pad in (torch.tensor([1]), torch.tensor([[1, 0]]), torch.tensor([1, 0, 0])):
        with pytest.raises(ExlqError, match="one length a row"):
            model(ids, model.new_cache(8, batch_size=2), pad_lengths=pad)
    assert model(ids, pad_lengths=torch.tensor([1, 0], dtype=torch.int32)).shape[0] == 2
    assert torch.equal(model(ids, pad_lengths=[1, 0]), model(ids, pad_lengths=torch.tensor([1, 0])))  # a list too


def test_truncate_rewinds_cache(model):
    ids = random_ids(model, 1, 20)
    other = random_ids(model, 1, 20, seed=9)
    cache = model.new_cache(32)
    model(ids[:, :12], cache, max_output_len=0)
    model(other[:, :5], cache, max_output_len=0)  # a branch we then abandon
    cache.truncate(12)
    out = model(ids[:, 12:], cache, max_output_len=None)
    assert torch.allclose(out, model(ids, max_output_len=None)[:, 12:], atol=ATOL)


def test_cache_is_lazy_and_refuses_overflow(model):
    cache = model.new_cache(16)
    assert not cache.allocated
    model(random_ids(model, 1, 10), cache, max_output_len=0)
    assert cache.allocated and cache.max_seq_len == 16
    with pytest.raises(ExlqError, match="max_seq_len=16"):
        model(random_ids(model, 1, 7), cache)
    assert cache.seq_len == 10 and cache.max_seq_len == 16  # nothing was reset behind our back


def test_replace_module_swaps_lm_head(model):
    from exlq.runtime.linear import DenseLinear

    ids = random_ids(model, 1, 6)
    head = model.lm_head
    new_head = DenseLinear(torch.zeros_like(head.weight))
    old = model.replace_module("lm_head", new_head)
    try:
        assert torch.count_nonzero(model(ids)) == 0
    finally:
        model.replace_module("lm_head", old)
    assert torch.count_nonzero(model(ids)) > 0
    with pytest.raises(ExlqError):
        model.replace_module("model.no_such_module", new_head)


def test_pinned_decode_backend_gives_the_same_attention(monkeypatch):
    """EXLQ_SDPA_DECODE (an A/B switch) changes which kernel runs a one-token step, not its result: the folded
    grouped-query call under a pinned backend equals the unpinned one and a per-head reference, additive mask
    included (on the CPU only the math backend exists; the GPU's are timed by `exlq bench`)."""
    from torch.nn.attention import SDPBackend

    from exlq.runtime import attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 1, 64, generator=gen)
    k, v = torch.randn(2, 2, 40, 64, generator=gen), torch.randn(2, 2, 40, 64, generator=gen)
    mask = torch.zeros(1, 1, 1, 40).masked_fill_(torch.arange(40) > 30, float("-inf"))
    monkeypatch.setattr(attention, "DECODE_BACKEND", None)
    expected = attention.attend(q, k, v, mask, False)
    monkeypatch.setattr(attention, "DECODE_BACKEND", SDPBackend.MATH)
    got = attention.attend(q, k, v, mask, False)
    # reference: each query head against its key/value head, masked positions left out
    keep = slice(0, 31)
    scores = (q.reshape(2, 2, 4, 64) @ k[:, :, keep].transpose(-1, -2)) / 8.0
    reference = (scores.softmax(-1) @ v[:, :, keep]).reshape(2, 8, 1, 64)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(expected, reference, atol=1e-5, rtol=1e-4)


def test_load_model_refuses_an_unsupported_torch_dtype(tiny_model_dirs):
    from exlq.runtime.loader import load_model

    with pytest.raises(ExlqError, match="not supported"):
        load_model(tiny_model_dirs["llama"], device="cpu", dtype=torch.int8)
