"""Shared fixtures: tiny random model directories (built once per session) and the real models."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from tiny_models import make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EXLQ_SHARED_DIR", REPO.parent / "shared"))
MODEL_CACHE = Path(os.environ.get("EXLQ_TEST_MODELS", Path.home() / ".cache" / "exlq-test-models"))

def forget_kernel_architecture() -> None:
    """Drop every cache that holds what the kernels were built or routed for: EXLQ_ARCH and the device's capability
    and limits are read once a process, so tests that switch them clear these before and after."""
    from exlq.runtime import kernels
    from exlq.runtime.kernels import exl2_stream_ops, launch, target

    for cached in (target._emulated, target.shared_limits, launch._module, launch._hopper_or_newer, kernels._capable,
                   exl2_stream_ops.block_shared_limit, exl2_stream_ops.sm_limits):
        cached.cache_clear()


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

# name -> (architecture, config overrides); each exercises a different code path.
TINY_VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied-llama3rope": ("llama", {"tie_word_embeddings": True, "rope_scaling": LLAMA3_ROPE}),
    "llama-linear-rope-bias": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "attention_bias": True}),
    "mistral-window": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
}


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        name: make_tiny_model_dir(root / name, arch, seed=i, **overrides)
        for i, (name, (arch, overrides)) in enumerate(TINY_VARIANTS.items())
    }


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


needs_datasets = pytest.mark.skipif(
    importlib.util.find_spec("datasets") is None, reason="the datasets package is not installed"
)

REAL_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")


def real_model_dir(name: str) -> Path:
    """A real model built by ../shared/tools/get-models, or skip with the command that builds it."""
    path = MODEL_CACHE / name
    if not (path / "model.safetensors").exists() or not (path / "tokenizer.json").exists():
        pytest.skip(f"real model {name} not found in {MODEL_CACHE}; build it with ../shared/tools/get-models {name}")
    return path


def write_jsonl(path: Path, rows: list[dict], opener=open) -> Path:
    """Rows as JSON lines (`opener=gzip.open` for .jsonl.gz)."""
    import json

    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def hf_tokenizer(path: Path):
    """transformers' tokenizer for the same directory: the reference exlq is checked against."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
