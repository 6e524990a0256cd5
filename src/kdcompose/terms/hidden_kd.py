"""`hidden_kd`: distillation of any module's hidden states, student layer i against teacher layer j.

The most common LLM distillation term after the logits (TinyBERT, MiniLM-style layer
mapping, FitNets): each pair names a module of the student and one of the teacher by dotted
path (decoder layers above all: `model.language_model.layers.1`), a distance and an
optional trainable projector for differing widths. The term declares the pairs as module
taps; the framework hooks them, checks paths and widths before training, builds and saves
the projectors -- this file holds no framework code, which is the point.

Positions: `labelled` (default) compares the positions whose next token carries a label --
the same positions `lm_jsd` distils, i.e. the completion; `all` compares every non-padding
position. Module outputs cover the whole sequence even when ms-swift trims the logits
(`logits_to_keep`), so the masks come from `LossContext.sequence_labels` / `attention_mask`.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from kdcompose.defaults import IGNORE_INDEX
from kdcompose.functional import feature_distance
from kdcompose.primitives import connected_zero
from kdcompose.registry import register_term
from kdcompose.schema.types import Weight
from kdcompose.terms.base import FeaturePair, LossContext, LossTerm, Tap, TermNeeds, TermSpec, TermValue
from kdcompose.terms.features import compare_features

Distance = Literal["mse", "cosine", "smooth_l1"]


class HiddenPairSpec(BaseModel):
    """One student module compared with one teacher module."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    student: StrictStr = Field(min_length=1)
    """Dotted module path in the student, e.g. `model.language_model.layers.1`."""
    teacher: StrictStr = Field(min_length=1)
    """Dotted module path in the teacher, e.g. `model.language_model.layers.2`."""
    distance: Distance = "mse"
    weight: Weight = 1.0
    projector: Literal["linear"] | None = None
    """`linear`: learn a student->teacher width map (needed when the widths differ)."""
    call: int | None = None
    """For a module that runs several times per forward: which call (0 first, -1 last);
    unset compares every call, pairwise."""


class HiddenKdSpec(TermSpec):
    pairs: list[HiddenPairSpec] = Field(min_length=1)
    positions: Literal["labelled", "all"] = "labelled"


@register_term("hidden_kd")
class HiddenKdTerm(LossTerm):
    """Weighted sum over pairs of the distance between the paired modules' outputs; each
    pair's share is logged as `hidden_kd_loss_<i>`."""

    spec_class = HiddenKdSpec
    default_metric = "hidden_kd_loss"
    spec: HiddenKdSpec

    def pair(self, index: int) -> FeaturePair:
        spec = self.spec.pairs[index]
        origin = f"{self.origin}.pairs.{index}"
        student = Tap("student", spec.student, call=spec.call, origin=f"{origin}.student")
        teacher = Tap("teacher", spec.teacher, call=spec.call, origin=f"{origin}.teacher")
        return FeaturePair(f"{self.name}__{index}", student, teacher, spec.projector, origin)

    @property
    def needs(self) -> TermNeeds:
        pairs = frozenset(self.pair(i) for i in range(len(self.spec.pairs)) if self.spec.pairs[i].weight > 0)
        return TermNeeds(pairs=pairs, labels=self.spec.positions == "labelled")

    def compute(self, ctx: LossContext) -> TermValue:
        parts: dict[str, torch.Tensor] = {}
        for index, spec in enumerate(self.spec.pairs):
            if spec.weight <= 0:
                continue
            pair = self.pair(index)
            mask = self._positions(ctx)
            if mask is not None and not bool(mask.any()):  # nothing to compare: a connected 0
                anchor = ctx.tapped(pair.student)
                parts[str(index)] = connected_zero(anchor[0]) if anchor else ctx.zero()
                continue
            distance = compare_features(
                ctx,
                pair,
                partial(_distance, distance=spec.distance),
                None if mask is None else partial(_select, mask=mask, origin=pair.origin),
            )
            parts[str(index)] = spec.weight * distance
        value = torch.stack(list(parts.values())).sum() if parts else ctx.zero()
        return TermValue(value=value, parts=parts)

    def _positions(self, ctx: LossContext) -> torch.Tensor | None:
        if self.spec.positions == "labelled":
            labels = ctx.sequence_labels if ctx.sequence_labels is not None else ctx.labels
            if labels is None:
                raise ValueError(f"{self.origin}: positions: labelled needs labels in the loss context")
            return labels != IGNORE_INDEX
        if ctx.attention_mask is None:
            return None
        return ctx.attention_mask.bool()

    def describe(self) -> str:
        inner = []
        for spec in self.spec.pairs:
            if spec.weight <= 0:
                continue
            text = f"{spec.student}->{spec.teacher}:{spec.distance}"
            if spec.projector:
                text += f"+{spec.projector}_projector"
            inner.append(text if spec.weight == 1 else f"{spec.weight:g}*{text}")
        positions = "" if self.spec.positions == "labelled" else ", all positions"
        return f"{self.name}({', '.join(inner)}{positions})"


def _distance(student: torch.Tensor, teacher: torch.Tensor, *, distance: str) -> torch.Tensor:
    return feature_distance(student, teacher, distance)


def _select(
    student: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor, origin: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tensors at the masked positions ([batch, tokens, width] -> [n, width])."""
    if student.shape[:-1] != mask.shape or teacher.shape[:-1] != mask.shape:
        raise ValueError(
            f"{origin}: the tapped outputs have shapes {tuple(student.shape)} / {tuple(teacher.shape)} but "
            f"the batch has {tuple(mask.shape)} tokens; hidden_kd compares per-token outputs "
            "[batch, tokens, width] (tap a decoder layer, not a pooled module)"
        )
    return student[mask], teacher[mask]
