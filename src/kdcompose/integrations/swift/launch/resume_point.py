"""Where a run starts: `kdcompose train CONFIG --resume`, `resume_from_checkpoint`, `KDCOMPOSE_RESUME`.

Decided before any model loads, from the files alone (`training.checkpoints`):

* `--resume` (or `KDCOMPOSE_RESUME=1` on the `swift rlhf --external_plugins` route): the newest
  complete checkpoint of the config's `output_dir`, across ms-swift's version folders
  (`output_dir/v<N>-<time>/checkpoint-K`). None: start fresh, and say so. One whose run already
  reached the config's `max_steps`: nothing to train, and say so.
* `resume_from_checkpoint: PATH` (config, `--set` or `--resume_from_checkpoint`): used as given
  when complete; otherwise refused, naming it, why, and the newest complete checkpoint.

A changed composition is refused later, at train start, by `training.records.check_resume_composition`
(it needs the composer, not a model).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcompose.errors import ConfigError
from kdcompose.training import checkpoints

RESUME_ENV = "KDCOMPOSE_RESUME"
"""`swift rlhf ... --external_plugins PLUGIN` route: 1 does what `kdcompose train --resume` does."""
RESUME_KEY = "resume_from_checkpoint"


@dataclass(frozen=True)
class StartPoint:
    """What a run starts from: `checkpoint` (None: fresh), and whether the run is already done."""

    checkpoint: str | None = None
    finished: bool = False
    message: str | None = None
    """What to tell the user (None: nothing to say)."""


def resume_requested(environ: Any = None) -> bool:
    value = (environ if environ is not None else os.environ).get(RESUME_ENV, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def default_output_dir(model: Any) -> str:
    """ms-swift's `output_dir` when none is given: `output/<model name>` (relative to the working folder)."""
    from swift.model.model_meta import get_model_name

    return os.path.join("output", get_model_name(str(model)) or "")


def output_dir_of(swift_args: Mapping[str, Any]) -> Path:
    """The absolute `output_dir` ms-swift will version runs under (relative paths: the working folder)."""
    value = swift_args.get("output_dir")
    return Path(os.path.abspath(value or default_output_dir(swift_args.get("model"))))


def start_point(
    swift_args: Mapping[str, Any],
    *,
    resume: bool,
    path_of: str = f"training.{RESUME_KEY}",
    resume_flag: str = "--resume",
    source: str | None = None,
) -> StartPoint:
    """Where the run of `swift_args` (a config's flat ms-swift arguments) starts; ConfigError (at
    `path_of`) for an incomplete checkpoint, or for a checkpoint given together with `resume_flag`."""
    explicit = swift_args.get(RESUME_KEY)
    if explicit and resume:
        raise ConfigError.single(
            path_of,
            f"{resume_flag} finds the newest complete checkpoint itself: remove {RESUME_KEY}, or drop "
            f"{resume_flag} to resume from this one",
            source=source,
        )
    if explicit:
        checkpoint = os.path.abspath(str(explicit))
        checkpoints.require_complete(checkpoint, path=path_of, source=source)
        return StartPoint(checkpoint)
    if not resume:
        return StartPoint()
    output_dir = output_dir_of(swift_args)
    newest = checkpoints.newest_complete_checkpoint(output_dir)
    if newest is None:
        skipped = checkpoints.incomplete_checkpoints(output_dir)
        note = f" (not complete, so not used: {', '.join(skipped)})" if skipped else ""
        return StartPoint(
            message=f"{resume_flag}: no complete checkpoint under {output_dir}{note}; starting fresh"
        )
    step = checkpoints.checkpoint_global_step(newest)
    max_steps = _positive(swift_args.get("max_steps"))
    if max_steps is not None and step >= max_steps:
        return StartPoint(
            newest,
            finished=True,
            message=f"{resume_flag}: {newest} is step {step} of max_steps {max_steps}: the run is finished, "
            "nothing to train",
        )
    return StartPoint(newest, message=f"{resume_flag}: continuing from {newest} (step {step})")


PLUGIN_SOURCE = "swift rlhf command line"


def apply_to_arguments(arguments: Any) -> StartPoint:
    """The plugin route: the same decision on ms-swift's half-built `RLHFArguments` (before any model
    loads), with `KDCOMPOSE_RESUME=1` in place of `--resume`; sets `resume_from_checkpoint`."""
    keys = (RESUME_KEY, "output_dir", "model", "max_steps")
    values = {key: getattr(arguments, key, None) for key in keys}
    resume = resume_requested()
    if resume and getattr(arguments, "resume_only_model", False):
        raise ConfigError.single(
            "--resume_only_model",
            f"{RESUME_ENV}=1 cannot choose the checkpoint of a model-only resume (ms-swift loads it before "
            "kdcompose runs): give --resume_from_checkpoint PATH instead",
            source=PLUGIN_SOURCE,
        )
    start = start_point(
        values, resume=resume, path_of=f"--{RESUME_KEY}", resume_flag=f"{RESUME_ENV}=1", source=PLUGIN_SOURCE
    )
    if resume and start.checkpoint:
        setattr(arguments, RESUME_KEY, start.checkpoint)
    return start


def _positive(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


__all__ = [
    "PLUGIN_SOURCE",
    "RESUME_ENV",
    "RESUME_KEY",
    "StartPoint",
    "apply_to_arguments",
    "default_output_dir",
    "output_dir_of",
    "resume_requested",
    "start_point",
]
