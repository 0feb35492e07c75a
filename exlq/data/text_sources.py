"""Evaluation and calibration text from a local file or a named built-in source, fully offline.

Tabular files (JSON lines, JSON, parquet) are read with `datasets` and their rows joined with
"\\n\\n", the convention of GPTQ-style WikiText scripts, so perplexities are comparable with
published numbers. Empty rows are kept exactly as in the file: WikiText has them, and dropping
them would change the joined text (and the perplexity) versus those scripts.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from exlq.errors import ExlqError

ROW_SEPARATOR = "\n\n"

# Named source -> path relative to the shared directory; calibration sets can be added here.
NAMED_SOURCES: dict[str, str] = {
    "wikitext2": "data/wikitext-2-raw/wikitext2_test_hf_joined.txt",
}

# Suffix (lowercase, compression included) -> (datasets builder, human-readable format).
_TABULAR_FORMATS: dict[str, tuple[str, str]] = {
    ".jsonl": ("json", "JSON lines"),
    ".jsonl.gz": ("json", "gzip JSON lines"),
    ".json": ("json", "JSON"),
    ".json.gz": ("json", "gzip JSON"),
    ".parquet": ("parquet", "parquet"),
}


@dataclass
class TextSource:
    """Loaded text plus a description of where it came from, for reports."""

    text: str
    description: str
    rows: int


def load_text(source: str, *, text_field: str = "text", max_rows: int | None = None) -> TextSource:
    """Load text from a named source (see NAMED_SOURCES) or a file path.

    Named sources take precedence; write `./wikitext2` to mean a local file of that name.
    `max_rows` keeps the first rows of a tabular file, or the first lines of a text file.
    """
    if max_rows is not None and max_rows < 1:
        raise ExlqError(f"max_rows={max_rows} must be at least 1 (or unset to read everything)")
    if source in NAMED_SOURCES:
        path = _named_source_path(source)
        loaded = _load_plain_text(path, max_rows)
        return TextSource(loaded.text, f"{source}: {loaded.description}", loaded.rows)
    path = _existing_file(Path(source).expanduser())
    fmt = _TABULAR_FORMATS.get(_suffix(path))
    if fmt is None:
        return _load_plain_text(path, max_rows)
    return _load_tabular(path, fmt, text_field, max_rows)


def find_shared_dir() -> Path | None:
    """The shared data directory: $EXLQ_SHARED_DIR, ../shared, or `shared` beside the repo root.

    An explicitly set $EXLQ_SHARED_DIR is the only place looked at, so a typo in it is reported
    rather than silently replaced by another directory.
    """
    return next((d for d in shared_dir_candidates() if d.is_dir()), None)


def shared_dir_candidates() -> list[Path]:
    """Where `find_shared_dir()` looks, in order (also listed in the not-found error)."""
    override = os.environ.get("EXLQ_SHARED_DIR")
    if override:
        return [Path(override).expanduser()]
    import exlq

    beside_repo = Path(exlq.__file__).resolve().parents[2] / "shared"
    return list(dict.fromkeys([Path.cwd().parent / "shared", beside_repo]))


def _named_source_path(name: str) -> Path:
    shared = find_shared_dir()
    if shared is None:
        looked = ", ".join(str(p) for p in shared_dir_candidates())
        raise ExlqError(
            f"cannot find the shared data directory for '{name}' (looked in: {looked}); "
            "pass --data FILE or set EXLQ_SHARED_DIR to the directory that holds data/"
        )
    path = shared / NAMED_SOURCES[name]
    if not path.is_file():
        raise ExlqError(
            f"'{name}' is not in the shared directory {shared} (expected {path}); "
            "pass --data FILE or set EXLQ_SHARED_DIR to a directory that has it"
        )
    return path


def _existing_file(path: Path) -> Path:
    """The path if it is a non-empty file, else an ExlqError saying what is wrong with it."""
    if not path.exists():
        named = ", ".join(sorted(NAMED_SOURCES))
        raise ExlqError(f"text source {path} does not exist; pass an existing file or a named source ({named})")
    if not path.is_file():
        raise ExlqError(f"text source {path} is not a file")
    if path.stat().st_size == 0:
        raise ExlqError(f"text source {path} is empty")
    return path


def _suffix(path: Path) -> str:
    """Lowercase format suffix, with a trailing .gz kept (e.g. '.jsonl.gz')."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] == ".gz":
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def _load_plain_text(path: Path, max_rows: int | None) -> TextSource:
    """A UTF-8 file with line endings normalized to "\\n"; its rows are lines.

    Normalizing matters: the shared WikiText-2 file was saved with CRLF endings, and only the
    "\\n" text equals HF's "\\n\\n".join(rows) that published perplexities were measured on.
    """
    try:
        text = path.read_text(encoding="utf-8")  # universal newlines: \r\n and \r become \n
    except UnicodeDecodeError as e:
        raise ExlqError(
            f"text source {path} is not valid UTF-8 (byte {e.start}: {e.reason}); "
            "convert it to UTF-8 or pass a .jsonl/.json/.parquet file"
        ) from None
    lines = io.StringIO(text).readlines()  # splits on "\n" only, unlike str.splitlines
    note = ""
    if max_rows is not None and max_rows < len(lines):
        note = f", first {max_rows} of {len(lines)} lines"
        lines = lines[:max_rows]
        text = "".join(lines)
    if not text.strip():
        raise ExlqError(f"text source {path} has no text")
    return TextSource(text, f"{path} (UTF-8 text, {len(lines)} lines{note})", len(lines))


def _load_tabular(path: Path, fmt: tuple[str, str], text_field: str, max_rows: int | None) -> TextSource:
    """Rows of a JSON/parquet file via `datasets`, the `text_field` values joined with "\\n\\n"."""
    builder, format_name = fmt
    dataset = _load_dataset(builder, path)
    if text_field not in dataset.column_names:
        columns = ", ".join(dataset.column_names) or "none"
        raise ExlqError(f"{path} has no field '{text_field}' (columns: {columns}); choose one with --text-field")
    total = dataset.num_rows
    if max_rows is not None and max_rows < total:
        dataset = dataset.select(range(max_rows))
    rows = [_row_text(value, path, text_field, i) for i, value in enumerate(dataset[text_field])]
    text = ROW_SEPARATOR.join(rows)
    if not text.strip():
        raise ExlqError(f"{path} has no text in field '{text_field}'")
    taken = f"first {len(rows)} of {total} rows" if len(rows) < total else f"{len(rows)} rows"
    description = (
        f"{path} ({format_name}, {taken} of field '{text_field}' joined with '\\n\\n', empty rows kept)"
    )
    return TextSource(text, description, len(rows))


def _row_text(value: object, path: Path, text_field: str, index: int) -> str:
    """A row's text; null counts as an empty row, any non-string is a user error."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ExlqError(
            f"{path} row {index}: field '{text_field}' is {type(value).__name__}, not text; "
            "choose a text column with --text-field"
        )
    return value


def _load_dataset(builder: str, path: Path):
    """`datasets.load_dataset` for one local file, offline; imported lazily (it is slow)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()  # our own progress goes to stderr; theirs would garble it
    datasets.logging.set_verbosity_error()
    # A throw-away cache: reading a local file once should leave nothing behind in ~/.cache.
    with tempfile.TemporaryDirectory(prefix="exlq-datasets-") as cache_dir:
        try:
            return datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache_dir, keep_in_memory=True
            )
        except Exception as e:  # datasets wraps parse errors in many types; all mean "bad file"
            raise ExlqError(f"cannot read {path} as {builder}: {type(e).__name__}: {e}") from e
