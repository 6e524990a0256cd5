"""Run `kdcompose train` on several processes under torchrun, passing stop signals on.

`kdcompose train` with `NPROC_PER_NODE` / `NNODES` re-launches itself under
`torch.distributed.run`. This module runs that launcher and stays in charge of its signals:

* torchrun and its workers run in a process group of their own; SIGTERM, SIGINT and SIGHUP sent to
  `kdcompose train` are passed on to that whole group (once; copies within
  `training.preemption.REPEAT_AFTER_S` are one event). The workers save on the first SIGTERM and
  never act on a repeat themselves (torchrun passes each signal on again, late on a loaded
  machine); a second SIGTERM or Ctrl-C to `kdcompose train` ends every process of the group at once
  (SIGKILL): "stop now" reaches every rank, even one blocked in a collective.
* torchrun kills its workers 30 s after it passes a signal on (`--shutdown_timeout`); the command
  asks for the grace period plus a margin instead, so a save on SIGTERM is not cut short.
* torchrun does not pass its workers' exit statuses on, so rank 0 reports a stop-signal save in a
  file (`training.preemption.REPORT_ENV`); the launcher exits with 75 when that save completed
  (waiting for it if torchrun itself ended first), 143 / 130 for a stop without one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from kdcompose.training import preemption

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SHUTDOWN_MARGIN_S = 60
"""torchrun's `--shutdown_timeout` is the grace period plus this (room for the save to finish)."""
NO_GRACE_SHUTDOWN_S = 24 * 3600
"""torchrun's `--shutdown_timeout` when the grace period is 0 (no limit)."""


def shutdown_timeout_s(grace_s: float) -> int:
    return int(grace_s + SHUTDOWN_MARGIN_S) if grace_s > 0 else NO_GRACE_SHUTDOWN_S


def run_torchrun(command: list[str], stderr: TextIO, interrupted_message: str) -> int:
    """Run `command` (torchrun), passing stop signals on; its exit status, 75 after a stop-signal save."""
    grace_s = preemption.grace_seconds()
    folder = Path(tempfile.mkdtemp(prefix="kdcompose-stop-"))
    report = folder / "report.json"
    env = {**os.environ, preemption.REPORT_ENV: str(report)}
    group: dict[str, Any] = (
        {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    )
    received: list[signal.Signals] = []
    first: dict[signal.Signals, float] = {}
    killed: list[bool] = []
    process = subprocess.Popen(command, env=env, **group)

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)

    def forward(signum: int, frame: Any) -> None:
        sig, now = signal.Signals(signum), time.monotonic()
        received.append(sig)
        if sig not in first:
            first[sig] = now
            send(sig)
        elif sig != signal.SIGHUP and now - first[sig] >= preemption.REPEAT_AFTER_S:
            print(
                f"kdcompose train: second {sig.name}: stopping every process at once", file=stderr, flush=True
            )
            killed.append(True)
            send(signal.SIGKILL)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        code = process.wait()
        waited = (received or report.exists()) and not killed
        outcome = _wait_for_save(report, grace_s, process.pid) if waited else preemption.read_report(report)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(folder, ignore_errors=True)
    if outcome.get("state") == "saved":
        print(
            f"kdcompose train: stopped on {_name(received)} after step {outcome.get('step')}; "
            f"complete checkpoint: {outcome.get('checkpoint')}. "
            "Continue with `kdcompose train CONFIG --resume`.",
            file=stderr,
            flush=True,
        )
        return preemption.EXIT_PREEMPTED
    if signal.SIGINT in received and signal.SIGTERM not in received:
        print(interrupted_message, file=stderr, flush=True)
        return preemption.EXIT_SIGINT
    if received:
        print(
            f"kdcompose train: stopped on {_name(received)} without a new checkpoint", file=stderr, flush=True
        )
        return preemption.EXIT_SIGTERM
    return code


def _wait_for_save(report: Path, grace_s: float, group: int) -> dict[str, object]:
    """The final report: torchrun may end before rank 0 does (a repeated signal ends torchrun's own
    shutdown early), so a save still `saving` is waited for while any process of the group lives,
    up to the grace period."""
    deadline = time.monotonic() + (grace_s if grace_s > 0 else SHUTDOWN_MARGIN_S)
    outcome = preemption.read_report(report)
    while outcome.get("state") == "saving" and time.monotonic() < deadline and _alive(group):
        time.sleep(0.5)
        outcome = preemption.read_report(report)
    return preemption.read_report(report)


def _alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _name(received: list[signal.Signals]) -> str:
    return received[0].name if received else "a stop signal"


__all__ = ["FORWARDED", "run_torchrun", "shutdown_timeout_s"]
