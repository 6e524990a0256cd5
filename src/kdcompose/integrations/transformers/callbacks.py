"""`KDLoopCallback`: a `KDLoop`'s step-boundary work from transformers' `TrainerCallback` events.

Why a callback: transformers' `Trainer` (and the ms-swift / TRL trainers built on it) applies the
optimizer step inside its own loop; `on_pre_optimizer_step` is the last moment before the update,
`on_optimizer_step` the first after it, `on_save` the moment a checkpoint folder exists. The
decisions themselves live in the framework-neutral `kdcompose.training.guard.NonFiniteGuard`.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from kdcompose.training.loop import KDLoop


class KDLoopCallback(TrainerCallback):
    """Forward the Trainer's step events to `loop`'s NaN/inf guard (stop or skip the step) and
    record its state in every checkpoint."""

    def __init__(self, loop: KDLoop) -> None:
        self.loop = loop

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.loop.guard().flags.clear()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.loop.guard().before_optimizer_step(
            state.global_step, kwargs.get("model"), kwargs.get("optimizer")
        )

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.loop.guard().after_optimizer_step(kwargs.get("lr_scheduler"))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self.loop.guard().save_state(folder, state.global_step)


__all__ = ["KDLoopCallback"]
