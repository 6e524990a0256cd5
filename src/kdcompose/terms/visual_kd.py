"""`visual_kd`: feature distillation of the vision tower, aligner and deepstack mergers.

Features are recorded with forward hooks by the trainer (see the ms-swift integration);
this term only compares what was recorded. Each target has its own weight and distance;
the term's value is the weighted sum over enabled targets, and each target's share is
reported as a part so dashboards can show `vision_kd_loss_<target>`.

A target whose student and teacher widths differ needs `projector: linear`: the student's
features then go through a trainable linear map (`kdcompose.projectors`, built and owned
by the trainer, handed over in `LossContext.projectors`) before the distance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr

from kdcompose.functional import feature_distance
from kdcompose.projectors import FeatureWidthError, projector_key, width_mismatch_message
from kdcompose.registry import register_term
from kdcompose.schema.types import Weight
from kdcompose.terms.base import LossContext, LossTerm, TermNeeds, TermSpec, TermValue

VISUAL_TARGETS: tuple[str, ...] = ("vit", "aligner", "deepstack")


class VisualTargetSpec(BaseModel):
    """One feature target: `vit` (vision tower output before the merger), `aligner`
    (merger output) or `deepstack` (each deepstack merger's output)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: StrictBool = True
    weight: Weight = 1.0
    distance: Literal["mse", "cosine", "smooth_l1"] = "mse"
    module: StrictStr | None = None
    """Module path override (e.g. `model.vision_tower.proj`) for model families whose
    layout kdcompose does not know; relative to the unwrapped model."""
    projector: Literal["linear"] | None = None
    """`linear`: map the student's features to the teacher's width with a trainable linear
    layer before the distance (needed when the widths differ, e.g. the aligner of a smaller
    student). Trained with the student and saved in its checkpoints (kdcompose.projectors)."""

    @property
    def active(self) -> bool:
        return self.enabled and self.weight > 0


class VisualKdSpec(TermSpec):
    """Same shape as the legacy `custom.visual_kd` block: a weight, an optional `enabled`
    switch, and the target blocks directly under it."""

    enabled: StrictBool = True
    vit: VisualTargetSpec | None = None
    aligner: VisualTargetSpec | None = None
    deepstack: VisualTargetSpec | None = None

    def targets(self) -> dict[str, VisualTargetSpec]:
        """Target blocks that are present, in a fixed order."""
        found = {name: getattr(self, name) for name in VISUAL_TARGETS}
        return {name: spec for name, spec in found.items() if spec is not None}

    def active_targets(self) -> dict[str, VisualTargetSpec]:
        return {name: spec for name, spec in self.targets().items() if spec.active}


@register_term("visual_kd")
class VisualKdTerm(LossTerm):
    """Weighted sum over targets of the distance between student and teacher features;
    a target recorded several times (deepstack mergers) contributes the mean."""

    spec_class = VisualKdSpec
    default_metric = "vision_kd_loss"
    spec: VisualKdSpec

    @property
    def weight(self) -> float:
        return self.spec.weight if self.spec.enabled else 0.0

    @property
    def targets(self) -> dict[str, VisualTargetSpec]:
        return self.spec.active_targets()

    @property
    def needs(self) -> TermNeeds:
        names = frozenset(self.targets)
        return TermNeeds(student_features=names, teacher_features=names)

    def applies_to(self, ctx: LossContext) -> bool:
        if ctx.has_images is False:
            return False
        return any(ctx.student_features.get(name) for name in self.targets)

    def compute(self, ctx: LossContext) -> TermValue:
        parts: dict[str, torch.Tensor] = {}
        for name, target in self.targets.items():
            student = list(ctx.student_features.get(name, ()))
            teacher = list(ctx.teacher_features.get(name, ()))
            if not student and not teacher:
                continue
            if len(student) != len(teacher):
                raise ValueError(
                    f"term {self.name!r}, target {name!r}: recorded {len(student)} student feature tensor(s) "
                    f"but {len(teacher)} teacher one(s); student and teacher must have the same "
                    "modules for this target"
                )
            project = self._projector(ctx, name, target)
            distances = []
            for s, t in zip(student, teacher, strict=True):
                if project is not None:
                    s = project(s)
                elif s.shape[-1] != t.shape[-1]:
                    raise FeatureWidthError(width_mismatch_message(self.name, name, s.shape[-1], t.shape[-1]))
                distances.append(feature_distance(s, t, target.distance))
            parts[name] = target.weight * torch.stack(distances).mean()
        if not parts:
            raise ValueError(f"term {self.name!r}: no features recorded for targets {sorted(self.targets)}")
        value = torch.stack(list(parts.values())).sum()
        return TermValue(value=value, parts=parts)

    def _projector(
        self, ctx: LossContext, name: str, target: VisualTargetSpec
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if target.projector is None:
            return None
        project = ctx.projectors.get(projector_key(self.name, name))
        if project is None:
            raise ValueError(
                f"term {self.name!r}, target {name!r} is configured with `projector: {target.projector}` but "
                "the loss context carries no projector for it: the ms-swift trainer builds them; in your own "
                "loop build them with kdcompose.projectors.plan_projectors / attach_projectors and pass "
                "them as LossContext.projectors"
            )
        return project

    def describe(self) -> str:
        inner = ", ".join(_describe_target(name, t) for name, t in self.targets.items())
        return f"{self.name}({inner})"


def _describe_target(name: str, target: VisualTargetSpec) -> str:
    text = f"{name}:{target.distance}"
    if target.projector is not None:
        text += f"+{target.projector}_projector"
    return text if target.weight == 1 else f"{target.weight:g}*{text}"
