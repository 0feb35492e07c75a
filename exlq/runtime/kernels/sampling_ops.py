"""Sampling on the GPU (`cuda/sampling.cu`), each row split over blocks of ~4096 logits. Greedy: each row's argmax,
as `torch.argmax` gives it (H200: 2.7 µs against torch's 26.3 over a 128k vocabulary, 8.4 over 152k, 11.7 over 49k).
Temperature, top-k, top-p, min-p and the repetition penalty: two to four launches, 12-37 µs, instead of the torch
path's 15-50 kernels, 56-207 µs (docs/benchmarks.md, session 26), drawing with the exponential race of `Sampler.draw`
(from a given race tensor, then the torch path's token, or from a hash of the seed and step). The torch path
(`exlq.runtime.sampler`) is the reference of both."""

from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

import torch

from exlq.runtime.kernels import ACTIVATION_TAGS, enabled as kernels_enabled
from exlq.runtime.kernels.launch import kernel, launch
from exlq.runtime.kernels.workspace import Workspace

SOURCE = "sampling.cu"
#: The kernels also take float32 logits (float32 models).
LOGIT_TAGS = {**ACTIVATION_TAGS, torch.float32: "fp32_t"}
SAMPLE_PASSES = ("sample_stats", "sample_bins", "sample_topk", "sample_draw")
INSTANCES = tuple(f"{name}<{tag}>" for name in ("argmax_rows", *SAMPLE_PASSES) for tag in LOGIT_TAGS.values())
SAMPLE_THREADS = 256  # SAMPLE_THREADS in the .cu
BINS, CANDIDATES = 2048, 2048  # SAMPLE_BINS, SAMPLE_CANDIDATES in the .cu
PIECE_TOKENS = 4096  # about this many tokens a block (one 16-byte load a thread, two in flight)
MAX_PIECES = 64
SEEN_TOKENS = 8192  # SEEN_TOKENS in the .cu: most tokens a block, so at most MAX_PIECES * SEEN_TOKENS a row
_WORKSPACE = Workspace()  # its own: the sampling passes leave theirs dirty, unlike the GEMV's
_ARGMAX_WORKSPACE = Workspace()  # zero between launches (the last block of a row clears its words)


class SampleArgs(ctypes.Structure):
    """The kernels' argument struct (`SampleArgs` in cuda/sampling.cu, the same layout)."""

    _fields_ = [("logits", ctypes.c_void_p), ("race", ctypes.c_void_p), ("history", ctypes.c_void_p),
                ("work", ctypes.c_void_p), ("out", ctypes.c_void_p), ("seed", ctypes.c_uint64),
                ("step", ctypes.c_uint64), ("row_stride", ctypes.c_int32), ("vocab", ctypes.c_int32),
                ("chunk", ctypes.c_int32), ("history_stride", ctypes.c_int32), ("history_start", ctypes.c_int32),
                ("history_end", ctypes.c_int32), ("inv_temperature", ctypes.c_float), ("top_p", ctypes.c_float),
                ("min_p", ctypes.c_float), ("penalty", ctypes.c_float), ("top_k", ctypes.c_int32)]  # fmt: skip


class Penalty(NamedTuple):
    """A repetition penalty as the kernels apply it: `history` [rows, tokens] ids (the whole window: the last
    `repetition_range` of them when that is > 0), `penalty` (sampler.apply_repetition_penalty's rule)."""

    history: torch.Tensor
    penalty: float
    repetition_range: int = -1


def applies(logits: torch.Tensor) -> bool:
    """Whether `logits` [rows, vocab] can take the kernels: fp16, bf16 or float32 on a kernel-enabled GPU, rows of
    contiguous values starting on 16-byte boundaries, vocab a multiple of 8 (every model we load: 49152, 128256,
    151936, ...)."""
    return (
        logits.dtype in LOGIT_TAGS and kernels_enabled(logits.device) and logits.dim() == 2 and logits.shape[0] >= 1
        and logits.shape[1] % 8 == 0 and logits.shape[1] <= MAX_PIECES * SEEN_TOKENS and logits.stride(1) == 1
        and logits.stride(0) % 8 == 0 and logits.data_ptr() % 16 == 0 and logits.shape[0] * logits.stride(0) < 2**31
    )


def _args(logits: torch.Tensor, work: torch.Tensor, out: torch.Tensor, penalty: Penalty | None, **values) -> SampleArgs:
    """The kernels' arguments for `logits`, with the penalty's history window (its tensor must outlive the launch:
    the caller holds `penalty`)."""
    vocab = logits.shape[1]
    args = SampleArgs(logits=logits.data_ptr(), work=work.data_ptr(), out=out.data_ptr(), row_stride=logits.stride(0),
                      vocab=vocab, chunk=pieces(vocab)[1], penalty=1.0, **values)  # fmt: skip
    if penalty is not None:
        history = penalty.history
        if history.dtype != torch.long or history.stride(-1) != 1:
            raise ValueError(f"history must be int64 rows of contiguous ids, got {history.dtype} {history.stride()}")
        length = history.shape[1]
        args.history, args.history_stride, args.history_end = history.data_ptr(), history.stride(0), length
        args.history_start = max(0, length - penalty.repetition_range) if penalty.repetition_range > 0 else 0
        args.penalty = penalty.penalty
    return args


def argmax_rows(logits: torch.Tensor, penalty: Penalty | None = None) -> torch.Tensor:
    """int64 [rows]: the index of each row's largest value (first of equal maxima; NaN counts as largest), after the
    repetition penalty if one is given."""
    rows, vocab = logits.shape
    work = _ARGMAX_WORKSPACE.get(logits.device, 4 * rows, 0)[0]  # [rows] × {key, blocks done}: u64 words
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    _run("argmax_rows", logits, _args(logits, work, out, penalty))
    return out


def _run(name: str, logits: torch.Tensor, args: SampleArgs) -> None:
    """Kernel `name` for the logits' dtype, a block a piece of each row."""
    function = kernel(SOURCE, INSTANCES, f"{name}<{LOGIT_TAGS[logits.dtype]}>", logits.device)
    grid = (pieces(logits.shape[1])[0], logits.shape[0], 1)
    launch(function, grid, (SAMPLE_THREADS, 1, 1), (args,), logits.device, overlap=True)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)` for [rows, vocab]: the kernel where it applies, else torch."""
    return argmax_rows(logits) if applies(logits) else logits.argmax(dim=-1)


@functools.cache
def pieces(vocab: int) -> tuple[int, int]:
    """(blocks a row, tokens a block): ~PIECE_TOKENS a block, a multiple of 8, none empty. Cached: every launch of a
    token's sampling asks."""
    count = min(MAX_PIECES, -(-vocab // PIECE_TOKENS))
    chunk = (-(-vocab // count) + 7) // 8 * 8
    return -(-vocab // chunk), chunk


def sample_rows(logits: torch.Tensor, temperature: float, top_p: float, min_p: float, *,
                top_k: int = 0, race: torch.Tensor | None = None, seed: int = 0, step: int = 0,
                penalty: Penalty | None = None) -> torch.Tensor:  # fmt: skip
    """int64 [rows]: a token a row drawn from softmax(logits / temperature) cut by top-k (0: off), top-p and min-p
    (as the torch path's `Sampler._filtered_probs`, after the repetition penalty if one is given), by the exponential
    race: with
    `race` (float32 [rows, vocab], Exp(1) values) the token `Sampler.draw` picks with it; else the race's values are
    hashed from (seed, step, row, token)."""
    rows, vocab = logits.shape
    top_k = top_k if 0 < top_k < vocab else 0
    if race is not None and (race.shape != logits.shape or race.dtype != torch.float32 or not race.is_contiguous()):
        raise ValueError(f"race must be contiguous float32 {tuple(logits.shape)}, got {race.dtype} {tuple(race.shape)}")
    work = _WORKSPACE.get(logits.device, 2 * rows * row_words(pieces(vocab)[0]), 0)[0]
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    args = _args(logits, work, out, penalty, race=0 if race is None else race.data_ptr(), seed=seed % 2**64,
                 step=step % 2**64, inv_temperature=1.0 / temperature, top_p=top_p, min_p=min_p,
                 top_k=top_k)  # fmt: skip
    wanted = {"sample_bins": top_p < 1.0 or top_k > 0, "sample_topk": top_k > 0}  # else the floor (min-p) decides
    for name in SAMPLE_PASSES:
        if wanted.get(name, True):
            _run(name, logits, args)
    return out


def row_words(count: int) -> int:
    """u64 words of one row's workspace with `count` blocks a row (ROW_WORDS in the .cu): mass bins, count bins
    (u32), the listed tokens, eight single words, each block's statistics."""
    return BINS + BINS // 2 + CANDIDATES + 8 + 2 * count
