"""`CheckpointCallback`: checkpoints that are complete or absent, and a save when a stop signal comes.

Two jobs at the same events of transformers' `Trainer` (ms-swift's and TRL's trainers build on it):

* **Complete or absent** (`on_save`). transformers has written the checkpoint folder by the time
  `on_save` runs on every rank, and ms-swift's `_save_checkpoint` ends with a barrier, so every
  rank's files exist (weights or adapters, kdcompose's projectors from `_save`, optimizer,
  scheduler, RNG states, trainer state, DeepSpeed's per-rank shards, and `kdcompose_state.json`
  from `KDLoopCallback.on_save`, which is added before this callback). Then one process per
  machine flushes the folder to disk (`fsync_tree`), all ranks meet at a barrier, and rank 0
  writes the completion marker (`training.checkpoints.write_completion_marker`) and only then
  lets transformers delete older checkpoints (`compat.transformers_rotation`). A folder about to be
  saved again at the same step loses its old marker first.
* **Stop signals** (`on_step_end`). While `train()` runs, SIGTERM is a stop request
  (`training.preemption.StopSignals`). At the end of every optimizer step the ranks agree on it
  (one all-reduce of a flag, only with several processes): every rank stops after the same step,
  so none waits in a collective for a rank that left. The step is then saved (`should_save`) and
  training stops (`should_training_stop`); a request that arrives while a scheduled checkpoint is
  being written stops right after that save. `finish` then raises `TrainingStopped` (exit 75).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from kdcompose.compat import transformers_rotation as rotation
from kdcompose.log import logger
from kdcompose.training import checkpoints, preemption


class CheckpointCallback(TrainerCallback):
    """Completion markers for every checkpoint, and stop signals turned into a last checkpoint."""

    def __init__(self) -> None:
        self.signals: preemption.StopSignals | None = None
        self.stopped_at: int | None = None
        """The step every rank agreed to stop after (None: no stop requested)."""
        self.saved: str | None = None
        """The complete checkpoint of `stopped_at`, once written."""
        self._run_dir: str | None = None

    # ------------------------------------------------------------------ around train()

    @contextmanager
    def stop_signals(self) -> Iterator[None]:
        """For the block (the trainer's `train()`): stop signals request a save (main thread only)."""
        self.stopped_at, self.saved = None, None
        self.signals = preemption.StopSignals()
        installed = self.signals.install()
        try:
            yield
        finally:
            if installed:
                self.signals.uninstall()
            if self._run_dir is not None:
                rotation.release(self._run_dir)
                self._run_dir = None

    def finish(self, result: Any, max_steps: int) -> Any:
        """After `train()` returned: `result`, or `TrainingStopped` when a stop signal ended it early."""
        request = self.signals.request if self.signals is not None else None
        if self.stopped_at is None or request is None or self.stopped_at >= max_steps:
            return result
        raise preemption.TrainingStopped(request.signal_name, self.stopped_at, self.saved)

    # ------------------------------------------------------------------ events

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._run_dir = str(args.output_dir)
        if not rotation.postpone(self._run_dir) and args.save_total_limit and state.is_world_process_zero:
            logger.warning(
                "kdcompose: cannot postpone transformers' checkpoint rotation in this version; with "
                "save_total_limit a kill during a save may leave no complete checkpoint"
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stopped_at is None and self._agreed(args):
            self.stopped_at = int(state.global_step)
            control.should_save = True
            control.should_training_stop = True
            if state.is_world_process_zero:
                preemption.write_report("saving", step=self.stopped_at)
        if control.should_save:
            self._unmark_stale(args, state)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.saved is not None and self.stopped_at == state.global_step:
            control.should_save = False  # the stop checkpoint of this step is already on disk
        if control.should_save:
            self._unmark_stale(args, state)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = int(state.global_step)
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        if state.is_local_process_zero and folder.is_dir():
            checkpoints.fsync_tree(folder)
        _barrier()
        if state.is_world_process_zero and folder.is_dir():
            checkpoints.write_completion_marker(folder, step)
            rotation.run_postponed(args.output_dir)
        if self.stopped_at is None and self._agreed(args):  # the signal came while this was written
            self.stopped_at = step
            control.should_training_stop = True
        if self.stopped_at == step:
            self.saved = str(folder)
            if self.signals is not None:
                self.signals.mark_saved(self.saved)
            if state.is_world_process_zero:
                preemption.write_report("saved", step=step, checkpoint=self.saved)
                name = self.signals.request.signal_name if self.signals and self.signals.request else "signal"
                logger.warning(
                    f"kdcompose: {name}: saved a complete checkpoint of step {step}/{state.max_steps} at "
                    f"{self.saved}; stopping (exit {preemption.EXIT_PREEMPTED}). Continue with "
                    "`kdcompose train CONFIG --resume`"
                )

    # ------------------------------------------------------------------ helpers

    def _agreed(self, args: Any) -> bool:
        """Whether any rank has a stop request: the same answer on every rank (a collective)."""
        local = self.signals is not None and self.signals.requested
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _unmark_stale(self, args: Any, state: Any) -> None:
        """A folder of this step saved before (the same step saved twice, or an earlier run in the
        same `output_dir` with `add_version: false`) is not complete while it is rewritten."""
        if state.is_world_process_zero:
            checkpoints.remove_completion_marker(
                os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            )


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


__all__ = ["CheckpointCallback"]
