"""`python` for the processes the tests' forked commands start (`forked_cli`): a stand-in that
asks the forked-command server for the process instead of importing torch, transformers and
ms-swift again.

`forked_cli` copies this file into a folder of its own as `python` (first line: this interpreter,
`-S`, so the stand-in itself starts in milliseconds) and makes it `sys.executable` of every command
it forks. So what a command starts with `sys.executable` -- `kdcompose train`'s torchrun launcher,
torchrun's ranks, the demo's training runs, teacher-cache workers, a teacher server -- comes here.

Here the request goes to the server named by `KDCOMPOSE_TEST_FORK_SOCKET`, with this process's
arguments, environment, working directory and standard streams. The server forks the process
when it can run it as a fresh interpreter would (`forked_cli._forkable`): then this process
stands in for it -- it passes every stop signal it receives on, and ends as the forked process
ends (the same exit status, or killed by the same signal); if this process is killed, the server
kills the forked one. Anything else (an interpreter flag other than `-u`, an environment that
changes what is read at import, no server to ask) runs in the real interpreter, which replaces
this process.

Only the standard library, as it runs without `site`: `forked_cli` imports its `SOCKET_ENV`.
"""

import contextlib
import json
import os
import signal
import socket
import sys

SOCKET_ENV = "KDCOMPOSE_TEST_FORK_SOCKET"
"""Where the stand-in finds the server (set in every forked command's environment)."""
PASSED_ON = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _read_line(conn: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("the forked-command server closed the connection")
        data += chunk
    return json.loads(data)


def _forked(argv: list[str]) -> tuple[socket.socket, int] | None:
    """The connection and pid of the forked process, or None when the server is not there or runs
    nothing like this."""
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    request = {"python": argv, "env": dict(os.environ), "cwd": os.getcwd()}
    try:
        conn.connect(path)
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
    except OSError:  # no server there (any more), or a standard stream closed: the real interpreter
        conn.close()
        return None
    answer = _read_line(conn)
    return (conn, answer["pid"]) if "pid" in answer else None


def _stand_in(conn: socket.socket, pid: int) -> None:
    def pass_on(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for sig in PASSED_ON:
        signal.signal(sig, pass_on)
    code = _read_line(conn)["exit"]
    if code < 0:  # killed by a signal: this process ends the same way
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code)


def main() -> None:
    argv = sys.argv[1:]
    forked = _forked(argv)
    if forked is not None:
        _stand_in(*forked)
    os.execv(sys.executable, [sys.executable, *argv])


if __name__ == "__main__":
    main()
