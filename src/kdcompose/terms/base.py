"""The loss-term protocol: what a term needs, how it computes, how it is named.

Every term declares up front, in `TermNeeds`, everything it reads from the models: logits
and final hidden states per side, labels, **module taps** (any module's output or input, by
dotted path, per side, with the call index for modules that run more than once), **feature
pairs** (a student tap compared with a teacher tap, optionally through a trainable
projector whose widths the framework discovers) and whether its value is a token mean (so
the framework applies `normalize`). The trainer computes exactly the union of what the
*active* terms declare -- no teacher forward, no hook, no projector for anything else -- and
never reads a term's own spec fields or tests its name. That is what lets a new term that
taps any module be one file and one decorator.

A term computes its *unweighted* value; weighting, skipping, normalization and metrics are
the composer's job, so a term cannot get them wrong.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from kdcompose.errors import ConfigIssue
from kdcompose.functional.cross_tokenizer import AlignedBatch, TeacherLogits, TeacherTopK
from kdcompose.nonfinite import OnNonFinite
from kdcompose.normalization import TokenNormalization
from kdcompose.primitives import connected_zero
from kdcompose.schedules import ScheduleSpec
from kdcompose.schema.types import Bool, Weight

Side = Literal["student", "teacher"]
TapIO = Literal["output", "input"]


class TermSpec(BaseModel):
    """Base of every term's config block: a weight (0 disables the term) and its type.

    Subclasses add their own knobs. Unknown keys are an error, so a typo such as
    `wieght` never silently falls back to a default. `schedule`, `log_raw`, `on_nonfinite`
    and `normalize` live here so that every term, a user's included, gets them without
    writing a line.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str | None = None
    weight: Weight = 1.0
    schedule: ScheduleSpec | None = None
    """Multiplies `weight` by a function of the optimizer step (kdcompose.schedules); a base
    weight of 0 keeps the term off whatever the schedule says."""
    log_raw: Bool = False
    """Also log the unweighted value as `<metric>_raw` (the weighted one is always logged)."""
    on_nonfinite: OnNonFinite = "error"
    """What the trainer does when this term is NaN/inf: `error` stops before the step is
    applied, naming the term and step; `skip_step` skips the optimizer step (kdcompose.nonfinite)."""
    normalize: TokenNormalization = "micro_batch"
    """For a term whose value is a mean over labelled tokens (`TermNeeds.token_mean`):
    `micro_batch` (ms-swift's default) or `global_tokens`, the labelled tokens of the whole
    optimizer step, all micro-batches and ranks (kdcompose.normalization). Ignored by nothing:
    a term that is not a token mean refuses `global_tokens` (see `LossTerm.config_issues`)."""

    def effective_weight(self) -> float:
        """The weight the composition uses (a spec with an off switch overrides this)."""
        return self.weight


@dataclass(frozen=True)
class Tap:
    """One module whose output (or input) a term reads, recorded during the loss forward only.

    `path` is relative to the unwrapped model (DDP `module.`, PEFT `base_model.model.` and
    `torch.compile` prefixes are resolved). `call`: which call of a module that runs several
    times per forward (0 = first, -1 = last; None = every call, in order). `children`: hook
    each direct child of the module instead (e.g. a list of mergers). `vision_only`: the
    module runs inside the vision encoder, so the teacher may run only that encoder when no
    active term needs more. `origin` is the dotted YAML path of the setting, for errors; it
    does not take part in equality, so two terms tapping one module share one hook.
    """

    side: Side
    path: str
    io: TapIO = "output"
    call: int | None = None
    children: bool = False
    vision_only: bool = False
    origin: str = field(default="", compare=False)

    def describe(self) -> str:
        call = "" if self.call is None else f"[call {self.call}]"
        return f"{self.side}:{self.path}{'' if self.io == 'output' else ' (input)'}{call}"


@dataclass(frozen=True)
class FeaturePair:
    """A student tap compared element by element with a teacher tap.

    The framework checks before training that the widths (last dimension) agree, or, with
    `projector` set, builds a trainable map from the student's width to the teacher's
    (kdcompose.training.projectors), trains it with the student, saves and resumes it, and hands it
    to the term as `LossContext.projectors[key]`. `key` is unique per composition
    (`<term>__<pair>`); `origin` is the YAML path of the pair, for errors.
    """

    key: str
    student: Tap
    teacher: Tap
    projector: Literal["linear"] | None = None
    origin: str = field(default="", compare=False)


@dataclass(frozen=True)
class TopkRequest:
    """A term reads the top-`k` distribution of teacher `teacher` (`""`: the default teacher).
    `origin` is the YAML path of the term's `topk` setting, for errors (e.g. a cache holding
    fewer tokens); it does not take part in equality."""

    teacher: str
    k: int
    origin: str = field(default="", compare=False)


@dataclass(frozen=True)
class CrossTokenizerRequest:
    """A term can read teacher `teacher` (`""`: the default) when its tokenizer differs from the
    student's: it then compares distributions over aligned completion text
    (`LossContext.aligned_teachers[teacher]`) instead of position by position.

    `force`: take that path even when the two tokenizers are the same (the identity check: it must
    give the same-tokenizer value). `temperature`: the one the term compares at; a cached or served
    teacher hands over log-probabilities at temperature 1, and the chain rule over a group needs the
    teacher's values at the term's temperature. `origin` is the YAML path of the term's setting,
    for errors; it does not take part in equality."""

    teacher: str
    force: bool = False
    temperature: float = 1.0
    origin: str = field(default="", compare=False)


@dataclass(frozen=True)
class TermNeeds:
    """What a term reads from the loss context. The union over active terms tells the
    trainer what to compute: e.g. no term needs teacher logits -> no teacher LM forward."""

    student_logits: bool = False
    teacher_logits: bool = False
    labels: bool = False
    student_hidden: bool = False
    """The student's final hidden states at its LM head's input (plus the head itself)."""
    teacher_hidden: bool = False
    taps: frozenset[Tap] = frozenset()
    pairs: frozenset[FeaturePair] = frozenset()
    token_mean: bool = False
    """The value is a mean over the labelled tokens of the micro-batch: the composer applies
    the spec's `normalize` to it."""
    teacher_topk: frozenset[TopkRequest] = frozenset()
    """Teachers (by name; `""` is the default teacher) whose top-K distribution the term reads.
    A teacher that is a cache or a server hands it over as `LossContext.teacher_topk[name]`,
    and then the term's `teacher_logits` / `teacher_hidden` needs are dropped for it: no local
    teacher forward. A local default teacher provides its logits (or hidden states) instead."""
    cross_tokenizer: frozenset[CrossTokenizerRequest] = frozenset()
    """Teachers the term can also read when their tokenizer differs from the student's. For each
    teacher a run finds with another tokenizer (or forced), the trainer encodes every sample with
    that teacher's own template, runs or asks the teacher on that encoding, aligns the completions
    and hands over `LossContext.aligned_teachers[name]`; an active term that reads such a teacher
    without declaring it here is refused before training."""

    @property
    def all_taps(self) -> frozenset[Tap]:
        """Every tap, including both sides of every feature pair."""
        return self.taps | {t for p in self.pairs for t in (p.student, p.teacher)}

    def side_taps(self, side: Side) -> frozenset[Tap]:
        return frozenset(t for t in self.all_taps if t.side == side)

    def served(self, remote: frozenset[str]) -> TermNeeds:
        """These needs when the teachers named in `remote` are caches or servers: a term that
        reads only such teachers' top-K needs no local teacher logits or hidden states."""
        if not self.teacher_topk or not self.topk_teachers <= remote:
            return self
        return replace(self, teacher_logits=False, teacher_hidden=False)

    @property
    def topk_teachers(self) -> frozenset[str]:
        """Names of the teachers whose top-K the term reads."""
        return frozenset(r.teacher for r in self.teacher_topk)

    @property
    def cross_tokenizer_teachers(self) -> frozenset[str]:
        """Names of the teachers the term can read across tokenizers."""
        return frozenset(r.teacher for r in self.cross_tokenizer)

    @property
    def teacher(self) -> bool:
        """True when the teacher must run at all."""
        return self.teacher_logits or self.teacher_hidden or bool(self.side_taps("teacher"))

    @property
    def teacher_language_model(self) -> bool:
        """True when the teacher's language model (not only its vision encoder) must run."""
        if self.teacher_logits or self.teacher_hidden:
            return True
        return any(not t.vision_only for t in self.side_taps("teacher"))

    def __or__(self, other: TermNeeds) -> TermNeeds:
        merged: dict[str, Any] = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            merged[f.name] = a | b
        return TermNeeds(**merged)


@dataclass(frozen=True)
class AlignedTeacher:
    """One micro-batch of a teacher whose tokenizer differs from the student's, aligned over text.

    `batch` holds every sample's alignment (kdcompose.teachers.alignment), student and teacher
    completion tokens concatenated in sample order. `teacher` has one row per teacher completion
    token of `batch` (full logits of a local teacher, or the top-K of a cache or server).
    `student_rows` picks, from the student's labelled positions in row-major order (the rows
    `labels != -100` selects), those of `batch` (a completion the teacher could only partly spell,
    e.g. a special token the student generated mid-text, is compared up to there); None: all."""

    batch: AlignedBatch
    teacher: TeacherLogits | TeacherTopK
    student_rows: torch.Tensor | None = None


@dataclass
class LossContext:
    """Everything a term may read for one micro-batch.

    Logits and labels are already aligned (position i of the logits predicts labels[i]);
    `-100` marks positions that carry no loss. `taps` maps each declared `Tap` to the
    tensors recorded for it during the loss forward (one per call, in call order, or the
    selected call). Module outputs cover the whole sequence even where ms-swift trims the
    logits (`logits_to_keep`): `sequence_labels` / `attention_mask` are the aligned labels
    and the padding mask of that whole sequence.
    """

    labels: torch.Tensor | None = None
    student_logits: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    student_hidden: torch.Tensor | None = None
    teacher_hidden: torch.Tensor | None = None
    student_lm_head: torch.nn.Module | None = None
    teacher_lm_head: torch.nn.Module | None = None
    taps: Mapping[Tap, Sequence[torch.Tensor]] = field(default_factory=dict)
    sequence_labels: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    student_generated: bool = False
    """True when the completion was sampled from the student (on-policy GKD batch)."""
    has_images: bool | None = None
    """None when unknown; False lets feature terms skip text-only batches."""
    teacher_topk: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Per teacher name (`""`: the default teacher), `(logprobs [.., K] fp32 at temperature 1, ids
    [.., K] int64)` aligned with `labels`, from a teacher cache or server; `-inf` where absent."""
    projectors: Mapping[str, Any] = field(default_factory=dict)
    """Trainable student->teacher width maps by `FeaturePair.key`, for pairs declared with a
    projector (built, trained, saved and resumed by the trainer; kdcompose.training.projectors)."""
    projected: Mapping[str, Sequence[torch.Tensor]] = field(default_factory=dict)
    """The student's tensors of a projected pair, already through its projector, by
    `FeaturePair.key` (the trainer projects inside the model's forward, for DDP); when absent,
    `compare_features` applies `projectors[key]` itself."""
    step: int = 0
    step_token_denominator: torch.Tensor | None = None
    """`D = N / (R G)` of the current optimizer step for `normalize: global_tokens`
    (kdcompose.normalization); None outside a trainer that counts it (then: micro-batch mean)."""
    vocab_size: int | None = None
    """The tokenizer's size: LM terms align teacher and student logits whose widths differ only
    by padding with it (`kdcompose.functional.vocab`); None when unknown."""
    aligned_teachers: Mapping[str, AlignedTeacher] = field(default_factory=dict)
    """Per teacher name (`""`: the default teacher), a teacher taught across tokenizers (see
    `TermNeeds.cross_tokenizer`); such a teacher's logits / top-K are only here, never in
    `teacher_logits` / `teacher_topk`."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Free-form values a custom training loop passes to its own terms."""

    def tapped(self, tap: Tap) -> list[torch.Tensor]:
        """The tensors recorded for `tap` (empty when none was recorded, e.g. no image)."""
        return list(self.taps.get(tap, ()))

    def anchor(self) -> torch.Tensor | None:
        """A student tensor to hang a graph-connected zero on (keeps DDP from hanging)."""
        for candidate in (self.student_logits, self.student_hidden):
            if candidate is not None and candidate.requires_grad:
                return candidate
        for tap, tensors in self.taps.items():
            for tensor in tensors:
                if tap.side == "student" and tensor.requires_grad:
                    return tensor
        return self.student_logits if self.student_logits is not None else self.student_hidden

    def zero(self) -> torch.Tensor:
        """A 0 connected to the student's graph that stays finite even if the anchor holds ±inf."""
        anchor = self.anchor()
        return torch.zeros(()) if anchor is None else connected_zero(anchor)


@dataclass(frozen=True)
class TermValue:
    """A term's unweighted value, optionally split into named parts that sum to it
    (e.g. one part per visual target, already multiplied by the target's own weight)."""

    value: torch.Tensor
    parts: Mapping[str, torch.Tensor] = field(default_factory=dict)
    stats: Mapping[str, torch.Tensor] = field(default_factory=dict)
    """Diagnostics logged as `<metric>_<name>`, unweighted and not part of the loss (e.g.
    `topk_mass`); aggregated over the logging window like every metric."""


class LossTerm(ABC):
    """Base class of a loss term. Register subclasses with `@register_term`.

    A subclass sets `spec_class` (its pydantic config block) and implements `needs`,
    `compute` and optionally `applies_to`, `describe` and `config_issues`. `origin` is the
    dotted YAML path the term was declared at (`rlhf.loss_terms.<name>`, `custom.visual_kd`,
    the `--loss_terms` flag, ...): every message about the term names it.
    """

    spec_class: ClassVar[type[TermSpec]] = TermSpec
    type_name: ClassVar[str] = ""
    """Set by `register_term` to the key the term is registered under."""
    default_metric: ClassVar[str | None] = None
    """Metric key used when the instance is named after its type (contract names such as
    `llm_kd_loss`); other instances log `<name>_loss`."""

    def __init__(self, name: str, spec: TermSpec, origin: str | None = None) -> None:
        if not isinstance(spec, self.spec_class):
            raise TypeError(f"term {name!r} expects a {self.spec_class.__name__}, got {type(spec).__name__}")
        self.name = name
        self.spec = spec
        self.origin = origin or f"rlhf.loss_terms.{name}"

    @property
    def weight(self) -> float:
        return self.spec.effective_weight()

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

    def config_issues(self) -> list[ConfigIssue]:
        """Problems with the term's settings that its spec alone cannot see (checked when the
        composition is resolved, before any model loads). The default checks `normalize`."""
        if self.spec.normalize == "global_tokens" and not self.needs.token_mean:
            return [
                ConfigIssue(
                    f"{self.origin}.normalize",
                    "global_tokens applies to terms whose value is a mean over labelled tokens; this "
                    "term's is not: remove `normalize`",
                )
            ]
        return []

    def describe(self) -> str:
        """How the term appears in the printed formula, e.g. `lm_jsd(beta=0.5)`."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, weight={self.weight})"
