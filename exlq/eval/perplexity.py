"""Perplexity over token windows, with the convention spelled out in the result.

Two conventions, because published numbers use both:
- non-overlapping windows (`rows` × `length`, e.g. "5x1k"): each window is scored alone and
  its first token is not predicted, so each window scores length-1 tokens;
- sliding windows (`length`, `stride`, wikitext-2 style as in the HF perplexity guide): windows
  start every `stride` tokens, each scores only the tokens the previous window did not, with
  up to length-stride tokens of context; every token but the very first is scored once (with
  stride = length this degenerates to non-overlapping windows over the whole text).

Two ways to run a window: one full forward with no KV cache (the default), or through a KV cache
`chunk` tokens at a time (`chunk=1`: a one-token prefill, then one decode step per token). Only
the second sees the cache, so it is how a quantized cache's error shows up in the perplexity.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from exlq.errors import ExlqError
from exlq.runtime.cache import KVCache
from exlq.runtime.kv_quant import CacheType, as_cache_type
from exlq.runtime.model import DecoderOnlyLM

LOGSOFTMAX_ROWS = 512  # rows of logits turned into log-probabilities at once (bounds memory)


@dataclass
class Window:
    start: int  # first token of the window in the token stream
    end: int  # one past its last token
    scored: int  # how many of its last tokens are scored (each predicted from the ones before)


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens_scored: int
    windows: int
    convention: str
    seconds: float
    kl_divergence: float | None = None  # mean KL(P_reference || P_model) per scored token
    top1_agreement: float | None = None  # share of scored tokens where both models' argmax agree
    mode: str = "full-window"  # or "token-by-token": through the KV cache `chunk` tokens at a time
    chunk: int | None = None
    cache_type: str | None = None  # the cache's name in cached mode ("fp16", "q4", "k4v2", ...)
    cache_bytes_per_token: int | None = None  # one sequence's cache bytes per position (all layers, K and V)
    cache_bytes_per_window: int | None = None  # one window's whole cache (a quantized cache's dense prefix included)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_scored / self.seconds if self.seconds > 0 else 0.0


def check_window_options(length: int, stride: int | None = None) -> None:
    """Window options that no text can satisfy, reported before anything is loaded."""
    if length < 2:
        raise ExlqError(f"--length must be at least 2 (got {length})")
    if stride is not None and not 0 < stride <= length:
        raise ExlqError(f"--stride must be between 1 and --length ({length}); got {stride}")


def nonoverlapping_windows(total_tokens: int, length: int, rows: int | None) -> list[Window]:
    check_window_options(length)
    available = total_tokens // length
    if available == 0:
        raise ExlqError(f"the text has {total_tokens} tokens, fewer than one window of {length}")
    count = available if rows is None else min(rows, available)
    return [Window(i * length, (i + 1) * length, length - 1) for i in range(count)]


def sliding_windows(total_tokens: int, length: int, stride: int) -> list[Window]:
    check_window_options(length, stride)
    if total_tokens < 2:
        raise ExlqError("the text has fewer than 2 tokens")
    windows, previous_end = [], 0
    for start in range(0, total_tokens, stride):
        end = min(start + length, total_tokens)
        scored = end - max(previous_end, start + 1)  # the stream's first token has no context
        windows.append(Window(start, end, scored))
        previous_end = end
        if end == total_tokens:
            break
    return windows


def check_chunk(chunk: int | None) -> None:
    if chunk is not None and chunk < 1:
        raise ExlqError(f"--chunk must be at least 1 (got {chunk})")


def describe(windows: list[Window], length: int, stride: int | None) -> str:
    scored = sum(w.scored for w in windows)
    if stride is None:
        how = (
            f"{len(windows)} non-overlapping windows of {length} tokens (tokens 0..{windows[-1].end - 1}), "
            "each scored alone; the first token of each window is not predicted"
        )
    else:
        how = (
            f"sliding windows of {length} tokens every {stride} tokens over {windows[-1].end} tokens; each "
            "token is scored once, in the first window that holds it as new, with up to "
            f"{length - stride} tokens of context"
            + ("; the first token of each window is not predicted" if stride == length else "")
        )
    return f"{how}; no BOS or other special tokens added; perplexity = exp(mean NLL over {scored} tokens)"


def describe_mode(chunk: int | None, cache: KVCache | None) -> str:
    if cache is None:
        return "; each window in one forward pass, no KV cache"
    step = "one token per step" if chunk == 1 else f"{chunk} tokens per step"
    return f"; each window run through a {cache.cache_type.name} KV cache, {step} (the first as prefill)"


def window_kl(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, int]:
    """(Σ KL(P_ref ‖ P), Σ [argmax agrees]) over rows of [B, n, vocab] logits, in float32 log-softmax."""
    kl, agree = 0.0, 0
    for s in range(0, logits.shape[1], LOGSOFTMAX_ROWS):
        logp = torch.log_softmax(logits[:, s : s + LOGSOFTMAX_ROWS].float(), dim=-1)
        logq = torch.log_softmax(reference[:, s : s + LOGSOFTMAX_ROWS].float(), dim=-1)
        kl += float((logq.exp() * (logq - logp)).sum(dim=-1).double().sum())
        agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
    return kl, agree


def window_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of `targets` [B, n] under `logits` [B, n, vocab], per row."""
    total = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    for s in range(0, logits.shape[1], LOGSOFTMAX_ROWS):
        logprobs = torch.log_softmax(logits[:, s : s + LOGSOFTMAX_ROWS].float(), dim=-1)
        picked = logprobs.gather(2, targets[:, s : s + LOGSOFTMAX_ROWS, None])[..., 0]
        total -= picked.double().sum(dim=1)
    return total


def evaluate_perplexity(
    model: DecoderOnlyLM,
    token_ids: torch.Tensor,
    *,
    length: int,
    rows: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    on_window: Callable[[int], None] | None = None,
    reference: DecoderOnlyLM | None = None,
    chunk: int | None = None,
    cache_type: CacheType | str | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on the 1-D `token_ids` (see the module docstring for conventions).

    With `reference` (e.g. the FP16 model a quantized one was made from), also the mean KL
    divergence KL(P_ref ‖ P_model) per scored token and the top-1 agreement, on the same windows
    (the reference always runs full windows). With `chunk`, `model` runs each window through a
    KV cache of `cache_type` (default fp16) `chunk` tokens at a time.
    """
    if batch_size < 1:
        raise ExlqError(f"--batch-size must be at least 1 (got {batch_size})")
    check_chunk(chunk)
    if chunk is None and as_cache_type(cache_type).quantized:
        raise ExlqError("a quantized cache only matters when windows run through the cache: give a chunk size")
    total_tokens = token_ids.numel()
    if stride is None:
        windows = nonoverlapping_windows(total_tokens, length, rows)
    else:
        windows = sliding_windows(total_tokens, length, stride)
    cache = None
    if chunk is not None:
        longest = max(w.end - w.start for w in windows)
        cache = KVCache.for_model(model, longest, min(batch_size, len(windows)), cache_type=cache_type)
    started = time.perf_counter()
    nll, kl, agree = 0.0, 0.0, 0
    for group in _batches(windows, batch_size):
        ids = torch.stack([token_ids[w.start : w.end] for w in group]).to(model.device)
        scored = group[0].scored
        if cache is None:
            logits = model(ids, max_output_len=scored + 1)[:, :-1]  # row j predicts token j+1
        else:
            logits = cached_logits(model, ids, scored, chunk, cache)
        nll += float(window_nll(logits, ids[:, -scored:]).sum())
        if reference is not None:
            ref_logits = reference(ids.to(reference.device), max_output_len=scored + 1)[:, :-1]
            window_kl_sum, window_agree = window_kl(logits, ref_logits.to(logits.device))
            kl += window_kl_sum
            agree += window_agree
        if on_window is not None:
            on_window(len(group))
    scored_tokens = sum(w.scored for w in windows)
    mean = nll / scored_tokens
    cached = {}
    if cache is not None:
        cached = dict(mode="token-by-token", chunk=chunk, cache_type=cache.cache_type.name,
                      cache_bytes_per_token=cache.bytes_per_token // cache.batch_size,
                      cache_bytes_per_window=cache.bytes_for(longest))  # fmt: skip
    return PerplexityResult(
        perplexity=math.exp(mean),
        mean_nll=mean,
        tokens_scored=scored_tokens,
        windows=len(windows),
        convention=describe(windows, length, stride) + describe_mode(chunk, cache),
        seconds=time.perf_counter() - started,
        kl_divergence=None if reference is None else kl / scored_tokens,
        top1_agreement=None if reference is None else agree / scored_tokens,
        **cached,
    )


def cached_logits(model: DecoderOnlyLM, ids: torch.Tensor, scored: int, chunk: int, cache: KVCache) -> torch.Tensor:
    """What `model(ids, max_output_len=scored + 1)[:, :-1]` gives, but run through `cache` `chunk` tokens a step.

    The window's last token predicts nothing here, so it is never run; steps before the scored
    part ask for no logits.
    """
    cache.reset()
    length = ids.shape[1]
    first_needed = length - 1 - scored  # position whose logits predict the first scored token
    pieces = []
    for start in range(0, length - 1, chunk):
        end = min(start + chunk, length - 1)
        wanted = end - max(start, first_needed)
        logits = model(ids[:, start:end], cache, max_output_len=max(wanted, 0))
        if wanted > 0:
            pieces.append(logits)
    cache.reset()
    return torch.cat(pieces, dim=1)


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal length and equal scored count, at most `batch_size` a batch."""
    groups: list[list[Window]] = []
    for w in windows:
        last = groups[-1] if groups else None
        if (
            last
            and len(last) < batch_size
            and last[0].end - last[0].start == w.end - w.start
            and last[0].scored == w.scored
        ):
            last.append(w)
        else:
            groups.append([w])
    return groups
