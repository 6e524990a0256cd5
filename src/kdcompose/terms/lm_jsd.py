"""`lm_jsd`: generalized JSD between student and teacher LM-head distributions."""

from __future__ import annotations

import torch
from pydantic import StrictBool

from kdcompose.defaults import SWIFT_GKD_BETA, SWIFT_GKD_TEMPERATURE
from kdcompose.functional import fused_linear_generalized_jsd, generalized_jsd
from kdcompose.registry import register_term
from kdcompose.schema.types import PositiveFloat, PositiveInt, Probability
from kdcompose.terms.base import LossContext, LossTerm, TermNeeds, TermSpec


class LmJsdSpec(TermSpec):
    """`lm_jsd` knobs. `beta`/`temperature` left unset inherit `rlhf.beta`/`rlhf.temperature`
    (ms-swift's GKD defaults 0.5 / 0.9 when those are absent too)."""

    beta: Probability | None = None
    temperature: PositiveFloat | None = None
    chunk_size: PositiveInt | None = None
    fused: StrictBool = False
    """Compute the JSD from both models' final hidden states and LM-head weights, one chunk of
    labelled tokens at a time, so neither model's full `[tokens, vocab]` logits (nor the student's
    logits gradient) ever exist (`kdcompose.functional.fused_linear_generalized_jsd`). Same value
    and gradients as `false` up to float rounding; saves memory, not time (docs/performance.md).
    The LM heads must be plain linear layers with the same number of rows."""


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
    def needs(self) -> TermNeeds:
        if self.spec.fused:
            return TermNeeds(student_hidden=True, teacher_hidden=True, labels=True, token_mean=True)
        return TermNeeds(student_logits=True, teacher_logits=True, labels=True, token_mean=True)

    def compute(self, ctx: LossContext) -> torch.Tensor:
        return self._fused_mean(ctx) if self.spec.fused else self._logits_mean(ctx)

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
        s_weight, s_bias = _linear_head(ctx.student_lm_head, "student", self.name)
        t_weight, t_bias = _linear_head(ctx.teacher_lm_head, "teacher", self.name)
        if s_weight.shape[0] != t_weight.shape[0]:
            raise ValueError(
                f"term {self.name!r} (fused): the student's LM head has {s_weight.shape[0]} rows and the "
                f"teacher's {t_weight.shape[0]}; vocabularies that differ by padding are aligned only on "
                f"logits: set `rlhf.loss_terms.{self.name}.fused: false`"
            )
        return fused_linear_generalized_jsd(
            ctx.student_hidden,
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

    def describe(self) -> str:
        params = f"beta={self.beta:g}"
        if self.temperature != 1.0:
            params += f", T={self.temperature:g}"
        if self.spec.normalize == "global_tokens":
            params += ", global_tokens"
        if self.spec.fused:
            params += ", fused"
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
