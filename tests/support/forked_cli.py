"""`python -m kdcompose.cli ARGS` for the tests, without paying the imports every time.

A `kdcompose train` of the tiny models spends about 7 CPU-seconds importing torch, transformers
and ms-swift, and the suite starts dozens of them (and their torchrun ranks). Here each command
runs in a process forked from a server process (one per pytest run, shared by its xdist
workers, started on first use, ended with the run) that has imported that stack once and
computed nothing, so no thread exists to be lost in the fork. Otherwise the child is the
command as a user's shell starts it: a process of its own, in a process group of its own (a
session of its own when asked), with the environment it is given
(replacing the server's), its own working directory (first on `sys.path`, as `python -m` puts
it) and `PYTHONPATH`, standard streams going where it is told (files, for `start_cli`), the
module run as `python -m` runs it, and its exit status as the process's. Several commands can
run at once (a teacher server and the run it teaches).

What a forked command starts with `sys.executable` goes through `forked_python.py`, a stand-in
`python` that asks the same server: so torchrun's launcher and ranks, the demo's training runs,
teacher-cache workers and teacher servers are forked too, whenever a fresh interpreter would run
them the same way (`_forkable`: `-m MODULE`, `-c CODE` or a script, no interpreter flag but `-u`,
no change to the variables read at import); the rest runs in the real interpreter. `python()`
gives the stand-in to tests that start a process themselves and need no fresh interpreter.

The variables read once at import (the hub's cache and offline settings, `HOME`, ...) are the
server's: each set of their values gets a server of its own, started with them. Not for what
needs a fresh interpreter anyway: start-up hooks (`.pth`, `sitecustomize`), what must not find
ms-swift imported, a plug-in registry read before a test adds to it.

Protocol: a connection to the server's Unix socket per process. The client sends one JSON line
with its three standard streams attached (`SCM_RIGHTS`): `{"argv", "env", "cwd", "session"}` from
`start_cli`, `{"python", "env", "cwd"}` from the stand-in; the server answers `{"pid"}` when forked
(`{"fresh": true}`: run it in the real interpreter) and `{"exit"}` when the process ended (negative:
killed by that signal, as `subprocess` reports it). A client that goes away takes its process
with it: the server kills the process group of a command whose connection closed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from forked_python import SOCKET_ENV

from kdcompose.serve.process import ServerProcess

STAND_IN = Path(__file__).with_name("forked_python.py")
READ_AT_IMPORT = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "MODELSCOPE_", "DATASETS_", "DS_", "PYTHON")
"""Prefixes of the variables that ms-swift, transformers, the hub clients and Python read once, at
import or start-up (each set of values has a server of its own; a stand-in request that changes
one runs in a fresh interpreter)."""
READ_AT_IMPORT_NAMES = ("HOME", "XDG_CACHE_HOME", "TORCH_HOME", "USE_HF", "KDCOMPOSE_NO_STARTUP_HOOK")
PRELOADED = (
    "swift.arguments",
    "swift.pipelines.train.rlhf",
    "swift.loss_scale",
    "torch.distributed.run",
    "deepspeed",  # imported by accelerate in every run
    "qwen_vl_utils",
    "PIL.Image",
    "PIL.PngImagePlugin",
    "PIL.JpegImagePlugin",
    "scipy.io",
    "multiprocess.managers",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "transformers.models.qwen2_vl.processing_qwen2_vl",
    "transformers.models.qwen2_vl.image_processing_qwen2_vl",
    "kdcompose.cli",
    "kdcompose.serve.app",
    "kdcompose.teachers.audit",
    "kdcompose.teachers.cache",
    "kdcompose.integrations.swift.launch.command",
    "kdcompose.integrations.swift.launch.preflight",
    "kdcompose.integrations.swift.launch.run_summary",
    "kdcompose.integrations.swift.launch.startup_errors",
    "kdcompose.integrations.swift.trainer",
)
"""What the server imports: what a `kdcompose train` of the tiny models imports (measured: a
forked run then imports nothing more of note, 0.4 CPU-seconds less than with ms-swift alone)."""
SET_IN_THE_CHILD = ("PYTHONPATH", "PYTHONUNBUFFERED", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOG_LEVEL")
"""Read at start-up, but the forked child applies them itself (`_apply_start_up_settings`; the
server runs unbuffered)."""


def _owner() -> int:
    """The process whose end ends the servers: under xdist the controller, whose workers share
    them; otherwise this test process."""
    return os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()


def _read_at_import(key: str) -> bool:
    if key in SET_IN_THE_CHILD:
        return False
    return key.startswith(READ_AT_IMPORT) or key in READ_AT_IMPORT_NAMES


def _read_at_import_values(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in env.items() if _read_at_import(k)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Server:
    """The server for one set of values read at import, shared by the test processes of one
    pytest run (the first that needs it starts it, under a lock; it ends with the run)."""

    def __init__(self, env: Mapping[str, str], key: tuple[tuple[str, str], ...]) -> None:
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        self.folder = Path(tempfile.gettempdir()) / f"kdcompose-fork-{_owner()}-{digest}"
        self.socket = str(self.folder / "server.sock")
        self.python = self.folder / "bin" / "python"
        self.folder.mkdir(exist_ok=True)
        with (self.folder / "lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self.alive():
                self._start(env)

    def alive(self) -> bool:
        pid_file = self.folder / "server.pid"
        return pid_file.exists() and _alive(int(pid_file.read_text()))

    def _start(self, env: Mapping[str, str]) -> None:
        self.python.parent.mkdir(exist_ok=True)
        self.python.write_text(f"#!{sys.executable} -S\n{STAND_IN.read_text()}")
        self.python.chmod(0o755)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)  # a server of this run that ended
        process = subprocess.Popen(
            [sys.executable, "-u", __file__, self.socket, str(self.python), str(_owner()), str(self.folder)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env={**env, "PYTHONPATH": os.pathsep.join(sys.path)},
            start_new_session=True,  # not ended with the test process that happened to start it
        )
        assert process.stdout is not None
        ready = process.stdout.readline()
        process.stdout.close()
        if ready != b"ready\n":
            process.kill()  # not left importing, or serving without having said so
            process.wait()
            raise RuntimeError("the forked-command server did not start")
        (self.folder / "server.pid").write_text(str(process.pid))
        _started.append(process)


_servers: dict[tuple[tuple[str, str], ...], _Server] = {}
_started: list[subprocess.Popen] = []
"""The servers this process started, kept referenced: they outlive it (they end with the run)."""
_starting = threading.Lock()


def _running_server(env: Mapping[str, str]) -> _Server:
    """The server for `env`: one per set of values read at import, started on first use."""
    key = _read_at_import_values(env)
    with _starting:
        server = _servers.get(key)
        if server is None or not server.alive():
            server = _servers[key] = _Server(env, key)
        return server


def python(env: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """The stand-in `python` (`forked_python.py`) and `env` with the variable that leads it to a
    server started with `env`'s values read at import: `[python, "-m", "kdcompose.cli", ...]` run
    with that environment is forked."""
    server = _running_server(env)
    return str(server.python), {**env, SOCKET_ENV: server.socket}


def _read_message(conn: socket.socket, buffer: bytearray, timeout: float | None) -> dict | None:
    """The next JSON line from `conn`, or None after `timeout` s without one."""
    while b"\n" not in buffer:
        if not select.select([conn], [], [], timeout)[0]:
            return None
        chunk = conn.recv(65536)
        if not chunk:
            raise RuntimeError("the forked-command server ended")
        buffer.extend(chunk)
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return json.loads(line)


class ForkedProcess:
    """A started forked command, as much of `subprocess.Popen` as the tests use."""

    def __init__(self, conn: socket.socket, buffer: bytearray, pid: int, args: list[str]) -> None:
        self._conn, self._buffer = conn, buffer
        self.pid, self.args = pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.wait(0) if self.returncode is None else self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status; after `timeout` s: `TimeoutExpired` (None from `poll`)."""
        if self.returncode is None:
            answer = _read_message(self._conn, self._buffer, timeout)
            if answer is None:
                if timeout == 0:
                    return None
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self.returncode = answer["exit"]
            self._conn.close()
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
        """SIGKILL to the command and every process it started (its process group, and through the
        stand-in `python` whatever those started)."""
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
    server = _running_server(env)
    request = {"argv": list(argv), "env": dict(env), "cwd": str(cwd) if cwd else None, "session": new_session}
    written = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    streams = [os.open(os.devnull, os.O_RDONLY), os.open(stdout, written, 0o644)]
    streams.append(os.dup(streams[1]) if Path(stderr) == Path(stdout) else os.open(stderr, written, 0o644))
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(server.socket)
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], streams)
    finally:
        for fd in streams:
            os.close(fd)
    buffer = bytearray()
    answer = _read_message(conn, buffer, None)
    assert answer is not None and "pid" in answer, answer
    return ForkedProcess(conn, buffer, answer["pid"], [sys.executable, "-m", "kdcompose.cli", *argv])


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
        text = {p: p.read_text(encoding="utf-8", errors="replace") for p in (out, err)}
        return subprocess.CompletedProcess(process.args, code, text[out], text[err])


class ForkedServerProcess(ServerProcess):
    """`kdcompose serve-teacher` as `ServerProcess` runs it, forked like the other commands here."""

    def _launch(self) -> ForkedProcess:
        assert self.args[1:4] == ["-m", "kdcompose.cli", "serve-teacher"], self.args
        return start_cli(self.args[3:], self.env, stdout=self.log_path, stderr=self.log_path)


# --- the server ---------------------------------------------------------------------------------


def _forkable(python_argv: list[str], env: Mapping[str, str]) -> list[str] | None:
    """What follows the interpreter's flags in `python PYTHON_ARGV` (`-m MODULE ...`, `-c CODE ...`
    or `SCRIPT ...`) when a fork of this server runs it as a fresh interpreter would with `env`;
    None when it needs one (a flag other than `-u`, or a variable read at import changed)."""
    run = list(python_argv)
    while run[:1] == ["-u"]:  # the server's streams are unbuffered already
        run.pop(0)
    if not run or run[0] == "-" or (run[0].startswith("-") and run[0] not in ("-m", "-c")):
        return None
    if run[0] in ("-m", "-c") and len(run) < 2:
        return None
    base = os.environ
    if any(env.get(k) != base.get(k) for k in {*env, *base} if _read_at_import(k)):
        return None
    return run


def _run(run: list[str]) -> None:
    """`python RUN...` after the flags: `sys.argv` and the first entry of `sys.path` as Python
    sets them, the code run as `__main__`."""
    import runpy
    import types

    if run[0] == "-m":
        sys.argv = [run[1], *run[2:]]  # run_module puts the module's file first
        sys.path.insert(0, os.getcwd())
        runpy.run_module(run[1], run_name="__main__", alter_sys=True)
    elif run[0] == "-c":
        sys.argv = ["-c", *run[2:]]
        sys.path.insert(0, "")
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        exec(compile(run[1], "<string>", "exec"), main.__dict__)
    else:
        sys.argv = list(run)
        sys.path.insert(0, os.path.dirname(os.path.abspath(run[0])))
        runpy.run_path(run[0], run_name="__main__")


def _child(request: dict, streams: list[int], ready: int, server: dict[str, str]) -> None:
    """The forked command; never returns."""
    code = 1
    try:
        if request.get("session"):
            os.setsid()
        else:
            os.setpgid(0, 0)  # a job of its own: a group kill ends it and what it started
        for fd, stream in enumerate(streams):
            os.dup2(stream, fd)
            os.close(stream)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as a process a shell starts
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.write(ready, b"1")  # the server answers with the pid only now: group, streams, signals set
        os.close(ready)
        env = {**request["env"], SOCKET_ENV: server["socket"]}
        os.environ.clear()
        os.environ.update(env)
        if request["cwd"]:
            os.chdir(request["cwd"])
        _apply_start_up_settings(env)
        sys.executable = server["python"]  # what this command starts comes back here
        _run(request["run"])
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        import traceback

        traceback.print_exc()
    _exit(code)


def _apply_start_up_settings(env: Mapping[str, str]) -> None:
    """What a fresh interpreter would have taken from `env` at start-up, applied to what the server
    imported: `PYTHONPATH` on `sys.path`, torch's thread count, and ms-swift's log levels (set
    from `LOG_LEVEL` and `LOCAL_RANK` when `swift.utils.logger` is imported: ranks other than 0
    log errors only)."""
    paths = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [p for p in paths if p not in sys.path]
    threads = env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    import logging

    from swift.utils import logger as swift_logging

    level = swift_logging._get_log_level()
    for handler in swift_logging.logger.handlers:
        handler.setLevel(level)
    for logger in (swift_logging.logger, swift_logging.ms_logger):
        logger.setLevel(level if swift_logging._is_local_master() else logging.ERROR)


def _exit(code: int) -> None:
    """End as a fresh interpreter ends: wait for the threads it started, run the exit handlers,
    flush; a KeyboardInterrupt ends it by SIGINT, as Python does."""
    with contextlib.suppress(BaseException):
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        import atexit as exit_handlers

        exit_handlers._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    while not data.endswith(b"\n"):
        chunk = conn.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the client went away mid-request")
        data += chunk
    return json.loads(data), fds


def _serve(socket_path: str, python_path: str, owner: int, folder: str) -> None:
    """The server: import the stack once, then fork one child per request; report each child's pid
    and, when it ends, its exit status (no thread: children are reaped between reads)."""
    from kdcompose.integrations.swift.runtime import prepare_swift_import

    ready = os.dup(1)  # the answer to the starting process; what the imports print goes to stderr
    os.dup2(2, 1)
    prepare_swift_import()  # the torchvision start-up fix first, as the `kdcompose` CLI applies it
    import importlib

    for module in PRELOADED:
        importlib.import_module(module)

    server = {"socket": socket_path, "python": python_path}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)
    os.write(ready, b"ready\n")
    os.close(ready)
    client_of: dict[int, socket.socket] = {}  # pid -> the connection that asked for it
    watched: dict[socket.socket, int] = {}  # connection -> pid, while the client is there

    def start(conn: socket.socket) -> None:
        request, streams = _receive(conn)
        if "python" in request:
            request["run"] = _forkable(request["python"], request["env"])
            if request["run"] is None:
                conn.sendall(b'{"fresh": true}\n')
                conn.close()
                for fd in streams:
                    os.close(fd)
                return
        else:
            request["run"] = ["-m", "kdcompose.cli", *request["argv"]]
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ready_read)
            for held in (listener, conn, *client_of.values()):
                held.close()
            _child(request, streams, ready_write, server)
        os.close(ready_write)
        for fd in streams:
            os.close(fd)
        os.read(ready_read, 1)
        os.close(ready_read)
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        client_of[pid] = conn
        watched[conn] = pid

    while True:
        readable = select.select([listener, *watched], [], [], 0.05)[0]
        if not _alive(owner):  # the test run ended: so do its commands, and this server
            for pid in client_of:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            shutil.rmtree(folder, ignore_errors=True)
            return
        if listener in readable:
            conn, _ = listener.accept()
            with contextlib.suppress(ConnectionError, OSError, ValueError):  # a client gone mid-request
                start(conn)
        for conn in readable:
            if conn in watched and not conn.recv(1):  # the client went away: its command goes too
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(watched.pop(conn), signal.SIGKILL)
        while client_of:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = client_of.pop(pid)
            if watched.pop(conn, None) is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
            conn.close()


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
