"""`lm_jsd`: generalized JSD between student and teacher LM-head distributions.

With `topk: K` the teacher is represented by its K most likely tokens -- what a teacher cache
or a served teacher can hand over, and what ms-swift's `gkd_logits_topk` does with a local
teacher. `missing_mass` names what happens to the probability outside those K tokens
(kdcompose.functional.topk_jsd): `renorm` (ms-swift), `tail` (TRL), `zero` (DistillKit).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from pydantic import StrictStr

from kdcompose.defaults import SWIFT_GKD_BETA, SWIFT_GKD_TEMPERATURE
from kdcompose.errors import ConfigIssue
from kdcompose.functional import (
    fused_linear_generalized_jsd,
    fused_linear_topk_generalized_jsd,
    generalized_jsd,
    teacher_topk,
    topk_generalized_jsd,
    topk_mass,
)
from kdcompose.functional.vocab import align_labelled_rows
from kdcompose.registry import register_term
from kdcompose.schema.types import Bool, PositiveFloat, PositiveInt, Probability
from kdcompose.sharding import call_through_head
from kdcompose.terms.base import LossContext, LossTerm, TermNeeds, TermSpec, TermValue, TopkRequest


class LmJsdSpec(TermSpec):
    """`lm_jsd` knobs. `beta`/`temperature` left unset inherit `rlhf.beta`/`rlhf.temperature`
    (ms-swift's GKD defaults 0.5 / 0.9 when those are absent too)."""

    beta: Probability | None = None
    temperature: PositiveFloat | None = None
    chunk_size: PositiveInt | None = None
    fused: Bool = False
    """Compute the JSD from both models' final hidden states and LM-head weights, one chunk of
    labelled tokens at a time, so neither model's full `[tokens, vocab]` logits (nor the student's
    logits gradient) ever exist (`kdcompose.functional.fused_linear_generalized_jsd`). Same value
    and gradients as `false` up to float rounding; saves memory, not time (docs/performance.md).
    The LM heads must be plain linear layers with the same number of rows."""
    topk: PositiveInt | None = None
    """Distil only the teacher's K most likely tokens per position (`missing_mass` says what
    happens to the rest). Required for a cached or served teacher; ms-swift's
    `rlhf.gkd_logits_topk: K` sets it. Each step also logs `<metric>_topk_mass`."""
    missing_mass: Literal["renorm", "tail", "zero"] = "renorm"
    """`renorm`: both sides renormalized over the teacher's top-K (ms-swift's gkd_logits_topk);
    `tail`: a K+1-th bucket holds the rest on both sides (TRL); `zero`: truncated teacher vs the
    student's full distribution, forward KL only, needs `beta: 0` (DistillKit / axolotl)."""
    teacher: StrictStr | None = None
    """A named teacher from `rlhf.teachers` (a cache or a server); unset: the default teacher."""


@register_term("lm_jsd")
class LmJsdTerm(LossTerm):
    """Generalized JSD (beta 0: KL(teacher||student), 1: KL(student||teacher)) per token,
    averaged over the tokens that carry a label, exactly as ms-swift's GKD loss."""

    spec_class = LmJsdSpec
    default_metric = "llm_kd_loss"
    spec: LmJsdSpec

    @property
    def beta(self) -> float:
        return SWIFT_GKD_BETA if self.spec.beta is None else self.spec.beta

    @property
    def temperature(self) -> float:
        return SWIFT_GKD_TEMPERATURE if self.spec.temperature is None else self.spec.temperature

    @property
    def teacher_name(self) -> str:
        """`""` for the default teacher, else the `rlhf.teachers` name."""
        return self.spec.teacher or ""

    @property
    def needs(self) -> TermNeeds:
        topk: frozenset[TopkRequest] = frozenset()
        if self.spec.topk is not None:
            topk = frozenset({TopkRequest(self.teacher_name, self.spec.topk, f"{self.origin}.topk")})
        local = not self.spec.teacher  # a named teacher is never a local model
        if self.spec.fused:
            return TermNeeds(
                student_hidden=True, teacher_hidden=local, labels=True, token_mean=True, teacher_topk=topk
            )
        return TermNeeds(
            student_logits=True, teacher_logits=local, labels=True, token_mean=True, teacher_topk=topk
        )

    def config_issues(self) -> list[ConfigIssue]:
        issues = super().config_issues()
        spec, origin = self.spec, self.origin
        if spec.topk is None:
            for key, unset in (("missing_mass", "renorm"), ("teacher", None)):
                if getattr(spec, key) != unset:
                    issues.append(
                        ConfigIssue(
                            f"{origin}.{key}", f"`{key}` applies to top-K distillation: set `topk: K` too"
                        )
                    )
        elif spec.missing_mass == "zero" and self.beta != 0:
            issues.append(
                ConfigIssue(
                    f"{origin}.beta",
                    f"missing_mass: zero compares a truncated teacher with the full student, which only a "
                    f"forward KL does meaningfully: set `beta: 0` (got {self.beta:g}), or use renorm / tail",
                )
            )
        return issues

    def compute(self, ctx: LossContext) -> torch.Tensor | TermValue:
        if ctx.student_logits is not None and ctx.teacher_logits is not None and ctx.labels is not None:
            student, teacher, labels = align_labelled_rows(
                ctx.student_logits, ctx.teacher_logits, ctx.labels, vocab_size=ctx.vocab_size
            )
            ctx = replace(ctx, student_logits=student, teacher_logits=teacher, labels=labels)
        if self.spec.topk is not None:
            return self._topk(ctx)
        return self._fused_mean(ctx) if self.spec.fused else self._logits_mean(ctx)

    def _topk(self, ctx: LossContext) -> TermValue:
        k, mode, beta, temperature = self.spec.topk, self.spec.missing_mass, self.beta, self.temperature
        given = ctx.teacher_topk.get(self.teacher_name)
        if given is None and self.spec.teacher:
            raise ValueError(
                f"{self.origin}: teacher {self.spec.teacher!r} handed over no top-K distribution for this "
                "batch (the trainer fills LossContext.teacher_topk from rlhf.teachers)"
            )
        if (
            given is None and self.spec.fused
        ):  # the teacher's top-K taken chunk by chunk from its hidden states
            t_weight, t_bias = _linear_head(ctx.teacher_lm_head, "teacher", self.name)

            def local_topk(head: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                s_weight, s_bias = _linear_head(head, "student", self.name)
                return fused_linear_topk_generalized_jsd(
                    hidden,
                    s_weight,
                    ctx.labels,
                    teacher_hidden=ctx.teacher_hidden,
                    teacher_weight=t_weight,
                    k=k,
                    beta=beta,
                    temperature=temperature,
                    missing_mass=mode,
                    chunk_size=self.spec.chunk_size,
                    student_bias=s_bias,
                    teacher_bias=t_bias,
                    return_topk_mass=True,
                )

            value, mass = call_through_head(ctx.student_lm_head, local_topk, ctx.student_hidden)
            return TermValue(value, stats={"topk_mass": mass})
        if given is not None:  # a cache or server: log-probabilities at temperature 1
            logprobs, ids = given[0][..., :k], given[1][..., :k]
        elif ctx.teacher_logits is None:
            raise ValueError(f"term {self.name!r} needs the teacher's logits or top-K in the loss context")
        else:
            # renorm renormalizes over the K ids (temperature applies to both sides there); tail and
            # zero read the teacher's full-vocabulary log-probabilities at the training temperature.
            logprobs, ids = teacher_topk(
                ctx.teacher_logits, k, temperature=1.0 if mode == "renorm" else temperature
            )
        mass = topk_mass(logprobs, ctx.labels)
        if self.spec.fused:  # given top-K, the student fused: only its logits at the K ids are built

            def given_topk(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
                s_weight, s_bias = _linear_head(head, "student", self.name)
                return fused_linear_topk_generalized_jsd(
                    hidden,
                    s_weight,
                    ctx.labels,
                    teacher_topk_logprobs=logprobs,
                    teacher_topk_ids=ids,
                    beta=beta,
                    temperature=temperature,
                    missing_mass=mode,
                    chunk_size=self.spec.chunk_size,
                    student_bias=s_bias,
                )

            value = call_through_head(ctx.student_lm_head, given_topk, ctx.student_hidden)
        else:
            value = topk_generalized_jsd(
                self._student_logits(ctx),
                logprobs,
                ids,
                ctx.labels,
                beta=beta,
                temperature=temperature,
                missing_mass=mode,
                chunk_size=self.spec.chunk_size,
            )
        return TermValue(value, stats={"topk_mass": mass})

    def _student_logits(self, ctx: LossContext) -> torch.Tensor:
        if ctx.student_logits is None:
            raise ValueError(f"term {self.name!r} needs the student's logits in the loss context")
        return ctx.student_logits

    def _logits_mean(self, ctx: LossContext) -> torch.Tensor:
        if ctx.student_logits is None or ctx.teacher_logits is None:
            raise ValueError(f"term {self.name!r} needs student and teacher logits in the loss context")
        return generalized_jsd(
            ctx.student_logits,
            ctx.teacher_logits,
            ctx.labels,
            beta=self.beta,
            temperature=self.temperature,
            chunk_size=self.spec.chunk_size,
        )

    def _fused_mean(self, ctx: LossContext) -> torch.Tensor:
        if ctx.student_hidden is None or ctx.teacher_hidden is None:
            raise ValueError(
                f"term {self.name!r} (fused) needs the student's and teacher's final hidden states in the "
                "loss context (student_hidden / teacher_hidden)"
            )
        t_weight, t_bias = _linear_head(ctx.teacher_lm_head, "teacher", self.name)

        def fused(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
            # Inside the head's own forward: under ZeRO-3 / FSDP2 its weight is whole here.
            s_weight, s_bias = _linear_head(head, "student", self.name)
            if s_weight.shape[0] != t_weight.shape[0]:
                raise ValueError(
                    f"term {self.name!r} (fused): the student's LM head has {s_weight.shape[0]} rows and the "
                    f"teacher's {t_weight.shape[0]}; vocabularies that differ by padding are aligned only on "
                    f"logits: set `{self.origin}.fused: false`"
                )
            return fused_linear_generalized_jsd(
                hidden,
                s_weight,
                ctx.teacher_hidden,
                t_weight,
                ctx.labels,
                beta=self.beta,
                temperature=self.temperature,
                chunk_size=self.spec.chunk_size,
                student_bias=s_bias,
                teacher_bias=t_bias,
            )

        return call_through_head(ctx.student_lm_head, fused, ctx.student_hidden)

    def describe(self) -> str:
        params = f"beta={self.beta:g}"
        if self.temperature != 1.0:
            params += f", T={self.temperature:g}"
        if self.spec.normalize == "global_tokens":
            params += ", global_tokens"
        if self.spec.fused:
            params += ", fused"
        if self.spec.topk is not None:
            params += f", top{self.spec.topk}" + (
                "" if self.spec.missing_mass == "renorm" else f" {self.spec.missing_mass}"
            )
        if self.spec.teacher:
            params += f", teacher={self.spec.teacher}"
        return f"{self.name}({params})"


def _linear_head(
    head: torch.nn.Module | None, side: str, term: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(weight [V, H], bias or None)` of an LM head the fused JSD can read directly."""
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"term {term!r} (fused) needs the {side}'s LM head as a linear layer with a [vocab, hidden] "
            f"weight in the loss context ({side}_lm_head), got {type(head).__name__}"
        )
    bias = getattr(head, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None
