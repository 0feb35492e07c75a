"""Run untrusted Python (model-written code and its tests) in a separate, limited process.

Every program runs in its own child process, `python -I exlq/eval/sandbox_runner.py`, in a fresh
temporary working directory that is deleted afterwards, with a clean environment (PATH, locale,
HOME and TMPDIR pointing into that directory; nothing inherited, so no secrets) and its own
session (process group).

Enforced by the operating system (hard limits; they hold whatever the program does in Python):
- wall-clock timeout: the parent kills the child's whole process group (SIGKILL);
- RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space, 2 GiB by default: a 10 GB allocation is a
  MemoryError), RLIMIT_FSIZE (largest file written), RLIMIT_NOFILE, RLIMIT_CORE = 0, and
  RLIMIT_NPROC = 0 (no new processes or threads), set with soft = hard;
- a new, empty network namespace via unshare(CLONE_NEWNET) when the kernel allows it (as root, or
  through an unprivileged user namespace): no route anywhere, not even loopback;
- as root, when the interpreter's files are world-readable and the temporary directory is
  reachable by others: the child becomes uid/gid `nobody` before the program runs, so file
  permissions protect everything it does not own, the rlimits cannot be raised again and
  RLIMIT_NPROC is counted (the kernel does not apply it to root). On the GPU machines (Python in
  /usr, /opt) this is in effect; the JSON summary of `eval-humaneval` lists what was (`sandbox`).

Enforced only by Python-level guards, installed just before the program runs: os.fork/forkpty,
os.system/popen/exec*/spawn*/posix_spawn, subprocess.Popen and its fork_exec primitive, os.kill,
file deletion, renaming and permission changes (os.remove/unlink/rmdir/rename/replace/chmod/chown,
shutil.rmtree/move), os._exit, resource.setrlimit, signal.signal, socket creation and name lookup
raise PermissionError; importing ctypes, cffi, multiprocessing or pty fails; open()/io.open/os.open/
io.FileIO/os.mkdir refuse write modes for paths that resolve outside the working directory. These
guards stop ordinary code (including a model that writes `os.system('rm -rf ~')` or a fork bomb)
but they are not a security boundary against a determined attacker, who can recover the original
functions from the interpreter; the rlimits, the separate process group, the network namespace
and (as root) the unprivileged uid are the hard parts. When the child runs as root without the
privilege drop (the interpreter lives under a private /root, as on the project machines), writes
and deletions outside the working directory are stopped by the guards alone.

A program passes only if it ran to the end and the runner then reported it with the nonce the
parent gave it on stdin: exiting early (sys.exit, os._exit, a signal) is a failure, not a pass.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RUNNER = Path(__file__).with_name("sandbox_runner.py")
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits; the defaults suit HumanEval-sized tests."""

    timeout: float = 10.0  # wall-clock seconds, interpreter start included
    memory_bytes: int = 2 * 2**30
    file_bytes: int = 16 * 2**20
    processes: int = 0  # RLIMIT_NPROC: no new processes or threads
    open_files: int = 64

    def as_runner_args(self) -> dict[str, int]:
        return {
            "cpu_seconds": max(1, math.ceil(self.timeout)) + 1,  # the wall clock fires first
            "memory_bytes": self.memory_bytes,
            "file_bytes": self.file_bytes,
            "processes": self.processes,
            "open_files": self.open_files,
        }


@dataclass
class SandboxResult:
    status: str  # "passed", "failed" or "timeout"
    error: str | None  # why it failed: exception and program line, timeout, or how the process ended
    seconds: float
    hardening: list[str] = field(default_factory=list)  # OS-level layers that took effect

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def clean_environment(workdir: str) -> dict[str, str]:
    """Only what a Python program needs; HOME and temp files inside the sandbox directory."""
    return {
        "PATH": CLEAN_PATH,
        "HOME": workdir,
        "TMPDIR": workdir,
        "TMP": workdir,
        "TEMP": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _ended_without_report(returncode: int, stderr: bytes) -> str:
    if returncode < 0:
        try:
            how = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
        if -returncode == signal.SIGXCPU:
            how += " (CPU time limit)"
    else:
        how = f"exited with code {returncode} before the end of the program"
    tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] if stderr else []
    return how + (f": {tail[0]}" if tail else "")


def run_sandboxed(program: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `program` (Python source) in a fresh sandboxed process and say whether it ran to the end."""
    limits = limits or SandboxLimits()
    start = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="exlq-sandbox-")
    try:
        Path(workdir, "program.py").write_text(program, encoding="utf-8")
        nonce = secrets.token_hex(16)
        proc = subprocess.Popen(
            [sys.executable, "-I", str(RUNNER), workdir, json.dumps(limits.as_runner_args())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=clean_environment(workdir),
            start_new_session=True,  # its own process group, killed as a whole
            close_fds=True,
        )
        try:
            out, err = proc.communicate((nonce + "\n").encode(), timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            return SandboxResult("timeout", f"timed out after {limits.timeout:g} s", time.perf_counter() - start)
        finally:
            _kill_group(proc.pid)  # anything the program left behind in its group
        seconds = time.perf_counter() - start
        report = _parse_report(out, nonce)
        if report is None:
            return SandboxResult("failed", _ended_without_report(proc.returncode, err), seconds)
        status = "passed" if report.get("status") == "passed" else "failed"
        return SandboxResult(status, report.get("error"), seconds, list(report.get("hardening") or []))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _parse_report(out: bytes, nonce: str) -> dict | None:
    """The runner's JSON line carrying our nonce (anything else on the pipe is ignored)."""
    for line in out.decode("utf-8", "replace").splitlines():
        try:
            report = json.loads(line)
        except ValueError:
            continue
        if isinstance(report, dict) and report.get("nonce") == nonce:
            return report
    return None
