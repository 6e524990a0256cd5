"""`NonFiniteGuard`: stop or skip an optimizer step whose loss terms went NaN/inf.

Framework-neutral: a training loop calls it at the step boundary (for transformers' `Trainer`
family, `kdcompose.integrations.transformers.KDLoopCallback` does). Once per optimizer step,
before the update is applied, the guard reduces the step's flags over ranks (one small
all-reduce and one host read per optimizer step; never per micro-batch), asks
`kdcompose.nonfinite.verdict` what to do, and either

* raises `NonFiniteLossError` naming the term(s) and the step -- the weights stay those of
  the previous step (default, `on_nonfinite: error`), or
* skips the step, so the optimizer leaves the weights and its state untouched, and counts it
  in `nonfinite_skipped_steps` (`skip_step`). The step counter and the learning-rate schedule
  still advance, as for ms-swift's own NaN-grad-norm skip. Every rank reaches the same
  verdict, so ranks never diverge.

When the decision is taken depends on who applies the update:

* the trainer's `optimizer.step()` (no DeepSpeed): in `before_optimizer_step`, the last
  moment before it; a skip drops every gradient (`param.grad = None`);
* DeepSpeed, whose engine steps inside accelerate's `backward` of the step's last
  micro-batch: in `compute_loss` of that micro-batch (`decide_before_engine_step`, called by
  the trainer), before `backward`; a skip takes DeepSpeed's own overflow path
  (`compat.deepspeed_skip`), and `after_optimizer_step` advances the LR schedule DeepSpeed left
  alone.

Evaluation has no optimizer step: the flags of an evaluation are checked when it is logged
(error: raise; skip_step: the batch counts 0, with a warning). The count of skipped steps is
saved into every checkpoint (`kdcompose_state.json`) and restored on resume.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from kdcompose.compat.deepspeed_skip import resume_schedule, skip_next_update
from kdcompose.composer import CompositionOutput, LossComposer
from kdcompose.nonfinite import (
    SKIP_STEP,
    TOTAL,
    NonFiniteLossError,
    OnNonFinite,
    Verdict,
    error_message,
    nonfinite_flags,
    verdict,
)
from kdcompose.training.records import write_checkpoint_state

SKIPPED_METRIC = "nonfinite_skipped_steps"


class NonFiniteGuard:
    """Per-mode non-finite flags of the active terms, and what happens at the step boundary."""

    def __init__(
        self, composer: LossComposer, device: torch.device | str, *, engine_steps_in_backward: bool = False
    ):
        self.device = torch.device(device)
        self.engine_steps_in_backward = engine_steps_in_backward
        """DeepSpeed applies the update inside `backward`: the trainer calls
        `decide_before_engine_step` instead of the guard deciding in `on_pre_optimizer_step`."""
        self.skipped_steps = 0
        self._skipping_engine: Any = None
        self.configure(composer)

    def configure(self, composer: LossComposer) -> None:
        terms = composer.active_terms
        self.names: tuple[str, ...] = (*(t.name for t in terms), TOTAL)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.policies: dict[str, OnNonFinite] = {t.name: t.spec.on_nonfinite for t in terms}
        self.metric_keys = {t.name: t.metric_key for t in terms}
        self.flags: dict[str, torch.Tensor] = {}
        self._row_cache: dict[tuple[str, ...], torch.Tensor] = {}

    def _rows(self, names: tuple[str, ...]) -> torch.Tensor:
        rows = self._row_cache.get(names)
        if rows is None:
            rows = self._row_cache[names] = torch.tensor([self.index[n] for n in names], device=self.device)
        return rows

    @property
    def may_skip(self) -> bool:
        """True when some active term allows skipping (then the skip count is logged)."""
        return any(p == SKIP_STEP for p in self.policies.values())

    # ---------------------------------------------------------------- every micro-batch

    def observe(self, output: CompositionOutput, mode: str) -> torch.Tensor:
        """OR this micro-batch's flags into the mode's running flags; returns `isfinite(total)`
        (a 0-d bool tensor, no sync) for the caller to mask the loss and the metrics with."""
        names = [r.name for r in output.terms] + [TOTAL]
        flags = nonfinite_flags([r.weighted for r in output.terms] + [output.total]).to(self.device)
        running = self.flags.get(mode)
        if running is None:
            running = self.flags[mode] = torch.zeros(
                (len(self.names), 2), dtype=torch.bool, device=self.device
            )
        rows = self._rows(tuple(names))
        running[rows] = running[rows] | flags  # names are unique within a micro-batch
        return torch.isfinite(output.total.detach())

    # ---------------------------------------------------------------- the step boundary

    def take_verdict(self, mode: str) -> Verdict:
        """Reduce the mode's flags over ranks (MAX), read them once, clear them."""
        running = self.flags.pop(mode, None)
        if running is None:
            running = torch.zeros((len(self.names), 2), dtype=torch.bool, device=self.device)
        reduced = running.to(torch.int32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        return verdict([tuple(map(bool, row)) for row in reduced.tolist()], self.names, self.policies)

    def before_optimizer_step(self, global_step: int, model: Any = None, optimizer: Any = None) -> bool:
        """Right before the optimizer applies step `global_step` (no DeepSpeed): raise, or drop
        every gradient of `model` and `optimizer` so the update changes nothing. Returns whether
        the step is skipped."""
        if self.engine_steps_in_backward:
            return False  # decided in compute_loss, before the engine stepped
        skip = self._decide(global_step)
        if skip:
            _drop_gradients(_parameters(model, optimizer))
        return skip

    def decide_before_engine_step(self, global_step: int, engine: Any) -> None:
        """Under DeepSpeed, in `compute_loss` of a step's last micro-batch (before `backward`,
        inside which the engine applies the update): raise, or make the engine skip."""
        if self._decide(global_step):
            skip_next_update(engine)
            self._skipping_engine = engine

    def after_optimizer_step(self, lr_scheduler: Any = None) -> None:
        """After the optimizer step: a DeepSpeed step skipped through the overflow path leaves the
        LR schedule where it was; advance it, as a skipped step does without DeepSpeed."""
        engine, self._skipping_engine = self._skipping_engine, None
        if engine is not None:
            resume_schedule(engine, lr_scheduler)

    def _decide(self, global_step: int) -> bool:
        """Take the train verdict: raise for `error`, count and return True for a skip."""
        result = self.take_verdict("train")
        if result.ok:
            return False
        if result.error:
            message = error_message(result.offending, global_step, metric_keys=self.metric_keys)
            raise NonFiniteLossError(message, result.culprits, global_step + 1)
        self.skipped_steps += 1
        return True

    def save_state(self, checkpoint_dir: str, global_step: int) -> None:
        """Record the skip count in a checkpoint just saved, for a resumed run to continue it."""
        write_checkpoint_state(
            checkpoint_dir, {SKIPPED_METRIC: self.skipped_steps, "global_step": global_step}
        )

    def check_eval(self, global_step: int) -> Verdict:
        """After an evaluation: raise for `error` terms, report the rest (the caller warns)."""
        result = self.take_verdict("eval")
        if result.error:
            message = error_message(result.offending, global_step, mode="eval", metric_keys=self.metric_keys)
            raise NonFiniteLossError(message, result.culprits, global_step)
        return result


def _parameters(model: Any, optimizer: Any) -> Iterable[torch.nn.Parameter]:
    if model is not None:
        yield from model.parameters()
    if optimizer is not None:  # parameters the optimizer holds outside the model (rare)
        for group in getattr(optimizer, "param_groups", []):
            yield from group.get("params", [])


def _drop_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    for param in parameters:
        param.grad = None


__all__ = ["SKIPPED_METRIC", "NonFiniteGuard"]
