"""Test-only kdcompose plugin (`plugins: [this file]`): hold a run at a chosen moment until released.

A test that kills a run "during a save" or "in the middle of a step" must know the process is
there when the signal is sent, whatever the machine's load; a fixed sleep cannot promise that.
With `KDCOMPOSE_TEST_HOLD=save:K` the trainer's `_save` of step K (the first files of the
checkpoint: weights or adapters and kdcompose's projectors; the optimizer, RNG and trainer state
come after it) waits; with `step:K` the last micro-batch of the optimizer step after global step K
waits (with gradient accumulation: in the middle of the step, the earlier micro-batches' gradients
already accumulated). On reaching the point, each process writes `held-<rank>` (holding its process id) into
`$KDCOMPOSE_TEST_HOLD_DIR` and waits until a file `release` appears there (at most `MAX_HOLD_S`).
Signals are handled as usual while it waits (the wait is a sleep loop in Python).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from kdcompose.integrations.swift.runtime import prepare_swift_import

prepare_swift_import()

from kdcompose.integrations.swift.trainer import KDComposeGKDTrainer  # noqa: E402

HOLD_ENV = "KDCOMPOSE_TEST_HOLD"
DIR_ENV = "KDCOMPOSE_TEST_HOLD_DIR"
MAX_HOLD_S = 600


def _hold(trainer: KDComposeGKDTrainer, where: str) -> None:
    spec, folder = os.environ.get(HOLD_ENV, ""), os.environ.get(DIR_ENV)
    kind, _, step = spec.partition(":")
    if not folder or kind != where or int(step or -1) != int(trainer.state.global_step):
        return
    seen = getattr(trainer, "_test_seen", 0) + 1  # calls at this point (micro-batches of the step)
    trainer._test_seen = seen
    if where == "step" and seen != int(trainer.args.gradient_accumulation_steps or 1):
        return  # hold at the step's last micro-batch only
    gate = Path(folder)
    held_file = gate / f"held-{trainer.accelerator.process_index}"
    tmp = held_file.with_suffix(".tmp")
    tmp.write_text(str(os.getpid()), encoding="utf-8")
    tmp.replace(held_file)  # complete when it appears
    deadline = time.monotonic() + MAX_HOLD_S
    while not (gate / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _install() -> None:
    cls = KDComposeGKDTrainer
    if getattr(cls, "_test_hold_installed", False):
        return
    cls._test_hold_installed = True
    save, training_step = cls._save, cls.training_step

    def held_save(self, output_dir=None, state_dict=None):
        save(self, output_dir, state_dict)
        _hold(self, "save")

    def held_training_step(self, *args, **kwargs):
        _hold(self, "step")
        return training_step(self, *args, **kwargs)

    cls._save, cls.training_step = held_save, held_training_step


_install()
