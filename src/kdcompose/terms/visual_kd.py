"""`visual_kd`: feature distillation of the vision tower, aligner and deepstack mergers.

Each target is a pair of module taps (`FeaturePair`): the framework hooks the declared
module paths on both models and records them during the loss forward (kdcompose.training.taps);
this term only compares what was recorded. `vit` / `aligner` / `deepstack` are default
paths for the Qwen2-VL / Qwen2.5-VL / Qwen3-VL layout; `module:` points a target anywhere.
Each target has its own weight and distance;
the term's value is the weighted sum over enabled targets, and each target's share is
reported as a part so dashboards can show `vision_kd_loss_<target>`.

A target whose student and teacher widths differ needs `projector: linear`: the student's
features then go through a trainable linear map (`kdcompose.training.projectors`, built and owned
by the trainer from the declared pair, handed over in `LossContext.projectors`) before the
distance.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, StrictStr

from kdcompose.errors import ConfigIssue
from kdcompose.functional import feature_distance
from kdcompose.registry import register_term
from kdcompose.schema.types import Bool, Weight
from kdcompose.terms.base import FeaturePair, LossContext, LossTerm, Tap, TermNeeds, TermSpec, TermValue
from kdcompose.terms.features import compare_features

VISUAL_TARGETS: tuple[str, ...] = ("vit", "aligner", "deepstack")
DEFAULT_TARGET_PATHS: dict[str, str] = {
    "vit": "model.visual",
    "aligner": "model.visual.merger",
    "deepstack": "model.visual.deepstack_merger_list",
}
"""Default module paths (relative to the unwrapped model) for the Qwen2-VL / Qwen2.5-VL /
Qwen3-VL families in transformers 5.x. `vit` is the vision tower: its output carries the
pre-merger patch features in `last_hidden_state`. `deepstack` taps every child of the merger list."""
EXPAND_CHILDREN: frozenset[str] = frozenset({"deepstack"})


class VisualTargetSpec(BaseModel):
    """One feature target: `vit` (vision tower output before the merger), `aligner`
    (merger output) or `deepstack` (each deepstack merger's output)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: Bool = True
    weight: Weight = 1.0
    distance: Literal["mse", "cosine", "smooth_l1"] = "mse"
    module: StrictStr | None = None
    """Module path override (e.g. `model.vision_tower.proj`) for model families whose
    layout kdcompose does not know; relative to the unwrapped model."""
    projector: Literal["linear"] | None = None
    """`linear`: map the student's features to the teacher's width with a trainable linear
    layer before the distance (needed when the widths differ, e.g. the aligner of a smaller
    student). Trained with the student and saved in its checkpoints (kdcompose.training.projectors)."""

    @property
    def active(self) -> bool:
        return self.enabled and self.weight > 0


class VisualKdSpec(TermSpec):
    """Same shape as the legacy `custom.visual_kd` block: a weight, an optional `enabled`
    switch, and the target blocks directly under it."""

    enabled: Bool = True
    vit: VisualTargetSpec | None = None
    aligner: VisualTargetSpec | None = None
    deepstack: VisualTargetSpec | None = None

    def targets(self) -> dict[str, VisualTargetSpec]:
        """Target blocks that are present, in a fixed order."""
        found = {name: getattr(self, name) for name in VISUAL_TARGETS}
        return {name: spec for name, spec in found.items() if spec is not None}

    def active_targets(self) -> dict[str, VisualTargetSpec]:
        return {name: spec for name, spec in self.targets().items() if spec.active}

    def effective_weight(self) -> float:
        return self.weight if self.enabled else 0.0


@register_term("visual_kd")
class VisualKdTerm(LossTerm):
    """Weighted sum over targets of the distance between student and teacher features;
    a target recorded several times (deepstack mergers) contributes the mean."""

    spec_class = VisualKdSpec
    default_metric = "vision_kd_loss"
    spec: VisualKdSpec

    @property
    def targets(self) -> dict[str, VisualTargetSpec]:
        return self.spec.active_targets()

    def pair(self, target: str) -> FeaturePair:
        """The module taps of `target` on both models, as a feature pair."""
        spec = self.spec.active_targets()[target]
        origin = f"{self.origin}.{target}"
        path = spec.module or DEFAULT_TARGET_PATHS[target]
        children = spec.module is None and target in EXPAND_CHILDREN
        where = f"{origin}.module" if spec.module else origin

        def tap(side: str) -> Tap:
            return Tap(side, path, children=children, vision_only=True, origin=where)  # type: ignore[arg-type]

        return FeaturePair(f"{self.name}__{target}", tap("student"), tap("teacher"), spec.projector, origin)

    @property
    def needs(self) -> TermNeeds:
        return TermNeeds(pairs=frozenset(self.pair(name) for name in self.targets))

    def config_issues(self) -> list[ConfigIssue]:
        issues = super().config_issues()
        if not self.targets:
            issues.append(
                ConfigIssue(
                    self.origin,
                    "visual KD is enabled but no target is: enable at least one of vit, aligner, deepstack "
                    "(e.g. `aligner: {enabled: true, weight: 1.0}`) or set its weight to 0",
                )
            )
        return issues

    def applies_to(self, ctx: LossContext) -> bool:
        if ctx.has_images is False:
            return False
        return any(ctx.tapped(self.pair(name).student) for name in self.targets)

    def compute(self, ctx: LossContext) -> TermValue:
        parts: dict[str, torch.Tensor] = {}
        for name, target in self.targets.items():
            pair = self.pair(name)
            if not ctx.tapped(pair.student) and not ctx.tapped(pair.teacher):
                continue
            distance = compare_features(ctx, pair, lambda s, t, d=target.distance: feature_distance(s, t, d))
            parts[name] = target.weight * distance
        if not parts:
            raise ValueError(f"term {self.name!r}: no features recorded for targets {sorted(self.targets)}")
        value = torch.stack(list(parts.values())).sum()
        return TermValue(value=value, parts=parts)

    def describe(self) -> str:
        inner = ", ".join(_describe_target(name, t) for name, t in self.targets.items())
        return f"{self.name}({inner})"


def _describe_target(name: str, target: VisualTargetSpec) -> str:
    text = f"{name}:{target.distance}"
    if target.projector is not None:
        text += f"+{target.projector}_projector"
    return text if target.weight == 1 else f"{target.weight:g}*{text}"
