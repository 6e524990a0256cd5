"""Give TRL's `RepeatSampler` a `set_epoch`, so a run resumed in a later epoch replays its order.

Upstream behaviour worked around (TRL 0.29, ms-swift 4.6, accelerate 1.15): ms-swift's GKD
trainer samples with TRL's `RepeatSampler` (swift/rlhf_trainers/gkd_trainer.py), which draws each
epoch's permutation from a private generator seeded once (trl/trainer/utils.py) and has no
`set_epoch`, so a run resumed in epoch `e > 0` replays epoch 0's order. `EpochReplaySampler` adds
`set_epoch`, which positions the generator after `e` draws: the uninterrupted order (and, for a
run that is not resumed, the stock order). transformers calls `set_epoch` on the dataloader of
the resumed epoch only after wrapping it in accelerate's `skip_first_batches`, and on several
processes that wrapper (`SkipBatchSampler` around `BatchSamplerShard`) does not forward it (on 2
ranks the resumed steps replayed epoch 0's batches), so a resumed run's sampler also starts in the
checkpoint's epoch (`start_epoch`).

How: the sampler instance's class is swapped for a subclass that mixes `EpochReplaySampler` in
(the trainer builds the sampler itself; there is no argument to pass another class).

Remove when: TRL's `RepeatSampler` has `set_epoch` and accelerate's skip wrapper forwards it
(`tests/swift/test_compat.py` fails for each, saying which).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class EpochReplaySampler:
    """Mixin for TRL's `RepeatSampler`: `set_epoch(e)` positions the generator after `e` epochs.

    The stock sampler draws one permutation per `__iter__` from a generator seeded at
    construction; the uninterrupted run's epoch `e` therefore uses the `(e+1)`-th draw. A resumed
    run starts a fresh sampler, so it would use the first draw in whatever epoch it resumes.
    transformers calls `set_epoch(epoch)` on the dataloader's sampler before each epoch
    (accelerate forwards it), so this reproduces the uninterrupted order at any epoch.
    """

    seed: int | None
    shuffle: bool
    num_samples: int
    generator: torch.Generator

    def set_epoch(self, epoch: int) -> None:
        if not getattr(self, "shuffle", True) or self.seed is None:
            return
        self.generator.manual_seed(self.seed)
        for _ in range(int(epoch)):
            torch.randperm(self.num_samples, generator=self.generator)


def make_epoch_replayable(sampler: Any) -> Any:
    """Give a `RepeatSampler` instance `set_epoch` (returns it; other samplers pass through)."""
    cls = type(sampler)
    needed = ("generator", "num_samples", "seed")
    if hasattr(sampler, "set_epoch") or not all(hasattr(sampler, a) for a in needed):
        return sampler
    sampler.__class__ = type(f"EpochReplay{cls.__name__}", (cls, EpochReplaySampler), {})
    return sampler


def replay_epochs(trainer: Any, start_epoch: Callable[[], int | None]) -> None:
    """Make the samplers `trainer._get_train_sampler` returns epoch-replayable (once per trainer)
    and start each in `start_epoch()` (the epoch a resumed run resumes in; None: a fresh run).
    Later epochs use the unwrapped dataloader, which forwards `set_epoch`."""
    factory: Callable[..., Any] = trainer._get_train_sampler
    if getattr(factory, "_kd_epoch_replay", False):
        return

    def get_train_sampler(*args: Any, **kwargs: Any) -> Any:
        sampler = make_epoch_replayable(factory(*args, **kwargs))
        epoch = start_epoch()
        if epoch is not None and isinstance(sampler, EpochReplaySampler):
            sampler.set_epoch(epoch)
        return sampler

    get_train_sampler._kd_epoch_replay = True  # type: ignore[attr-defined]
    trainer._get_train_sampler = get_train_sampler


__all__ = ["EpochReplaySampler", "make_epoch_replayable", "replay_epochs"]
