"""Rotation folded into the weights: the model computes the same function, in every variant."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_VARIANTS
from exlq.errors import ExlqError
from exlq.quant.rotate import check_rotation, random_orthogonal, rotate_model, rotation_for
from exlq.runtime.loader import load_model


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = random_orthogonal(48, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(48, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, random_orthogonal(48, seed=3))
    assert not torch.allclose(q, random_orthogonal(48, seed=4))


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_rotated_model_computes_the_same_logits(tiny_model_dirs, variant):
    model = load_model(tiny_model_dirs[variant], device="cpu", dtype=torch.float64)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = model(ids, max_output_len=None)
    cache = model.new_cache(32, batch_size=2)
    rotate_model(model, seed=1)
    got = model(ids, max_output_len=None)
    # Exact in exact arithmetic; the runtime keeps the residual stream in float32 (~1e-7 relative).
    assert ((got - expected).norm() / expected.norm()).item() < 2e-6
    # Decode through the cache as well (values and keys of the rotated model are what is cached).
    model(ids[:, :20], cache, max_output_len=0)
    step = model(ids[:, 20:], cache, max_output_len=None)
    assert ((step - expected[:, 20:]).norm() / expected[:, 20:].norm()).item() < 2e-6


def test_rotation_changes_the_weights_and_unties_the_head(tiny_model_dirs):
    model = load_model(tiny_model_dirs["llama-tied-llama3rope"], device="cpu")
    embed_before = model.model.embed_tokens.weight.clone()
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    rotate_model(model)
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.allclose(model.model.embed_tokens.weight, embed_before)
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_before)
    # Rows keep their norms (an orthogonal map), and every norm's gain is folded away.
    assert torch.allclose(model.model.embed_tokens.weight.norm(dim=1), embed_before.norm(dim=1), rtol=1e-5)
    for layer in model.model.layers:
        assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))


def test_measurement_must_match_the_rotation():
    check_rotation(rotation_for(True), rotation_for(True))
    check_rotation(None, rotation_for(False))
    with pytest.raises(ExlqError, match="without rotation.*--no-rotate"):
        check_rotation(None, rotation_for(True))
    with pytest.raises(ExlqError, match="with rotation"):
        check_rotation(rotation_for(True), None)
