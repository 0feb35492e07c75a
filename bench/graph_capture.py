"""What a short generation pays for its CUDA graph, per synthetic shape: the capture's host time (warm-up steps,
then the capture), and the decode rate `Generator.generate` reports over a few tokens with the first step's graph
captured ahead, while the GPU runs the prompt (`prepare_decode`, what generate does), or on the first step's use.

    python3 bench/graph_capture.py [--shapes smollm2-135m llama3-8b] [--bpw 4.0] [--tokens 48] [--prompt 32]

With --tokens past a graph bucket, the `_linear_spans` rows also pay the captures of the later buckets' graphs, one
each time the position enters a new bucket of 256 positions, as all steps had before session 27; the other rows take
graphs.step_span (since session 28 one graph for every position of one-token kernel steps).

The generation's tokenizer is a stand-in (one character a token, no EOS): the model's ids are random, and the
decode rate is the model's, not the detokenizer's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from exlq.cli.bench import _synthetic_model  # noqa: E402
from exlq.runtime import graphs  # noqa: E402
from exlq.runtime.generator import Generator  # noqa: E402
from exlq.runtime.sampler import SamplerSettings  # noqa: E402


class StandInTokenizer:
    """What Generator needs of a tokenizer: no EOS, and a decode as cheap as it gets."""

    eos_token_ids: list[int] = []

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "x" * len(ids)


def capture_ms(model, prompt: torch.Tensor, warmups: int) -> float:
    """Host ms of prepare_decode after a prefill, with `warmups` eager steps before the capture."""
    graphs.WARMUP_STEPS = warmups
    model.decode_graphs.clear()
    cache = model.new_cache(1024)
    model(prompt, cache, max_output_len=0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.prepare_decode(cache)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def generation(model, prompt: list[int], tokens: int, ahead: bool) -> dict[str, float]:
    """Time to the first token and the reported decode rate of one generate call with no graph captured before it."""
    model.decode_graphs.clear()
    generator = Generator(model, StandInTokenizer(), max_seq_len=max(1024, len(prompt) + tokens))
    if not ahead:
        generator.model = _NoPrepare(model)
    torch.cuda.synchronize()
    result = generator.generate(prompt, sampler=SamplerSettings(temperature=0), max_new_tokens=tokens)
    return {"ttft_ms": round(result.time_to_first_token * 1e3, 1),
            "decode_tok_s": round(result.decode_tokens_per_second, 1),
            "total_ms": round((result.time_to_first_token + result.decode_seconds) * 1e3, 1)}


class _NoPrepare:
    """The model with prepare_decode switched off: the first step captures its graph on use, as before."""

    def __init__(self, model):
        self._model = model

    def prepare_decode(self, cache) -> None:
        pass

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs)


def linear_span(cache, tokens: int, heads: int) -> int:
    """Every graph step's span a multiple of BUCKET, as before session 27."""
    return min(cache.max_seq_len, -(-(cache.seq_len + tokens) // graphs.BUCKET) * graphs.BUCKET)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b", "llama3-8b"])
    parser.add_argument("--bpw", type=float, default=4.0)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--prompt", type=int, default=32)
    args = parser.parse_args()
    device = torch.device("cuda")
    for shape in args.shapes:
        model = _synthetic_model(shape, args.bpw, device, 128)
        prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        row = {"shape": shape, "first_capture_ms": round(capture_ms(model, prompt, 1), 1)}  # + loading the kernels
        for warmups in (2, 1, 2, 1):
            row.setdefault(f"capture_ms_warmup{warmups}", []).append(round(capture_ms(model, prompt, warmups), 1))
        graphs.WARMUP_STEPS = 1
        ids = prompt[0].tolist()
        runs = (("on_first_step", False, False), ("ahead", True, False), ("ahead_linear_spans", True, True),
                ("ahead_again", True, False), ("ahead_linear_spans_again", True, True))
        for label, ahead, linear in runs:
            spans = graphs.step_span
            if linear:
                graphs.step_span = linear_span
            try:
                row[label] = generation(model, ids, args.tokens, ahead)
            finally:
                graphs.step_span = spans
        print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
