"""Many sequences generated together in one left-padded batch, each stopping on its own.

Evaluations sample many completions (HumanEval: N per problem); one forward over B rows costs
little more than one over a single row while decode is bound by weight reads, so rows run in
one batch. Prompts of unequal length are left padded (the model masks and positions the padding
through `pad_lengths`); N samples of one prompt are simply N rows with the same prompt.

`max_seq_len` bounds each row on its own, as if it ran alone: a row's prompt and new tokens, not its
left padding, so a short prompt beside a long one is not cut early (the cache holds `max_seq_len` plus the
longest padding, and positions count from each row's first real token).

A row that has stopped (EOS, its stop rule, `max_new_tokens`, `max_seq_len`) keeps being decoded with whatever
it sampled, and its tokens are ignored: the batch runs until every row has stopped. That wastes
the finished rows' share of each step but keeps the cache a plain rectangular batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from exlq.errors import ExlqError
from exlq.runtime.cache import KVCache
from exlq.runtime.generator import PREFILL_CHUNK, TokenSink, cache_length
from exlq.runtime.kv_quant import CacheType
from exlq.runtime.model import DecoderOnlyLM
from exlq.runtime.sampler import Sampler, SamplerSettings
from exlq.runtime.tokenizer import Tokenizer

# Given the text generated so far, where to cut it and stop the row (None: go on).
StopRule = Callable[[str], "int | None"]
DEFAULT_CACHE = "fp16"  # the model's own dtype, unquantized


@dataclass
class RowResult:
    text: str  # cut at the stop rule's position when it fired
    token_ids: list[int]  # every token sampled for the row up to its stop (EOS excluded)
    prompt_tokens: int
    stop_reason: str  # "eos", "stop_string", "stop_rule", "max_new_tokens" or "max_seq_len"


@dataclass
class BatchResult:
    rows: list[RowResult]
    steps: int  # decode steps the batch ran (the longest row's length)
    seconds: float  # prefill and decode of the whole batch

    @property
    def new_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.rows)


class BatchGenerator:
    """Batched sampling of independent continuations with per-row stopping."""

    def __init__(self, model: DecoderOnlyLM, tokenizer: Tokenizer, *, max_seq_len: int | None = None,
                 cache_type: CacheType | str = DEFAULT_CACHE):  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = cache_length(model, max_seq_len)
        self.cache_type = cache_type

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        sampler: SamplerSettings | Sampler | None = None,
        max_new_tokens: int = 256,
        stop_rule: StopRule | None = None,
        stop_strings: Sequence[str] = (),
        eos_ids: Sequence[int] | None = None,
    ) -> BatchResult:
        """Continue every prompt; row i of the result belongs to prompt i."""
        if not prompts:
            raise ExlqError("no prompts to generate from")
        longest, shortest = max(len(p) for p in prompts), min(len(p) for p in prompts)
        if shortest == 0:
            raise ExlqError("a prompt is empty after tokenization")
        if longest > self.max_seq_len:
            raise ExlqError(f"a prompt has {longest} tokens but max_seq_len is {self.max_seq_len}; raise --max-seq-len")
        if not isinstance(sampler, Sampler):
            sampler = Sampler(sampler or SamplerSettings())
        start = time.perf_counter()
        rows = len(prompts)
        texts: list[list[str]] = [[] for _ in range(rows)]
        sinks = [TokenSink(self.tokenizer, stop_strings, eos_ids, texts[i].append, max_new_tokens) for i in range(rows)]
        device = self.model.device
        pads = [longest - len(p) for p in prompts]
        # Prompt + room for every new token, filled in place: the shortest prompt's row has the most (each row's
        # real tokens stop at max_seq_len, its padding not counted).
        room = sinks[0].room(self.max_seq_len, shortest)
        history = torch.full((rows, longest + room), -1, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            history[i, pads[i] : longest] = torch.tensor(list(p), dtype=torch.long)
        cache = KVCache.for_model(self.model, min(self.max_seq_len + max(pads), longest + room), rows,
                                  cache_type=self.cache_type)
        pad_lengths = torch.tensor(pads) if any(pads) else None  # equal prompts need no padding masks
        logits = self._prefill(history[:, :longest].clamp(min=0), pad_lengths, cache)
        cut_at: dict[int, int] = {}  # row -> where the stop rule cut its text
        active = set(range(rows))
        length, steps = longest, 0
        while True:
            tokens = sampler.sample(logits, history[:, :length])
            steps += 1
            for i, token in enumerate(tokens.tolist()):
                if i in active:
                    seen = len(texts[i])
                    going = sinks[i].push(token)
                    if stop_rule is not None and len(texts[i]) > seen:
                        cut = stop_rule("".join(texts[i]))
                        if cut is not None:
                            cut_at[i], sinks[i].stop_reason, going = cut, "stop_rule", False
                    if not going:
                        active.discard(i)
            history[:, length] = tokens
            length += 1
            # (the cache, max_seq_len + the longest padding or the prompts + room, never fills before every row stops)
            for i in [i for i in active if cache.seq_len - pads[i] >= self.max_seq_len]:
                sinks[i].stop_reason = "max_seq_len"  # its own tokens fill max_seq_len: the last one is never cached
                active.discard(i)
            if not active:
                break
            logits = self.model(tokens[:, None], cache, max_output_len=1)[:, -1]

        results = []
        for i, sink in enumerate(sinks):
            text = "".join(texts[i]) if i in cut_at else sink.result(prompts[i], 0, start, None).text
            cut = cut_at[i] if i in cut_at else stop_rule(text) if stop_rule is not None else None  # held-back text too
            text = text if cut is None else text[:cut]
            results.append(RowResult(text, sink.token_ids, len(prompts[i]), sink.stop_reason))
        return BatchResult(results, steps, time.perf_counter() - start)

    def _prefill(self, ids: torch.Tensor, pad_lengths: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Run the padded prompts in chunks; the last position's logits [B, vocab]."""
        total = ids.shape[1]
        for begin in range(0, total, PREFILL_CHUNK):
            chunk = ids[:, begin : begin + PREFILL_CHUNK]
            last = begin + chunk.shape[1] >= total
            logits = self.model(chunk, cache, max_output_len=1 if last else 0,
                                pad_lengths=pad_lengths if begin == 0 else None)  # fmt: skip
        return logits[:, -1]
