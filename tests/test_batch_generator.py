"""BatchGenerator: left-padded batches give every row what batch-1 generation gives it."""

from __future__ import annotations

import pytest

from exlq.errors import ExlqError
from exlq.runtime.batch_generator import BatchGenerator
from exlq.runtime.generator import Generator
from exlq.runtime.loader import load_model
from exlq.runtime.sampler import SamplerSettings
from exlq.runtime.tokenizer import Tokenizer

GREEDY = SamplerSettings(temperature=0.0)
PROMPTS = [
    "The quick brown fox",
    "def add(a, b):\n    return",
    "Paris is",
    "Once upon a time there was a little model that could",
]


@pytest.fixture(scope="module", params=["llama", "qwen2-tied", "mistral-window"])
def model_and_tokenizer(request, tiny_model_dirs):
    path = tiny_model_dirs[request.param]
    return load_model(path, device="cpu", dtype="fp32"), Tokenizer.from_dir(path)


def test_greedy_batch_matches_single_sequence_generation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ: real left padding
    batch = BatchGenerator(model, tokenizer, max_seq_len=128).generate(prompts, sampler=GREEDY, max_new_tokens=16, eos_ids=[])
    for prompt, row in zip(prompts, batch.rows):
        single = Generator(model, tokenizer, max_seq_len=128).generate(prompt, sampler=GREEDY, max_new_tokens=16, eos_ids=[])
        assert row.token_ids == single.token_ids
        assert row.text == single.text
        assert row.stop_reason == "max_new_tokens" and row.prompt_tokens == len(prompt)
    assert batch.steps == 16 and batch.new_tokens == 16 * len(prompts)


def test_rows_stop_on_their_own(model_and_tokenizer):
    """EOS ends one row; the stop rule cuts another; the rest run to the limit."""
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer.encode(p, add_bos=True) for p in PROMPTS[:3]]
    free = BatchGenerator(model, tokenizer).generate(prompts, sampler=GREEDY, max_new_tokens=12, eos_ids=[])
    ids0 = free.rows[0].token_ids
    first_new = next(k for k in range(1, len(ids0)) if ids0[k] not in ids0[:k])
    eos = ids0[first_new]  # make a token row 0 writes (and had not written before) its "EOS"
    target = free.rows[1].text[:4]

    def stop_rule(text: str) -> int | None:
        return 2 if text.startswith(target) else None

    result = BatchGenerator(model, tokenizer).generate(
        prompts, sampler=GREEDY, max_new_tokens=12, eos_ids=[eos], stop_rule=stop_rule
    )
    row0, row1, row2 = result.rows
    assert row0.stop_reason == "eos" and row0.token_ids == ids0[:first_new]
    assert row1.stop_reason == "stop_rule" and row1.text == target[:2]
    assert row1.token_ids == free.rows[1].token_ids[: len(row1.token_ids)] and len(row1.token_ids) < 12
    if eos not in free.rows[2].token_ids and not free.rows[2].text.startswith(target):
        assert row2.token_ids == free.rows[2].token_ids and row2.stop_reason == "max_new_tokens"


def test_repeated_prompt_samples_differ_and_are_reproducible(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode(PROMPTS[0], add_bos=True)
    settings = SamplerSettings(temperature=1.5, seed=3)
    runs = [BatchGenerator(model, tokenizer).generate([prompt] * 4, sampler=settings, max_new_tokens=8, eos_ids=[]) for _ in range(2)]
    assert [r.token_ids for r in runs[0].rows] == [r.token_ids for r in runs[1].rows]
    assert len({tuple(r.token_ids) for r in runs[0].rows}) > 1


def test_max_seq_len_stops_each_row_where_it_would_alone(model_and_tokenizer):
    """max_seq_len bounds a row's own tokens, not its left padding: a short prompt beside a long one gets as
    many new tokens as it would alone, and the same ones."""
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer.encode(p, add_bos=True) for p in PROMPTS[:2]]
    lengths = [len(p) for p in prompts]
    assert lengths[0] != lengths[1]
    limit = max(lengths) + 3
    assert abs(lengths[0] - lengths[1]) + 4 < 40
    for new_tokens in (40, 10**12):  # a huge limit allocates nothing beyond the cache
        result = BatchGenerator(model, tokenizer, max_seq_len=limit).generate(prompts, sampler=GREEDY,
                                                                              max_new_tokens=new_tokens, eos_ids=[])
        assert [len(r.token_ids) for r in result.rows] == [limit - n + 1 for n in lengths]
        assert all(r.stop_reason == "max_seq_len" for r in result.rows)
        for prompt, row in zip(prompts, result.rows):
            alone = Generator(model, tokenizer, max_seq_len=limit).generate(prompt, sampler=GREEDY,
                                                                            max_new_tokens=new_tokens, eos_ids=[])
            assert alone.token_ids == row.token_ids and alone.stop_reason == row.stop_reason
    # A limit of new tokens below the short row's room still stops every row there.
    result = BatchGenerator(model, tokenizer, max_seq_len=limit).generate(prompts, sampler=GREEDY, max_new_tokens=5,
                                                                          eos_ids=[])
    assert [(len(r.token_ids), r.stop_reason) for r in result.rows] == [
        (min(5, limit - n + 1), "max_new_tokens" if limit - n + 1 > 5 else "max_seq_len") for n in lengths]


def test_bad_input(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    gen = BatchGenerator(model, tokenizer, max_seq_len=8)
    with pytest.raises(ExlqError, match="no prompts"):
        gen.generate([])
    with pytest.raises(ExlqError, match="empty"):
        gen.generate([[1], []])
    with pytest.raises(ExlqError, match="max_seq_len"):
        gen.generate([list(range(1, 12))])
    with pytest.raises(ExlqError, match="max_seq_len"):
        BatchGenerator(model, tokenizer, max_seq_len=0)
    with pytest.raises(ExlqError):  # unknown everywhere; without quantized caches any non-fp16 type is refused
        BatchGenerator(model, tokenizer, cache_type="q5x").generate([[1, 2]], max_new_tokens=2)
