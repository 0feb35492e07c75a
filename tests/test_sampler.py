"""Sampler tests on hand-built distributions whose expected outcomes are computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from exlq.errors import ExlqError
from exlq.runtime.sampler import Sampler, SamplerSettings, min_p_mask


def probs_to_logits(*rows: list[float]) -> torch.Tensor:
    """Logits whose softmax is exactly the given (normalized) probabilities, up to float error."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


def kept(probs: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row > 0).flatten().tolist() for row in probs]


def dist(**kwargs) -> Sampler:
    """A sampling (non-greedy) sampler at temperature 1 unless told otherwise."""
    return Sampler(SamplerSettings(**{"temperature": 1.0, **kwargs}))


# --- greedy ------------------------------------------------------------------------------------


def test_settings_describe_what_acts():
    assert SamplerSettings().describe() == "greedy"
    assert SamplerSettings(temperature=0.8, top_p=0.95, min_p=0.05).describe() == "temperature 0.8, top-p 0.95, min-p 0.05"
    assert SamplerSettings(temperature=1.0, top_k=40).describe() == "temperature 1, top-k 40"
    assert SamplerSettings(temperature=0.7, top_k=1, top_p=0.5).describe() == "greedy"  # top-k 1 is greedy
    assert SamplerSettings(repetition_penalty=1.1).describe() == "greedy, repetition penalty 1.1"
    assert SamplerSettings(repetition_penalty=1.1, repetition_range=0).describe() == "greedy"  # a range of 0 is off


def test_greedy_is_argmax_per_row_and_int64():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [5.0, -3.0, 4.9, 0.0], [-2.0, -1.0, -3.0, -1.5]])
    out = Sampler(SamplerSettings()).sample(logits)
    assert out.dtype == torch.int64 and out.shape == (3,)
    assert out.tolist() == [1, 0, 1]


def test_top_k_one_is_greedy_even_with_temperature():
    settings = SamplerSettings(temperature=1.5, top_k=1)
    assert settings.greedy
    logits = torch.tensor([[0.3, 0.2, 0.9, -4.0]])
    sampler = Sampler(settings)
    assert [sampler.sample(logits).item() for _ in range(5)] == [2] * 5
    assert sampler.probabilities(logits).tolist() == [[0.0, 0.0, 1.0, 0.0]]


def test_greedy_argmax_is_taken_after_repetition_penalty():
    logits = torch.tensor([[3.0, 2.0, -1.0]])
    history = torch.tensor([[0]])
    # 3 / 2 = 1.5 < 2, so the penalty moves the argmax from 0 to 1.
    assert Sampler(SamplerSettings(repetition_penalty=2.0)).sample(logits, history).tolist() == [1]
    assert Sampler(SamplerSettings()).sample(logits, history).tolist() == [0]


# --- temperature and top-k ---------------------------------------------------------------------


def test_temperature_scales_logits_before_softmax():
    logits = torch.tensor([[1.0, 2.0, 4.0]])
    got = dist(temperature=2.0).probabilities(logits)[0]
    e = [math.exp(x / 2.0) for x in (1.0, 2.0, 4.0)]
    expected = [v / sum(e) for v in e]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)


def test_tiny_temperature_does_not_overflow():
    probs = dist(temperature=1e-30).probabilities(torch.tensor([[100.0, 99.0, 50.0]]))
    assert probs.tolist() == [[1.0, 0.0, 0.0]]


def test_top_k_keeps_exactly_the_k_largest_and_renormalizes():
    p = [0.05, 0.3, 0.1, 0.4, 0.15]
    probs = dist(top_k=3).probabilities(probs_to_logits(p))
    assert kept(probs) == [[1, 3, 4]]
    mass = 0.3 + 0.4 + 0.15
    assert probs[0].tolist() == pytest.approx([0, 0.3 / mass, 0, 0.4 / mass, 0.15 / mass], abs=1e-6)


def test_top_k_with_ties_keeps_exactly_k():
    probs = dist(top_k=2).probabilities(torch.tensor([[1.0, 3.0, 3.0, 3.0]]))
    assert len(kept(probs)[0]) == 2 and set(kept(probs)[0]) <= {1, 2, 3}


def test_top_k_larger_than_vocab_is_off():
    logits = probs_to_logits([0.1, 0.2, 0.7])
    assert torch.equal(dist(top_k=10).probabilities(logits), dist().probabilities(logits))
    assert torch.allclose(dist(top_k=10).probabilities(logits), torch.tensor([[0.1, 0.2, 0.7]]), atol=1e-6)


# --- top-p and min-p ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [(0.8, [0, 1]), (0.81, [0, 1, 2]), (0.5, [0]), (0.3, [0]), (0.96, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])],
)
def test_top_p_keeps_smallest_set_reaching_p(top_p, expected):
    # Shuffled order so the filter has to sort: 0.5 at index 2, 0.3 at 0, 0.15 at 3, 0.05 at 1.
    logits = probs_to_logits([0.3, 0.05, 0.5, 0.15])
    rank_to_index = [2, 0, 3, 1]
    probs = dist(top_p=top_p).probabilities(logits)
    assert kept(probs) == [sorted(rank_to_index[r] for r in expected)]
    base = torch.tensor([0.3, 0.05, 0.5, 0.15])
    mask = probs[0] > 0
    assert torch.allclose(probs[0], base * mask / (base * mask).sum(), atol=1e-6)


def test_top_p_always_keeps_top_token_even_when_it_alone_is_tiny():
    probs = dist(top_p=0.01).probabilities(torch.zeros(1, 100))  # uniform, each p = 0.01
    assert len(kept(probs)[0]) == 1


def test_min_p_boundary_is_inclusive():
    # Powers of two are exact in float32: threshold 0.25 * 0.5 = 0.125 keeps the 0.125 token.
    mask = min_p_mask(torch.tensor([[0.0625, 0.5, 0.125, 0.25, 0.0625]]), 0.25)
    assert mask.tolist() == [[False, True, True, True, False]]


def test_min_p_drops_tokens_below_fraction_of_max():
    # p_max = 0.4 (of a 1.001 total); min_p = 0.2 -> threshold 0.08: keep 0.4, 0.3, 0.2, 0.1.
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1, 1e-3]]).log()
    probs = dist(min_p=0.2).probabilities(logits)
    assert kept(probs) == [[0, 1, 2, 3]]
    # threshold 0.4 * 0.6 = 0.24: keeps only 0.4 and 0.3.
    probs = dist(min_p=0.6).probabilities(logits)
    assert kept(probs) == [[0, 1]]
    assert probs[0, :2].tolist() == pytest.approx([0.4 / 0.7, 0.3 / 0.7], abs=1e-6)


def test_filters_compose_in_order_and_keep_at_least_one_token():
    logits = probs_to_logits([0.35, 0.3, 0.2, 0.1, 0.05])
    # top_k=4 -> renormalized [0.3684, 0.3158, 0.2105, 0.1053]; top_p=0.7 keeps the first 3
    # (0.684 < 0.7); min_p=0.6 -> threshold 0.221 drops index 2 too.
    probs = dist(top_k=4, top_p=0.7, min_p=0.6).probabilities(logits)
    assert kept(probs) == [[0, 1]]
    assert probs[0, :2].tolist() == pytest.approx([0.35 / 0.65, 0.3 / 0.65], abs=1e-6)
    extreme = dist(top_k=3, top_p=1e-9, min_p=0.999).probabilities(logits)
    assert kept(extreme) == [[0]] and extreme[0, 0].item() == pytest.approx(1.0)


# --- repetition penalty ------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_once():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    history = torch.tensor([[0, 1, 1, 1, 4, 0]])  # repeats must not compound
    probs = dist(repetition_penalty=2.0).probabilities(logits, history)
    expected_logits = torch.tensor([[1.0, -2.0, 0.5, 3.0, -4.0]])
    assert torch.allclose(probs, torch.softmax(expected_logits, dim=-1), atol=1e-7)


def test_repetition_range_only_penalizes_most_recent_tokens():
    logits = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    history = torch.tensor([[0, 1, 2, 2]])
    settings = dict(repetition_penalty=4.0)
    # range 2 -> only id 2 (twice) is penalized; range -1 -> ids 0, 1, 2; range 0 -> none.
    for repetition_range, penalized in [(2, [2]), (3, [1, 2]), (-1, [0, 1, 2]), (0, []), (100, [0, 1, 2])]:
        probs = dist(repetition_range=repetition_range, **settings).probabilities(logits, history)
        expected = torch.tensor([[0.5 if i in penalized else 2.0 for i in range(4)]])
        assert torch.allclose(probs, torch.softmax(expected, dim=-1), atol=1e-7), repetition_range


def test_repetition_penalty_ignores_padding_ids_and_empty_history():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    sampler = dist(repetition_penalty=3.0)
    plain = torch.softmax(logits, dim=-1)
    assert torch.allclose(sampler.probabilities(logits, torch.tensor([[-1, -1]])), plain)
    assert torch.allclose(sampler.probabilities(logits, torch.zeros(1, 0, dtype=torch.long)), plain)


def test_batch_rows_use_their_own_history():
    logits = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    history = torch.tensor([[0, 0], [2, 1]])
    probs = dist(repetition_penalty=10.0).probabilities(logits, history)
    row0 = torch.softmax(torch.tensor([0.1, 1.0, 1.0]), dim=-1)
    row1 = torch.softmax(torch.tensor([1.0, 0.1, 0.1]), dim=-1)
    assert torch.allclose(probs, torch.stack([row0, row1]), atol=1e-7)
    assert Sampler(SamplerSettings(repetition_penalty=10.0)).sample(logits, history).tolist() == [1, 0]


# --- randomness --------------------------------------------------------------------------------


def test_seeded_runs_reproduce_and_different_seeds_differ():
    logits = torch.zeros(8, 1000)  # uniform: 8 draws from 1000 ids

    def draws(seed):
        sampler = dist(seed=seed)
        return torch.stack([sampler.sample(logits) for _ in range(4)])
    assert torch.equal(draws(1234), draws(1234))
    assert not torch.equal(draws(1234), draws(1235))
    # Unseeded samplers each get their own entropy-seeded generator.
    assert not torch.equal(draws(None), draws(None))


def test_sampler_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    dist(seed=5).sample(torch.zeros(4, 10))
    dist().sample(torch.zeros(4, 10))
    assert torch.equal(torch.rand(3), expected)


def test_empirical_frequencies_match_probabilities():
    # Same logits, different histories (row 1 penalizes ids 0 and 3), so the rows' targets differ.
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0], [2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    history = torch.tensor([[5, 5], [0, 3]])
    sampler = dist(temperature=0.8, top_k=5, top_p=0.95, repetition_penalty=1.5, seed=7)
    expected = sampler.probabilities(logits, history)
    n = 10_000
    draws = sampler.sample(logits.repeat(n, 1), history.repeat(n, 1)).view(n, 2)
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=6).float() / n
        # 4.5 sigma of a binomial proportion at n = 10k is <= 0.0225.
        assert torch.allclose(freq, expected[row], atol=0.0225), (row, freq, expected[row])
        assert (freq[expected[row] == 0] == 0).all()
    assert not torch.allclose(expected[0], expected[1])


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", "hot"),
        ("top_p", None),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("min_p", 1.0),
        ("min_p", -0.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_range", -2),
        ("seed", -1),
        ("seed", 2**64),
    ],
)
def test_settings_validation_names_the_option(option, value):
    settings = SamplerSettings(**{option: value})
    with pytest.raises(ExlqError, match=option):
        settings.validate()
    with pytest.raises(ExlqError, match=option):
        Sampler(settings)


def test_default_settings_are_valid_and_greedy():
    SamplerSettings().validate()
    assert SamplerSettings().greedy
    assert not SamplerSettings(temperature=0.7).greedy
