"""The sandbox: hostile programs fail, legitimate ones pass, and nothing outside the sandbox changes.

All programs run together through the scorer's pool (as the evaluator runs them), so one test
module also shows that the evaluator keeps going whatever a sample does.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from exlq.eval.humaneval import score_programs
from exlq.eval.sandbox import SandboxLimits, run_sandboxed

LIMITS = SandboxLimits(timeout=3.0)


def canary_programs(canary: Path) -> dict[str, str]:
    """Ways model-written code might delete or write files outside its sandbox."""
    c = str(canary)
    return {
        "rm_rf_system": f"import os\nos.system('rm -rf ' + {c!r})\n",
        "rm_rf_home": "import os\nos.system('rm -rf ~')\n",
        "rmtree": f"import shutil\nshutil.rmtree({c!r})\n",
        "remove": f"import os\nos.remove({c + '/a.txt'!r})\n",
        "unlink_pathlib": f"import pathlib\npathlib.Path({c + '/b.txt'!r}).unlink()\n",
        "rename": f"import os\nos.rename({c + '/a.txt'!r}, 'stolen.txt')\n",
        "open_write": f"open({c + '/x'!r}, 'w').write('pwned')\n",
        "open_append": f"open({c + '/a.txt'!r}, 'a').write('pwned')\n",
        "pathlib_write": f"import pathlib\npathlib.Path({c + '/y'!r}).write_text('pwned')\n",
        "os_open": f"import os\nos.close(os.open({c + '/z'!r}, os.O_WRONLY | os.O_CREAT))\n",
        "mkdir": f"import os\nos.makedirs({c + '/sub/dir'!r})\n",
        "chmod": f"import os\nos.chmod({c + '/a.txt'!r}, 0o777)\n",
        "symlink_escape": f"import os\nos.symlink({c!r}, 'link')\nopen('link/x', 'w').write('pwned')\n",
    }


HOSTILE = {
    "infinite_loop": "while True:\n    pass\n",
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
    "subprocess": "import subprocess\nsubprocess.Popen(['sleep', '30'])\n",
    "subprocess_run": "import subprocess\nsubprocess.run('true', shell=True)\n",
    "spawn": "import os\nos.spawnlp(os.P_WAIT, 'true', 'true')\n",
    "multiprocessing": "import multiprocessing\nmultiprocessing.Process(target=print).start()\n",
    "ctypes": "import ctypes\nctypes.CDLL(None).fork()\n",
    "memory_10gb": "b = bytearray(10 * 2**30)\n",
    "kill_parent": "import os\nos.kill(os.getppid(), 9)\n",
    "early_exit_ok": "import os\nos._exit(0)\n",
    "sys_exit_ok": "import sys\nsys.exit(0)\n",
    "raise_limits": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n",
}
LEGIT = {
    "correct": "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n",
    "files_inside": (
        "import os, tempfile, pathlib\n"
        "open('out.txt', 'w').write('hi')\n"
        "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')\n"
        "os.makedirs('a/b')\nos.rename('out.txt', 'a/b/out.txt')\nos.remove('a/b/out.txt')\n"
        "pathlib.Path('~/home.txt').expanduser().write_text('ok')\n"
        "assert os.path.realpath(os.environ['HOME']) == os.getcwd() == os.path.realpath(tempfile.gettempdir())\n"
        "print('printing is fine')\n"
    ),
    "clean_environment": "import os\nassert 'EXLQ_SANDBOX_SECRET' not in os.environ, os.environ\n",
    "stdlib": "import collections, itertools, math, re, hashlib, heapq, random, string, fractions, statistics\n"
              "assert math.gcd(12, 18) == 6 and random.Random(1).random() < 1\n",
}


@pytest.fixture(scope="module")
def canary(tmp_path_factory) -> Path:
    """A directory with files outside any sandbox directory; every test checks it is untouched."""
    root = tmp_path_factory.mktemp("canary")
    (root / "a.txt").write_text("alpha")
    (root / "b.txt").write_text("beta")
    (root / "keep").mkdir()
    (root / "keep" / "c.txt").write_text("gamma")
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): (p.read_text() if p.is_file() else "<dir>") for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def listener():
    """A local TCP server: a sandboxed program that reached it would show up as an accepted connection."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    yield server
    server.close()


@pytest.fixture(scope="module")
def results(canary, listener, tmp_path_factory):
    """Every program, scored together in the scorer's pool; also how long the whole lot took."""
    import os

    port = listener.getsockname()[1]
    network = {
        "socket_connect": f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
        "create_connection": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
        "dns": "import socket\nsocket.getaddrinfo('example.com', 80)\n",
        "urllib": "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)\n",
    }
    programs = {**canary_programs(canary), **HOSTILE, **network, **LEGIT}
    before = snapshot(canary)
    os.environ["EXLQ_SANDBOX_SECRET"] = "hunter2"
    try:
        start = time.perf_counter()
        scored = score_programs(programs.values(), limits=LIMITS, workers=4)
        elapsed = time.perf_counter() - start
    finally:
        del os.environ["EXLQ_SANDBOX_SECRET"]
    return dict(zip(programs, scored)), before, elapsed


@pytest.mark.parametrize("name", list(canary_programs(Path("/x"))))
def test_deleting_or_writing_outside_fails_and_changes_nothing(results, canary, name):
    by_name, before, _ = results
    result = by_name[name]
    assert result.status == "failed", (name, result)
    assert "PermissionError" in result.error or "not allowed" in result.error, result.error
    assert snapshot(canary) == before


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_programs_fail(results, name):
    result = results[0][name]
    assert not result.passed, (name, result)
    if name == "infinite_loop":
        assert result.status == "timeout" and "timed out" in result.error
    else:
        assert result.status == "failed", result
    expected = {
        "fork_bomb": "os.fork is not allowed",
        "subprocess": "subprocess.Popen is not allowed",
        "memory_10gb": "MemoryError",
        "ctypes": "importing ctypes is not allowed",
        "early_exit_ok": "os._exit is not allowed",
        "sys_exit_ok": "SystemExit",
    }
    if name in expected:
        assert expected[name] in result.error, result.error


@pytest.mark.parametrize("name", ["socket_connect", "create_connection", "dns", "urllib"])
def test_network_is_refused(results, listener, name):
    result = results[0][name]
    assert result.status == "failed", result
    with pytest.raises(OSError):  # socket.timeout: nobody connected
        listener.accept()[0].close()


@pytest.mark.parametrize("name", list(LEGIT))
def test_legitimate_programs_pass(results, name):
    result = results[0][name]
    assert result.passed, (name, result)
    assert "RLIMIT_AS" in result.hardening and "RLIMIT_CPU" in result.hardening


def test_the_pool_keeps_going_and_is_quick(results):
    by_name, _, elapsed = results
    assert len(by_name) == len(canary_programs(Path("/x"))) + len(HOSTILE) + 4 + len(LEGIT)
    # one infinite loop waits out its timeout; everything else takes well under a second each
    assert elapsed < 3.0 + 20.0, elapsed


def test_fork_bomb_is_stopped_before_it_forks():
    """No child process ever exists: the program fails at once instead of filling the process table."""
    result = run_sandboxed("import os\nwhile True:\n    os.fork()\n", LIMITS)
    assert result.status == "failed" and result.seconds < 5, result


def test_infinite_loop_is_killed_at_the_wall_clock_timeout():
    start = time.perf_counter()
    result = run_sandboxed("while True:\n    pass\n", SandboxLimits(timeout=1.0))
    assert result.status == "timeout" and time.perf_counter() - start < 5, result


def test_wrong_answer_shows_the_failing_assertion():
    program = "def add(a, b):\n    return a - b\n\nassert add(1, 1) == 2\n"
    result = run_sandboxed(program, LIMITS)
    assert result.status == "failed"
    assert result.error == "AssertionError (line 4: assert add(1, 1) == 2)"


def test_syntax_error_fails():
    result = run_sandboxed("def f(:\n    pass\n", LIMITS)
    assert result.status == "failed" and result.error.startswith("SyntaxError")


def test_sandbox_directory_is_removed(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = run_sandboxed("open('left.txt', 'w').write('x')\n", LIMITS)
    assert result.passed, result
    assert list(tmp_path.iterdir()) == []
