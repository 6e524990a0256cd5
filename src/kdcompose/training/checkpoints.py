"""Checkpoint folders of a run: `checkpoint-N` under the run's output folder, complete or absent.

Framework-neutral (transformers' Trainer, ms-swift and kdcompose's own resume use this layout).

A save is many files written one after the other (weights, optimizer, scheduler, RNG states,
trainer state, kdcompose's projectors and records, DeepSpeed's per-rank shards), so a run killed
while saving leaves a `checkpoint-N` folder that looks like the newest checkpoint and is not one.
kdcompose therefore writes a completion marker, `COMPLETE_MARKER`, as the very last file of a save,
once every file of every rank is on disk and flushed (`fsync_tree`), and counts a folder as a
checkpoint only when it has one (`is_complete`). The marker is a manifest (each file's size), so a
checkpoint damaged later (a partial copy, a deleted file) is not taken for complete either.

ms-swift writes every run into a new version folder (`output_dir/v<N>-<time>/`), so the checkpoints
of one config are spread over several run folders: `newest_complete_checkpoint(output_dir)` looks
across them.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
VERSION_PATTERN = re.compile(r"^v(\d+)-")
"""ms-swift's run folders under an `output_dir` (`add_version: true`, its default): `v<N>-<time>`."""
TRAINER_STATE = "trainer_state.json"
COMPLETE_MARKER = "kdcompose_complete.json"
"""Written last into a checkpoint folder, after every rank's files are on disk: the folder is complete."""
ALLOW_INCOMPLETE_ENV = "KDCOMPOSE_RESUME_INCOMPLETE"
"""Set to 1 to resume from a folder that is not marked complete (one saved without kdcompose's marker)."""


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


def checkpoint_max_steps(checkpoint: str | Path) -> int:
    """The run's total optimizer steps as the checkpoint recorded them (0: unknown)."""
    return int(_trainer_state(checkpoint).get("max_steps", 0) or 0)


# ---------------------------------------------------------------------- complete or absent


def _files(folder: Path) -> Iterator[Path]:
    """Every regular file under `folder` (recursively; DeepSpeed writes a `global_stepN/` subfolder)."""
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                yield path


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # a directory that cannot be opened (some platforms): nothing more can be done
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. a directory on a filesystem that does not support it
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> int:
    """Flush every file under `folder`, then the folders themselves (their entries), to disk.

    Run by one process per machine once every process of the run has finished writing the
    checkpoint: `fsync` flushes a file's pages whoever wrote them. Returns how many files."""
    root = Path(folder)
    count = 0
    for path in _files(root):
        _fsync_path(path)
        count += 1
    for current, _dirs, _names in os.walk(root, topdown=False):
        _fsync_path(Path(current), directory=True)
    return count


def write_completion_marker(folder: str | Path, global_step: int) -> Path:
    """Mark `folder` complete: a manifest of its files (relative path -> size) written atomically
    (temporary file, fsync, rename, fsync of the folder). Call last, after `fsync_tree`."""
    from kdcompose import __version__

    root = Path(folder)
    files = {
        path.relative_to(root).as_posix(): path.stat().st_size
        for path in _files(root)
        if path.name != COMPLETE_MARKER and not path.name.startswith(COMPLETE_MARKER)
    }
    record = {
        "kdcompose_version": __version__,
        "global_step": int(global_step),
        "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    target = root / COMPLETE_MARKER
    tmp = root / f"{COMPLETE_MARKER}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    _fsync_path(root, directory=True)
    return target


def remove_completion_marker(folder: str | Path) -> bool:
    """Unmark `folder` before it is written again (a run re-saving a step into the same folder)."""
    try:
        (Path(folder) / COMPLETE_MARKER).unlink()
    except FileNotFoundError:
        return False
    return True


def incomplete_reason(folder: str | Path) -> str | None:
    """Why `folder` is not a complete checkpoint (None: it is one)."""
    root = Path(folder)
    if not root.is_dir():
        return "it does not exist" if not root.exists() else "it is not a folder"
    try:
        record = json.loads((root / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return (
            f"it has no completion marker ({COMPLETE_MARKER}): the run stopped while writing it, "
            "or it was written without kdcompose"
        )
    except (OSError, ValueError):
        return f"its completion marker ({COMPLETE_MARKER}) is unreadable"
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):
        return f"its completion marker ({COMPLETE_MARKER}) has no file list"
    for name, size in sorted(files.items()):
        path = root / name
        if not path.is_file():
            return f"{name} is missing (listed in {COMPLETE_MARKER})"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {COMPLETE_MARKER} recorded {size}"
    return None


def is_complete(folder: str | Path) -> bool:
    """Whether `folder` is a checkpoint an exact resume can use: marked complete, nothing missing."""
    return incomplete_reason(folder) is None


def last_complete_checkpoint(run_dir: str | Path | None) -> str | None:
    """The newest complete `checkpoint-N` folder directly under `run_dir`, or None."""
    for folder in reversed(checkpoint_dirs(run_dir)):
        if is_complete(folder):
            return str(folder)
    return None


def run_dirs(output_dir: str | Path | None) -> list[Path]:
    """The folders of `output_dir` that hold a run's checkpoints, oldest first: `output_dir` itself
    (a run with `add_version: false`), then ms-swift's `v<N>-<time>` folders by N."""
    if not output_dir:
        return []
    root = Path(output_dir)
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    versions = [
        (int(m.group(1)), p.name, p) for p in entries if p.is_dir() and (m := VERSION_PATTERN.match(p.name))
    ]
    return [root, *(path for *_, path in sorted(versions))]


def all_checkpoints(output_dir: str | Path | None) -> list[Path]:
    """Every `checkpoint-N` folder of every run under `output_dir`, oldest first (run, then N)."""
    return [folder for run in run_dirs(output_dir) for folder in checkpoint_dirs(run)]


def newest_complete_checkpoint(output_dir: str | Path | None) -> str | None:
    """The checkpoint `kdcompose train CONFIG --resume` continues from: the newest complete one of the
    newest run under `output_dir` that has one (runs in ms-swift's version order, then by step)."""
    for folder in reversed(all_checkpoints(output_dir)):
        if is_complete(folder):
            return str(folder)
    return None


def output_root(checkpoint: str | Path) -> Path:
    """The `output_dir` a checkpoint folder belongs to (above ms-swift's `v<N>-<time>` run folder)."""
    run = Path(checkpoint).parent
    return run.parent if VERSION_PATTERN.match(run.name) else run


def require_complete(
    checkpoint: str | Path, path: str = "resume_from_checkpoint", source: str | None = None
) -> None:
    """Refuse to resume from `checkpoint` unless it is complete: a `ConfigError` at `path` naming it,
    why, and the newest complete checkpoint of the same `output_dir` (`KDCOMPOSE_RESUME_INCOMPLETE=1`:
    allowed)."""
    from kdcompose.errors import ConfigError

    reason = incomplete_reason(checkpoint)
    if reason is None or os.environ.get(ALLOW_INCOMPLETE_ENV, "").strip().lower() in ("1", "true", "yes"):
        return
    root = output_root(checkpoint)
    newest = newest_complete_checkpoint(root)
    instead = (
        f"the newest complete checkpoint under {root} is {newest} (`kdcompose train CONFIG --resume` "
        "finds it)"
        if newest
        else f"there is no complete checkpoint under {root}"
    )
    raise ConfigError.single(
        path,
        f"{checkpoint} is not a complete checkpoint: {reason}. Resuming from it would not continue the run "
        f"exactly (or would fail); {instead}. Set {ALLOW_INCOMPLETE_ENV}=1 to resume from it anyway (a "
        "checkpoint saved before kdcompose marked checkpoints complete)",
        source=source,
    )


def incomplete_checkpoints(output_dir: str | Path | None) -> list[str]:
    """The `checkpoint-N` folders under `output_dir` that are not complete (for messages)."""
    return [str(folder) for folder in all_checkpoints(output_dir) if not is_complete(folder)]


__all__ = [
    "ALLOW_INCOMPLETE_ENV",
    "CHECKPOINT_PATTERN",
    "COMPLETE_MARKER",
    "VERSION_PATTERN",
    "all_checkpoints",
    "checkpoint_dirs",
    "checkpoint_epoch",
    "checkpoint_global_step",
    "checkpoint_max_steps",
    "fsync_tree",
    "incomplete_checkpoints",
    "incomplete_reason",
    "is_complete",
    "last_checkpoint",
    "last_complete_checkpoint",
    "newest_complete_checkpoint",
    "output_root",
    "remove_completion_marker",
    "require_complete",
    "run_dirs",
    "write_completion_marker",
]
