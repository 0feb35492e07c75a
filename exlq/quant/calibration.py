"""Calibration token rows: the built-in offline mix, or a user's file.

Rows are non-overlapping windows spread evenly over each source, and the built-in mix takes
rows from its sources in turn, so a small `rows` still sees every kind of text. Everything is
deterministic: the same options give the same rows, which the resumable job fingerprints.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from exlq.data.text_sources import NAMED_SOURCES, load_text
from exlq.errors import ExlqError
from exlq.runtime.tokenizer import Tokenizer

BUILTIN = "builtin"
BUILTIN_SOURCES = ("c4", "code", "multilingual", "technical", "tiny")


@dataclass
class Calibration:
    ids: torch.Tensor  # [rows, length] int64
    description: str

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.ids.numpy().tobytes()).hexdigest()[:16]


def builtin_texts() -> dict[str, str]:
    folder = resources.files("exlq.data") / "calibration"
    return {name: (folder / f"{name}.utf8").read_text(encoding="utf-8") for name in BUILTIN_SOURCES}


def spread_windows(ids: list[int], count: int, length: int) -> list[list[int]]:
    """Up to `count` non-overlapping windows of `length` tokens, evenly spaced over `ids`."""
    available = len(ids) // length
    if available == 0 or count == 0:
        return []
    picks = torch.linspace(0, available - 1, min(count, available)).round().long().unique()
    return [ids[int(i) * length : (int(i) + 1) * length] for i in picks]


def check_calibration_request(source: str, rows: int, length: int) -> None:
    """Refuse a calibration that cannot be made, before a model is loaded for it."""
    if rows < 1 or length < 16:
        raise ExlqError(f"calibration needs rows >= 1 and length >= 16 (got {rows} x {length})")
    if source != BUILTIN and source not in NAMED_SOURCES and not Path(source).expanduser().is_file():
        raise ExlqError(f"--calibration {source!r}: no such file; pass {BUILTIN!r} (the mix shipped with exlq) or a "
                        ".txt/.jsonl/.parquet file")


def load_calibration(tokenizer: Tokenizer, source: str = BUILTIN, *, rows: int = 128, length: int = 2048) -> Calibration:
    """`rows` windows of `length` tokens from `source` (a file, a named text source, or "builtin")."""
    check_calibration_request(source, rows, length)
    if source == BUILTIN:
        texts = builtin_texts()
        description = f"built-in mix ({', '.join(BUILTIN_SOURCES)})"
    else:
        loaded = load_text(source)
        texts = {source: loaded.text}
        description = loaded.description
    windows = _take_in_turn([tokenizer.encode(text) for text in texts.values()], rows, length)
    if len(windows) < rows:
        raise ExlqError(
            f"calibration text {source!r} holds only {len(windows)} windows of {length} tokens; "
            f"lower --rows/--length or give more text"
        )
    return Calibration(torch.tensor(windows, dtype=torch.long), f"{rows} rows x {length} tokens of {description}")


def _take_in_turn(sources: list[list[int]], rows: int, length: int) -> list[list[int]]:
    """Round-robin over sources; a source that runs out leaves its share to the others."""
    per_source = [spread_windows(ids, rows, length) for ids in sources]
    taken: list[list[int]] = []
    quota = [0] * len(sources)
    while len(taken) < rows and any(q < len(w) for q, w in zip(quota, per_source)):
        for s, windows in enumerate(per_source):
            if quota[s] < len(windows) and len(taken) < rows:
                taken.append(windows[quota[s]])
                quota[s] += 1
    # Keep each source's windows spread out: re-pick evenly from those allowed by the quota.
    return [w for s, windows in enumerate(per_source) for w in _evenly(windows, quota[s])]


def _evenly(items: list, count: int) -> list:
    if count >= len(items):
        return items
    picks = torch.linspace(0, len(items) - 1, count).round().long().tolist() if count else []
    return [items[i] for i in picks]
