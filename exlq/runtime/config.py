"""Reading `config.json` into typed dataclasses whose fields are named exactly as in HF configs.

Each architecture module declares its own config dataclass (derived ones override only what
differs); this module holds the shared parsing, so a config can be built from either the
transformers-4.x layout (`rope_theta`, `rope_scaling`) or the 5.x one (`rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from exlq.errors import ExlqError

T = TypeVar("T")


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object from `path`, turning I/O and syntax problems into ExlqError."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExlqError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExlqError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ExlqError(f"{path} must hold a JSON object")
    return data


def read_optional_json(path: Path) -> dict[str, Any] | None:
    """Like read_json, but None when the file is absent (most files of a model directory are optional)."""
    return read_json(path) if Path(path).is_file() else None


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """The raw `config.json` of a model directory, with clear errors for the usual mistakes."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ExlqError(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise ExlqError(f"{model_dir} is not a directory: pass a Hugging Face model directory")
    path = model_dir / "config.json"
    if not path.exists():
        raise ExlqError(f"{model_dir} has no config.json: pass a Hugging Face model directory")
    return read_json(path)


def normalize_rope(raw: dict[str, Any]) -> dict[str, Any]:
    """Fold transformers-5 `rope_parameters` into the 4.x keys `rope_theta` and `rope_scaling`."""
    raw = dict(raw)
    params = raw.pop("rope_parameters", None)
    if isinstance(params, dict):
        params = dict(params)
        if "rope_theta" in params:
            raw.setdefault("rope_theta", params.pop("rope_theta"))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default" and raw.get("rope_scaling") is None:
            raw["rope_scaling"] = params
    return raw


def config_from_dict(cls: type[T], raw: dict[str, Any]) -> T:
    """Build dataclass `cls` from the keys of `raw` it declares; unknown keys are ignored.

    Type checks are shallow on purpose (ints may be given as floats in hand-written configs);
    what matters is that a missing required field gives a message naming it.
    """
    raw = normalize_rope(raw)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in raw.items() if k in fields}
    missing = [
        name
        for name, f in fields.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ExlqError(f"config.json lacks required field(s): {', '.join(missing)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ExlqError(f"config.json is not valid for {cls.__name__}: {exc}") from None
