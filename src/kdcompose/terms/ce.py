"""`ce`: cross-entropy of the student on the labels (ms-swift's `sft_alpha` term)."""

from __future__ import annotations

import torch

from kdcompose.functional import masked_cross_entropy
from kdcompose.registry import register_term
from kdcompose.schema.types import Bool
from kdcompose.terms.base import LossContext, LossTerm, TermNeeds, TermSpec


class CeSpec(TermSpec):
    """`ce` knobs. ms-swift adds its SFT loss only on dataset batches: a completion the
    student sampled itself is not a target worth imitating, so by default neither do we."""

    on_student_generated: Bool = False


@register_term("ce")
class CeTerm(LossTerm):
    """Token-mean cross-entropy over labelled positions (ignore_index -100)."""

    spec_class = CeSpec
    default_metric = "sft_loss"
    spec: CeSpec

    @property
    def needs(self) -> TermNeeds:
        return TermNeeds(student_logits=True, labels=True, token_mean=True)

    def applies_to(self, ctx: LossContext) -> bool:
        return self.spec.on_student_generated or not ctx.student_generated

    def compute(self, ctx: LossContext) -> torch.Tensor:
        if ctx.student_logits is None or ctx.labels is None:
            raise ValueError(f"term {self.name!r} needs student logits and labels in the loss context")
        return masked_cross_entropy(ctx.student_logits, ctx.labels)

    def describe(self) -> str:
        options = ["all batches"] if self.spec.on_student_generated else []
        if self.spec.normalize == "global_tokens":
            options.append("global_tokens")
        return f"{self.name}({', '.join(options)})" if options else self.name
