"""Greedy sampling on the GPU (`cuda/sampling.cu`): each row's argmax, as `torch.argmax` gives it (H200: 6.8 µs
against torch's 26.3 over a 128k vocabulary, 7.9 against 8.6 over 152k, 3.5 against 11.7 over 49k; docs/benchmarks.md,
session 25). The torch path is the reference."""

from __future__ import annotations

import torch

from exlq.runtime.kernels import ACTIVATION_TAGS, applies as kernels_apply
from exlq.runtime.kernels.launch import kernel, launch

SOURCE = "sampling.cu"
THREADS = 1024  # ARGMAX_THREADS in the .cu: one block a row
INSTANCES = tuple(f"argmax_rows<{tag}>" for tag in ACTIVATION_TAGS.values())


def applies(logits: torch.Tensor) -> bool:
    """Whether `logits` [rows, vocab] can take the kernel: 16-bit on a kernel-enabled GPU, rows of contiguous values
    starting on 16-byte boundaries, vocab a multiple of 8 (every model we load: 49152, 128256, 151936, ...)."""
    return (
        logits.dim() == 2 and kernels_apply(logits) and logits.shape[0] >= 1 and logits.shape[1] % 8 == 0
        and logits.stride(1) == 1 and logits.stride(0) % 8 == 0 and logits.data_ptr() % 16 == 0
        and logits.shape[0] * logits.stride(0) < 2**31
    )


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """int64 [rows]: the index of each row's largest value (first of equal maxima; NaN counts as largest)."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    function = kernel(SOURCE, INSTANCES, f"argmax_rows<{ACTIVATION_TAGS[logits.dtype]}>", logits.device)
    launch(function, (rows, 1, 1), (THREADS, 1, 1), (logits, logits.stride(0), vocab, out), logits.device,
           overlap=True)  # fmt: skip
    return out


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)` for [rows, vocab]: the kernel where it applies, else torch."""
    return argmax_rows(logits) if applies(logits) else logits.argmax(dim=-1)
