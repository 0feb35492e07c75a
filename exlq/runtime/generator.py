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
from exlq.runtime.cache import KVCache
from exlq.runtime.kv_quant import CacheType
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
    draft_proposed: int = 0  # speculative decoding: draft tokens proposed and accepted
    draft_accepted: int = 0

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


class TokenSink:
    """Where sampled tokens go: EOS, stop strings, the token limit, streamed text and the result."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str], eos_ids: Sequence[int] | None,
                 on_text: Callable[[str], None] | None, max_new_tokens: int):  # fmt: skip
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ExlqError(f"max_new_tokens must be an integer of at least 1 (got {max_new_tokens!r})")
        self.eos = set(tokenizer.eos_token_ids if eos_ids is None else eos_ids)
        self.decoder = StreamDecoder(tokenizer)
        self.stops = StopStrings(list(stop_strings))
        self.on_text = on_text
        self.max_new_tokens = max_new_tokens
        self.emitted: list[str] = []
        self.token_ids: list[int] = []
        self.stop_reason = "max_new_tokens"

    def room(self, max_seq_len: int, prompt_length: int) -> int:
        """New tokens a history buffer needs after a prompt: the limit, or what a cache of `max_seq_len` lets through
        (its last token is sampled, never cached), whichever is fewer."""
        return min(self.max_new_tokens, max_seq_len - prompt_length + 1)

    def _emit(self, text: str) -> None:
        if text:
            self.emitted.append(text)
            if self.on_text is not None:
                self.on_text(text)

    def push(self, token_id: int) -> bool:
        """Take one sampled token; False when generation must stop (EOS, stop string, limit)."""
        if token_id in self.eos:
            self.stop_reason = "eos"
            return False
        self.token_ids.append(token_id)
        text, stopped = self.stops.push(self.decoder.push(token_id))
        self._emit(text)
        if stopped:
            self.stop_reason = "stop_string"
            return False
        return len(self.token_ids) < self.max_new_tokens

    def result(self, prompt_ids: Sequence[int], reused: int, start: float, first_token_at: float | None) -> GenerationResult:
        if self.stop_reason != "stop_string":
            self._emit(self.stops.push(self.decoder.flush())[0] + self.stops.flush())
        end = time.perf_counter()
        return GenerationResult(
            text="".join(self.emitted),
            token_ids=self.token_ids,
            prompt_tokens=len(prompt_ids),
            reused_tokens=reused,
            stop_reason=self.stop_reason,
            time_to_first_token=(first_token_at or end) - start,
            decode_seconds=end - (first_token_at or end),
        )


class TokenReader:
    """Reads a sampled token to the host while later steps are queued behind it.

    `int(token.item())` waits for everything queued on the stream before the read, so a step queued after the token
    would be waited for too, and the GPU would idle while the host reads, streams and queues the step after. Here
    `start` queues the token's copy into pinned host memory with an event behind it, the caller queues its next step,
    and `value` waits for that event alone. On the CPU it just reads the token."""

    def __init__(self, device: torch.device):
        self.device = device
        self.on_gpu = device.type == "cuda"
        if self.on_gpu:
            self.host = torch.empty(1, dtype=torch.long, pin_memory=True)
            self.event = torch.cuda.Event()
        self.token: torch.Tensor | None = None

    def start(self, token: torch.Tensor) -> None:
        """Queue the read of `token`'s first element (the sampler's output: [B] or [B, 1])."""
        self.token = token.view(-1)[:1]
        if self.on_gpu:
            self.host.copy_(self.token, non_blocking=True)
            self.event.record(torch.cuda.current_stream(self.device))  # the copy's stream: the token's device

    def value(self) -> int:
        """The token `start` queued, once it is on the host."""
        if not self.on_gpu:
            return int(self.token[0])
        self.event.synchronize()
        return int(self.host[0])


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share. Called every speculative round on the whole context, so prefixes
    are compared as lists (at C speed) and the first difference found by bisection, not id by id in Python."""
    a, b = list(a), list(b)
    lo, hi = 0, min(len(a), len(b))  # the first lo ids agree; the answer is at most hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def cache_length(model: DecoderOnlyLM, max_seq_len: int | None) -> int:
    """A generator's cache length: `max_seq_len`, or the model's max_position_embeddings when None."""
    length = model.config.max_position_embeddings if max_seq_len is None else max_seq_len
    if length < 1:
        raise ExlqError(f"max_seq_len must be at least 1 (got {length})")
    return length


class Generator:
    """Batch-1 generation and scoring with prefix reuse across calls."""

    def __init__(
        self,
        model: DecoderOnlyLM,
        tokenizer: Tokenizer,
        *,
        max_seq_len: int | None = None,
        cache_type: CacheType | str | None = None,
    ):
        """`cache_type`: fp16 (default), a quantized CacheType, or its name ("q4"); see kv_quant."""
        self.model = model
        self.tokenizer = tokenizer
        self.cache = KVCache.for_model(model, cache_length(model, max_seq_len), cache_type=cache_type)
        self._cached_ids: list[int] = []  # tokens whose keys/values are in the cache, in order
        self._revision = model.revision  # the model's, when the cache's keys/values were computed
        self.tokens_processed = 0  # every token ever run through the model by this generator

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    def run(self, ids: Sequence[int], max_output_len: int | None, *, graph_step: bool = False) -> torch.Tensor | None:
        """Append `ids` to the cache; logits of the last `max_output_len` positions [1, n, vocab].

        `graph_step`: replay a CUDA graph for this multi-token call (see DecoderOnlyLM.forward)."""
        tensor = torch.tensor([list(ids)], dtype=torch.long, device=self.model.device)
        logits = self.run_tensor(tensor, max_output_len, graph_step=graph_step)
        self.record(ids)
        return logits

    def run_tensor(self, ids: torch.Tensor, max_output_len: int | None, *, graph_step: bool = False) -> torch.Tensor | None:
        """`run` for ids [1, T] already on the model's device: no host copy and no wait for the GPU, so steps can
        feed each other's outputs. The caller must `record` the ids' values once it has read them."""
        return self.model(ids, self.cache, max_output_len=max_output_len, graph_step=graph_step)

    def record(self, ids: Sequence[int]) -> None:
        """Note that `ids` went into the cache through `run_tensor` (the bookkeeping `sync` and `rewind` rely on)."""
        self._cached_ids.extend(ids)
        self.tokens_processed += len(ids)

    def rewind(self, length: int) -> None:
        """Keep only the first `length` cached tokens."""
        self.cache.truncate(length)
        del self._cached_ids[length:]

    def follow_model(self) -> None:
        """Start over if the model changed since the cache was filled (set_loras, set_layer_order: `revision`): its
        keys and values are stale, and a new layer order needs a cache of its own size."""
        if self.model.revision == self._revision:
            return
        if self.cache.num_layers != self.model.num_cache_layers:
            self.cache = KVCache.for_model(self.model, self.cache.max_seq_len, cache_type=self.cache.cache_type)
        self.rewind(0)
        self._revision = self.model.revision

    def sync(self, ids: Sequence[int]) -> None:
        """Make the cache hold exactly `ids`, running only what is not cached yet (no logits)."""
        self.rewind(common_prefix_length(self.cached_ids, ids))
        pending = list(ids[len(self._cached_ids) :])
        for start in range(0, len(pending), PREFILL_CHUNK):
            self.run(pending[start : start + PREFILL_CHUNK], max_output_len=0)

    @property
    def cached_ids(self) -> list[int]:
        """The tokens whose keys/values the cache holds (read-only view by convention), once the cache follows the
        model (follow_model): every reuse of the cache asks this first."""
        self.follow_model()
        return self._cached_ids

    def check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        """The prompt's ids as a list (it may come as a list, a tuple or a 1-D tensor); it must hold at least one
        token id of the vocabulary and fit the cache."""
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ExlqError("the prompt is empty after tokenization")
        vocab = self.model.config.vocab_size
        if (bad := next((t for t in prompt_ids if not 0 <= t < vocab), None)) is not None:
            raise ExlqError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if len(prompt_ids) > self.max_seq_len:
            raise ExlqError(
                f"the prompt has {len(prompt_ids)} tokens but max_seq_len is {self.max_seq_len}; "
                "raise --max-seq-len or shorten the prompt"
            )
        return prompt_ids

    def prefill(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Make the cache hold exactly `prompt_ids`; return the last position's logits [1, vocab]."""
        return self._prefill(self.check_prompt(prompt_ids))[0]

    def _prefill(self, prompt_ids: list[int]) -> tuple[torch.Tensor, int]:
        """prefill() of checked ids (check_prompt's), also returning how many prompt tokens were already cached."""
        # Keep at least one token to run: its logits are the ones we need.
        keep = min(common_prefix_length(self.cached_ids, prompt_ids), len(prompt_ids) - 1)
        self.rewind(keep)
        pending = list(prompt_ids[keep:])
        while len(pending) > PREFILL_CHUNK:
            self.run(pending[:PREFILL_CHUNK], max_output_len=0)
            pending = pending[PREFILL_CHUNK:]
        return self.run(pending, max_output_len=1)[:, -1], keep

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
        if not isinstance(sampler, Sampler):
            sampler = Sampler(sampler or SamplerSettings())
        prompt_ids = self.check_prompt(prompt_ids)
        sink = TokenSink(self.tokenizer, stop_strings, eos_ids, on_text, max_new_tokens)
        start = time.perf_counter()
        logits, reused = self._prefill(prompt_ids)
        # Prompt + room for every new token the cache allows, filled in place: no per-token reallocation.
        room = sink.room(self.max_seq_len, len(prompt_ids))
        history = torch.empty(1, len(prompt_ids) + room, dtype=torch.long, device=self.model.device)
        history[0, : len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
        length = len(prompt_ids)
        reader = TokenReader(self.model.device)
        token = sampler.sample(logits, history[:, :length])
        if max_new_tokens > 1:  # the first step's graph captured while the GPU runs the prompt
            self.model.prepare_decode(self.cache)
        value: int | None = int(token.item())  # read at once: the time to the first token is the prompt's
        first_token_at = time.perf_counter()
        while True:
            # Queue the step that runs `token` behind the token's read, so the GPU works while the host reads, decodes
            # and streams it. Skipped when no step can follow (the token limit, a full cache); a step queued for a
            # token that turns out to end the text (EOS, a stop string) is rewound.
            queued = len(sink.token_ids) + 1 < max_new_tokens and self.cache.seq_len < self.max_seq_len
            if value is None:
                reader.start(token)
            if queued:
                history[0, length] = token[0]
                following = sampler.sample(self.run_tensor(token.view(1, 1), max_output_len=1)[:, -1],
                                           history[:, : length + 1])  # fmt: skip
            if value is None:
                value = reader.value()
            if queued:
                self.record([value])
            if not sink.push(value):
                if queued:
                    self.rewind(len(self._cached_ids) - 1)
                break
            if not queued:
                sink.stop_reason = "max_seq_len"
                break
            length += 1
            token, value = following, None
        return sink.result(prompt_ids, reused, start, first_token_at)

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
        if len(labels) != len(choice_ids):
            raise ExlqError(f"got {len(labels)} labels for {len(choice_ids)} choices")
        first_logprobs = torch.log_softmax(self.prefill(prompt_ids).float(), dim=-1)[0]
        base = len(self._cached_ids)
        totals = []
        for ids in choice_ids:
            total = first_logprobs[ids[0]]
            if len(ids) > 1:
                logits = self.run(ids[:-1], max_output_len=None)[0].float()
                total = total + torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:], device=logits.device)[:, None]).sum()
                self.rewind(base)
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
