"""CUDA kernels for the runtime: sources in `cuda/`, compiled by NVRTC at run time (see `compiler`).

Every kernel has a torch reference path; the runtime uses a kernel only where `enabled(device)` holds:
a CUDA device of compute capability 8.0 or newer, CuPy importable, and `EXLQ_KERNELS` not set to 0.
`EXLQ_ARCH=sm_80|sm_86|sm_89|...` runs an older architecture's kernels and paths on a newer GPU (see `target`).
"""

from __future__ import annotations

import functools
import os

import torch

MIN_CAPABILITY = (8, 0)
#: Activation dtypes the kernels take, with the tag type their templates are instantiated on (cuda/common.cuh).
ACTIVATION_TAGS = {torch.float16: "fp16_t", torch.bfloat16: "bf16_t"}


@functools.cache
def _cupy_importable() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or a CuPy built for another CUDA
        return False
    return True


@functools.cache
def _capable(device: torch.device) -> bool:
    from exlq.runtime.kernels import target
    from exlq.runtime.kernels.launch import device_index

    return target.capability(device_index(device)) >= MIN_CAPABILITY and _cupy_importable()


def enabled(device: torch.device) -> bool:
    """Whether kernels run for tensors on `device` (CPU and old GPUs use the torch path; EXLQ_KERNELS=0 forces it)."""
    if device.type != "cuda" or os.environ.get("EXLQ_KERNELS", "1") == "0":
        return False
    return _capable(device)


def applies(t: torch.Tensor) -> bool:
    """Whether kernels run for activations like `t`: fp16/bf16 on a kernel-enabled GPU (else the torch path)."""
    return t.dtype in ACTIVATION_TAGS and enabled(t.device)
