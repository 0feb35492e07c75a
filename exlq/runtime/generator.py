"""Text generation with one model and the KV cache it owns.

The generator remembers which tokens its cache holds. A new prompt that shares a prefix with
them (the next turn of a chat, the same few-shot header, a retry) only runs the tokens after the
common prefix: `tokens_processed` counts what actually went through the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from exlq.errors import ExlqError
from exlq.runtime.model import DecoderOnlyLM
from exlq.runtime.sampler import Sampler, SamplerSettings
from exlq.runtime.streaming import StopStrings, StreamDecoder
from exlq.runtime.tokenizer import Tokenizer

PREFILL_CHUNK = 2048  # bounds activation memory of long prompts


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    reused_tokens: int  # prompt tokens whose keys/values were already cached
    stop_reason: str  # "eos", "stop_string", "max_new_tokens" or "max_seq_len"
    time_to_first_token: float  # seconds from the call to the first sampled token
    decode_seconds: float  # from the first sampled token to the last

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.new_tokens - 1  # the first token comes from the prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


@dataclass
class ChoiceScore:
    text: str
    token_ids: list[int]
    logprob: float  # sum of the continuation's token log-probabilities
    probability: float  # normalized over the candidate set
    value: float


@dataclass
class ChoiceScores:
    choices: list[ChoiceScore]
    expected_value: float  # Σ probability · value
    best: str = field(init=False)

    def __post_init__(self) -> None:
        self.best = max(self.choices, key=lambda c: c.logprob).text


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Generator:
    """Batch-1 generation and scoring with prefix reuse across calls."""

    def __init__(self, model: DecoderOnlyLM, tokenizer: Tokenizer, *, max_seq_len: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.cache = model.new_cache(max_seq_len or model.config.max_position_embeddings)
        self._cached_ids: list[int] = []  # tokens whose keys/values are in the cache, in order
        self.tokens_processed = 0  # every token ever run through the model by this generator

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    def _run(self, ids: Sequence[int], max_output_len: int | None) -> torch.Tensor | None:
        tensor = torch.tensor([list(ids)], dtype=torch.long, device=self.model.device)
        logits = self.model(tensor, self.cache, max_output_len=max_output_len)
        self._cached_ids.extend(ids)
        self.tokens_processed += len(ids)
        return logits

    def _rewind(self, length: int) -> None:
        self.cache.truncate(length)
        del self._cached_ids[length:]

    def prefill(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Make the cache hold exactly `prompt_ids`; return the last position's logits [1, vocab]."""
        return self._prefill(prompt_ids)[0]

    def _prefill(self, prompt_ids: Sequence[int]) -> tuple[torch.Tensor, int]:
        """prefill(), also returning how many prompt tokens were already cached."""
        if not prompt_ids:
            raise ExlqError("the prompt is empty after tokenization")
        if len(prompt_ids) > self.max_seq_len:
            raise ExlqError(
                f"the prompt has {len(prompt_ids)} tokens but max_seq_len is {self.max_seq_len}; "
                "raise --max-seq-len or shorten the prompt"
            )
        # Keep at least one token to run: its logits are the ones we need.
        keep = min(common_prefix_length(self._cached_ids, prompt_ids), len(prompt_ids) - 1)
        self._rewind(keep)
        pending = list(prompt_ids[keep:])
        while len(pending) > PREFILL_CHUNK:
            self._run(pending[:PREFILL_CHUNK], max_output_len=0)
            pending = pending[PREFILL_CHUNK:]
        return self._run(pending, max_output_len=1)[:, -1], keep

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        sampler: SamplerSettings | Sampler | None = None,
        max_new_tokens: int = 256,
        stop_strings: Sequence[str] = (),
        eos_ids: Sequence[int] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Continue `prompt_ids` until EOS, a stop string, `max_new_tokens` or the cache is full.

        `on_text` receives the decoded text as it becomes final (never half a UTF-8 character,
        never text that might still turn out to be part of a stop string).
        """
        if max_new_tokens < 1:
            raise ExlqError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
        if not isinstance(sampler, Sampler):
            sampler = Sampler(sampler or SamplerSettings())
        eos = set(self.tokenizer.eos_token_ids if eos_ids is None else eos_ids)
        decoder = StreamDecoder(self.tokenizer)
        stops = StopStrings(list(stop_strings))
        emitted: list[str] = []

        def emit(text: str) -> None:
            if text:
                emitted.append(text)
                if on_text is not None:
                    on_text(text)

        start = time.perf_counter()
        logits, reused = self._prefill(prompt_ids)
        # Prompt + room for every new token, filled in place: no per-token reallocation.
        history = torch.empty(1, len(prompt_ids) + max_new_tokens, dtype=torch.long, device=self.model.device)
        history[0, : len(prompt_ids)] = torch.tensor(list(prompt_ids), dtype=torch.long)
        length = len(prompt_ids)
        new_ids: list[int] = []
        first_token_at = None
        stop_reason = "max_new_tokens"
        while True:
            token = sampler.sample(logits, history[:, :length])
            token_id = int(token.item())
            if first_token_at is None:
                first_token_at = time.perf_counter()
            if token_id in eos:
                stop_reason = "eos"
                break
            new_ids.append(token_id)
            history[0, length] = token[0]
            length += 1
            text, stopped = stops.push(decoder.push(token_id))
            emit(text)
            if stopped:
                stop_reason = "stop_string"
                break
            if len(new_ids) >= max_new_tokens:
                break
            if self.cache.seq_len >= self.max_seq_len:
                stop_reason = "max_seq_len"
                break
            logits = self._run([token_id], max_output_len=1)[:, -1]
        if stop_reason != "stop_string":
            emit(stops.push(decoder.flush())[0] + stops.flush())
        end = time.perf_counter()
        return GenerationResult(
            text="".join(emitted),
            token_ids=new_ids,
            prompt_tokens=len(prompt_ids),
            reused_tokens=reused,
            stop_reason=stop_reason,
            time_to_first_token=(first_token_at or end) - start,
            decode_seconds=end - (first_token_at or end),
        )

    def continuation_ids(self, prompt_text: str, prompt_ids: Sequence[int], continuation: str) -> list[int]:
        """Token ids of `continuation` as the tokenizer splits it after `prompt_text`.

        Tokenizing the joined text and dropping the prompt's tokens respects merges across the
        boundary (" A" vs "A"); when the prompt's tokens change in the joined text, fall back to
        tokenizing the continuation alone.
        """
        joined = self.tokenizer.encode(prompt_text + continuation, encode_special_tokens=True)
        plain_prompt = self.tokenizer.encode(prompt_text, encode_special_tokens=True)
        if joined[: len(plain_prompt)] == plain_prompt and len(joined) > len(plain_prompt):
            return joined[len(plain_prompt) :]
        return self.tokenizer.encode(continuation, encode_special_tokens=True)

    def score_choices(
        self,
        prompt_ids: Sequence[int],
        choice_ids: Sequence[Sequence[int]],
        *,
        labels: Sequence[str],
        values: Sequence[float] | None = None,
    ) -> ChoiceScores:
        """Log-probability of each candidate continuation after the prompt, and their weighted value.

        The prompt is run once; each multi-token candidate runs after it and is rewound again.
        """
        if not choice_ids or any(not ids for ids in choice_ids):
            raise ExlqError("every choice must be a non-empty continuation")
        if values is not None and len(values) != len(choice_ids):
            raise ExlqError(f"got {len(values)} values for {len(choice_ids)} choices")
        first_logprobs = torch.log_softmax(self.prefill(prompt_ids).float(), dim=-1)[0]
        base = len(self._cached_ids)
        totals = []
        for ids in choice_ids:
            total = first_logprobs[ids[0]]
            if len(ids) > 1:
                logits = self._run(ids[:-1], max_output_len=None)[0].float()
                total = total + torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:], device=logits.device)[:, None]).sum()
                self._rewind(base)
            totals.append(float(total))
        probs = torch.softmax(torch.tensor(totals, dtype=torch.float64), dim=0).tolist()
        values = list(values) if values is not None else default_choice_values(labels)
        scores = [
            ChoiceScore(text=label, token_ids=list(ids), logprob=lp, probability=p, value=float(v))
            for label, ids, lp, p, v in zip(labels, choice_ids, totals, probs, values)
        ]
        return ChoiceScores(scores, expected_value=sum(s.probability * s.value for s in scores))


def default_choice_values(labels: Sequence[str]) -> list[float]:
    """Numeric labels stand for themselves; others ("A".."J") are valued 1..n in the given order."""
    try:
        return [float(label) for label in labels]
    except ValueError:
        return [float(i + 1) for i in range(len(labels))]
