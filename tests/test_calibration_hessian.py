"""Calibration rows and layer-by-layer Hessians through the runtime."""

from __future__ import annotations

import pytest
import torch

from exlq.errors import ExlqError
from exlq.quant.calibration import BUILTIN_SOURCES, builtin_texts, load_calibration, spread_windows
from exlq.quant.hessian import LayerRunner, linear_modules
from exlq.runtime.loader import load_model
from exlq.runtime.tokenizer import Tokenizer


def test_builtin_calibration_is_deterministic_and_mixed(tiny_llama_dir):
    tokenizer = Tokenizer.from_dir(tiny_llama_dir)
    a = load_calibration(tokenizer, rows=10, length=64)
    b = load_calibration(tokenizer, rows=10, length=64)
    assert a.ids.shape == (10, 64) and torch.equal(a.ids, b.ids) and a.fingerprint == b.fingerprint
    texts = [tokenizer.decode(row.tolist()) for row in a.ids]
    assert len(set(texts)) == 10  # no window twice
    sources = builtin_texts()
    # Every built-in source contributes (a window's edges may split a UTF-8 character: trim them).
    found = {name for t in texts for name, text in sources.items() if t[4:-4] in text}
    assert found == set(BUILTIN_SOURCES)


def test_calibration_from_file_and_too_little_text(tiny_llama_dir, tmp_path):
    tokenizer = Tokenizer.from_dir(tiny_llama_dir)
    path = tmp_path / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    calibration = load_calibration(tokenizer, str(path), rows=4, length=32)
    assert calibration.ids.shape == (4, 32) and str(path) in calibration.description
    with pytest.raises(ExlqError, match="windows"):
        load_calibration(tokenizer, str(path), rows=10_000, length=64)


def test_spread_windows_do_not_overlap():
    windows = spread_windows(list(range(1000)), 7, 100)
    starts = [w[0] for w in windows]
    assert len(windows) == 7 and starts == sorted(set(starts)) and all(len(w) == 100 for w in windows)
    assert starts[0] == 0 and starts[-1] == 900


def test_layer_runner_reproduces_the_full_forward(tiny_model_dirs):
    model = load_model(tiny_model_dirs["qwen2"], device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (5, 24), generator=torch.Generator().manual_seed(0))
    runner = LayerRunner(model, ids, batch_rows=2)
    for layer in model.model.layers:
        runner.advance(layer)
    logits = model.logits(torch.cat(runner.chunks))
    assert torch.allclose(logits, model(ids, max_output_len=None), atol=1e-5)


def test_hessians_equal_xtx_of_captured_inputs(tiny_model_dirs):
    model = load_model(tiny_model_dirs["llama"], device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    layer = model.model.layers[0]
    captured: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(_module, args):
            captured[name] = args[0].reshape(-1, args[0].shape[-1])  # returns None: input unchanged

        return hook

    handles = [m.register_forward_pre_hook(capture(name)) for name, m in linear_modules(layer).items()]
    model(ids)
    for h in handles:
        h.remove()
    collector = LayerRunner(model, ids, batch_rows=2).collect_hessians(layer)
    assert collector.owner["self_attn.k_proj"] == "self_attn.q_proj" == collector.owner["self_attn.v_proj"]
    assert collector.owner["mlp.up_proj"] == "mlp.gate_proj"
    for name, x in captured.items():
        expected = x.T @ x / x.shape[0]
        assert torch.allclose(collector.hessian(name), expected, rtol=1e-4, atol=1e-6), name


def test_runner_rows_and_hessians_can_leave_out_the_first_rows(tiny_model_dirs):
    """Held-out scoring (measure --holdout): outputs(rows, skip) are rows [skip, rows) across chunk borders, and the
    Hessians with `skip` are XᵀX of the other rows only."""
    model = load_model(tiny_model_dirs["llama"], device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(2))
    layer = model.model.layers[0]
    runner = LayerRunner(model, ids, batch_rows=2)  # chunks of rows [0, 2), [2, 4), [4, 5)
    everything = torch.cat(runner.outputs(layer))
    for rows, skip in [(None, 0), (3, 0), (None, 3), (4, 1), (5, 2)]:
        got = torch.cat(runner.outputs(layer, rows=rows, skip=skip))
        assert torch.equal(got, everything[skip:rows])
    held_out = runner.collect_hessians(layer, skip=3)
    rest = LayerRunner(model, ids[3:], batch_rows=2).collect_hessians(layer)
    for name in linear_modules(layer):
        assert torch.allclose(held_out.hessian(name), rest.hessian(name), rtol=1e-4, atol=1e-6), name
        assert not torch.allclose(held_out.hessian(name), runner.collect_hessians(layer).hessian(name), rtol=1e-3)
