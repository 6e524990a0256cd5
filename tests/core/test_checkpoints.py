"""Checkpoints complete or absent, where `--resume` starts, and what a stop signal does (pure parts).

Folders here are built by hand the way transformers / ms-swift / DeepSpeed lay them out; the real
saves, kills and signals during training are in tests/swift/test_preemption.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from kdcompose.errors import ConfigError
from kdcompose.integrations.swift.launch.resume_point import start_point
from kdcompose.training import checkpoints, preemption
from kdcompose.training.checkpoints import COMPLETE_MARKER


def _checkpoint(run: Path, step: int, *, complete: bool = True, max_steps: int = 10) -> Path:
    folder = run / f"checkpoint-{step}"
    (folder / f"global_step{step}").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"w" * (100 + step))
    (folder / "optimizer.pt").write_bytes(b"o" * 50)
    (folder / f"global_step{step}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"z" * 7)
    (folder / "trainer_state.json").write_text(f'{{"global_step": {step}, "max_steps": {max_steps}}}')
    if complete:
        checkpoints.write_completion_marker(folder, step)
    return folder


def test_a_marked_folder_is_complete_and_its_manifest_lists_every_file(tmp_path):
    folder = _checkpoint(tmp_path / "v0-20250101-000000", 3)
    assert checkpoints.is_complete(folder)
    import json

    record = json.loads((folder / COMPLETE_MARKER).read_text())
    assert record["global_step"] == 3
    assert set(record["files"]) == {
        "adapter_model.safetensors",
        "optimizer.pt",
        "trainer_state.json",
        "global_step3/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }
    assert record["files"]["optimizer.pt"] == 50
    assert not list(folder.glob("*.tmp")), "the marker is written through a temporary file, then renamed"


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda f: (f / COMPLETE_MARKER).unlink(), "no completion marker"),
        (lambda f: (f / "optimizer.pt").unlink(), "optimizer.pt is missing"),
        (lambda f: (f / "optimizer.pt").write_bytes(b"o" * 49), "optimizer.pt has 49 bytes"),
        (
            lambda f: (f / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(),
            "global_step3/zero_pp_rank_1_mp_rank_00_optim_states.pt is missing",
        ),
        (lambda f: (f / COMPLETE_MARKER).write_text("{not json"), "unreadable"),
    ],
    ids=["unmarked", "file-missing", "file-truncated", "shard-missing", "marker-garbled"],
)
def test_an_unmarked_or_damaged_folder_is_not_complete_and_says_why(tmp_path, damage, expected):
    folder = _checkpoint(tmp_path / "run", 3)
    damage(folder)
    assert not checkpoints.is_complete(folder)
    assert expected in checkpoints.incomplete_reason(folder)


def test_the_newest_complete_checkpoint_is_found_across_version_folders(tmp_path):
    out = tmp_path / "out"
    _checkpoint(out, 1)  # an earlier run with add_version: false (the oldest)
    _checkpoint(out / "v0-20250101-000000", 4)
    _checkpoint(out / "v2-20250103-000000", 2)
    _checkpoint(out / "v10-20250102-000000", 6)  # v10 is newer than v2, whatever its time says
    _checkpoint(out / "v10-20250102-000000", 7, complete=False)  # killed during this save
    (out / "v11-20250104-000000").mkdir()  # killed before its first save
    (out / "logs").mkdir()
    newest = checkpoints.newest_complete_checkpoint(out)
    assert newest == str(out / "v10-20250102-000000" / "checkpoint-6")
    assert checkpoints.incomplete_checkpoints(out) == [str(out / "v10-20250102-000000" / "checkpoint-7")]
    assert checkpoints.last_complete_checkpoint(out / "v10-20250102-000000") == newest
    assert checkpoints.newest_complete_checkpoint(tmp_path / "nothing-here") is None
    assert checkpoints.output_root(newest) == out
    assert checkpoints.remove_completion_marker(newest)
    assert checkpoints.newest_complete_checkpoint(out) == str(out / "v2-20250103-000000" / "checkpoint-2")


def test_an_incomplete_checkpoint_is_refused_naming_it_and_the_newest_complete_one(tmp_path, monkeypatch):
    out = tmp_path / "out"
    good = _checkpoint(out / "v0-20250101-000000", 2)
    bad = _checkpoint(out / "v1-20250102-000000", 3, complete=False)
    with pytest.raises(ConfigError) as info:
        checkpoints.require_complete(bad, path="training.resume_from_checkpoint")
    (issue,) = info.value.issues
    assert issue.path == "training.resume_from_checkpoint"
    assert str(bad) in issue.message and str(good) in issue.message
    assert "no completion marker" in issue.message and checkpoints.ALLOW_INCOMPLETE_ENV in issue.message
    checkpoints.require_complete(good)  # a complete one passes
    monkeypatch.setenv(checkpoints.ALLOW_INCOMPLETE_ENV, "1")
    checkpoints.require_complete(bad)  # the override: a checkpoint from before markers existed


def test_resume_starts_from_the_newest_complete_checkpoint_or_fresh_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    args = {"output_dir": str(out), "max_steps": 10}
    fresh = start_point(args, resume=True)
    assert fresh.checkpoint is None and not fresh.finished and "starting fresh" in fresh.message
    _checkpoint(out / "v0-20250101-000000", 4)
    _checkpoint(out / "v1-20250102-000000", 5, complete=False)
    start = start_point(args, resume=True)
    assert start.checkpoint == str(out / "v0-20250101-000000" / "checkpoint-4") and not start.finished
    assert "continuing from" in start.message and "(step 4)" in start.message
    assert start_point(args, resume=False).checkpoint is None  # no --resume: a fresh run
    _checkpoint(out / "v2-20250103-000000", 10)
    done = start_point(args, resume=True)
    assert done.finished and "nothing to train" in done.message
    assert not start_point({**args, "max_steps": 12}, resume=True).finished  # more steps asked for
    with pytest.raises(ConfigError) as info:  # an explicit incomplete checkpoint: refused by path
        killed = out / "v1-20250102-000000" / "checkpoint-5"
        start_point({**args, "resume_from_checkpoint": str(killed)}, resume=False)
    assert info.value.issues[0].path == "training.resume_from_checkpoint"
    with pytest.raises(ConfigError, match="finds the newest complete checkpoint itself"):
        start_point({**args, "resume_from_checkpoint": start.checkpoint}, resume=True)


def test_fsync_tree_flushes_every_file(tmp_path):
    folder = _checkpoint(tmp_path / "run", 1, complete=False)
    assert checkpoints.fsync_tree(folder) == 4


# ---------------------------------------------------------------------- stop signals


class _Exit(Exception):
    pass


class _Recorder:
    def __init__(self) -> None:
        self.now = 100.0
        self.exits: list[int] = []

    def clock(self) -> float:
        return self.now

    def exit_now(self, code: int) -> None:
        self.exits.append(code)


def _signals(rec: _Recorder, sigs=(signal.SIGTERM,), grace_s: float = 0, **kwargs) -> preemption.StopSignals:
    kwargs.setdefault("escalate", True)  # as `kdcompose train` in one process (not under its launcher)
    return preemption.StopSignals(sigs, grace_s, clock=rec.clock, exit_now=rec.exit_now, **kwargs)


def test_the_first_sigterm_requests_a_stop_and_a_repeat_exits_at_once():
    rec = _Recorder()
    stops = _signals(rec)
    stops.notify(signal.SIGTERM)
    assert stops.requested and stops.request.signal_name == "SIGTERM" and rec.exits == []
    rec.now += preemption.REPEAT_AFTER_S / 2
    stops.notify(signal.SIGTERM)  # the same event twice (scheduler + torchrun): still one request
    assert rec.exits == []
    rec.now += preemption.REPEAT_AFTER_S
    stops.notify(signal.SIGTERM)
    assert rec.exits == [preemption.EXIT_SIGTERM]


def test_under_kdcompose_s_launcher_a_repeat_is_left_to_the_launcher():
    """torchrun's forwarded copy may arrive late; the launcher escalates a real second signal."""
    rec = _Recorder()
    stops = _signals(rec, escalate=False)
    stops.notify(signal.SIGTERM)
    rec.now += preemption.REPEAT_AFTER_S + 10
    stops.notify(signal.SIGTERM)
    assert stops.requested and rec.exits == []


def test_the_grace_period_ends_the_process_with_the_status_of_what_was_saved():
    rec = _Recorder()
    stops = _signals(rec)
    stops.notify(signal.SIGTERM)
    stops.grace_over()
    assert rec.exits == [preemption.EXIT_SIGTERM]
    stops.mark_saved("/x/checkpoint-3")
    stops.grace_over()
    assert rec.exits == [preemption.EXIT_SIGTERM, preemption.EXIT_PREEMPTED]


def test_a_real_sigterm_reaches_the_watcher_even_while_the_main_thread_is_busy():
    """Delivered by the kernel while the main thread is inside a blocking call: the request is seen
    without the main thread running Python code, and the previous handler is back afterwards."""
    rec = _Recorder()
    stops = preemption.StopSignals((signal.SIGTERM,), 0.05, exit_now=rec.exit_now)
    before = signal.getsignal(signal.SIGTERM)
    with stops.installed():
        blocked = threading.Event()
        threading.Timer(0.05, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
        deadline = time.monotonic() + 30
        while not stops.requested and time.monotonic() < deadline:
            blocked.wait(0.05)  # a blocking wait in C; the watcher thread does the work
        assert stops.requested
        while not rec.exits and time.monotonic() < deadline:
            blocked.wait(0.05)
        assert rec.exits == [preemption.EXIT_SIGTERM], "the grace period (0.05 s) ended without a save"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_real_second_ctrl_c_raises_keyboard_interrupt_in_the_main_thread():
    """With KDCOMPOSE_SAVE_ON_SIGINT the first Ctrl-C is a stop request; a second one interrupts as
    Python's own handler would (the clock is the test's: no 2 s wait)."""
    rec = _Recorder()
    stops = _signals(rec, (signal.SIGTERM, signal.SIGINT), escalate=True)
    waiting = threading.Event()
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest itself runs in the background
    with stops.installed():
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 30
        while not stops.requested and time.monotonic() < deadline:
            waiting.wait(0.05)
        assert stops.requested and stops.request.signal_name == "SIGINT"
        rec.now += preemption.REPEAT_AFTER_S + 1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            while time.monotonic() < deadline:
                waiting.wait(0.05)
    assert signal.getsignal(signal.SIGINT) is before


def test_settings_come_from_the_environment():
    assert preemption.grace_seconds({}) == preemption.DEFAULT_GRACE_S
    assert preemption.grace_seconds({preemption.GRACE_ENV: "12.5"}) == 12.5
    for bad in ("-1", "soon", "nan"):
        with pytest.raises(ValueError, match=preemption.GRACE_ENV):
            preemption.grace_seconds({preemption.GRACE_ENV: bad})
    assert preemption.handled_signals({}) == (signal.SIGTERM,)
    assert preemption.handled_signals({preemption.SAVE_ON_SIGINT_ENV: "1"}) == (signal.SIGTERM, signal.SIGINT)
