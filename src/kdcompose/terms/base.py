"""The loss-term protocol: what a term needs, how it computes, how it is named.

Every term declares up front what it needs (`TermNeeds`), so the trainer can skip the
teacher forward, the feature hooks or the labels when no *active* term asks for them.
A term computes its *unweighted* value; weighting, skipping and metrics are the
composer's job, so a term cannot get them wrong.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, StrictBool

from kdcompose.nonfinite import OnNonFinite
from kdcompose.schedules import ScheduleSpec
from kdcompose.schema.types import Weight


class TermSpec(BaseModel):
    """Base of every term's config block: a weight (0 disables the term) and its type.

    Subclasses add their own knobs. Unknown keys are an error, so a typo such as
    `wieght` never silently falls back to a default. `schedule` and `log_raw` live here so
    that every term, a user's included, gets them without writing a line.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str | None = None
    weight: Weight = 1.0
    schedule: ScheduleSpec | None = None
    """Multiplies `weight` by a function of the optimizer step (kdcompose.schedules); a base
    weight of 0 keeps the term off whatever the schedule says."""
    log_raw: StrictBool = False
    """Also log the unweighted value as `<metric>_raw` (the weighted one is always logged)."""
    on_nonfinite: OnNonFinite = "error"
    """What the trainer does when this term is NaN/inf: `error` stops before the step is
    applied, naming the term and step; `skip_step` skips the optimizer step (kdcompose.nonfinite)."""


@dataclass(frozen=True)
class TermNeeds:
    """What a term reads from the loss context. The union over active terms tells the
    trainer what to compute: e.g. no term needs teacher logits -> no teacher LM forward."""

    student_logits: bool = False
    teacher_logits: bool = False
    labels: bool = False
    student_hidden: bool = False
    teacher_hidden: bool = False
    student_features: frozenset[str] = frozenset()
    teacher_features: frozenset[str] = frozenset()

    @property
    def teacher(self) -> bool:
        """True when the teacher must run at all."""
        return self.teacher_logits or self.teacher_hidden or bool(self.teacher_features)

    @property
    def teacher_language_model(self) -> bool:
        """True when the teacher's language model (not only its vision tower) must run."""
        return self.teacher_logits or self.teacher_hidden

    def __or__(self, other: TermNeeds) -> TermNeeds:
        merged: dict[str, Any] = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            merged[f.name] = a | b
        return TermNeeds(**merged)


@dataclass
class LossContext:
    """Everything a term may read for one micro-batch.

    Logits and labels are already aligned (position i of the logits predicts labels[i]);
    `-100` marks positions that carry no loss. Features map a target name (e.g.
    "aligner") to the tensors recorded for it during the loss forward.
    """

    labels: torch.Tensor | None = None
    student_logits: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    student_hidden: torch.Tensor | None = None
    teacher_hidden: torch.Tensor | None = None
    student_lm_head: torch.nn.Module | None = None
    teacher_lm_head: torch.nn.Module | None = None
    student_features: Mapping[str, Sequence[torch.Tensor]] = field(default_factory=dict)
    teacher_features: Mapping[str, Sequence[torch.Tensor]] = field(default_factory=dict)
    student_generated: bool = False
    """True when the completion was sampled from the student (on-policy GKD batch)."""
    has_images: bool | None = None
    """None when unknown; False lets feature terms skip text-only batches."""
    projectors: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    """Feature projectors by `kdcompose.projectors.projector_key(term, target)`: the trainable
    student->teacher width maps of targets configured with `projector:` (trained with the student)."""
    step: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    def anchor(self) -> torch.Tensor | None:
        """A student tensor to hang a graph-connected zero on (keeps DDP from hanging)."""
        for candidate in (self.student_logits, self.student_hidden):
            if candidate is not None and candidate.requires_grad:
                return candidate
        for tensors in self.student_features.values():
            for tensor in tensors:
                if tensor.requires_grad:
                    return tensor
        return self.student_logits if self.student_logits is not None else self.student_hidden


@dataclass(frozen=True)
class TermValue:
    """A term's unweighted value, optionally split into named parts that sum to it
    (e.g. one part per visual target, already multiplied by the target's own weight)."""

    value: torch.Tensor
    parts: Mapping[str, torch.Tensor] = field(default_factory=dict)


class LossTerm(ABC):
    """Base class of a loss term. Register subclasses with `@register_term`.

    A subclass sets `spec_class` (its pydantic config block) and implements `needs`,
    `compute` and optionally `applies_to` and `describe`.
    """

    spec_class: ClassVar[type[TermSpec]] = TermSpec
    type_name: ClassVar[str] = ""
    """Set by `register_term` to the key the term is registered under."""
    default_metric: ClassVar[str | None] = None
    """Metric key used when the instance is named after its type (contract names such as
    `llm_kd_loss`); other instances log `<name>_loss`."""

    def __init__(self, name: str, spec: TermSpec) -> None:
        if not isinstance(spec, self.spec_class):
            raise TypeError(f"term {name!r} expects a {self.spec_class.__name__}, got {type(spec).__name__}")
        self.name = name
        self.spec = spec

    @property
    def weight(self) -> float:
        return self.spec.weight

    @property
    def active(self) -> bool:
        return self.weight > 0

    @property
    def metric_key(self) -> str:
        if self.default_metric and self.name == self.type_name:
            return self.default_metric
        return f"{self.name}_loss"

    @property
    @abstractmethod
    def needs(self) -> TermNeeds:
        """What this term reads from the context."""

    def applies_to(self, ctx: LossContext) -> bool:
        """Whether the term contributes on this batch (e.g. CE skips student-generated
        batches). A term that does not apply adds nothing and logs nothing."""
        return True

    @abstractmethod
    def compute(self, ctx: LossContext) -> torch.Tensor | TermValue:
        """The unweighted value (a scalar tensor connected to the student's graph)."""

    def describe(self) -> str:
        """How the term appears in the printed formula, e.g. `lm_jsd(beta=0.5)`."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, weight={self.weight})"
