"""Lazy access to the tensors of a model directory's `*.safetensors` files.

Files are memory-mapped by safetensors and each tensor is read only when asked for, straight into
its final dtype and device: peak host memory is the model in its compute dtype plus one tensor,
never a second copy of the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from exlq.errors import ExlqError
from exlq.runtime.config import read_json

INDEX_FILE = "model.safetensors.index.json"


class WeightStore:
    """Name → tensor lookup over single or sharded safetensors checkpoints."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._handles: dict[Path, object] = {}
        self._file_of: dict[str, Path] = {}
        for path in self._checkpoint_files():
            handle = self._open(path)
            for name in handle.keys():
                if name in self._file_of:
                    raise ExlqError(f"tensor {name} appears in both {self._file_of[name].name} and {path.name}")
                self._file_of[name] = path

    def _checkpoint_files(self) -> list[Path]:
        """The index's shards when they are all there; otherwise every *.safetensors of the directory.

        EXL2 directories made by ExLlamaV2 carry the source model's index, which names shards that
        are not there (spec §10.3): such an index is stale, not a missing-file error.
        """
        files = sorted(self.model_dir.glob("*.safetensors"))
        index = self.model_dir / INDEX_FILE
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ExlqError(f"{index} has no weight_map")
            listed = sorted({self.model_dir / f for f in weight_map.values()})
            if all(f.exists() for f in listed):
                return listed
            if not files:
                missing = [f.name for f in listed if not f.exists()]
                raise ExlqError(f"{index.name} lists shard(s) that are missing: {', '.join(missing)}")
        if not files:
            raise ExlqError(f"{self.model_dir} holds no *.safetensors weights (other formats are not supported)")
        return files

    def _open(self, path: Path):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
            raise ExlqError(f"cannot read {path.name}: not a complete safetensors file ({exc})") from None
        self._handles[path] = handle
        return handle

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def _handle(self, name: str):
        try:
            return self._handles[self._file_of[name]]
        except KeyError:
            raise ExlqError(f"tensor {name} is missing from the checkpoint in {self.model_dir}") from None

    def get(
        self,
        name: str,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Read one tensor, converted to `dtype`/`device`; with `shape`, check it first."""
        if shape is not None and self.shape(name) != tuple(shape):
            raise ExlqError(
                f"tensor {name} has shape {list(self.shape(name))} but config.json implies {list(shape)}"
            )
        try:
            tensor = self._handle(name).get_tensor(name)
        except ExlqError:
            raise
        except Exception as exc:
            raise ExlqError(f"cannot read tensor {name} from {self._file_of[name].name}: {exc}") from None
        return tensor.to(device=device, dtype=dtype)
