"""Generator: prefix reuse, stop rules, streaming, scoring, against direct model calls."""

from __future__ import annotations

import pytest
import torch

from exlq.errors import ExlqError
from exlq.runtime.generator import Generator, common_prefix_length, default_choice_values
from exlq.runtime.loader import load_model
from exlq.runtime.sampler import Sampler, SamplerSettings
from exlq.runtime.tokenizer import Tokenizer

GREEDY = SamplerSettings(temperature=0.0)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama_dir):
    return load_model(tiny_llama_dir, device="cpu"), Tokenizer.from_dir(tiny_llama_dir)


@pytest.fixture
def generator(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    return Generator(model, tokenizer, max_seq_len=128)


def greedy_reference(model, ids: list[int], steps: int) -> list[int]:
    """Greedy continuation by full forwards with no cache at all."""
    ids = list(ids)
    out = []
    for _ in range(steps):
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(token)
        ids.append(token)
    return out


def test_greedy_generation_matches_uncached_reference(generator, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("The quick brown fox", add_bos=True)
    result = generator.generate(prompt, sampler=GREEDY, max_new_tokens=12, eos_ids=[])
    assert result.token_ids == greedy_reference(model, prompt, 12)
    assert result.stop_reason == "max_new_tokens"
    assert result.text == tokenizer.decode(result.token_ids)


def test_prefix_reuse_processes_only_new_tokens(generator, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    first = tokenizer.encode("Paris is the capital of France.", add_bos=True)
    generator.generate(first, sampler=GREEDY, max_new_tokens=4, eos_ids=[])
    assert generator.tokens_processed == len(first) + 3  # the last sampled token is never run

    second = first + tokenizer.encode(" Berlin is the capital of")
    before = generator.tokens_processed
    result = generator.generate(second, sampler=GREEDY, max_new_tokens=6, eos_ids=[])
    prompt_cost = len(second) - len(first)
    assert result.reused_tokens == len(first)
    assert generator.tokens_processed - before == prompt_cost + 5
    fresh = Generator(model, tokenizer, max_seq_len=128)
    assert fresh.generate(second, sampler=GREEDY, max_new_tokens=6, eos_ids=[]).token_ids == result.token_ids
    assert fresh.tokens_processed == len(second) + 5

    # The same prompt again: only its last token runs (its logits are needed).
    before = generator.tokens_processed
    again = generator.generate(second, sampler=GREEDY, max_new_tokens=1, eos_ids=[])
    assert generator.tokens_processed - before == 1
    assert again.token_ids == result.token_ids[:1]


def test_diverging_prompt_rewinds_the_cache(generator, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    generator.generate(tokenizer.encode("Once upon a time there", add_bos=True), sampler=GREEDY, max_new_tokens=3)
    other = tokenizer.encode("Once upon a mountain", add_bos=True)
    result = generator.generate(other, sampler=GREEDY, max_new_tokens=8, eos_ids=[])
    assert result.token_ids == greedy_reference(model, other, 8)


def test_stop_string_truncates_text(generator, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("def add(a, b):", add_bos=True)
    full = generator.generate(prompt, sampler=GREEDY, max_new_tokens=16, eos_ids=[]).text
    assert len(full) > 6
    stop = full[3:6]
    streamed: list[str] = []
    result = generator.generate(prompt, sampler=GREEDY, max_new_tokens=16, eos_ids=[], stop_strings=[stop], on_text=streamed.append)
    assert result.stop_reason == "stop_string"
    assert result.text == full[: full.index(stop)]
    assert "".join(streamed) == result.text
    # The step queued for the token that completed the stop string was rewound: the last sampled token is not cached.
    assert generator.cached_ids == prompt + result.token_ids[:-1]
    assert generator.cache.seq_len == len(generator.cached_ids)


def test_eos_stops_without_emitting_it(generator, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    candidates = ("Numbers: 0 1 2", "The quick brown fox", "def add(a, b):", "Paris is")
    prompt, first, second = next(
        (p, *pair)
        for p in (tokenizer.encode(text, add_bos=True) for text in candidates)
        if len(set(pair := greedy_reference(model, p, 2))) == 2
    )
    result = generator.generate(prompt, sampler=GREEDY, max_new_tokens=16, eos_ids=[second])
    assert result.stop_reason == "eos"
    assert result.token_ids == [first]
    assert generator.cached_ids == prompt + [first]  # the step queued for the EOS token was rewound
    assert generator.cache.seq_len == len(prompt) + 1
    # The next call reuses that cache as if the EOS step had never run.
    again = generator.generate(prompt + [first], sampler=GREEDY, max_new_tokens=3, eos_ids=[])
    assert again.reused_tokens == len(prompt) and again.token_ids == greedy_reference(model, prompt + [first], 3)


@pytest.mark.parametrize("new_tokens", [1, 5])
def test_generate_prepares_the_first_steps_graph_after_the_prompt(generator, model_and_tokenizer, monkeypatch, new_tokens):
    """The first decode step's CUDA graph is captured while the GPU runs the prompt (prepare_decode, a no-op here on
    the CPU), once the prompt is in the cache; a one-token generation has no step to prepare."""
    model, tokenizer = model_and_tokenizer
    calls = []
    monkeypatch.setattr(model, "prepare_decode", lambda cache: calls.append((cache, cache.seq_len)))
    prompt = tokenizer.encode("The quick brown fox", add_bos=True)
    result = generator.generate(prompt, sampler=GREEDY, max_new_tokens=new_tokens, eos_ids=[])
    assert result.token_ids == greedy_reference(model, prompt, new_tokens)
    assert calls == ([(generator.cache, len(prompt))] if new_tokens > 1 else [])


def test_generation_ends_cleanly_at_max_seq_len(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    generator = Generator(model, tokenizer, max_seq_len=20)
    prompt = tokenizer.encode("Once upon a time", add_bos=True)
    result = generator.generate(prompt, sampler=GREEDY, max_new_tokens=100, eos_ids=[])
    assert result.stop_reason == "max_seq_len"
    assert result.new_tokens == 20 - len(prompt) + 1  # the last token is sampled but never cached
    assert generator.cache.seq_len == 20 and generator.max_seq_len == 20


def test_prompt_longer_than_max_seq_len_is_refused(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    generator = Generator(model, tokenizer, max_seq_len=8)
    with pytest.raises(ExlqError, match="max_seq_len is 8"):
        generator.generate(list(range(5, 20)), sampler=GREEDY)


def test_seeded_sampling_reproduces(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("Once upon a time", add_bos=True)

    def run(seed):
        return Generator(model, tokenizer, max_seq_len=64).generate(
            prompt, sampler=SamplerSettings(temperature=1.5, seed=seed), max_new_tokens=20, eos_ids=[]
        ).token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.mark.parametrize("settings", [
    SamplerSettings(temperature=1.3, top_p=0.9, repetition_penalty=1.4, seed=7),
    SamplerSettings(temperature=0.0, repetition_penalty=3.0, repetition_range=1),  # greedy, only the newest token penalized
])
def test_sampled_generation_equals_a_step_by_step_loop(model_and_tokenizer, settings):
    """The generator queues each step before it reads the token; the draws, their order and the penalized history
    must be those of a loop that reads each token first."""
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("Once upon a time", add_bos=True)
    result = Generator(model, tokenizer, max_seq_len=64).generate(prompt, sampler=settings, max_new_tokens=15, eos_ids=[])
    sampler, cache, ids = Sampler(settings), model.new_cache(64), list(prompt)
    logits = model(torch.tensor([prompt]), cache)[:, -1]
    for _ in range(15):
        token = int(sampler.sample(logits, torch.tensor([ids]))[0])
        ids.append(token)
        logits = model(torch.tensor([[token]]), cache)[:, -1]
    assert result.token_ids == ids[len(prompt) :]


def test_score_choices_match_full_forward(generator, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt_text = "The quick brown"
    prompt = tokenizer.encode(prompt_text, add_bos=True)
    labels = [" fox", " dog jumps", "A"]
    choice_ids = [generator.continuation_ids(prompt_text, prompt, c) for c in labels]
    assert any(len(ids) > 1 for ids in choice_ids)
    scores = generator.score_choices(prompt, choice_ids, labels=labels)
    for label, ids, score in zip(labels, choice_ids, scores.choices):
        logits = model(torch.tensor([prompt + ids]), max_output_len=None)[0].float()
        logprobs = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
        expected = logprobs.gather(1, torch.tensor(ids)[:, None]).sum().item()
        assert score.logprob == pytest.approx(expected, abs=1e-4), label
    assert sum(c.probability for c in scores.choices) == pytest.approx(1.0)
    assert scores.expected_value == pytest.approx(sum(c.probability * (i + 1) for i, c in enumerate(scores.choices)))
    assert generator.cache.seq_len == len(prompt)  # candidates were rewound


def test_default_choice_values():
    assert default_choice_values(["A", "B", "C"]) == [1.0, 2.0, 3.0]
    assert default_choice_values(["1", "5", "10"]) == [1.0, 5.0, 10.0]


def test_common_prefix_length_matches_the_id_by_id_count():
    import random

    def reference(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    rng = random.Random(0)
    for _ in range(3000):
        a = [rng.randint(0, 2) for _ in range(rng.randint(0, 12))]
        b = a[: rng.randint(0, len(a))] + [rng.randint(0, 2) for _ in range(rng.randint(0, 12))]
        assert common_prefix_length(a, b) == common_prefix_length(tuple(b), a) == reference(a, b)


def test_a_changed_model_is_not_served_from_the_old_cache(tiny_llama_dir):
    """After set_layer_order (or set_loras: both go through the model's `revision`) the generator's cached keys and
    values are stale: the next generation equals a fresh generator's, and a new layer count gets a cache of its own."""
    model, tokenizer = load_model(tiny_llama_dir, device="cpu"), Tokenizer.from_dir(tiny_llama_dir)
    prompt = tokenizer.encode("The capital of France is a city named", add_bos=True)
    generator = Generator(model, tokenizer, max_seq_len=64)
    generator.generate(prompt, sampler=GREEDY, max_new_tokens=4, eos_ids=[])
    layers = len(model.model.layers)
    for order in (list(reversed(range(layers))), [0, *range(layers)]):  # same count, then one more
        model.set_layer_order(order)
        result = generator.generate(prompt, sampler=GREEDY, max_new_tokens=6, eos_ids=[])
        fresh = Generator(model, tokenizer, max_seq_len=64).generate(prompt, sampler=GREEDY, max_new_tokens=6, eos_ids=[])
        assert result.token_ids == fresh.token_ids == greedy_reference(model, prompt, 6)
        assert result.reused_tokens == 0 and generator.cache.num_layers == len(order)
    again = generator.generate(prompt, sampler=GREEDY, max_new_tokens=6, eos_ids=[])
    assert again.reused_tokens == len(prompt) - 1  # unchanged since: reused as before


def test_api_misuse_is_refused_with_a_clear_error(generator, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("Hello", add_bos=True)
    with pytest.raises(ExlqError, match="max_new_tokens"):
        generator.generate(prompt, max_new_tokens=2.0)
    with pytest.raises(ExlqError, match="outside the vocabulary"):
        generator.generate([*prompt, model.config.vocab_size], max_new_tokens=2)
    with pytest.raises(ExlqError, match="labels"):
        generator.score_choices(prompt, [[5], [6], [7]], labels=["a", "b"])
    with pytest.raises(ExlqError, match="max_seq_len"):
        Generator(model, tokenizer, max_seq_len=0)
    with pytest.raises(ExlqError, match="input_ids"):
        model(torch.tensor(prompt))
    with pytest.raises(ExlqError, match="max_output_len"):
        model(torch.tensor([prompt]), max_output_len=-1)


def test_a_huge_max_new_tokens_is_bounded_by_the_cache(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("Once upon a time", add_bos=True)
    result = Generator(model, tokenizer, max_seq_len=24).generate(prompt, sampler=GREEDY, max_new_tokens=10**12,
                                                                   eos_ids=[])
    assert result.stop_reason == "max_seq_len" and result.new_tokens == 24 - len(prompt) + 1


def test_a_tensor_prompt_is_taken_as_its_ids(generator, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("The quick brown fox", add_bos=True)
    as_list = generator.generate(prompt, sampler=GREEDY, max_new_tokens=5, eos_ids=[]).token_ids
    assert generator.generate(torch.tensor(prompt), sampler=GREEDY, max_new_tokens=5, eos_ids=[]).token_ids == as_list
