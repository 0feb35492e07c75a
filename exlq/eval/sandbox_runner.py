"""The child side of `exlq.eval.sandbox`: run one untrusted program and report how it ended.

Started as `python -I sandbox_runner.py WORKDIR LIMITS_JSON` (a plain script: it imports nothing
from exlq, so the child never loads torch). It reads a one-time nonce from stdin, then, in this
order: compiles `WORKDIR/program.py`; sets hard resource limits; moves into a fresh network
namespace when the kernel allows it; drops root to `nobody` when the interpreter's files are
world-readable; points stdin/stdout/stderr at /dev/null; installs the Python-level guards; runs
the program; and writes one JSON line `{"nonce", "status", "error", "hardening"}` to a private
copy of the original stdout. Without that line (killed, crashed, exited on its own) the parent
counts the sample as failed. See `exlq.eval.sandbox` for what each layer does and does not stop.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import traceback

NOBODY = 65534
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
BLOCKED_MODULES = ("ctypes", "_ctypes", "cffi", "_cffi_backend", "multiprocessing", "_multiprocessing", "_posixshmem", "pty")
# os/posix functions that start, replace or signal processes, change permissions or identity, or
# delete whole trees: refused outright (nothing HumanEval-like needs them).
REFUSED_OS = (
    "fork", "forkpty", "system", "popen", "execv", "execve", "execl", "execle", "execlp",
    "execlpe", "execvp", "execvpe", "_execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe",
    "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg", "pidfd_open",
    "removedirs", "renames", "truncate", "chmod", "lchmod", "fchmod", "chown",
    "lchown", "fchown", "chroot", "link", "symlink", "mkfifo", "mknod", "utime", "setuid", "setgid", "seteuid",
    "setegid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "setsid", "setpgid", "setpgrp",
    "_exit", "sched_setaffinity", "setpriority",
)
# Deleting or moving is allowed only inside the sandbox directory (tempfile needs it); relative
# paths against a directory fd cannot be checked, so dir_fd arguments are refused.
PATH_CHECKED_OS = {"remove": 1, "unlink": 1, "rmdir": 1, "mkdir": 1, "rename": 2, "replace": 2}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def refused(name: str):
    def blocked(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is not allowed")

    blocked.__name__ = name.rsplit(".", 1)[-1]
    return blocked


def set_limits(limits: dict) -> list[str]:
    """Soft = hard limits, so an unprivileged program cannot raise them again."""
    done = []
    for name, value in (
        ("RLIMIT_CPU", limits["cpu_seconds"]),
        ("RLIMIT_AS", limits["memory_bytes"]),
        ("RLIMIT_FSIZE", limits["file_bytes"]),
        ("RLIMIT_NPROC", limits["processes"]),
        ("RLIMIT_NOFILE", limits["open_files"]),
        ("RLIMIT_CORE", 0),
    ):
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
            done.append(name)
        except (ValueError, OSError, AttributeError):
            pass
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the file limit: the write fails (OSError), no core
    return done


def isolate_network() -> str | None:
    """A new, empty network namespace (only a down loopback): no socket can reach anything.

    Needs CAP_SYS_ADMIN, or unprivileged user namespaces (then the user namespace comes along).
    ctypes is imported for this alone and hidden again before the program runs.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        for flags, label in ((CLONE_NEWNET, "netns"), (CLONE_NEWUSER | CLONE_NEWNET, "userns+netns")):
            if libc.unshare(flags) == 0:
                return label
    except (OSError, AttributeError, ImportError):
        pass
    return None


def _others_can_use(path: str, *, read: bool) -> bool:
    """Whether `nobody` could reach `path` (every ancestor directory searchable by others) and,
    with `read`, read it (list it, for a directory)."""
    import stat

    path = os.path.realpath(path)
    ancestors = [os.path.dirname(path)]
    while ancestors[-1] != os.path.dirname(ancestors[-1]):
        ancestors.append(os.path.dirname(ancestors[-1]))
    if any(not os.stat(d).st_mode & stat.S_IXOTH for d in ancestors):
        return False
    if read:
        mode = os.stat(path).st_mode
        need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(mode) else 0)
        return mode & need == need
    return True


def drop_root(workdir: str) -> bool:
    """As root, become uid/gid `nobody`: the kernel then enforces RLIMIT_NPROC and file permissions.

    Skipped when `nobody` could not read the interpreter's standard library (e.g. Python installed
    under a private /root: the program could then not import anything) or could not reach the
    working directory (a private TMPDIR).
    """
    if os.geteuid() != 0:
        return False
    try:
        stdlib = os.path.dirname(os.__file__)
        usable = _others_can_use(stdlib, read=True) and _others_can_use(sys.executable, read=True)
        if not (usable and _others_can_use(workdir, read=False)):
            return False
        os.chown(workdir, NOBODY, NOBODY)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        return True
    except OSError:
        return False


def install_guards(workdir: str) -> None:
    """Python-level refusals: no processes, sockets, ctypes, or writes/deletions outside `workdir`."""
    import _io
    import posix

    def inside(path) -> bool:
        real = os.path.realpath(os.fsdecode(os.fspath(path)))
        return real == workdir or real.startswith(workdir + os.sep)

    def check_write(path, what: str) -> None:
        if not isinstance(path, int) and not inside(path):
            raise PermissionError(f"sandbox: {what} outside the sandbox directory is not allowed: {path!r}")

    real_open, real_os_open = _io.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check_write(file, "writing")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & WRITE_FLAGS:
            check_write(path, "writing")
        return real_os_open(path, flags, *args, **kwargs)

    def path_checked(name: str, paths: int):
        real = getattr(os, name)

        def guarded(*args, **kwargs):
            if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
                raise PermissionError(f"sandbox: os.{name} with a directory fd is not allowed")
            for path in [*args[:paths], *(kwargs[k] for k in ("path", "src", "dst") if k in kwargs)]:
                check_write(path, f"os.{name}")
            return real(*args, **kwargs)

        return guarded

    checked = {name: path_checked(name, paths) for name, paths in PATH_CHECKED_OS.items()}

    class GuardedFileIO(_io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                check_write(file, "writing")
            super().__init__(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = GuardedFileIO
    for module in (os, posix):
        module.open = guarded_os_open
        for name, guarded in checked.items():
            setattr(module, name, guarded)
        for name in REFUSED_OS:
            if hasattr(module, name):
                setattr(module, name, refused(f"os.{name}"))

    import _posixsubprocess
    import _socket

    _posixsubprocess.fork_exec = refused("_posixsubprocess.fork_exec")
    subprocess.Popen = refused("subprocess.Popen")  # run/call/check_output go through Popen
    subprocess._fork_exec = refused("subprocess._fork_exec")
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, refused(f"shutil.{name}"))

    class NoSocket:
        def __new__(cls, *args, **kwargs):
            raise PermissionError("sandbox: network access is not allowed")

    for module in (socket, _socket):
        module.socket = module.SocketType = NoSocket
        for name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo", "gethostbyname",
                     "gethostbyname_ex", "gethostbyaddr", "dup", "fromshare"):  # fmt: skip
            if hasattr(module, name):
                setattr(module, name, refused(f"socket.{name}"))
    for name in ("setrlimit", "prlimit"):
        setattr(resource, name, refused(f"resource.{name}"))
    signal.signal = refused("signal.signal")  # keep SIGXCPU and friends as they are
    signal.pthread_kill = refused("signal.pthread_kill")

    class BlockImports:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] in BLOCKED_MODULES:
                raise ImportError(f"sandbox: importing {name} is not allowed")
            return None

    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED_MODULES:
            del sys.modules[name]
    sys.meta_path.insert(0, BlockImports)


def describe(exc: BaseException, source_lines: list[str], filename: str) -> str:
    """`ExcType: message`, plus the program line where it was raised (asserts have no message)."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
    if frames and frames[-1].lineno and 0 < frames[-1].lineno <= len(source_lines):
        line = source_lines[frames[-1].lineno - 1].strip()
        text += f" (line {frames[-1].lineno}: {line})"
    return text[:2000]


def main() -> None:
    workdir = os.path.realpath(sys.argv[1])
    limits = json.loads(sys.argv[2])
    nonce = sys.stdin.readline().strip()
    result_fd = os.dup(1)
    write, exit_now = os.write, os._exit  # kept before the guards replace os._exit
    filename = os.path.join(workdir, "program.py")
    with open(filename, encoding="utf-8") as f:
        source = f.read()

    def report(status: str, error: str | None, hardening: list[str]) -> None:
        line = json.dumps({"nonce": nonce, "status": status, "error": error, "hardening": hardening})
        write(result_fd, (line + "\n").encode())
        exit_now(0)

    try:
        code = compile(source, filename, "exec")
    except (SyntaxError, ValueError) as exc:
        report("failed", describe(exc, [], filename) if not isinstance(exc, SyntaxError) else
               f"SyntaxError: {exc.msg} (line {exc.lineno})", [])  # fmt: skip
    hardening = set_limits(limits)
    network = isolate_network()
    if network:
        hardening.append(network)
    if drop_root(workdir):
        hardening.append("uid nobody")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.chdir(workdir)
    install_guards(workdir)
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are failures too
        try:
            error = describe(exc, source.splitlines(), filename)
        except BaseException:  # noqa: BLE001 - an exception whose str() raises
            error = type(exc).__name__
        report("failed", error, hardening)
    report("passed", None, hardening)


if __name__ == "__main__":
    main()
