"""What kdcompose adds around the trainer loop: per micro-batch, per optimizer step, per log.

`KDLoop` is an object the trainer holds (`trainer.kd_loop`), and everything it reads from the
trainer is declared in `LoopHost`: no other attribute of the trainer is touched. The trainer
calls it from a few places (`compute_loss`, `log`, `train`), each one line. Its jobs, each
delegating the logic to a pure or single-purpose module:

* telemetry (`metrics.TermWindow`): record each micro-batch's term contributions with the
  weight the trainer's `loss` gives it, and add the reduced values to each log row;
* token normalization (`kdcompose.normalization`): the `global_tokens` denominator of the
  current optimizer step, counted once per step from ms-swift's buffered micro-batches and
  summed over ranks;
* faults (`guard.NonFiniteGuard`): flag NaN/inf per term, mask the micro-batch, decide at
  the optimizer step (under DeepSpeed, before the engine steps); and a clear message when the
  run is interrupted (Ctrl-C);
* resume (`resume`): the composition file in the run folder, the counters in checkpoints.

Framework-neutral: it imports neither ms-swift nor transformers' `Trainer`. What it reads from
the trainer it serves is declared in `LoopHost` (ms-swift's GKD trainer satisfies it; its
optional members, read with a default, are ms-swift GKD's `_step` / `_buffered_inputs`
micro-batch buffer and transformers' `current_gradient_accumulation_steps`); the step-boundary
callbacks for transformers' `Trainer` family are `kdcompose.integrations.transformers`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

from kdcompose.compat.deepspeed_skip import SUPPORTED_STAGES
from kdcompose.composer import CompositionOutput, LossComposer
from kdcompose.errors import ConfigError, ConfigIssue
from kdcompose.log import logger
from kdcompose.nonfinite import SKIP_STEP, describe
from kdcompose.normalization import GLOBAL_TOKENS, step_token_denominator, valid_token_count
from kdcompose.training import records as resume
from kdcompose.training.checkpoints import last_checkpoint, last_complete_checkpoint
from kdcompose.training.guard import SKIPPED_METRIC, NonFiniteGuard
from kdcompose.training.metrics import (
    TermWindow,
    eval_batch_weight,
    is_distributed,
    train_micro_batch_weight,
    zero_where_nonfinite,
)


class LoopHost(Protocol):
    """Everything `KDLoop` reads from the trainer it serves (ms-swift's `GKDTrainer` subclass).

    Optional, read with a default when absent: `current_gradient_accumulation_steps`
    (transformers' count for the current optimizer step), `_step` and `_buffered_inputs`
    (ms-swift GKD's micro-batch counter and generation-batch buffer)."""

    args: Any
    """TrainingArguments: device, output_dir, gradient_accumulation_steps, steps_per_generation,
    eval_batch_size, hf_deepspeed_config."""
    accelerator: Any
    """sync_gradients, gradient_state, process_index, num_processes, is_main_process."""
    state: Any
    """global_step, max_steps."""
    model: Any
    """`.training` tells train from eval."""
    template: Any
    """`sequence_parallel_size`."""
    is_deepspeed_enabled: bool
    deepspeed: Any
    """The DeepSpeed engine (set by transformers once training starts)."""
    kd_composer: LossComposer


class KDLoop:
    """Telemetry, token normalization, non-finite handling and resume state for one trainer."""

    def __init__(self, host: LoopHost) -> None:
        """Build once in the trainer's `__init__`, after the base class (needs its args)."""
        self.host = host
        self.windows = {"train": TermWindow(), "eval": TermWindow()}
        self._denominator: torch.Tensor | None = None
        self._guard = NonFiniteGuard(
            host.kd_composer, host.args.device, engine_steps_in_backward=bool(host.is_deepspeed_enabled)
        )
        self._guard_composer = host.kd_composer

    def guard(self) -> NonFiniteGuard:
        """The guard, reconfigured when `use_composer` swapped the composition."""
        if self._guard_composer is not self.host.kd_composer:
            self._guard.configure(self.host.kd_composer)
            self._guard_composer = self.host.kd_composer
        return self._guard

    def global_token_terms(self) -> list[str]:
        return [
            t.origin
            for t in self.host.kd_composer.active_terms
            if t.needs.token_mean and t.spec.normalize == GLOBAL_TOKENS
        ]

    # ------------------------------------------------------------------ every micro-batch

    def prepare_step_tokens(self, mode: str, model_inputs: Mapping[str, Any]) -> None:
        """Set the `global_tokens` denominator for this micro-batch (None when no active term
        asks for it, and in evaluation, where each batch is its own step).

        Counted at the first micro-batch of each optimizer step over all the step's
        micro-batches (ms-swift encodes the whole generation batch up front), then summed over
        ranks: one all-reduce per optimizer step, no host sync.
        """
        if mode != "train" or not self.global_token_terms():
            self._denominator = None
            return
        accumulation = self.accumulation_steps()
        per_generation = int(getattr(self.host.args, "steps_per_generation", None) or accumulation)
        micro = (int(getattr(self.host, "_step", 1)) - 1) % per_generation
        if micro % accumulation == 0 or self._denominator is None:
            first = micro - micro % accumulation
            buffered = getattr(self.host, "_buffered_inputs", None) or []
            chunks = [c["model_inputs"] for c in buffered[first : first + accumulation]] or [model_inputs]
            local = torch.stack([valid_token_count(c["labels"]) for c in chunks]).sum()
            if is_distributed():
                dist.all_reduce(local, op=dist.ReduceOp.SUM)
            world = int(self.host.accelerator.num_processes)
            self._denominator = step_token_denominator(local, world, accumulation)

    def step_denominator(self) -> torch.Tensor | None:
        """`LossContext.step_token_denominator` for this micro-batch (None: micro-batch means)."""
        return self._denominator

    def record(self, output: CompositionOutput, mode: str) -> torch.Tensor:
        """Flag non-finite terms, record the micro-batch's metrics and return the loss to
        backpropagate: the composed total, or 0 when it is NaN/inf (the guard then stops or
        skips the step; the micro-batch counts 0 in `loss` and in every term alike)."""
        guard = self.guard()
        finite = guard.observe(output, mode)
        if mode == "train" and guard.engine_steps_in_backward and self.host.accelerator.sync_gradients:
            # DeepSpeed applies the update in this micro-batch's backward: decide now.
            guard.decide_before_engine_step(int(self.host.state.global_step), self.host.deepspeed)
        contributions = zero_where_nonfinite(output.contributions(), finite)
        self.windows[mode].add(contributions, output.effective_weights(), self.batch_weight(mode))
        total = output.total
        return torch.where(finite, total, torch.zeros_like(total))

    def accumulation_steps(self) -> int:
        steps = getattr(self.host, "current_gradient_accumulation_steps", None)
        return int(steps or self.host.args.gradient_accumulation_steps or 1)

    def batch_weight(self, mode: str) -> float:
        """The weight the trainer's own `loss` / `eval_loss` gives this micro-batch."""
        if mode == "train":
            return train_micro_batch_weight(self.accumulation_steps())
        gradient_state = self.host.accelerator.gradient_state
        return eval_batch_weight(
            int(self.host.args.eval_batch_size),
            last=bool(gradient_state.end_of_dataloader),
            remainder=int(gradient_state.remainder),
            rank=int(self.host.accelerator.process_index),
        )

    # ------------------------------------------------------------------ every log row

    def add_to_log(self, logs: dict[str, float]) -> None:
        """Add the window's per-term values (reduced over ranks; a collective, so every rank
        calls it) to the trainer's log row, in place, so that `evaluate()` returns them too (best
        model, early stopping); after an evaluation, act on its non-finite flags."""
        mode = "train" if self.host.model.training else "eval"
        logs.update(self.metric_values(mode))
        guard = self.guard()
        if mode == "eval":
            result = guard.check_eval(int(self.host.state.global_step))
            if result.skip and self.host.accelerator.is_main_process:
                logger.warning(
                    f"kdcompose: non-finite values during evaluation ({describe(result.offending)}); "
                    "those batches count as 0 in the evaluation metrics (on_nonfinite: skip_step)"
                )
        elif guard.may_skip:
            logs[SKIPPED_METRIC] = guard.skipped_steps

    def metric_values(self, mode: str = "train") -> dict[str, float]:
        """What the next log row of `mode` would get from kdcompose (reduced over ranks; a
        collective), and restart that window: for notebooks and tests that call `compute_loss`
        themselves."""
        return self.windows[mode].reduce("eval_" if mode == "eval" else "", self.host.args.device)

    def reset_metrics(self) -> None:
        """Drop what the metric windows and the non-finite flags hold (e.g. after probing)."""
        for window in self.windows.values():
            window.reset()
        self._guard.flags.clear()

    # ------------------------------------------------------------------ run start, checkpoints, Ctrl-C

    def run_started(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """At `train()`: check what the loop needs, restore counters, record the composition."""
        self.check_loop_settings()
        self.reset_metrics()
        checkpoint = resume_checkpoint(self.host, args, kwargs)
        guard = self.guard()
        guard.skipped_steps = int(resume.read_checkpoint_state(checkpoint).get(SKIPPED_METRIC, 0))
        if not self.host.accelerator.is_main_process:
            return
        if checkpoint:
            changes = resume.resume_changes(checkpoint, self.host.kd_composer)
            if changes:
                logger.warning(
                    f"kdcompose: resuming from {checkpoint} with a different loss composition than that run "
                    f"recorded: {'; '.join(changes)}"
                )
        path = resume.write_composition(self.host.args.output_dir, self.host.kd_composer)
        logger.info(f"kdcompose: composition recorded in {path}")

    def check_loop_settings(self) -> None:
        issues = []
        global_terms = self.global_token_terms()
        accumulation = int(self.host.args.gradient_accumulation_steps or 1)
        per_generation = int(getattr(self.host.args, "steps_per_generation", None) or accumulation)
        for origin in global_terms:
            path = f"{origin}.normalize"
            if per_generation % accumulation:
                issues.append(
                    ConfigIssue(
                        path,
                        f"global_tokens needs each optimizer step's micro-batches encoded together: "
                        f"steps_per_generation ({per_generation}) must be a multiple of "
                        f"gradient_accumulation_steps ({accumulation}); leave steps_per_generation and "
                        "generation_batch_size unset",
                    )
                )
            if getattr(self.host.template, "sequence_parallel_size", 1) > 1:
                issues.append(ConfigIssue(path, "global_tokens is not supported with sequence parallelism"))
        if self.host.is_deepspeed_enabled and self.guard().may_skip:
            stage = _zero_stage(self.host.args)
            if stage not in SUPPORTED_STAGES:
                for term in self.host.kd_composer.active_terms:
                    if term.spec.on_nonfinite == SKIP_STEP:
                        issues.append(
                            ConfigIssue(
                                f"{term.origin}.on_nonfinite",
                                f"skip_step under DeepSpeed needs ZeRO stage 1, 2 or 3 (this run uses "
                                f"stage {stage}); use a zero1/zero2/zero3 `deepspeed` config, or "
                                "on_nonfinite: error",
                            )
                        )
        if issues:
            raise ConfigError(issues, source="kdcompose trainer")

    def interrupted(self) -> None:
        """Ctrl-C: say where training stopped and how to resume (hooks are closed by the caller)."""
        if not self.host.accelerator.is_main_process:
            return
        last = last_complete_checkpoint(self.host.args.output_dir)
        where = (
            f"`kdcompose train CONFIG --resume` continues from {last}"
            if last
            else "no checkpoint was saved yet"
        )
        logger.warning(
            f"kdcompose: training interrupted (Ctrl-C) at global_step {self.host.state.global_step}/"
            f"{self.host.state.max_steps}; feature hooks removed; {where}"
        )


def _zero_stage(args: Any) -> int:
    """The ZeRO stage of the run's DeepSpeed config (0 when it sets none)."""
    config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None) or {}
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def resume_checkpoint(trainer: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
    """The checkpoint `trainer.train(*args, **kwargs)` resumes from (None: a fresh run)."""
    value = kwargs.get("resume_from_checkpoint", args[0] if args else None)
    if value is True:
        return last_checkpoint(trainer.args.output_dir)
    return str(value) if value else None


__all__ = ["KDLoop", "LoopHost", "is_distributed", "last_checkpoint", "resume_checkpoint"]
