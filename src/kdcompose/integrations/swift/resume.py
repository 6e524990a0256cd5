"""Exact resume of a ms-swift GKD run: the resumed run continues as the uninterrupted run would.

Stock ms-swift 4.6 / transformers 5.19 get three things wrong on resume; each fix is an upstream
workaround in `kdcompose.compat` (measured on the tiny models, tests/swift/test_resume*.py):
the fully fine-tuned student is not restored (`compat.transformers_checkpoint_keys`), a later
epoch replays epoch 0's data order (`compat.trl_repeat_sampler`), and GKD's micro-batch counter
restarts inside a generation batch (`compat.swift_gkd_step`). This module applies them from the
trainer's `train()` / `_load_from_checkpoint`, refuses a checkpoint that is not marked complete
(`training.checkpoints.require_complete`) or whose recorded composition differs
(`training.records.check_resume_composition`), and says at train start, as a warning naming the
cause, what a checkpoint cannot give back instead of diverging silently: a checkpoint saved with
`save_only_model: true` (no optimizer, scheduler or RNG state: the ~5e-4 "LoRA drift"),
`resume_only_model` / `ignore_data_skip`, a checkpoint inside a logging window, and on-policy
batches generated before the checkpoint inside a generation batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swift.utils import get_logger

from kdcompose.compat.swift_gkd_step import restore_micro_batch_counter
from kdcompose.compat.transformers_checkpoint_keys import load_full_weights
from kdcompose.compat.trl_repeat_sampler import replay_epochs
from kdcompose.training.checkpoints import checkpoint_epoch, checkpoint_global_step, require_complete
from kdcompose.training.loop import resume_checkpoint
from kdcompose.training.records import check_resume_composition

RESTORED_FILES = {
    "optimizer.pt": "optimizer state (AdamW moments start from zero)",
    "scheduler.pt": "LR scheduler state",
}


@dataclass
class ResumePlan:
    """What `begin_train` found about the checkpoint a run resumes from (kept on the trainer)."""

    checkpoint: str
    global_step: int
    epoch: int = 0
    """The dataloader epoch the resumed run starts in (`checkpoint_epoch`)."""
    not_exact: list[str] = field(default_factory=list)
    """Why the resumed steps will not equal the uninterrupted run's (each logged as a warning)."""
    composition_changes: list[str] = field(default_factory=list)
    weights_loaded: int = 0
    """Student tensors `load_full_weights` restored (0: adapters, or stock loading)."""


def not_exact_reasons(trainer: Any, checkpoint: str | Path, global_step: int) -> list[str]:
    """Why the resumed steps will not equal the uninterrupted run's (empty: exact)."""
    folder, args = Path(checkpoint), trainer.args
    reasons: list[str] = []
    missing = [f"{name} ({what})" for name, what in RESTORED_FILES.items() if not (folder / name).is_file()]
    if not trainer.is_deepspeed_enabled and missing and not getattr(args, "resume_only_model", False):
        reasons.append(
            f"the checkpoint has no {', '.join(missing)}: it was saved with save_only_model: true; "
            "set save_only_model: false to make checkpoints that resume exactly"
        )
    world = int(getattr(args, "world_size", 1) or 1)
    rng = folder / (f"rng_state_{args.process_index}.pth" if world > 1 else "rng_state.pth")
    if not rng.is_file() and not getattr(args, "resume_only_model", False):
        reasons.append(f"the checkpoint has no {rng.name}: random states (dropout, sampling) start fresh")
    if getattr(args, "resume_only_model", False):
        reasons.append("resume_only_model: true restores only the weights (no optimizer, scheduler, RNG)")
    if getattr(args, "ignore_data_skip", False):
        reasons.append("ignore_data_skip: true restarts the epoch's data instead of skipping trained batches")
    logging_steps = getattr(args, "logging_steps", 1)
    if isinstance(logging_steps, int) and logging_steps > 1 and global_step % logging_steps:
        reasons.append(
            f"the checkpoint (step {global_step}) falls inside a logging window of {logging_steps} steps: "
            "the first logged row after resuming averages fewer steps (make save_steps a multiple of "
            "logging_steps)"
        )
    per_generation = int(getattr(args, "steps_per_generation", 0) or 0)
    accumulation = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    lmbda = float(getattr(trainer, "lmbda", 0.0) or 0.0)
    if per_generation and (global_step * accumulation) % per_generation and lmbda > 0:
        reasons.append(
            f"the checkpoint falls inside a generation batch (steps_per_generation {per_generation}) of an "
            "on-policy run: the rest of that batch is generated again by the restored student"
        )
    return reasons


def begin_train(trainer: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> ResumePlan | None:
    """Called by the trainer's `train()` before the loop starts: refuse, warn, restore counters.

    Installs the epoch-replaying sampler for every run (fresh runs keep stock order). For a
    resume, refuses a changed composition (unless overridden), warns once for each reason the
    resume cannot be exact, and restores the GKD micro-batch counter. Returns the plan (also kept
    as `trainer.kd_resume_plan`), or None for a fresh run.
    """
    replay_epochs(trainer, lambda: getattr(getattr(trainer, "kd_resume_plan", None), "epoch", None))
    trainer.kd_resume_plan = None
    checkpoint = resume_checkpoint(trainer, args, kwargs)
    if not checkpoint:
        return None
    require_complete(checkpoint, source="trainer.train")  # complete or absent: never half a save
    global_step = checkpoint_global_step(checkpoint)
    plan = ResumePlan(checkpoint=checkpoint, global_step=global_step, epoch=checkpoint_epoch(checkpoint))
    plan.composition_changes = check_resume_composition(checkpoint, trainer.kd_composer)
    plan.not_exact = not_exact_reasons(trainer, checkpoint, global_step)
    restore_micro_batch_counter(trainer, global_step)
    if trainer.accelerator.is_main_process:
        for reason in plan.not_exact:
            get_logger().warning(f"kdcompose: resuming from {checkpoint} will not be exact: {reason}")
    trainer.kd_resume_plan = plan
    return plan


def load_checkpoint_weights(trainer: Any, checkpoint: str, model: Any = None) -> bool:
    """The trainer's `_load_from_checkpoint`: True when the full student weights were restored here
    (the caller must then skip the stock loader), False when the stock loader should run."""
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        return False
    target = model if model is not None else trainer.model
    target = trainer.accelerator.unwrap_model(target) if hasattr(trainer, "accelerator") else target
    loaded = load_full_weights(target, checkpoint)
    if loaded is None:
        return False
    plan = getattr(trainer, "kd_resume_plan", None)
    if plan is not None:
        plan.weights_loaded = loaded
    return True


__all__ = ["ResumePlan", "begin_train", "load_checkpoint_weights", "not_exact_reasons"]
