"""`python -m kdcompose.cli ARGS` for the tests, without paying the imports every time.

A `kdcompose train` of the tiny models spends about 10 of its 15 s importing torch, transformers
and ms-swift, and the suite starts dozens of them. Here each command runs in a process forked
from a server process (one per test process, started on first use) that has imported that stack
once and computed nothing, so no thread exists to be lost in the fork. Otherwise the child is
the command as a user's shell starts it: a process of its own, in a process group of its own (a
session of its own when asked), with the environment it is given (replacing the server's), its
own working directory, file descriptors 1 and 2 going to files (everything it prints, ms-swift's
log included), `kdcompose.cli.main` run as `python -m kdcompose.cli` runs it, and its exit status
as the process's. Several commands can run at once (a teacher server and the run it teaches).

Not for what needs a fresh interpreter: start-up hooks (`.pth`), environment variables read at
import time (`LOG_LEVEL`, `OMP_NUM_THREADS`: the server's apply).

Protocol on the server's stdin/stdout, one JSON line each: request `{"id", "argv", "env", "cwd",
"out", "err", "session"}`; answers `{"id", "pid"}` when forked and `{"id", "exit"}` when it ended
(negative: killed by that signal, as `subprocess` reports it).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
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

from kdcompose.serve.process import ServerProcess
from kdcompose.testing import tiny_run_env

BASE_ENV = {**os.environ, **tiny_run_env()}
"""The environment the server starts with (the session's at import, offline hub), whatever a test
has changed by the time the first command runs; each command gets its own."""
_server: subprocess.Popen | None = None
_starting = threading.Lock()
_reading = threading.Lock()
"""One thread at a time reads the server's answers; each keeps what it reads for whoever asked."""
_pending = bytearray()
_answers: dict[tuple[int, str], int] = {}
_ids = itertools.count(1)


def _start_server() -> subprocess.Popen:
    global _server
    with _starting:
        if _server is None or _server.poll() is not None:
            _pending.clear()
            _answers.clear()
            _server = subprocess.Popen(
                [sys.executable, "-u", __file__],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**BASE_ENV, "PYTHONPATH": os.pathsep.join(sys.path)},
            )
            atexit.register(_server.kill)
        return _server


def _read_answers(server: subprocess.Popen, timeout: float) -> None:
    """Keep every answer line that arrives within `timeout` s (read unbuffered, so an answer already
    read is never waited for again)."""
    assert server.stdout is not None
    with _reading:
        fd = server.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return
        chunk = os.read(fd, 65536)
        if not chunk:
            raise RuntimeError("the forked-command server ended")
        _pending.extend(chunk)
        *lines, rest = bytes(_pending).split(b"\n")
        _pending[:] = rest
        for line in lines:
            answer = json.loads(line)
            kind = "pid" if "pid" in answer else "exit"
            _answers[(answer["id"], kind)] = answer[kind]


def _answer(server: subprocess.Popen, key: tuple[int, str], timeout: float | None) -> int | None:
    """The server's answer `key`, or None after `timeout` s without it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while key not in _answers:
        left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
        _read_answers(server, max(0.0, left))  # at least one look, even with no time left
        if left <= 0 and key not in _answers:
            return None
    return _answers.pop(key)


class ForkedProcess:
    """A started forked command, as much of `subprocess.Popen` as the tests use."""

    def __init__(self, server: subprocess.Popen, ident: int, pid: int, args: list[str]) -> None:
        self._server, self._id = server, ident
        self.pid, self.args = pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.wait(0) if self.returncode is None else self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status; after `timeout` s: `TimeoutExpired` (None from `poll`)."""
        if self.returncode is None:
            code = _answer(self._server, (self._id, "exit"), timeout)
            if code is None:
                if timeout == 0:
                    return None
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self.returncode = code
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # ended since: as `Popen` does
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def kill_group(self) -> None:
        """SIGKILL to the command and every process it started (its process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)


def start_cli(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    stdout: Path,
    stderr: Path,
    cwd: str | os.PathLike[str] | None = None,
    new_session: bool = False,
) -> ForkedProcess:
    """Start `kdcompose ARGV` in a forked process writing to the files `stdout` and `stderr`."""
    server = _start_server()
    assert server.stdin is not None
    ident = next(_ids)
    request = {
        "id": ident,
        "argv": list(argv),
        "env": dict(env),
        "cwd": str(cwd) if cwd else None,
        "out": str(stdout),
        "err": str(stderr),
        "session": new_session,
    }
    with _starting:
        server.stdin.write((json.dumps(request) + "\n").encode())
        server.stdin.flush()
    pid = _answer(server, (ident, "pid"), None)
    assert pid is not None
    return ForkedProcess(server, ident, pid, [sys.executable, "-m", "kdcompose.cli", *argv])


def run_cli(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run `kdcompose ARGV` in a forked process; the result as `subprocess.run` gives it (text
    output; `TimeoutExpired` after `timeout` s, the command and what it started killed)."""
    with tempfile.TemporaryDirectory(prefix="kdcompose-forked-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        process = start_cli(argv, env, stdout=out, stderr=err, cwd=cwd)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill_group()
            process.wait()
            raise
        text = {p: p.read_text(encoding="utf-8", errors="replace") if p.exists() else "" for p in (out, err)}
        return subprocess.CompletedProcess(process.args, code, text[out], text[err])


class ForkedServerProcess(ServerProcess):
    """`kdcompose serve-teacher` as `ServerProcess` runs it, forked like the other commands here."""

    def _launch(self) -> ForkedProcess:
        assert self.args[1:4] == ["-m", "kdcompose.cli", "serve-teacher"], self.args
        return start_cli(self.args[3:], self.env, stdout=self.log_path, stderr=self.log_path)


def _child(request: dict, ready: int) -> None:
    if request["session"]:
        os.setsid()
    else:
        os.setpgid(0, 0)  # a job of its own, as a shell starts it: the timeout kills its whole group
    written = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),  # not the server's request pipe
        (1, request["out"], written),
        (2, request["err"], written),
    ):
        if fd == 2 and path == request["out"]:
            os.dup2(1, 2)  # one file for both, as `stderr=subprocess.STDOUT` gives
            continue
        handle = os.open(path, flags, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a process a shell starts
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.write(ready, b"1")  # the server answers with the pid only now: group, output files, signals set
    os.close(ready)
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
    """The server: import the stack once, then fork one child per request; report each child's pid
    and, when it ends, its exit status (no thread: children are reaped between reads)."""
    from kdcompose.integrations.swift.runtime import prepare_swift_import

    prepare_swift_import()  # the torchvision start-up fix first, as the `kdcompose` CLI applies it
    import swift.arguments
    import swift.pipelines.train.rlhf  # noqa: F401

    import kdcompose.cli
    import kdcompose.integrations.swift.launch.command
    import kdcompose.integrations.swift.trainer  # noqa: F401

    running: dict[int, int] = {}  # pid -> request id
    buffer = b""
    stdin_open = True

    def answer(payload: dict) -> None:
        os.write(1, (json.dumps(payload) + "\n").encode())

    while stdin_open or running:
        if stdin_open and select.select([0], [], [], 0.05)[0]:
            chunk = os.read(0, 65536)
            stdin_open = bool(chunk)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                request = json.loads(line)
                ready_read, ready_write = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(ready_read)
                    _child(request, ready_write)
                os.close(ready_write)
                os.read(ready_read, 1)
                os.close(ready_read)
                running[pid] = request["id"]
                answer({"id": request["id"], "pid": pid})
        elif not stdin_open:
            time.sleep(0.05)
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            answer({"id": running.pop(pid), "exit": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    _serve()
