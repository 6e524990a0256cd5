"""Stop signals during training: SIGTERM means "finish this optimizer step, save, exit".

Schedulers take machines away with a warning: SLURM preemption, spot-instance reclaims and
Kubernetes evictions send SIGTERM first and SIGKILL some seconds later. Python's default is to
die at once (exit 143) and lose every step since the last checkpoint, although there was time to
write one. `StopSignals` turns the first SIGTERM into a request the training loop reads at the
end of each optimizer step (for transformers' `Trainer` family:
`kdcompose.integrations.transformers.checkpointing.CheckpointCallback`, which makes every rank
agree, saves a complete checkpoint of the reached step and stops). Then the process exits with
`EXIT_PREEMPTED` (75, sysexits' EX_TEMPFAIL: "try again later"), so a job script can tell "saved,
resume me" from a failure.

What else can happen:

* A second SIGTERM (at least `REPEAT_AFTER_S` after the first) exits at once with 143, as without
  kdcompose. Signals that arrive together count once: a scheduler may signal every process of a
  job while torchrun also forwards the signal to its workers. Under `kdcompose train`'s own
  torchrun launcher the workers never treat a repeat as the second signal (a forwarded copy may
  arrive late on a loaded machine); the launcher does, and ends every worker at once
  (`training.torchrun_launcher`).
* The grace period (`KDCOMPOSE_SIGTERM_GRACE_S`, default `DEFAULT_GRACE_S`) runs out before the
  checkpoint is complete (a very slow save, a rank that hangs): exit at once with 143 (75 if the
  checkpoint was complete by then). Set it a little below the time your scheduler waits between
  SIGTERM and SIGKILL.
* SIGINT (Ctrl-C) keeps its usual meaning (KeyboardInterrupt, exit 130, no save) unless
  `KDCOMPOSE_SAVE_ON_SIGINT=1`: then the first Ctrl-C saves like SIGTERM and a second one
  interrupts as usual.

Why a watcher thread: Python runs signal handlers in the main thread between bytecodes, so a
main thread blocked in C (a collective waiting for a rank that died, a long kernel) would never
see the second SIGTERM. The C-level handler writes each signal number to a wakeup pipe
(`signal.set_wakeup_fd`) immediately, whatever the main thread is doing; a daemon thread reads it
and acts. The loop only ever reads `requested`, a plain attribute.

Framework-neutral: the standard library only (no torch, no transformers).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

EXIT_PREEMPTED = 75
"""Exit status of a run stopped by SIGTERM (or an opted-in Ctrl-C) after saving a complete
checkpoint of the step it reached: resume with `kdcompose train CONFIG --resume`."""
EXIT_SIGTERM = 128 + signal.SIGTERM
"""A run that ended on SIGTERM without a new checkpoint (second SIGTERM, grace period over, or the
signal came before training started): the shell's "killed by SIGTERM"."""
EXIT_SIGINT = 128 + signal.SIGINT
GRACE_ENV = "KDCOMPOSE_SIGTERM_GRACE_S"
DEFAULT_GRACE_S = 300.0
SAVE_ON_SIGINT_ENV = "KDCOMPOSE_SAVE_ON_SIGINT"
REPORT_ENV = "KDCOMPOSE_STOP_REPORT"
"""Set by `kdcompose train`'s torchrun launcher: the file where rank 0 reports a stop-signal save,
so the launcher can exit with `EXIT_PREEMPTED` (torchrun itself does not pass worker statuses on).
Its presence also tells a worker that the launcher handles a repeated signal."""
REPEAT_AFTER_S = 2.0
"""A repeated signal counts as "the second one" only this long after the first."""


class TrainingStopped(SystemExit):
    """Raised by the trainer's `train()` after a stop signal made it save and stop early. A
    `SystemExit` with code `EXIT_PREEMPTED`: a script (or `swift rlhf`) that does not catch it
    exits with 75 and no traceback."""

    def __init__(self, signal_name: str, step: int, checkpoint: str | None) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint

    def __str__(self) -> str:
        where = (
            f"saved a complete checkpoint of step {self.step}: {self.checkpoint}" if self.checkpoint else ""
        )
        return f"training stopped on {self.signal_name} at step {self.step}; {where}".rstrip("; ")


@dataclass(frozen=True)
class StopRequest:
    signal_name: str
    received_at: float
    """`time.monotonic()` when the first signal arrived."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def grace_seconds(environ: dict[str, str] | None = None) -> float:
    """The grace period from `KDCOMPOSE_SIGTERM_GRACE_S` (default `DEFAULT_GRACE_S`; 0: none).
    A value that is not a number >= 0 is a ValueError naming the variable."""
    text = (environ if environ is not None else os.environ).get(GRACE_ENV, "").strip()
    if not text:
        return DEFAULT_GRACE_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(
            f"{GRACE_ENV}={text!r}: give the grace period in seconds, a number >= 0 (0: no limit)"
        )
    return value


def handled_signals(environ: dict[str, str] | None = None) -> tuple[signal.Signals, ...]:
    """SIGTERM, plus SIGINT when `KDCOMPOSE_SAVE_ON_SIGINT=1`."""
    save_on_sigint = _truthy((environ if environ is not None else os.environ).get(SAVE_ON_SIGINT_ENV))
    return (signal.SIGTERM, signal.SIGINT) if save_on_sigint else (signal.SIGTERM,)


def _say(message: str) -> None:
    """Write to stderr without Python's buffered streams (safe from any thread, at any moment),
    naming the rank when there are several (a signal may reach only some of them)."""
    world = os.environ.get("WORLD_SIZE", "1")
    who = f"kdcompose [rank {os.environ.get('RANK', '0')}/{world}]" if world not in ("", "1") else "kdcompose"
    with contextlib.suppress(OSError):
        os.write(2, f"{who}: {message}\n".encode())


class StopSignals:
    """The stop request of this process (`requested`), fed by signals while installed."""

    def __init__(
        self,
        signals: tuple[signal.Signals, ...] | None = None,
        grace_s: float | None = None,
        *,
        escalate: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        exit_now: Callable[[int], None] = os._exit,
    ) -> None:
        self.signals = tuple(signals) if signals is not None else handled_signals()
        self.grace_s = grace_seconds() if grace_s is None else float(grace_s)
        self.escalate = (REPORT_ENV not in os.environ) if escalate is None else bool(escalate)
        """Whether a repeated signal stops this process at once (not under kdcompose's launcher)."""
        self._clock, self._exit_now = clock, exit_now
        self.request: StopRequest | None = None
        self.saved_checkpoint: str | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._previous_wakeup = -1
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None

    @property
    def requested(self) -> bool:
        return self.request is not None

    # ------------------------------------------------------------------ install / uninstall

    def install(self) -> bool:
        """Handle the signals from now on (main thread only; False elsewhere, nothing installed)."""
        if self._pipe is not None:
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._previous = {sig: signal.signal(sig, self._in_main_thread) for sig in self.signals}
        self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._pipe = (read_fd, write_fd)
        self._watcher = threading.Thread(target=self._watch, args=(read_fd,), name="kdcompose-stop-signals")
        self._watcher.daemon = True
        self._watcher.start()
        return True

    def uninstall(self) -> None:
        """Back to the handlers from before `install` (main thread); cancels the grace period."""
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        read_fd, write_fd = self._pipe
        self._pipe = None
        os.close(write_fd)  # the watcher reads EOF and ends
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        os.close(read_fd)
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        self.install()
        try:
            yield self
        finally:
            self.uninstall()

    def _in_main_thread(self, signum: int, frame: object) -> None:
        """The Python-level handler. The watcher thread does the work (it sees each signal at once);
        here only a second Ctrl-C becomes a KeyboardInterrupt, as without kdcompose (a KeyboardInterrupt
        can only be raised in the main thread)."""
        if signum == signal.SIGINT and self._is_repeat():
            raise KeyboardInterrupt

    def _is_repeat(self) -> bool:
        first = self.request
        return self.escalate and first is not None and self._clock() - first.received_at >= REPEAT_AFTER_S

    def _watch(self, read_fd: int) -> None:
        wanted = {int(sig) for sig in self.signals}
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:
                return
            for number in data:
                if number in wanted:
                    self.notify(signal.Signals(number))

    # ------------------------------------------------------------------ what a signal does

    def notify(self, sig: signal.Signals) -> None:
        """One signal arrived: the first requests a stop, a repeat exits (SIGINT: interrupts)."""
        now = self._clock()
        with self._lock:
            first = self.request
            if first is None:
                self.request = StopRequest(sig.name, now)
                if self.grace_s > 0:
                    self._timer = threading.Timer(self.grace_s, self.grace_over)
                    self._timer.daemon = True
                    self._timer.start()
        if first is None:
            limit = f"after {self.grace_s:g} s" if self.grace_s > 0 else "never by itself"
            _say(
                f"{sig.name} received: finishing the current optimizer step, then saving a checkpoint "
                f"and stopping (send it again to stop at once; the grace period ends {limit})"
            )
            return
        if not self.escalate or now - first.received_at < REPEAT_AFTER_S:
            return  # the same event reaching us twice (scheduler + torchrun), not a second request
        if sig == signal.SIGINT:
            _say("second Ctrl-C: interrupting without a checkpoint")
            return  # `_in_main_thread` raises the KeyboardInterrupt, as Python's own handler would
        _say(f"second {sig.name}: exiting at once ({EXIT_SIGTERM}) without a new checkpoint")
        self._exit_now(EXIT_SIGTERM)

    def grace_over(self) -> None:
        """The grace period ended: exit at once (75 when the checkpoint is already complete)."""
        if self.saved_checkpoint is not None:
            self._exit_now(EXIT_PREEMPTED)
            return
        name = self.request.signal_name if self.request else "SIGTERM"
        _say(f"the grace period ({GRACE_ENV}={self.grace_s:g} s) after {name} is over: exiting at once")
        self._exit_now(EXIT_SIGINT if name == "SIGINT" else EXIT_SIGTERM)

    def mark_saved(self, checkpoint: str) -> None:
        """The stop checkpoint is complete on disk."""
        self.saved_checkpoint = checkpoint


# ---------------------------------------------------------------------- launcher <-> rank 0


def write_report(state: str, **fields: object) -> Path | None:
    """Rank 0 tells `kdcompose train`'s launcher how a stop went (`saving`, then `saved`)."""
    target = os.environ.get(REPORT_ENV)
    if not target:
        return None
    path = Path(target)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"state": state, **fields}), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_report(path: str | Path) -> dict[str, object]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


__all__ = [
    "DEFAULT_GRACE_S",
    "EXIT_PREEMPTED",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "GRACE_ENV",
    "REPEAT_AFTER_S",
    "REPORT_ENV",
    "SAVE_ON_SIGINT_ENV",
    "StopRequest",
    "StopSignals",
    "TrainingStopped",
    "grace_seconds",
    "handled_signals",
    "read_report",
    "write_report",
]
