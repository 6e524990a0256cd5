"""`lm_jsd`: generalized JSD between student and teacher LM-head distributions."""

from __future__ import annotations

import torch

from kdcompose.defaults import SWIFT_GKD_BETA, SWIFT_GKD_TEMPERATURE
from kdcompose.functional import generalized_jsd
from kdcompose.registry import register_term
from kdcompose.schema.types import PositiveFloat, PositiveInt, Probability
from kdcompose.terms.base import LossContext, LossTerm, TermNeeds, TermSpec


class LmJsdSpec(TermSpec):
    """`lm_jsd` knobs. `beta`/`temperature` left unset inherit `rlhf.beta`/`rlhf.temperature`
    (ms-swift's GKD defaults 0.5 / 0.9 when those are absent too)."""

    beta: Probability | None = None
    temperature: PositiveFloat | None = None
    chunk_size: PositiveInt | None = None


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
        return TermNeeds(student_logits=True, teacher_logits=True, labels=True)

    def compute(self, ctx: LossContext) -> torch.Tensor:
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

    def describe(self) -> str:
        params = f"beta={self.beta:g}"
        if self.temperature != 1.0:
            params += f", T={self.temperature:g}"
        return f"{self.name}({params})"
