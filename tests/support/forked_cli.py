"""`python -m kdcompose.cli ARGS` for the tests, without paying the imports every time.

A `kdcompose train` of the tiny models spends about 10 of its 15 s importing torch, transformers
and ms-swift, and the suite starts dozens of them. Here each command runs in a process forked
from a server process (one per test process, started on first use) that has imported that stack
once and computed nothing, so no thread exists to be lost in the fork. Otherwise the child is
the command as a user's shell starts it: a process of its own with the environment it is given
(replacing the server's), its own working directory, file descriptors 1 and 2 going to files
(everything it prints, ms-swift's log included), `kdcompose.cli.main` run as
`python -m kdcompose.cli` runs it, and its exit status as the process's.

Not for what needs a fresh interpreter: start-up hooks (`.pth`), environment variables read at
import time (`LOG_LEVEL`, `OMP_NUM_THREADS`: the server's apply), a process a test signals.

Protocol on the server's stdin/stdout, one JSON line each: request `{"argv", "env", "cwd", "out",
"err"}`, answers `{"pid"}` when forked and `{"exit"}` when it ended (negative: killed by that
signal, as `subprocess` reports it).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from kdcompose.testing import tiny_run_env

BASE_ENV = {**os.environ, **tiny_run_env()}
"""The environment the server starts with (the session's at import, offline hub), whatever a test
has changed by the time the first command runs; each command gets its own."""
_server: subprocess.Popen | None = None
_one_at_a_time = threading.Lock()
"""The server runs one command at a time; callers in several threads take turns."""
_pending = bytearray()
"""Bytes read from the server after the last complete answer line."""


def _start_server() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        _pending.clear()
        _server = subprocess.Popen(
            [sys.executable, "-u", __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**BASE_ENV, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        atexit.register(_server.kill)
    return _server


def _answer(server: subprocess.Popen, timeout: float | None) -> dict | None:
    """The server's next answer line, or None after `timeout` s without one (read unbuffered, so
    an answer already read is never waited for again)."""
    assert server.stdout is not None
    fd = server.stdout.fileno()
    deadline = None if timeout is None else time.monotonic() + timeout
    while b"\n" not in _pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            raise RuntimeError("the forked-command server ended")
        _pending.extend(chunk)
    line, _, rest = bytes(_pending).partition(b"\n")
    _pending[:] = rest
    return json.loads(line)


def run_cli(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run `kdcompose ARGV` in a forked process; the result as `subprocess.run` gives it (text
    output; `TimeoutExpired` after `timeout` s, the process killed)."""
    with _one_at_a_time, tempfile.TemporaryDirectory(prefix="kdcompose-forked-") as folder:
        server = _start_server()
        assert server.stdin is not None
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        request = {"argv": list(argv), "env": dict(env), "cwd": str(cwd) if cwd else None}
        server.stdin.write((json.dumps({**request, "out": str(out), "err": str(err)}) + "\n").encode())
        server.stdin.flush()
        pid = _answer(server, None)["pid"]
        ended = _answer(server, timeout)
        if ended is None:
            os.kill(pid, signal.SIGKILL)
            _answer(server, None)
            raise subprocess.TimeoutExpired(["kdcompose", *argv], timeout)
        text = {p: p.read_text(encoding="utf-8", errors="replace") if p.exists() else "" for p in (out, err)}
        return subprocess.CompletedProcess(
            [sys.executable, "-m", "kdcompose.cli", *argv], ended["exit"], text[out], text[err]
        )


def _child(request: dict) -> None:
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),  # not the server's request pipe
        (1, request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        (2, request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    ):
        handle = os.open(path, flags, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a process a shell starts
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(request["env"])
    if request["cwd"]:
        os.chdir(request["cwd"])
    sys.argv = [sys.executable, "-m", "kdcompose.cli", *request["argv"]]
    code = 1
    try:
        from kdcompose.cli import main

        code = int(main(request["argv"]) or 0)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve() -> None:
    """The server: import the stack once, then fork one child per request, one at a time."""
    from kdcompose.integrations.swift.runtime import prepare_swift_import

    prepare_swift_import()  # the torchvision start-up fix first, as the `kdcompose` CLI applies it
    import swift.arguments
    import swift.pipelines.train.rlhf  # noqa: F401

    import kdcompose.cli
    import kdcompose.integrations.swift.launch.command
    import kdcompose.integrations.swift.trainer  # noqa: F401

    answers = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        answers.write(json.dumps({"pid": pid}) + "\n")
        answers.flush()
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        answers.write(json.dumps({"exit": code}) + "\n")
        answers.flush()


if __name__ == "__main__":
    _serve()
