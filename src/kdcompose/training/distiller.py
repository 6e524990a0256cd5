"""`Distiller`: kdcompose's distillation objective in any training script.

A plain PyTorch loop, Accelerate, or a TRL / transformers trainer's `compute_loss` gets the same
composition `kdcompose train` trains -- every built-in term (`lm_jsd` with fused and top-K modes,
`ce`, `visual_kd`, `hidden_kd`), plug-in terms with module taps and projectors, schedules,
`global_tokens` normalization and the NaN/inf policy -- from the same YAML::

    kd = Distiller.from_yaml("kd.yaml", student=student, teacher=teacher)
    optimizer = torch.optim.AdamW([*student.parameters(), *kd.parameters()])  # + projectors
    for batch in loader:  # input_ids, attention_mask, labels (HF style), pixel_values, ...
        out = kd.loss(batch)
        out.total.backward(); optimizer.step(); optimizer.zero_grad()
        log(out.metrics())  # the per-term keys kdcompose train logs
    kd.close()

What it does per batch is what the ms-swift trainer does, through the same core: the student's
forward with the declared taps, the teacher's (under `no_grad`, its vision tower alone when that
is all the terms read) only if an active term needs it, `build_context`, the composer. The
projectors a feature pair asks for belong to the Distiller (`kd.projectors`, saved by
`kd.state_dict()`), not to the student, so the student's own `state_dict` stays the model's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kdcompose.composer import CompositionOutput, LossComposer
from kdcompose.composition import Composition
from kdcompose.config import KDConfig, load_config, parse_config
from kdcompose.errors import ConfigError, ConfigIssue
from kdcompose.log import logger
from kdcompose.nonfinite import (
    SKIP_STEP,
    TOTAL,
    NonFiniteLossError,
    error_message,
    nonfinite_flags,
    verdict,
)
from kdcompose.normalization import GLOBAL_TOKENS, step_token_denominator
from kdcompose.resolve import GKD_KNOB_NAMES
from kdcompose.training import projectors as _projectors
from kdcompose.training.attachments import ModelAttachments
from kdcompose.training.context import ForwardCapture, build_context, has_images
from kdcompose.training.shared_tokenizer import tokenizer_issues
from kdcompose.training.vision_only import encode_vision_only

SOURCE = "kdcompose.Distiller"


@dataclass(frozen=True)
class DistillOutput(CompositionOutput):
    """The composer's output for one batch, plus what the NaN/inf policy decided: `skipped` is
    True when a term went non-finite and every such term says `on_nonfinite: skip_step`; `total`
    is then a graph-connected 0, and the caller should not step the optimizer (zero its
    gradients and go on)."""

    skipped: bool = False


class Distiller:
    """Distil `student` from `teacher` with a kdcompose composition, in any training loop.

    `config` is a loaded `KDConfig`, a parsed YAML document (mapping), a resolved `Composition`
    or a built `LossComposer`. `teacher` may be None when no active term needs one. `vocab_size`
    (the tokenizer's length) lets LM terms align logits whose widths differ only by padding.
    `tokenizer` and `teacher_tokenizer` (Hugging Face fast tokenizers): the teacher is given the
    student's token ids, so with both given, a teacher whose tokenizer differs is refused before
    training (`kdcompose.training.shared_tokenizer`); `tokenizer` alone gives `vocab_size`.
    Build it before wrapping the models (DDP, Accelerate): it hooks modules by name and reads the
    LM heads. Raises `ConfigError` (naming the YAML key) for anything the models rule out.
    """

    def __init__(
        self,
        config: KDConfig | Mapping[str, Any] | Composition | LossComposer,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        vocab_size: int | None = None,
        tokenizer: Any | None = None,
        teacher_tokenizer: Any | None = None,
    ) -> None:
        self.composer = _composer_of(config)
        self.student, self.teacher = student, teacher
        self.vocab_size = len(tokenizer) if vocab_size is None and tokenizer is not None else vocab_size
        self._check_teacher()
        issues = tokenizer_issues(self.composer, tokenizer, teacher_tokenizer, logger.info)
        if issues:
            raise ConfigError(issues, source=SOURCE)
        self.projectors = nn.ModuleDict()
        self.attachments = ModelAttachments(
            self.composer, student, teacher, vocab_size=self.vocab_size, log=logger.info, attach=self._attach
        )
        self.attachments.open()
        self._closed = False
        if any(t.spec.on_nonfinite == SKIP_STEP for t in self.composer.active_terms):
            logger.info(
                "kdcompose: a term says on_nonfinite: skip_step; when `kd.loss(batch).skipped` is True, "
                "skip that optimizer step (zero the gradients instead of stepping)"
            )

    @classmethod
    def from_yaml(
        cls,
        path: str | Path,
        *,
        student: nn.Module,
        teacher: nn.Module | None = None,
        vocab_size: int | None = None,
        tokenizer: Any | None = None,
        teacher_tokenizer: Any | None = None,
    ) -> Distiller:
        """The composition of a kdcompose YAML config (the same `rlhf.loss_terms`,
        `rlhf.llm_kd_weight`, `custom.visual_kd` and `plugins:` that `kdcompose train` reads).
        Keys only the launcher reads (model, data, training, ...) are listed once in the log."""
        config = load_config(path)
        unused = sorted(config.arg_paths[k] for k in config.swift_args if k not in GKD_KNOB_NAMES)
        if unused:
            logger.info(
                f"kdcompose: {path}: the Distiller uses the loss composition; these keys are for "
                f"`kdcompose train` and not used here: {', '.join(unused)}"
            )
        return cls(
            config,
            student,
            teacher,
            vocab_size=vocab_size,
            tokenizer=tokenizer,
            teacher_tokenizer=teacher_tokenizer,
        )

    # ------------------------------------------------------------------ one batch

    def loss(
        self,
        batch: Mapping[str, Any],
        *,
        step: int | None = None,
        step_tokens: int | torch.Tensor | None = None,
        accumulation_steps: int = 1,
        student_generated: bool = False,
    ) -> DistillOutput:
        """The composed loss of one batch: runs the student, and the teacher only if an active
        term needs it.

        `batch` holds the models' inputs plus `labels` as Hugging Face causal LMs take them
        (the shape of `input_ids`, `-100` where no loss is taken, not shifted). `step`: the
        optimizer step, required when a term has a `schedule`. `step_tokens`: the labelled
        tokens of the whole optimizer step (all its micro-batches, all ranks), required by terms
        with `normalize: global_tokens`, with `accumulation_steps` micro-batches per step.
        `student_generated`: the completion was sampled from the student (terms such as `ce`
        skip such batches by default). A NaN/inf term raises `NonFiniteLossError` (its
        `on_nonfinite: error`) or marks the output `skipped`; this reads one small flag tensor
        on the host per call.
        """
        if self._closed:
            raise RuntimeError("this Distiller is closed; build a new one")
        step = self._step(step)
        needs = self.composer.needs_at(step)
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with self.attachments.capturing("student", needs) as student:
            student.logits = self.student(**inputs).logits
        teacher = self._teacher_forward(inputs, needs) if needs.teacher else None
        context = build_context(
            labels,
            student,
            teacher,
            attention_mask=batch.get("attention_mask"),
            images=has_images(batch),
            student_generated=student_generated,
            step=step,
            projectors=self.attachments.projectors,
            step_token_denominator=self._denominator(step_tokens, accumulation_steps),
            vocab_size=self.vocab_size,
        )
        return self._checked(self.composer(context), step)

    def _teacher_forward(self, inputs: Mapping[str, Any], needs: Any) -> ForwardCapture:
        teacher = self.teacher
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            capture = stack.enter_context(self.attachments.capturing("teacher", needs))
            if needs.teacher_language_model or not encode_vision_only(teacher, inputs):
                capture.logits = teacher(**inputs).logits
        return capture

    def _step(self, step: int | None) -> int:
        if step is not None:
            return int(step)
        scheduled = [t for t in self.composer.active_terms if t.spec.schedule is not None]
        if scheduled:
            raise ValueError(
                f"{scheduled[0].origin}.schedule: the term's weight follows the optimizer step; pass it as "
                "kd.loss(batch, step=global_step)"
            )
        return 0

    def _denominator(
        self, step_tokens: int | torch.Tensor | None, accumulation_steps: int
    ) -> torch.Tensor | None:
        global_terms = [
            t for t in self.composer.active_terms if t.needs.token_mean and t.spec.normalize == GLOBAL_TOKENS
        ]
        if not global_terms:
            return None
        if step_tokens is None:
            raise ValueError(
                f"{global_terms[0].origin}.normalize: global_tokens divides by the labelled tokens of the "
                "whole optimizer step; pass them as kd.loss(batch, step_tokens=N, accumulation_steps=G)"
            )
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return step_token_denominator(torch.as_tensor(step_tokens), world, accumulation_steps)

    def _checked(self, output: CompositionOutput, step: int) -> DistillOutput:
        names = [r.name for r in output.terms]
        flags = nonfinite_flags([r.weighted for r in output.terms] + [output.total])
        rows = [tuple(map(bool, row)) for row in flags.tolist()]
        policies = {t.name: t.spec.on_nonfinite for t in self.composer.active_terms}
        result = verdict(rows, [*names, TOTAL], policies)
        if result.ok:
            return DistillOutput(output.total, output.terms)
        if result.error:
            metric_keys = {t.name: t.metric_key for t in self.composer.active_terms}
            message = error_message(result.offending, step, metric_keys=metric_keys)
            raise NonFiniteLossError(message, result.culprits, step + 1)
        zero = torch.where(torch.isfinite(output.total), output.total, torch.zeros_like(output.total))
        return DistillOutput(zero, output.terms, skipped=True)

    # ------------------------------------------------------------------ projectors and state

    def _attach(self, plans: list[_projectors.ProjectorPlan]) -> dict[str, nn.Module]:
        """Build the projectors the feature pairs ask for, owned by the Distiller."""
        device = next((p.device for p in self.student.parameters()), None)
        for plan in plans:
            self.projectors[plan.key] = _projectors.build_projector(
                plan.kind, plan.in_width, plan.out_width, device=device
            )
        return dict(self.projectors.items())

    def parameters(self) -> Iterator[nn.Parameter]:
        """What kdcompose adds to training (the feature projectors): give it to the optimizer."""
        return self.projectors.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.projectors.named_parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The projectors' weights (`<term>__<pair>.weight` / `.bias`), to save with a checkpoint."""
        return _projectors.projector_state(dict(self.projectors.items()))

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned (a missing or misshapen projector is an error)."""
        for key, module in self.projectors.items():
            own = {name[len(key) + 1 :]: t for name, t in state.items() if name.startswith(key + ".")}
            if not own:
                raise KeyError(f"the state has no weights for projector {key!r}")
            module.load_state_dict(own)

    def all_reduce_gradients(self) -> None:
        """Average the projectors' gradients over the ranks of the default process group (they
        live outside the student, so DDP does not); call after backward, before the optimizer
        step, on every rank. A no-op in a single process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for parameter in self.projectors.parameters():
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            parameter.grad /= dist.get_world_size()

    # ------------------------------------------------------------------ lifecycle

    def formula(self) -> str:
        return self.composer.formula()

    def close(self) -> None:
        """Remove every hook kdcompose put on the models (idempotent)."""
        self.attachments.close()
        self._closed = True

    def __enter__(self) -> Distiller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_teacher(self) -> None:
        needing = [t for t in self.composer.active_terms if t.needs.teacher]
        if needing and self.teacher is None:
            raise ConfigError(
                [
                    ConfigIssue(t.origin, "needs a teacher: pass Distiller(..., teacher=model), or weight 0")
                    for t in needing
                ],
                source=SOURCE,
            )
        named = sorted(
            {r.teacher for t in self.composer.active_terms for r in t.needs.teacher_topk if r.teacher}
        )
        if named:
            raise ConfigError.single(
                "rlhf.teachers",
                f"the Distiller's teacher is the model passed to it; named teachers ({', '.join(named)}) are "
                "read by `kdcompose train`",
                source=SOURCE,
            )


def _composer_of(config: KDConfig | Mapping[str, Any] | Composition | LossComposer) -> LossComposer:
    if isinstance(config, LossComposer):
        return config
    if isinstance(config, Composition):
        return LossComposer.from_composition(config)
    if isinstance(config, Mapping):
        config = parse_config(config, source=SOURCE)
    if config.teachers:
        where = sorted(source.origin for source in config.teachers.values())
        raise ConfigError(
            [
                ConfigIssue(
                    w,
                    "the Distiller's teacher is the model passed to it; caches and servers are read "
                    "by `kdcompose train`",
                )
                for w in where
            ],
            source=config.source or SOURCE,
        )
    return config.composer


__all__ = ["DistillOutput", "Distiller"]
