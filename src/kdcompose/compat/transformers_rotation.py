"""Delete old checkpoints (`save_total_limit`) only after the new one is marked complete.

Upstream behaviour worked around (transformers 5.19): `Trainer._save_checkpoint` rotates the
checkpoints -- `transformers.trainer_utils.rotate_checkpoints`, called through the name
`transformers.trainer.rotate_checkpoints` -- at the end of the save, before any callback's
`on_save` runs, and kdcompose can only mark the new checkpoint complete in `on_save`, after every
rank's files are flushed. With `save_total_limit: 1` a run killed between the two would already
have deleted its only complete checkpoint and kept one without a marker.

How: while a run folder is registered (`postpone(run_dir)`, by kdcompose's checkpoint callback at
train start), a rotation of that folder is recorded instead of run; `run_postponed(run_dir)` runs
it right after the marker is written. Other folders, and every other trainer in the process, rotate
as before. If transformers no longer calls the function through that name, nothing is wrapped and
`postpone` returns False (the callback then says that a kill in that window may leave no complete
checkpoint when `save_total_limit` is 1).

Remove when: transformers rotates after `on_save`, or lets a callback veto the deletion
(`tests/core/test_checkpoints.py` checks the call site this relies on).
"""

from __future__ import annotations

import os
import threading
from typing import Any

_lock = threading.Lock()
_postponed: dict[str, dict[str, Any] | None] = {}
"""Registered run folders -> the recorded rotation call (None: none pending)."""
_original: Any = None


def _key(path: Any) -> str:
    return os.path.realpath(os.fspath(path))


def _rotate(output_dir: str, *args: Any, **kwargs: Any) -> None:
    key = _key(output_dir)
    with _lock:
        if key in _postponed:
            _postponed[key] = {"output_dir": output_dir, "args": args, "kwargs": kwargs}
            return
    _original(output_dir, *args, **kwargs)


def install() -> bool:
    """Wrap transformers' rotation call site (idempotent); False when it is not where expected."""
    global _original
    try:
        import transformers.trainer as trainer_module
    except ImportError:
        return False
    current = getattr(trainer_module, "rotate_checkpoints", None)
    if current is None:
        return False
    if current is not _rotate:
        _original = current
        trainer_module.rotate_checkpoints = _rotate
    return True


def postpone(run_dir: str | os.PathLike[str]) -> bool:
    """From now on, rotating `run_dir` waits for `run_postponed` (False: cannot be postponed here)."""
    if not install():
        return False
    with _lock:
        _postponed.setdefault(_key(run_dir), None)
    return True


def run_postponed(run_dir: str | os.PathLike[str]) -> bool:
    """Run the rotation recorded for `run_dir`, if any; True when one ran."""
    with _lock:
        call = _postponed.get(_key(run_dir))
        if call is None:
            return False
        _postponed[_key(run_dir)] = None
    _original(call["output_dir"], *call["args"], **call["kwargs"])
    return True


def release(run_dir: str | os.PathLike[str]) -> None:
    """Stop postponing for `run_dir` (at train end); a rotation still pending is dropped, as a run
    that ends without marking its last save complete must keep what it has."""
    with _lock:
        _postponed.pop(_key(run_dir), None)


__all__ = ["install", "postpone", "release", "run_postponed"]
