"""Skip one DeepSpeed optimizer step the way DeepSpeed skips an fp16 overflow step.

Why this exists: under DeepSpeed, accelerate's `backward` calls `engine.step()` itself on the
last micro-batch of a step, so the transformers callback that skips a step elsewhere
(`on_pre_optimizer_step`, which drops the gradients) runs after the update was applied. The
decision is therefore taken earlier, in `compute_loss` of that last micro-batch (every
micro-batch's flags are known by then, and `backward` has not run), and carried out here:
the ZeRO optimizer is told, for its next `step()` only, that the gradients overflowed. That
is DeepSpeed's own skip path, used for every fp16 overflow: it clears the accumulated
(partitioned) gradients, leaves the weights and the optimizer state untouched, and counts the
step in `engine.skipped_steps`.

One difference from DeepSpeed's overflow skip is undone, so that a skipped step means the
same with and without DeepSpeed (the weights and the optimizer state stay, the step counter
and the learning-rate schedule advance): `resume_schedule` steps the LR scheduler, which
nothing steps after an overflow (neither DeepSpeed nor the trainer). One is kept: with a
dynamic fp16 loss scale DeepSpeed halves the scale, as for the overflow a NaN causes anyway.

Supported: ZeRO stages 1, 2 and 3 (with or without offload), the stages ms-swift's DeepSpeed
configs use. Relies on DeepSpeed 0.19 internals (`DeepSpeedZeroOptimizer.check_overflow` /
`check_grad_overflow`, `DeepSpeedZeroOptimizer_Stage3._overflow_check_and_loss_scale_update`),
pinned by tests that run real DeepSpeed.
"""

from __future__ import annotations

from typing import Any

SUPPORTED_STAGES = (1, 2, 3)


class UnsupportedSkipError(RuntimeError):
    """The engine's optimizer has no overflow-skip path kdcompose knows how to trigger."""


def skip_next_update(engine: Any) -> None:
    """Make the engine's next `step()` discard the accumulated gradients instead of applying
    them. One-shot: the override removes itself when that step runs."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = engine.optimizer
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        _force_stage3_overflow(optimizer)
    elif isinstance(optimizer, DeepSpeedZeroOptimizer):
        _force_stage12_overflow(optimizer)
    else:
        raise UnsupportedSkipError(
            f"on_nonfinite: skip_step under DeepSpeed needs ZeRO stage 1, 2 or 3; this engine's optimizer "
            f"is {type(optimizer).__name__}"
        )


def _force_stage12_overflow(optimizer: Any) -> None:
    """Stages 1/2 check for overflow in `step()` only when `check_grad_overflow` is set (it is
    not for fp32, nor by default for bf16); the override sets the verdict instead of reading
    the gradients."""
    previous = optimizer.check_grad_overflow

    def overflowed(partition_gradients: bool = True) -> None:
        del optimizer.check_overflow  # the class method again
        optimizer.check_grad_overflow = previous
        optimizer.overflow = True

    optimizer.check_grad_overflow = True
    optimizer.check_overflow = overflowed


def _force_stage3_overflow(optimizer: Any) -> None:
    """Stage 3 asks `_overflow_check_and_loss_scale_update(update_scale=False)` first, skips
    the norm when it says overflow, then cleans up the gradients and returns."""

    def overflowed(update_scale: bool = True) -> bool:
        del optimizer._overflow_check_and_loss_scale_update
        optimizer.overflow = True
        return optimizer._loss_scale_update_and_overflow_cleanup() if update_scale else True

    optimizer._overflow_check_and_loss_scale_update = overflowed


def resume_schedule(engine: Any, trainer_scheduler: Any) -> None:
    """After a skipped step: check DeepSpeed really skipped it, then advance the learning-rate
    schedule that an overflow leaves where it was. Its owner is the engine when the DeepSpeed
    config declares a scheduler; otherwise the trainer's (accelerate's wrapper, whose `step`
    does nothing after a skipped step, so the wrapped scheduler is stepped)."""
    if engine.was_step_applied():
        raise UnsupportedSkipError(
            "kdcompose asked DeepSpeed to skip this optimizer step (on_nonfinite: skip_step) but DeepSpeed "
            "applied it; this DeepSpeed version's ZeRO optimizer no longer takes its overflow path the way "
            "kdcompose expects"
        )
    scheduler = engine.lr_scheduler
    if scheduler is None:
        scheduler = getattr(trainer_scheduler, "scheduler", trainer_scheduler)
    if scheduler is not None:
        scheduler.step()


__all__ = ["SUPPORTED_STAGES", "UnsupportedSkipError", "resume_schedule", "skip_next_update"]
