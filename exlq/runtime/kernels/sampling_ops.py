"""Sampling on the GPU (`cuda/sampling.cu`), each row split over blocks of ~4096 logits. Greedy: each row's argmax,
as `torch.argmax` gives it (H200: 2.7 µs against torch's 26.3 over a 128k vocabulary, 8.4 over 152k, 11.7 over 49k).
Temperature, top-p and min-p: three launches, ~13 µs, instead of the torch path's ~37 kernels, 124-190 µs
(docs/benchmarks.md, session 26), drawing with the exponential race of `Sampler.draw` (from a given race tensor, then
the torch path's token, or from a hash of the seed and step). The torch path (`exlq.runtime.sampler`) is the
reference of both."""

from __future__ import annotations

import ctypes

import torch

from exlq.runtime.kernels import ACTIVATION_TAGS, applies as kernels_apply, enabled as kernels_enabled
from exlq.runtime.kernels.launch import kernel, launch
from exlq.runtime.kernels.workspace import Workspace

SOURCE = "sampling.cu"
#: The sampling kernel also takes float32 logits (the torch path's float copy after a repetition penalty).
LOGIT_TAGS = {**ACTIVATION_TAGS, torch.float32: "fp32_t"}
SAMPLE_PASSES = ("sample_stats", "sample_bins", "sample_draw")
INSTANCES = tuple(f"argmax_rows<{tag}>" for tag in ACTIVATION_TAGS.values()) + tuple(
    f"{name}<{tag}>" for name in SAMPLE_PASSES for tag in LOGIT_TAGS.values())
SAMPLE_THREADS = 256  # SAMPLE_THREADS in the .cu
BINS, CANDIDATES = 2048, 2048  # SAMPLE_BINS, SAMPLE_CANDIDATES in the .cu
PIECE_TOKENS = 4096  # about this many tokens a block (one 16-byte load a thread, two in flight)
MAX_PIECES = 64
_WORKSPACE = Workspace()  # its own: the sampling passes leave theirs dirty, unlike the GEMV's
_ARGMAX_WORKSPACE = Workspace()  # zero between launches (the last block of a row clears its words)


class SampleArgs(ctypes.Structure):
    """The kernels' argument struct (`SampleArgs` in cuda/sampling.cu, the same layout)."""

    _fields_ = [("logits", ctypes.c_void_p), ("race", ctypes.c_void_p), ("work", ctypes.c_void_p),
                ("out", ctypes.c_void_p), ("seed", ctypes.c_uint64), ("step", ctypes.c_uint64),
                ("row_stride", ctypes.c_int32), ("vocab", ctypes.c_int32), ("chunk", ctypes.c_int32),
                ("inv_temperature", ctypes.c_float), ("top_p", ctypes.c_float), ("min_p", ctypes.c_float)]  # fmt: skip


def applies(logits: torch.Tensor) -> bool:
    """Whether `logits` [rows, vocab] can take the argmax kernel: 16-bit on a kernel-enabled GPU, rows of contiguous
    values starting on 16-byte boundaries, vocab a multiple of 8 (every model we load: 49152, 128256, 151936, ...)."""
    return kernels_apply(logits) and _rows_fit(logits)


def sample_applies(logits: torch.Tensor) -> bool:
    """Whether `logits` can take the sampling kernel: as `applies`, and float32 too."""
    return logits.dtype in LOGIT_TAGS and kernels_enabled(logits.device) and _rows_fit(logits)


def _rows_fit(logits: torch.Tensor) -> bool:
    return (
        logits.dim() == 2 and logits.shape[0] >= 1 and logits.shape[1] % 8 == 0 and logits.stride(1) == 1
        and logits.stride(0) % 8 == 0 and logits.data_ptr() % 16 == 0 and logits.shape[0] * logits.stride(0) < 2**31
    )


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """int64 [rows]: the index of each row's largest value (first of equal maxima; NaN counts as largest)."""
    rows, vocab = logits.shape
    count, chunk = pieces(vocab)
    work = _ARGMAX_WORKSPACE.get(logits.device, 4 * rows, 0)[0]  # [rows] × {key, blocks done}: u64 words
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    args = SampleArgs(logits.data_ptr(), 0, work.data_ptr(), out.data_ptr(), 0, 0, logits.stride(0), vocab, chunk,
                      1.0, 1.0, 0.0)  # fmt: skip
    _run("argmax_rows", logits, count, args)
    return out


def _run(name: str, logits: torch.Tensor, count: int, args: SampleArgs) -> None:
    """Kernel `name` for the logits' dtype, `count` blocks a row."""
    function = kernel(SOURCE, INSTANCES, f"{name}<{LOGIT_TAGS[logits.dtype]}>", logits.device)
    launch(function, (count, logits.shape[0], 1), (SAMPLE_THREADS, 1, 1), (args,), logits.device, overlap=True)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)` for [rows, vocab]: the kernel where it applies, else torch."""
    return argmax_rows(logits) if applies(logits) else logits.argmax(dim=-1)


def pieces(vocab: int) -> tuple[int, int]:
    """(blocks a row, tokens a block): ~PIECE_TOKENS a block, a multiple of 8, none empty."""
    count = min(MAX_PIECES, -(-vocab // PIECE_TOKENS))
    chunk = (-(-vocab // count) + 7) // 8 * 8
    return -(-vocab // chunk), chunk


def sample_rows(logits: torch.Tensor, temperature: float, top_p: float, min_p: float, *,
                race: torch.Tensor | None = None, seed: int = 0, step: int = 0) -> torch.Tensor:  # fmt: skip
    """int64 [rows]: a token a row drawn from softmax(logits / temperature) cut by top-p and min-p (as the torch
    path's `Sampler._filtered_probs`), by the exponential race: with `race` (float32 [rows, vocab], Exp(1) values) the
    token `Sampler.draw` picks with it; else the race's values are hashed from (seed, step, row, token)."""
    rows, vocab = logits.shape
    if race is not None and (race.shape != logits.shape or race.dtype != torch.float32 or not race.is_contiguous()):
        raise ValueError(f"race must be contiguous float32 {tuple(logits.shape)}, got {race.dtype} {tuple(race.shape)}")
    count, chunk = pieces(vocab)
    words = rows * (BINS + CANDIDATES + 4 + 2 * count)
    work = _WORKSPACE.get(logits.device, 2 * words, 0)[0]
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    args = SampleArgs(logits.data_ptr(), 0 if race is None else race.data_ptr(), work.data_ptr(), out.data_ptr(),
                      seed % 2**64, step % 2**64, logits.stride(0), vocab, chunk, 1.0 / temperature, top_p, min_p)
    for name in SAMPLE_PASSES:
        if name != "sample_bins" or top_p < 1.0:  # no top-p: the floor (min-p) alone decides
            _run(name, logits, count, args)
    return out
