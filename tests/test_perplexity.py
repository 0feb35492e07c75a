"""Perplexity windows and values against direct computations with transformers."""

from __future__ import annotations

import math

import pytest
import torch

from exlq.errors import ExlqError
from exlq.eval.perplexity import evaluate_perplexity, nonoverlapping_windows, sliding_windows
from exlq.runtime.loader import load_model


@pytest.mark.parametrize("total,length,stride", [(100, 32, 8), (100, 32, 32), (97, 16, 5), (10, 32, 4), (33, 32, 31)])
def test_sliding_windows_score_each_token_once_with_context(total, length, stride):
    windows = sliding_windows(total, length, stride)
    scored = []
    for w in windows:
        assert w.end - w.start <= length and 0 < w.scored < w.end - w.start + (w.start > 0)
        scored.extend(range(w.end - w.scored, w.end))
        assert scored[-w.scored] > w.start  # every scored token has context in its window
    if stride < length:
        assert scored == list(range(1, total))  # every token but the first
    else:
        assert scored == [t for t in range(1, total) if t % length]  # windows' first tokens have no context


def test_nonoverlapping_windows():
    windows = nonoverlapping_windows(100, 32, None)
    assert [(w.start, w.end, w.scored) for w in windows] == [(0, 32, 31), (32, 64, 31), (64, 96, 31)]
    assert len(nonoverlapping_windows(100, 32, 2)) == 2
    with pytest.raises(ExlqError):
        nonoverlapping_windows(10, 32, None)
    with pytest.raises(ExlqError):
        sliding_windows(100, 32, 40)


def hf_nll(model, ids: torch.Tensor, score_last: int) -> float:
    logits = model(ids[None]).logits[0, :-1].double()
    logprobs = torch.log_softmax(logits, -1).gather(1, ids[1:, None])[:, 0]
    return -logprobs[-score_last:].sum().item()


@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    import transformers

    path = tiny_model_dirs["qwen2"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return load_model(path, device="cpu"), reference


def test_nonoverlapping_perplexity_matches_transformers(models):
    model, reference = models
    ids = torch.randint(0, model.config.vocab_size, (200,), generator=torch.Generator().manual_seed(0))
    result = evaluate_perplexity(model, ids, length=48, rows=3, batch_size=2)
    with torch.no_grad():
        nll = sum(hf_nll(reference, ids[i * 48 : (i + 1) * 48], 47) for i in range(3))
    assert result.tokens_scored == 3 * 47 and result.windows == 3
    assert result.perplexity == pytest.approx(math.exp(nll / 141), rel=1e-5)
    assert "3 non-overlapping windows of 48 tokens" in result.convention


def test_sliding_perplexity_matches_transformers(models):
    model, reference = models
    ids = torch.randint(0, model.config.vocab_size, (150,), generator=torch.Generator().manual_seed(1))
    result = evaluate_perplexity(model, ids, length=64, stride=24, batch_size=3)
    nll = 0.0
    with torch.no_grad():
        for w in sliding_windows(150, 64, 24):
            nll += hf_nll(reference, ids[w.start : w.end], w.scored)
    assert result.tokens_scored == 149
    assert result.perplexity == pytest.approx(math.exp(nll / 149), rel=1e-5)


def test_batch_size_does_not_change_the_result(models):
    model, _ = models
    ids = torch.randint(0, model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(2))
    one = evaluate_perplexity(model, ids, length=32, batch_size=1)
    four = evaluate_perplexity(model, ids, length=32, batch_size=4)
    assert four.perplexity == pytest.approx(one.perplexity, rel=1e-6)
    assert one.windows == 9


def test_kl_against_reference(models, tiny_model_dirs):
    model, reference_hf = models
    ids = torch.randint(0, model.config.vocab_size, (100,), generator=torch.Generator().manual_seed(3))
    same = evaluate_perplexity(model, ids, length=32, reference=model)
    assert same.kl_divergence == pytest.approx(0.0, abs=1e-9) and same.top1_agreement == 1.0
    other = load_model(tiny_model_dirs["qwen2-tied"], device="cpu")
    result = evaluate_perplexity(model, ids, length=32, reference=other)
    # Independent computation of the mean KL(P_other || P_model) over the scored rows.
    kl, n = 0.0, 0
    for w in nonoverlapping_windows(100, 32, None):
        x = ids[w.start : w.end][None]
        logp = torch.log_softmax(model(x, max_output_len=None)[0, :-1].double(), -1)
        logq = torch.log_softmax(other(x, max_output_len=None)[0, :-1].double(), -1)
        kl += float((logq.exp() * (logq - logp)).sum())
        n += w.scored
    assert result.kl_divergence == pytest.approx(kl / n, rel=1e-4)
    assert 0 <= result.top1_agreement < 1
