"""End-to-end checks on the real models from ../shared/tools/get-models (skipped when absent)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import real_model_dir
from test_kv_cache_quant import relative_logit_error
from exlq.data.text_sources import load_text
from exlq.eval.perplexity import evaluate_perplexity
from exlq.runtime.cache import KVCache
from exlq.runtime.generator import Generator
from exlq.runtime.kv_quant import CacheType
from exlq.runtime.loader import load_model
from exlq.runtime.prompt_format import format_prompt, prompt_encoding
from exlq.runtime.sampler import SamplerSettings
from exlq.runtime.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

ROWS, LENGTH = 3, 1024


@pytest.fixture(scope="module")
def smollm():
    path = real_model_dir("smollm2-135m")
    return path, load_model(path, device="cpu", dtype="fp32"), Tokenizer.from_dir(path)


def test_eval_ppl_matches_transformers_on_wikitext(smollm):
    """Same windows, same tokens: exlq's perplexity within 0.5 % of transformers' (in practice ~1e-6)."""
    import transformers

    try:
        text = load_text("wikitext2").text
    except Exception as exc:  # the shared data is optional for this test
        pytest.skip(f"wikitext-2 test text not available: {exc}")
    path, model, tokenizer = smollm
    ids = torch.tensor(tokenizer.encode(text[:200_000]))
    ours = evaluate_perplexity(model, ids, length=LENGTH, rows=ROWS)

    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    hf_ids = hf_tok(text[:200_000], return_tensors="pt", add_special_tokens=False).input_ids[0]
    assert torch.equal(hf_ids[: ROWS * LENGTH], ids[: ROWS * LENGTH])
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in range(ROWS):
            x = hf_ids[w * LENGTH : (w + 1) * LENGTH][None]
            logp = torch.log_softmax(reference(x).logits.float()[0, :-1], dim=-1)
            nll -= logp.gather(1, x[0, 1:, None]).sum().item()
            n += LENGTH - 1
    expected = math.exp(nll / n)
    assert ours.tokens_scored == n
    assert ours.perplexity == pytest.approx(expected, rel=5e-3)
    assert 10 < ours.perplexity < 40  # a trained model on English text, not noise


def test_chat_answer_is_coherent(smollm):
    path, model, tokenizer = smollm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = format_prompt(messages, "auto", tokenizer)
    add_bos, special = prompt_encoding("chat_template", tokenizer, prompt)
    ids = tokenizer.encode(prompt, add_bos=add_bos, encode_special_tokens=special)
    result = Generator(model, tokenizer, max_seq_len=512).generate(
        ids, sampler=SamplerSettings(temperature=0.0), max_new_tokens=32
    )
    assert "Paris" in result.text
    assert result.stop_reason == "eos"


def test_speculative_decoding_on_real_models(smollm):
    """Qwen draft for a Qwen main: same greedy tokens as plain decoding; a SmolLM2 draft is refused."""
    from exlq.errors import ExlqError
    from exlq.runtime.speculative import SpeculativeGenerator

    path = real_model_dir("qwen2.5-coder-0.5b")
    tokenizer = Tokenizer.from_dir(path)
    model = load_model(path, device="cpu", dtype="fp32")
    prompt = tokenizer.encode('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n')
    greedy = SamplerSettings(temperature=0.0)
    expected = Generator(model, tokenizer, max_seq_len=256).generate(prompt, sampler=greedy, max_new_tokens=24)
    # The model drafts for itself with half its layers skipped (layer order): a cheaper, different draft.
    draft_model = load_model(path, device="cpu", dtype="fp32")
    draft_model.set_layer_order(list(range(0, len(draft_model.model.layers), 2)))
    spec = SpeculativeGenerator(Generator(model, tokenizer, max_seq_len=256), Generator(draft_model, tokenizer, max_seq_len=256))
    got = spec.generate(prompt, sampler=greedy, max_new_tokens=24)
    assert got.token_ids == expected.token_ids and got.draft_proposed > 0
    _, smol_model, smol_tokenizer = smollm
    with pytest.raises(ExlqError, match="vocabulary differs"):
        SpeculativeGenerator(Generator(model, tokenizer, max_seq_len=256), Generator(smol_model, smol_tokenizer, max_seq_len=256))


def test_chunked_prefill_with_a_quantized_cache_is_as_good_as_one_shot(smollm):
    """Chunking a prefill into a q4 cache changes the logits (a float-noise difference in a key flips a rounding,
    and the flip grows through the later layers: up to ~3 % relative here), but not their quality: as close to the
    FP16 cache's as one-shot prefill is. Measured 2026-12-05 (relative logit error): one-shot vs FP16 5.8 %,
    chunked vs FP16 5.6-6.0 %, chunked vs one-shot 0.15-2.8 %."""
    _, model, tokenizer = smollm
    text = ("The printing press reached Venice in 1469, and within thirty years the city had more than a hundred "
            "shops. Aldus Manutius cut a slanted type that saved paper, printed small books a scholar could carry, "
            "and sold Greek classics to readers across Europe. Paper mills along the rivers of the Veneto grew "
            "with the trade, while the Senate granted the first privileges, an early form of copyright, to "
            "printers who asked for them. By 1500 the presses of the city had turned out perhaps a sixth of all "
            "the books printed in Europe, from grammars and missals to maps and music.")
    ids = torch.tensor(tokenizer.encode(text))[None, :120]
    assert ids.shape[1] == 120

    def logits(cache_type, chunks):
        cache = KVCache.for_model(model, ids.shape[1], cache_type=cache_type)
        bounds = [0, *torch.tensor(chunks).cumsum(0).tolist()]
        return torch.cat([model(ids[:, a:b], cache, max_output_len=None) for a, b in zip(bounds, bounds[1:])], dim=1)

    fp16 = logits(CacheType(None, None), [120])
    q4 = CacheType(4, 4)
    one_shot = relative_logit_error(logits(q4, [120]), fp16)
    assert 0.01 < one_shot < 0.15  # the cache is quantized, and not broken
    for chunks in ([60, 60], [2] + [1] * 118, [7] * 17 + [1]):
        assert relative_logit_error(logits(q4, chunks), fp16) < 1.25 * one_shot, chunks
