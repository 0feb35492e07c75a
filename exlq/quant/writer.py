"""Assembling the final EXL2 model directory (spec §10), atomically.

Everything is written into a hidden sibling `.<out>.tmp-XXXX` and renamed to `out_dir` only when
complete, so `out_dir` is either absent or whole: a crash, Ctrl-C or error midway leaves at most
the hidden temp directory (removed on errors). The input directory is only read.

Layout (ExLlamaV2 loads any split of keys across `*.safetensors` files and ignores index files,
spec §10.2/§15; we use the Hugging Face names so other tools find the shards too):
- one shard: `model.safetensors`; several: `model-00001-of-0000N.safetensors` plus a correct
  `model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map"});
- `config.json`: the input's, with `config_update` merged at the top level (an existing key such
  as `quantization_config` is replaced in place), written with indent 4 like ExLlamaV2 (§10.4);
- every other top-level regular file of the input, byte for byte (tokenizer files, chat template,
  generation config, README, ...), except weights of any format (WEIGHT_SUFFIXES) and index files
  (`*.index.json`: the input's would name the input's shards). Subdirectories (`.git`, caches,
  `original/`) are not copied, as in ExLlamaV2 (§10.3). Symlinks to files (Hugging Face cache
  snapshots) are followed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import save_file

from exlq import __version__
from exlq.errors import ExlqError
from exlq.quant.job import current_umask, fsync_path, storable
from exlq.runtime.config import read_model_config

DEFAULT_SHARD_SIZE = 8192 * 1024**2  # §10.2: ExLlamaV2's default `-ss 8192` MiB
SINGLE_SHARD = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")

TensorSource = Union[Iterable[tuple[str, torch.Tensor]], Callable[[], Iterable[tuple[str, torch.Tensor]]]]


def quantization_config(bits: float, head_bits: int, calibration: dict[str, Any]) -> dict[str, Any]:
    """`config_update` for §10.4: ExLlamaV2's keys, with our version and a `quantizer` naming us.

    `calibration` holds the spec's rows/length/dataset and may add more (e.g. a fingerprint).
    """
    return {
        "quantization_config": {
            "quant_method": "exl2",
            "version": __version__,
            "quantizer": "exlq",
            "bits": float(bits),
            "head_bits": int(head_bits),
            "calibration": dict(calibration),
        }
    }


def write_model_dir(
    out_dir: str | Path,
    input_dir: str | Path,
    tensors: TensorSource,
    config_update: dict[str, Any],
    shard_size_bytes: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Write the model directory `out_dir` from `tensors` and `input_dir`'s other files; return it.

    `tensors` yields (name, tensor) pairs in output order (or is a callable returning such an
    iterable, so they can be produced lazily): at most one shard's tensors are held at a time.
    Dtypes are written as given. A shard is closed when the next tensor would push it past
    `shard_size_bytes`; a tensor bigger than that gets a shard of its own. `overwrite=True`
    replaces a non-empty `out_dir` (callers pass it only after their own checks).
    """
    out_dir, input_dir = Path(out_dir), Path(input_dir)
    if shard_size_bytes <= 0:
        raise ValueError("shard_size_bytes must be positive")
    config = read_model_config(input_dir)
    check_out_dir(out_dir, input_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        _write_config(tmp / "config.json", config, config_update)
        _copy_non_weight_files(input_dir, tmp)
        _write_shards(tmp, tensors() if callable(tensors) else tensors, shard_size_bytes)
        mask = current_umask()
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~mask)
            fsync_path(path)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes the folder private; the model is an ordinary folder
        fsync_path(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_out_dir(out_dir: Path, input_dir: Path, overwrite: bool = False) -> None:
    """ExlqError unless `out_dir` can be (re)placed without touching the input or a user's files."""
    out, inp = out_dir.resolve(), input_dir.resolve()
    if out == inp or inp in out.parents:
        raise ExlqError(f"output directory {out_dir} is inside the input model directory {input_dir}; choose another")
    if out in inp.parents:
        raise ExlqError(f"output directory {out_dir} contains the input model directory {input_dir}; choose another")
    if out_dir.is_symlink():
        raise ExlqError(f"output directory {out_dir} is a symlink; pass the directory it points to")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExlqError(f"output path {out_dir} exists and is not a directory")
    if not overwrite and any(out_dir.iterdir()):
        raise ExlqError(f"output directory {out_dir} exists and is not empty; remove it or choose another")


def is_copied_file(path: Path) -> bool:
    """Whether an input directory entry goes to the output unchanged (see the module docstring)."""
    name = path.name.lower()
    return (
        path.is_file()
        and name != "config.json"
        and not name.endswith(WEIGHT_SUFFIXES)
        and not name.endswith(".index.json")
    )


def _copy_non_weight_files(input_dir: Path, dest: Path) -> None:
    for path in sorted(input_dir.iterdir()):
        if is_copied_file(path):
            shutil.copyfile(path, dest / path.name)


def _write_config(path: Path, config: dict[str, Any], config_update: dict[str, Any]) -> None:
    """Input config with `config_update` merged; dict.update keeps existing keys in place (§10.4)."""
    merged = dict(config)
    merged.update(config_update)
    path.write_text(json.dumps(merged, indent=4) + "\n", encoding="utf-8")


def _write_shards(dest: Path, tensors: Iterable[tuple[str, torch.Tensor]], shard_size: int) -> None:
    """Stream tensors into shards of at most `shard_size` bytes, then give the shards their final names."""
    shards: list[dict[str, int]] = []  # per shard: tensor name -> bytes
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    seen: set[str] = set()
    for name, tensor in tensors:
        if name in seen:
            raise ValueError(f"tensor {name} given twice")
        seen.add(name)
        tensor = storable(tensor)
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > shard_size:
            shards.append(_save_shard(dest, len(shards), pending))
            pending, pending_bytes = {}, 0
        pending[name] = tensor
        pending_bytes += size
    if pending:
        shards.append(_save_shard(dest, len(shards), pending))
    if not shards:
        raise ValueError("no tensors to write")
    _name_shards(dest, shards)


def _save_shard(dest: Path, index: int, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    save_file(tensors, str(dest / _partial_name(index)), metadata={"format": "pt"})
    return {name: t.numel() * t.element_size() for name, t in tensors.items()}


def _partial_name(index: int) -> str:
    return f".shard-{index:05d}.partial"


def _name_shards(dest: Path, shards: list[dict[str, int]]) -> None:
    """Rename the shards now that their count is known; several shards also get the index file."""
    if len(shards) == 1:
        os.replace(dest / _partial_name(0), dest / SINGLE_SHARD)
        return
    weight_map: dict[str, str] = {}
    for i, sizes in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(dest / _partial_name(i), dest / file_name)
        weight_map.update(dict.fromkeys(sizes, file_name))
    index = {
        "metadata": {"total_size": sum(sum(s.values()) for s in shards)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (dest / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temp dir to `out_dir`; an existing `out_dir` is moved aside first, then deleted."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    fsync_path(out_dir.parent)
    if old is not None:
        shutil.rmtree(old)
