"""Start and stop ``kdcompose serve-teacher`` as a child process (tests, benchmarks, CI scripts).

A real process on 127.0.0.1: the same command a user types, so what is tested is what ships.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ServerProcess", "free_port"]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``with ServerProcess(model=..., model_type=...) as server: server.url`` — started, ready, stopped.

    ``start()`` returns once ``GET /health`` answers 200 (``ready_timeout_s``), and records the
    statuses it saw meanwhile (``health_statuses``: 503 while the teacher loads). The server's
    output goes to ``log_path``; it is quoted in the error when the server dies or never gets ready.
    """

    def __init__(
        self,
        *,
        model: str,
        model_type: str,
        template: str | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 240.0,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "kdcompose.cli", "serve-teacher", "--model", model]
        self.args += ["--model-type", model_type, "--port", str(self.port), *extra_args]
        if template:
            self.args += ["--template", template]
        self.env = dict(env if env is not None else os.environ)
        self.ready_timeout_s = ready_timeout_s
        self.proc: Any = None  # subprocess.Popen, or what a subclass's `_launch` returns
        self.health_statuses: list[int] = []
        self.log_path = Path(tempfile.mkstemp(prefix="kdcompose-teacher-server-", suffix=".log")[1])

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def start(self) -> ServerProcess:
        import requests

        self.proc = self._launch()
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"teacher server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status = requests.get(f"{self.url}/health", timeout=2).status_code
                self.health_statuses.append(status)
                if status == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"teacher server not ready after {self.ready_timeout_s:g} s:\n{self.log_tail()}")

    def _launch(self) -> subprocess.Popen:
        """Start `self.args` with `self.env`, output to `log_path`. A subclass may start the same
        command another way (the test suite forks it from a process that imported ms-swift once);
        what it returns needs `pid`, `returncode`, `poll`, `wait`, `kill` and `terminate`."""
        with open(self.log_path, "wb") as log:
            return subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def pause(self) -> None:
        """SIGSTOP: the socket still accepts connections but nothing answers (a stalled server)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile: nothing to resume
            os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as a crashed node would go."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.resume()  # a paused process cannot handle SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)
