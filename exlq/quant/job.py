"""The resumable work directory of one conversion: fingerprint, atomic checkpoints, progress.

A conversion takes long enough that a crash or Ctrl-C must not cost the work already done. Every
file here is written to a temporary name beside its final one, fsynced and then `os.replace`d, so
a kill at any point leaves either the old file or the new one under a final name, never half of
one. A step counts as done only once `mark_done` has rewritten the progress file; a checkpoint
written before a crash but never marked is simply redone. `job.json` holds the fingerprint of the
inputs and options, so a rerun with anything different refuses instead of mixing two conversions.

Layout of a work directory (top level only; nothing else is ever touched):

    job.json             {fingerprint, created, exlq_version, state}
    progress.json        {fingerprint, steps: {step: info}}
    <name>.safetensors   checkpoints (save_tensors)
    <name>.json          checkpoints (save_json)
    .lock                held (flock) while a process uses the directory
    .<file>.tmp-XXXX     a write in progress; left behind only by a kill, removed on the next open
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from exlq import __version__
from exlq.errors import ExlqError
from exlq.runtime.config import read_model_config

try:  # advisory locking is POSIX-only; elsewhere two concurrent runs are the user's responsibility
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

JOB_FILE = "job.json"
PROGRESS_FILE = "progress.json"
LOCK_FILE = ".lock"
TMP_MARK = ".tmp-"
INDEX_FILE = "model.safetensors.index.json"

# What the fingerprint reads of each weight file besides its header: a few small chunks spread
# over the data, enough to tell two fine-tunes of one base apart (same header, same size).
SAMPLE_CHUNKS = 16
SAMPLE_BYTES = 4096

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RESERVED = {Path(JOB_FILE).stem, Path(PROGRESS_FILE).stem}


# ---------------------------------------------------------------------------------------------
# Fingerprint


def fingerprint(model_dir: str | Path, options: dict[str, Any]) -> str:
    """sha256 (hex) of what decides a conversion's intermediate results, read in milliseconds.

    Covered: the exlq version (checkpoint contents may change between versions); the bytes of
    `config.json`; the index file's bytes if any; for each top-level `*.safetensors` file its name,
    size, full header (every tensor's name, dtype, shape and offsets) and SAMPLE_CHUNKS chunks of
    SAMPLE_BYTES spread over its data; and `options` as canonical JSON (sorted keys, so dict order
    does not matter). Callers put in `options` everything else that changes results: calibration
    fingerprint, bpw, head bits, ...

    Not covered, on purpose: the directory's path and files' mtimes (moving or copying a model
    must not invalidate a job), and the full weight bytes (hashing GBs would take minutes).
    Tokenizer files are covered through the calibration fingerprint (the token ids).
    """
    model_dir = Path(model_dir)
    read_model_config(model_dir)  # the usual clear errors for a missing/bad model directory
    digest = hashlib.sha256()
    _feed(digest, b"exlq", __version__.encode())
    _feed(digest, b"config.json", (model_dir / "config.json").read_bytes())
    index = model_dir / INDEX_FILE
    if index.is_file():
        _feed(digest, INDEX_FILE.encode(), index.read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        _feed(digest, path.name.encode(), _safetensors_digest(path))
    _feed(digest, b"options", canonical_json(options).encode())
    return digest.hexdigest()


def canonical_json(obj: Any) -> str:
    """One spelling per value: sorted keys, no spaces, ASCII; Paths become strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"options must be JSON-serializable; got {type(obj).__name__}")


def _feed(digest: Any, *parts: bytes) -> None:
    """Length-prefix each part, so that ("ab", "c") and ("a", "bc") hash differently."""
    for part in parts:
        digest.update(struct.pack("<Q", len(part)))
        digest.update(part)


def _safetensors_digest(path: Path) -> bytes:
    """Size + header + sampled data chunks of one safetensors file (see `fingerprint`)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if header_len < 0 or 8 + header_len > size:
            raise ExlqError(f"cannot read {path.name}: not a complete safetensors file")
        parts = [str(size).encode(), f.read(header_len)]
        start, data_len = 8 + header_len, size - 8 - header_len
        chunk = min(SAMPLE_BYTES, data_len)
        last = data_len - chunk
        for i in range(SAMPLE_CHUNKS if chunk else 0):
            f.seek(start + last * i // max(SAMPLE_CHUNKS - 1, 1))
            parts.append(f.read(chunk))
    digest = hashlib.sha256()
    _feed(digest, *parts)
    return digest.digest()


# ---------------------------------------------------------------------------------------------
# Atomic files


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temp file beside `path`, fsync it, then rename it to `path`.

    The temp name starts with "." and holds TMP_MARK, so a leftover from a kill is recognizable
    (and never mistaken for a checkpoint). The directory is fsynced so the rename itself survives
    a power loss.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes files private; results are ordinary files
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path (directories cannot be fsynced on Windows: skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):  # pragma: no cover - Windows directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_file(path: Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def storable(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as safetensors wants it: on the CPU, contiguous, owning its storage.

    A view into a bigger storage (a slice, a split of a fused tensor) is cloned, because
    safetensors refuses tensors that share memory and would otherwise save the whole storage.
    The dtype is never changed.
    """
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


# ---------------------------------------------------------------------------------------------
# Job


class Job:
    """A work directory bound to one fingerprint; resumable step by step.

    Use as a context manager (or call `close`) to release the directory's lock.
    """

    def __init__(self, work_dir: str | Path, fingerprint: str, restart: bool = False):
        self.work_dir = Path(work_dir)
        self.fingerprint = fingerprint
        self._lock_fd: int | None = None
        self._prepare_dir()
        try:
            self._lock()
            self._open(restart)
        except BaseException:
            self.close()
            raise

    # -- opening -------------------------------------------------------------------------------

    def _prepare_dir(self) -> None:
        """Create the work dir; refuse a non-empty directory that is not an exlq work dir."""
        if self.work_dir.exists() and not self.work_dir.is_dir():
            raise ExlqError(f"work directory {self.work_dir} exists and is not a directory")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if (self.work_dir / JOB_FILE).exists():
            return
        foreign = [p.name for p in self.work_dir.iterdir() if p.name != LOCK_FILE and not _is_tmp(p)]
        if foreign:
            raise ExlqError(
                f"work directory {self.work_dir} is not empty and is not an exlq work directory "
                f"(no {JOB_FILE}); choose a new or empty directory"
            )

    def _lock(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        self._lock_fd = os.open(self.work_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExlqError(f"work directory {self.work_dir} is in use by another exlq process") from None

    def _open(self, restart: bool) -> None:
        """Resume a matching job, refuse another one, or (restart: whatever it holds) clear it and start afresh."""
        self._remove_tmp_files()
        existing = self._read_job_file()
        if existing is not None and existing.get("fingerprint") == self.fingerprint and not restart:
            self._job = existing
        elif existing is not None and not restart:
            raise ExlqError(
                f"work directory {self.work_dir} belongs to a different conversion (other model, "
                "calibration or options); pass --restart to discard its progress, or use another work directory"
            )
        else:
            if existing is not None:
                self._clear()
            self._job = {
                "fingerprint": self.fingerprint,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "exlq_version": __version__,
                "state": "running",
            }
            write_json_file(self.work_dir / JOB_FILE, self._job)
        self._steps = self._read_progress()

    def _read_job_file(self) -> dict[str, Any] | None:
        """job.json, or None when absent; an unreadable one counts as a different job."""
        path = self.work_dir / JOB_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {"fingerprint": None}
        return data if isinstance(data, dict) else {"fingerprint": None}

    def _read_progress(self) -> dict[str, Any]:
        """Finished steps; a progress file of another fingerprint counts as none."""
        path = self.work_dir / PROGRESS_FILE
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}  # cannot happen with atomic writes; if it does, redoing every step is safe
        if not isinstance(data, dict) or data.get("fingerprint") != self.fingerprint:
            return {}
        return dict(data.get("steps", {}))

    def _clear(self) -> None:
        """Delete the files a Job writes, progress first, so a kill midway never leaves stale steps marked done.

        Only regular top-level files with our names or suffixes go; subdirectories, symlinks and
        anything else a user put here stay.
        """
        (self.work_dir / PROGRESS_FILE).unlink(missing_ok=True)
        for path in self.work_dir.iterdir():
            if path.is_symlink() or not path.is_file() or path.name in (JOB_FILE, LOCK_FILE):
                continue
            if path.suffix in (".json", ".safetensors") or _is_tmp(path):
                path.unlink()

    def _remove_tmp_files(self) -> None:
        """Delete half-written files left by a killed process (we hold the lock: none is in progress)."""
        for path in self.work_dir.iterdir():
            if _is_tmp(path) and path.is_file() and not path.is_symlink():
                path.unlink()

    def close(self) -> None:
        """Release the work directory's lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state and progress ----------------------------------------------------------------------

    @property
    def state(self) -> str:
        return str(self._job.get("state", "running"))

    def set_state(self, state: str) -> None:
        """Record a coarse state in job.json (e.g. "measured", "finished") for humans and the CLI."""
        self._job = {**self._job, "state": state}
        write_json_file(self.work_dir / JOB_FILE, self._job)

    def done(self, step: str) -> bool:
        return step in self._steps

    def step_info(self, step: str) -> Any:
        """The `info` given to `mark_done(step)`, or None."""
        return self._steps.get(step)

    def mark_done(self, step: str, info: Any = None) -> None:
        """Record `step` as finished, atomically; call only after its checkpoints are saved."""
        steps = {**self._steps, step: info}
        write_json_file(self.work_dir / PROGRESS_FILE, {"fingerprint": self.fingerprint, "steps": steps})
        self._steps = steps

    # -- checkpoints ---------------------------------------------------------------------------

    def save_tensors(
        self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None
    ) -> Path:
        """Atomically write `<name>.safetensors`; `metadata` (JSON-serializable) is kept beside the tensors."""
        path = self._path(name, ".safetensors")
        header = {"format": "pt", "exlq": json.dumps(metadata)} if metadata is not None else {"format": "pt"}
        data = {key: storable(t) for key, t in tensors.items()}
        atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=header))
        return path

    def load_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        """The tensors saved under `name`, or None if there are none."""
        path = self._path(name, ".safetensors")
        if not path.exists():
            return None
        with self._safetensors(path) as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}

    def load_metadata(self, name: str) -> Any:
        """The `metadata` given to `save_tensors(name, ...)`, or None."""
        path = self._path(name, ".safetensors")
        if not path.exists():
            return None
        with self._safetensors(path) as handle:
            raw = (handle.metadata() or {}).get("exlq")
        return None if raw is None else json.loads(raw)

    def save_json(self, name: str, obj: Any) -> Path:
        """Atomically write `<name>.json`."""
        path = self._path(name, ".json")
        write_json_file(path, obj)
        return path

    def load_json(self, name: str) -> Any:
        """The object saved under `name`, or None if there is none."""
        path = self._path(name, ".json")
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExlqError(f"cannot read checkpoint {path} ({exc}); rerun with --restart") from None

    def _path(self, name: str, suffix: str) -> Path:
        """A checkpoint's path; names are plain file stems so a checkpoint can never leave the work dir."""
        if not _NAME_RE.fullmatch(name) or TMP_MARK in name or name in _RESERVED:
            raise ValueError(f"invalid checkpoint name {name!r}")
        return self.work_dir / f"{name}{suffix}"

    def _safetensors(self, path: Path):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors has its own error types
            raise ExlqError(f"cannot read checkpoint {path} ({exc}); rerun with --restart") from None


def _is_tmp(path: Path) -> bool:
    return path.name.startswith(".") and TMP_MARK in path.name
