"""Speculative decoding: exact greedy output, the main model's distribution, safe at the context edge."""

from __future__ import annotations

import pytest
import torch

from exlq.errors import ExlqError
from exlq.runtime.generator import Generator
from exlq.runtime.loader import load_model
from exlq.runtime.sampler import Sampler, SamplerSettings
from exlq.runtime.speculative import SpeculativeGenerator
from exlq.runtime.tokenizer import Tokenizer
from tiny_models import make_tiny_model_dir

GREEDY = SamplerSettings(temperature=0.0)


@pytest.fixture(scope="module")
def pair(tiny_model_dirs, tmp_path_factory):
    """A main model and a different draft (another seed, one layer) with the same tokenizer."""
    main_dir = tiny_model_dirs["llama"]
    draft_dir = make_tiny_model_dir(tmp_path_factory.mktemp("draft"), "llama", seed=11, num_hidden_layers=1)
    return main_dir, draft_dir


def generators(pair, max_seq_len=64):
    main_dir, draft_dir = pair
    tokenizer = Tokenizer.from_dir(main_dir)
    main = Generator(load_model(main_dir, device="cpu"), tokenizer, max_seq_len=max_seq_len)
    draft = Generator(load_model(draft_dir, device="cpu"), Tokenizer.from_dir(draft_dir), max_seq_len=max_seq_len)
    return main, draft, tokenizer


@pytest.mark.parametrize("draft_tokens", [1, 3, 5])
def test_greedy_output_equals_the_main_model(pair, draft_tokens):
    main, draft, _ = generators(pair)
    plain = Generator(main.model, main.tokenizer, max_seq_len=64)
    prompt = [1, 5, 9, 23, 7]
    expected = plain.generate(prompt, sampler=GREEDY, max_new_tokens=40, eos_ids=[])
    spec = SpeculativeGenerator(main, draft, draft_tokens=draft_tokens)
    got = spec.generate(prompt, sampler=GREEDY, max_new_tokens=40, eos_ids=[])
    assert got.token_ids == expected.token_ids and got.stop_reason == expected.stop_reason
    assert got.draft_proposed > 0 and 0 <= got.draft_accepted <= got.draft_proposed
    # The same draft as main: everything is accepted.
    self_spec = SpeculativeGenerator(Generator(main.model, main.tokenizer, max_seq_len=64),
                                     Generator(main.model, main.tokenizer, max_seq_len=64), draft_tokens=draft_tokens)  # fmt: skip
    again = self_spec.generate(prompt, sampler=GREEDY, max_new_tokens=40, eos_ids=[])
    assert again.token_ids == expected.token_ids and again.draft_accepted == again.draft_proposed


@pytest.mark.parametrize("penalty", [1.0, 1.3])  # 1.0: the greedy round (drafts stay on the device); 1.3: the general one
def test_padded_verification_changes_nothing(pair, monkeypatch, penalty):
    """The GPU pads each verification to one length (for its CUDA graph): forced here on the CPU, the
    output is still the main model's greedy output, also at the context edge, and no padding stays cached."""
    sampler = SamplerSettings(temperature=0, repetition_penalty=penalty)
    import exlq.runtime.speculative as speculative

    monkeypatch.setattr(speculative, "graphs_possible", lambda model, cache: True)
    calls = []
    main, draft, _ = generators(pair, max_seq_len=40)
    real_run = main.run_tensor
    main.run_tensor = lambda ids, max_output_len, graph_step=False: calls.append((ids.shape[1], graph_step)) or real_run(
        ids, max_output_len, graph_step=graph_step)  # fmt: skip
    plain = Generator(main.model, main.tokenizer, max_seq_len=40)
    prompt = [1, 5, 9, 23, 7]
    expected = plain.generate(prompt, sampler=sampler, max_new_tokens=60, eos_ids=[])
    spec = SpeculativeGenerator(main, draft, draft_tokens=3)
    got = spec.generate(prompt, sampler=sampler, max_new_tokens=60, eos_ids=[])
    assert got.token_ids == expected.token_ids and got.stop_reason == expected.stop_reason == "max_seq_len"
    verifications = [n for n, graph_step in calls if graph_step]
    # One length, max_draft_tokens + 1, until the cache's free room is shorter (then the room).
    assert verifications.count(spec.max_draft_tokens + 1) >= 3 and verifications == sorted(verifications, reverse=True)
    assert main.cached_ids == (prompt + got.token_ids)[: main.cache.seq_len]


def test_context_edge_every_draft_length_and_start(pair):
    """max_seq_len 24, prompts ending 1..6 positions before it, N = 1..6: clean stop, same tokens as plain decoding."""
    main, draft, _ = generators(pair, max_seq_len=24)
    plain = Generator(main.model, main.tokenizer, max_seq_len=24)
    for free in range(1, 7):
        prompt = [(7 * i + 3) % 300 + 1 for i in range(24 - free)]
        expected = plain.generate(prompt, sampler=GREEDY, max_new_tokens=50, eos_ids=[])
        assert expected.stop_reason == "max_seq_len"
        for n in range(1, 7):
            spec = SpeculativeGenerator(main, draft, draft_tokens=n)
            got = spec.generate(prompt, sampler=GREEDY, max_new_tokens=50, eos_ids=[])
            assert got.stop_reason == "max_seq_len", (free, n)
            assert got.token_ids == expected.token_ids, (free, n)
            assert main.cache.seq_len <= 24 and draft.cache.seq_len <= 24


def test_sampled_output_follows_the_main_distribution(pair):
    """First-token frequencies with a draft match the main model's probabilities (and not the draft's).

    top-k 5 keeps the support small, so 3000 samples pin the distribution down (sampling noise in
    total variation ~0.02); the filter is part of both p and q, as the sampler applies it.
    """
    main, draft, _ = generators(pair)
    settings = SamplerSettings(temperature=1.0, top_k=5, top_p=1.0, min_p=0.0, seed=0)
    prompt = [1, 5, 9]
    target = Sampler(settings).probabilities(main.prefill(prompt))[0]
    draft_p = Sampler(settings).probabilities(draft.prefill(prompt))[0]
    spec = SpeculativeGenerator(main, draft, draft_tokens=3, adaptive=False)
    sampler = Sampler(settings)
    trials = 2000
    counts = torch.zeros_like(target)
    for _ in range(trials):
        # Two tokens per call: the first from a verified draft position or the correction.
        result = spec.generate(prompt, sampler=sampler, max_new_tokens=2, eos_ids=[])
        counts[result.token_ids[0]] += 1
    freq = counts / trials
    tv_main = 0.5 * float((freq - target).abs().sum())
    tv_draft = 0.5 * float((freq - draft_p).abs().sum())
    assert tv_main < 0.05 and tv_draft > 0.3, (tv_main, tv_draft)


@pytest.mark.parametrize("temperature", [1.0, 0.0])  # the general round and the greedy one
def test_rejections_keep_both_caches_consistent(pair, temperature):
    main, draft, _ = generators(pair)
    spec = SpeculativeGenerator(main, draft, draft_tokens=4)
    prompt = [2, 4, 6, 8]
    result = spec.generate(prompt, sampler=SamplerSettings(temperature=temperature, seed=3), max_new_tokens=20, eos_ids=[])
    assert result.draft_accepted < result.draft_proposed  # different models: some rejections happened
    context = prompt + result.token_ids
    # The caches hold real keys/values for what they claim: continuing equals a fresh run.
    logits = main.prefill(context)
    fresh = Generator(main.model, main.tokenizer, max_seq_len=64).prefill(context)
    torch.testing.assert_close(logits, fresh, rtol=1e-5, atol=1e-5)
    d_logits = draft.prefill(context)
    d_fresh = Generator(draft.model, draft.tokenizer, max_seq_len=64).prefill(context)
    torch.testing.assert_close(d_logits, d_fresh, rtol=1e-5, atol=1e-5)


def test_different_vocabulary_is_refused(pair, tiny_model_dirs):
    main, _, _ = generators(pair)
    qwen_dir = tiny_model_dirs["qwen2"]
    model = load_model(qwen_dir, device="cpu")
    model.config.vocab_size += 1  # same tokenizer files, different vocabulary size
    with pytest.raises(ExlqError, match="vocabulary differs"):
        SpeculativeGenerator(main, Generator(model, Tokenizer.from_dir(qwen_dir), max_seq_len=64))
    with pytest.raises(ExlqError, match="at least 1"):
        SpeculativeGenerator(main, Generator(main.model, main.tokenizer, max_seq_len=64), draft_tokens=0)


def test_cli_draft(capsys, pair):
    import json

    from test_cli import cli

    main_dir, draft_dir = pair
    args = ("infer", main_dir, "-p", "hello", "--greedy", "--max-new-tokens", 12, "--format", "raw", "--json")
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    plain = json.loads(out)
    code, out, err = cli(capsys, *args, "--draft", draft_dir, "--draft-tokens", 3)
    assert code == 0, err
    spec = json.loads(out)
    assert spec["text"] == plain["text"] and spec["draft_proposed"] > 0
    code, out, err = cli(capsys, *args, "--draft", draft_dir, "--draft-tokens", 0)
    assert code == 2 and "--draft-tokens" in err


def test_acceptance_and_correction_follow_speculative_sampling():
    """`_accept` with fixed drafts: P(a drafts stand) = Π min(1, p/q) up to a then one rejection, and the next
    token comes from norm(max(0, p − q)) at a rejection or from p after all k (checked jointly by frequency)."""
    sampler = Sampler(SamplerSettings(temperature=1.0, seed=5))
    gen = torch.Generator().manual_seed(0)
    main_logits = torch.randn(3, 4, generator=gen) * 1.5  # k = 2 drafts, vocabulary of 4
    p = torch.softmax(main_logits, dim=-1)
    q = torch.softmax(torch.randn(2, 4, generator=gen), dim=-1)
    drafts = torch.tensor([1, 2])
    history = torch.zeros(1, 5, dtype=torch.long)
    expected = torch.zeros(3, 4)  # [accepted, next token]
    reach = 1.0
    for i in range(2):
        stand = min(1.0, float(p[i, drafts[i]] / q[i, drafts[i]]))
        residual = (p[i] - q[i]).clamp_min(0)
        expected[i] = reach * (1 - stand) * residual / residual.sum()
        reach *= stand
    expected[2] = reach * p[2]
    counts = torch.zeros(3, 4)
    trials = 4000
    for _ in range(trials):
        accepted, fixed = SpeculativeGenerator._accept(sampler, main_logits, q, drafts, history, 3)
        counts[int(accepted), int(fixed)] += 1
    assert 0.5 * float((counts / trials - expected).abs().sum()) < 0.04


def test_the_draft_needs_a_generator_of_its_own(pair):
    main, _, _ = generators(pair)
    with pytest.raises(ExlqError, match="own"):
        SpeculativeGenerator(main, main)
    main_again, _, _ = generators(pair)
    result = SpeculativeGenerator(main, main_again).generate([1, 5, 9], sampler=SamplerSettings(), max_new_tokens=10**12)
    assert result.stop_reason in ("max_seq_len", "eos") and result.new_tokens <= 64
