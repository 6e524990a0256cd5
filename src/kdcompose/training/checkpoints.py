"""Checkpoint folders of a run: `checkpoint-N` under the run's output folder.

Framework-neutral (transformers' Trainer, ms-swift and kdcompose's own resume use this layout).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def checkpoint_dirs(output_dir: str | Path | None) -> list[Path]:
    """The `checkpoint-N` folders directly under `output_dir`, oldest (smallest N) first."""
    if not output_dir:
        return []
    folder = Path(output_dir)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    found = [(int(m.group(1)), p) for p in entries if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for _, path in sorted(found)]


def last_checkpoint(output_dir: str | Path | None) -> str | None:
    """The newest `checkpoint-N` folder under `output_dir`, or None."""
    folders = checkpoint_dirs(output_dir)
    return str(folders[-1]) if folders else None


def _trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    try:
        state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def checkpoint_global_step(checkpoint: str | Path) -> int:
    return int(_trainer_state(checkpoint).get("global_step", 0) or 0)


def checkpoint_epoch(checkpoint: str | Path) -> int:
    """The index of the dataloader epoch the run resumes in: the floor of the checkpoint's
    fractional `epoch` (`e + trained/steps_in_epoch`, exactly `e + 1` at an epoch's end)."""
    return math.floor(float(_trainer_state(checkpoint).get("epoch", 0) or 0) + 1e-6)


__all__ = [
    "CHECKPOINT_PATTERN",
    "checkpoint_dirs",
    "checkpoint_epoch",
    "checkpoint_global_step",
    "last_checkpoint",
]
