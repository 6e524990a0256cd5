"""Restore ms-swift GKD's micro-batch counter when a run resumes.

Upstream behaviour worked around (ms-swift 4.6): `GKDTrainer._prepare_inputs` picks the
micro-batch `_buffered_inputs[_step % steps_per_generation]` of the current generation batch and
`_step` starts at 0 in a resumed run, so a checkpoint inside a generation batch
(`steps_per_generation` > `gradient_accumulation_steps`) would continue with the wrong slice.
`restore_micro_batch_counter` sets `_step` to the micro-batches already trained and drops the
buffer, so the resumed run encodes the generation batch again and takes the right slice.

Remove when: ms-swift saves and restores `_step` itself (`tests/swift/test_compat.py` fails when
`GKDTrainer._prepare_inputs` no longer reads `_step`).
"""

from __future__ import annotations

from typing import Any


def restore_micro_batch_counter(trainer: Any, global_step: int) -> None:
    """Set a fresh GKD trainer's `_step` to the micro-batches of `global_step` optimizer steps."""
    if hasattr(trainer, "_step") and not trainer._step:
        trainer._step = global_step * int(trainer.args.gradient_accumulation_steps or 1)
        trainer._buffered_inputs = None


__all__ = ["restore_micro_batch_counter"]
