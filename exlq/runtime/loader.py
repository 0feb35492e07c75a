"""Load a Hugging Face model directory into the exlq runtime."""

from __future__ import annotations

from pathlib import Path

import torch

from exlq.errors import ExlqError
from exlq.runtime.architectures.registry import model_class_for
from exlq.runtime.config import config_from_dict, read_model_config
from exlq.runtime.model import DecoderOnlyLM
from exlq.runtime.weights import WeightStore

DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks the first CUDA GPU when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ExlqError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ExlqError("device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    if resolved.type not in ("cpu", "cuda"):
        raise ExlqError(f"device {device!r} is not supported; use cpu or cuda")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on GPUs (fast, halves memory) and fp32 on CPUs (fp16 matmuls are slow there)."""
    if isinstance(dtype, torch.dtype):  # float64 too: references and tests compute in it
        if dtype not in (*DTYPES.values(), torch.float64):
            raise ExlqError(f"dtype {dtype} is not supported; use torch.float16, torch.bfloat16 or torch.float32")
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ExlqError(f"unknown dtype {dtype!r}; use auto, fp16, bf16 or fp32")
    return DTYPES[dtype]


def load_model(
    model_dir: str | Path, *, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto"
) -> DecoderOnlyLM:
    """Build the model of `model_dir` with its weights read lazily from safetensors."""
    model_dir = Path(model_dir)
    raw = read_model_config(model_dir)
    model_class = model_class_for(raw)
    config = config_from_dict(model_class.config_class, raw)
    target = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, target)
    store = WeightStore(model_dir)
    model = model_class(config, store, dtype=compute_dtype, device=target)
    model.model_dir = model_dir
    return model.eval()
