"""What a run leaves next to its checkpoints so that a resumed run continues the same run.

* `kdcompose_composition.yaml` in the run folder (next to ms-swift's `args.json` and the
  `checkpoint-*` folders): the resolved composition as an explicit `rlhf.loss_terms` block
  plus the printed formula. `args.json` already carries `kdcompose_loss_terms` when the run
  came from `kdcompose train` or the plugin; this file is written by the trainer itself, so
  every route (Python included) has it, and it is readable without ms-swift.
* `kdcompose_state.json` in every checkpoint folder: the counters that are not a function of
  the step (today `nonfinite_skipped_steps`).

Everything else a resumed run needs is already a function of the restored `global_step`:
the schedules are pure functions of the step, the composition is rebuilt from the config,
and the metric windows start empty exactly like the trainer's own `loss` accumulator.
Resuming with a different composition is refused at train start
(`check_resume_composition`, naming what changed) unless `KDCOMPOSE_RESUME_ALLOW_CHANGES=1`; then
it is logged as a warning that names what changed. `integrations.swift.resume` also restores what stock
ms-swift does not (full fine-tuned weights, per-epoch data order, the GKD micro-batch counter).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kdcompose.composer import LossComposer
from kdcompose.composition import loss_terms_block
from kdcompose.errors import ConfigError

ALLOW_CHANGES_ENV = "KDCOMPOSE_RESUME_ALLOW_CHANGES"
"""Set to 1 to resume from a checkpoint whose recorded loss composition differs from the config."""
COMPOSITION_FILE = "kdcompose_composition.yaml"
STATE_FILE = "kdcompose_state.json"


def loss_terms_of(composer: LossComposer) -> dict[str, dict[str, Any]]:
    """Every term (active or not) as an explicit `loss_terms` block, as `Composition.to_loss_terms`."""
    return loss_terms_block((term.name, term.type_name, term.spec) for term in composer.terms)


def composition_record(composer: LossComposer) -> dict[str, Any]:
    from kdcompose import __version__

    return {
        "kdcompose_version": __version__,
        "formula": composer.formula(),
        "rlhf": {"loss_terms": loss_terms_of(composer)},
    }


def write_composition(run_dir: str | Path, composer: LossComposer) -> Path:
    """Write `kdcompose_composition.yaml` into `run_dir` (created if needed); returns its path."""
    path = Path(run_dir) / COMPOSITION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# The loss composition this run trained with (written by kdcompose at train start).\n"
    body = yaml.safe_dump(composition_record(composer), sort_keys=False)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(header + body, encoding="utf-8")
    tmp.replace(path)
    return path


def read_loss_terms(run_dir: str | Path) -> dict[str, Any] | None:
    """The `loss_terms` a run folder recorded, or None when it has no readable record."""
    path = Path(run_dir) / COMPOSITION_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    terms = (data or {}).get("rlhf", {}).get("loss_terms") if isinstance(data, Mapping) else None
    return dict(terms) if isinstance(terms, Mapping) else None


def composition_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two `loss_terms` blocks (empty: the same)."""
    changes = [f"term {name!r} removed" for name in sorted(set(saved) - set(current))]
    changes += [f"term {name!r} added" for name in sorted(set(current) - set(saved))]
    for name in sorted(set(saved) & set(current)):
        before, after = saved[name] or {}, current[name] or {}
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                changes.append(f"{name}.{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return changes


def resume_changes(checkpoint: str | Path, composer: LossComposer) -> list[str] | None:
    """What differs from the composition of the run `checkpoint` belongs to (None: no record)."""
    saved = read_loss_terms(Path(checkpoint).parent)
    if saved is None:
        return None
    return composition_changes(saved, loss_terms_of(composer))


def write_checkpoint_state(checkpoint_dir: str | Path, state: Mapping[str, Any]) -> Path | None:
    """Write `kdcompose_state.json` into an existing checkpoint folder (None if it is not there)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None
    path = folder / STATE_FILE
    path.write_text(json.dumps(dict(state), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_checkpoint_state(checkpoint_dir: str | Path | None) -> dict[str, Any]:
    """The state a checkpoint recorded ({} when none: a checkpoint from before kdcompose wrote it)."""
    if not checkpoint_dir:
        return {}
    try:
        data = json.loads((Path(checkpoint_dir) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_resume_composition(checkpoint: str | Path, composer: LossComposer) -> list[str]:
    """What differs from the checkpoint's recorded composition (`resume_changes`).

    Raises a `ConfigError` at `rlhf.loss_terms` naming every difference, unless
    `KDCOMPOSE_RESUME_ALLOW_CHANGES=1` allows it (the loop then logs the differences as a warning).
    """
    changes = resume_changes(checkpoint, composer) or []
    allowed = os.environ.get(ALLOW_CHANGES_ENV, "").strip().lower() in ("1", "true", "yes")
    if changes and not allowed:
        raise ConfigError.single(
            "rlhf.loss_terms",
            f"differs from the composition the checkpoint's run recorded ({COMPOSITION_FILE}): "
            f"{'; '.join(changes)}. Resume with the recorded composition, or set {ALLOW_CHANGES_ENV}=1 to "
            "continue with this one on purpose",
            source=f"(resume_from_checkpoint: {checkpoint})",
        )
    return changes


__all__ = [
    "ALLOW_CHANGES_ENV",
    "COMPOSITION_FILE",
    "STATE_FILE",
    "check_resume_composition",
    "composition_changes",
    "composition_record",
    "loss_terms_of",
    "read_checkpoint_state",
    "read_loss_terms",
    "resume_changes",
    "write_checkpoint_state",
    "write_composition",
]
