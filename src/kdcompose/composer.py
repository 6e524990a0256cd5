"""LossComposer: the weighted sum of the active loss terms.

Zero-weight terms are never computed, never hooked and never logged; the composer's
`needs` is the union over *active* terms only, which is what lets the trainer skip the
teacher. The composer returns the total and, per term, the weighted value under the term's
metric key, so what is logged is exactly what was optimized. No normalization by the sum
of weights: a weight means what it says.

A term's `schedule` multiplies its weight by a pure function of `LossContext.step`
(kdcompose.schedules): at a step where that product is 0 the term is skipped like a
zero-weight term (not computed, nothing logged), but it stays active for `needs`, because
it will run at other steps. A scheduled term also logs its effective weight as
`<metric>_weight`; `log_raw: true` adds the unweighted value as `<metric>_raw`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import TYPE_CHECKING

import torch

from kdcompose.normalization import token_normalized
from kdcompose.registry import get_term_class
from kdcompose.schedules import effective_weight
from kdcompose.terms.base import LossContext, LossTerm, TermNeeds, TermValue

if TYPE_CHECKING:
    from kdcompose.composition import Composition

WEIGHT_SUFFIX = "_weight"
"""`<metric>_weight`: a scheduled term's effective weight at the step."""
RAW_SUFFIX = "_raw"
"""`<metric>_raw`: a term's unweighted value (with `log_raw: true`)."""
RESERVED_PARTS: frozenset[str] = frozenset({WEIGHT_SUFFIX[1:], RAW_SUFFIX[1:]})
"""Part names a term may not use: `<metric>_weight` / `<metric>_raw` would be ambiguous."""
STAT_NAMES: frozenset[str] = frozenset({"topk_mass", "kept_frac", "matched_frac"})
"""Diagnostics the built-in terms publish as `<metric>_<name>` (`TermValue.stats`): unweighted,
not in the total. Readers of a log (`kdcompose plot`) use this list to tell them from parts."""


@dataclass(frozen=True)
class TermResult:
    """One active term's contribution on one batch."""

    name: str
    metric_key: str
    weight: float
    """The effective weight at this step (the configured weight times the schedule's multiplier)."""
    raw: torch.Tensor
    """The unweighted value."""
    weighted: torch.Tensor
    """weight * raw: what was added to the total."""
    parts: Mapping[str, torch.Tensor] = field(default_factory=dict)
    """Weighted parts by metric key (e.g. `vision_kd_loss_aligner`); they sum to `weighted`."""
    scheduled: bool = False
    """The term has a schedule: its effective weight is logged as `<metric>_weight`."""
    log_raw: bool = False
    """The term asked for its unweighted value to be logged as `<metric>_raw`."""
    stats: Mapping[str, torch.Tensor] = field(default_factory=dict)
    """Unweighted diagnostics by metric key (e.g. `llm_kd_loss_topk_mass`); not in the total."""


@dataclass(frozen=True)
class CompositionOutput:
    """The total loss and what each active term contributed to it."""

    total: torch.Tensor
    terms: tuple[TermResult, ...]

    def contributions(self) -> dict[str, torch.Tensor]:
        """What each term put into the loss, by metric key, detached and left on the device
        (no sync): the weighted value, its weighted parts, and `<metric>_raw` (the unweighted
        value) for terms with `log_raw`."""
        out: dict[str, torch.Tensor] = {}
        for result in self.terms:
            key = result.metric_key
            out[key] = result.weighted.detach()
            for part_key, part in result.parts.items():
                out[part_key] = part.detach()
            if result.log_raw:
                out[f"{key}{RAW_SUFFIX}"] = result.raw.detach().float()
            for stat_key, stat in result.stats.items():
                out[stat_key] = stat.detach().float()
        return out

    def effective_weights(self) -> dict[str, float]:
        """`<metric>_weight` -> effective weight of each scheduled term (plain floats)."""
        return {f"{r.metric_key}{WEIGHT_SUFFIX}": float(r.weight) for r in self.terms if r.scheduled}

    def metrics(self) -> dict[str, torch.Tensor]:
        """Everything to log for this batch as tensors: `contributions()` plus
        `<metric>_weight` for scheduled terms."""
        out = self.contributions()
        for key, weight in self.effective_weights().items():
            out[key] = torch.tensor(weight, dtype=torch.float32, device=self.total.device)
        return out


class LossComposer:
    """Sums `weight * term(ctx)` over active terms (weight > 0)."""

    def __init__(self, terms: Iterable[LossTerm]) -> None:
        self.terms: tuple[LossTerm, ...] = tuple(terms)
        names = [t.name for t in self.terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate term names: {duplicates}; each term needs its own name")
        keys = [t.metric_key for t in self.active_terms]
        clashes = sorted({k for k in keys if keys.count(k) > 1})
        if clashes:
            raise ValueError(f"terms share metric keys {clashes}; rename one of the terms")

    @classmethod
    def from_composition(cls, composition: Composition) -> LossComposer:
        return cls(get_term_class(t.type)(t.name, t.spec, t.path) for t in composition.terms)

    @property
    def active_terms(self) -> tuple[LossTerm, ...]:
        return tuple(t for t in self.terms if t.active)

    remote_teachers: frozenset[str] = frozenset()
    """Teachers (by name, `""` = the default) that are caches or servers: terms reading only
    their top-K need no local teacher forward (`TermNeeds.served`). Set by the trainer."""

    @property
    def needs(self) -> TermNeeds:
        """What the active terms need, merged: drives teacher forward, hooks and labels."""
        live = (t.needs.served(self.remote_teachers) for t in self.active_terms)
        return reduce(lambda a, b: a | b, live, TermNeeds())

    @property
    def needs_teacher(self) -> bool:
        return self.needs.teacher

    def term(self, name: str) -> LossTerm:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(f"no term named {name!r}; terms: {[t.name for t in self.terms]}")

    @staticmethod
    def weight_at(term: LossTerm, step: int) -> float:
        """The term's effective weight at optimizer step `step`: weight * schedule multiplier."""
        return effective_weight(term.weight, term.spec.schedule, step)

    def weights_at(self, step: int) -> dict[str, float]:
        """Effective weight of every active term at `step`, by term name (0 = skipped there)."""
        return {t.name: self.weight_at(t, step) for t in self.active_terms}

    def needs_at(self, step: int) -> TermNeeds:
        """What the terms that run at `step` need (a subset of `needs`): lets a trainer skip
        the teacher forward at steps where every teacher-needing term is scheduled to 0."""
        live = (
            t.needs.served(self.remote_teachers) for t in self.active_terms if self.weight_at(t, step) > 0
        )
        return reduce(lambda a, b: a | b, live, TermNeeds())

    def formula(self) -> str:
        """E.g. `Loss = 0.5*lm_jsd(beta=0.5) + 0.3*ce[linear 1->0 over 1000]`."""
        parts = [f"{t.weight:g}*{describe_term(t)}" for t in self.active_terms]
        return "Loss = " + (" + ".join(parts) if parts else "0")

    def __str__(self) -> str:
        return self.formula()

    def __call__(self, ctx: LossContext) -> CompositionOutput:
        results: list[TermResult] = []
        for term in self.active_terms:
            weight = self.weight_at(term, ctx.step)
            if weight <= 0 or not term.applies_to(ctx):
                continue
            results.append(self._run(term, ctx, weight))
        total = torch.stack([r.weighted for r in results]).sum() if results else ctx.zero()
        return CompositionOutput(total=total, terms=tuple(results))

    @staticmethod
    def _run(term: LossTerm, ctx: LossContext, weight: float) -> TermResult:
        value = term.compute(ctx)
        if isinstance(value, TermValue):
            raw, raw_parts, stats = value.value, value.parts, value.stats
        else:
            raw, raw_parts, stats = value, {}, {}
        if not isinstance(raw, torch.Tensor) or raw.dim() != 0:
            raise TypeError(f"term {term.name!r} must return a scalar tensor, got {raw!r}")
        if term.needs.token_mean:  # one implementation of `normalize` for every token-mean term
            scale = token_normalized(
                raw.new_ones(()), ctx.labels, term.spec.normalize, ctx.step_token_denominator
            )
            raw = raw * scale
            raw_parts = {key: part * scale for key, part in raw_parts.items()}
        reserved = sorted(RESERVED_PARTS.intersection(raw_parts) | RESERVED_PARTS.intersection(stats))
        clash = sorted(set(raw_parts) & set(stats))
        if reserved or clash:
            raise ValueError(
                f"term {term.name!r} returned parts or stats named {reserved or clash}; those names are "
                "reserved or used twice"
            )
        parts = {f"{term.metric_key}_{key}": weight * part for key, part in raw_parts.items()}
        return TermResult(
            term.name,
            term.metric_key,
            weight,
            raw,
            weight * raw.float(),
            parts,
            scheduled=term.spec.schedule is not None,
            log_raw=term.spec.log_raw,
            stats={f"{term.metric_key}_{key}": stat for key, stat in stats.items()},
        )


def describe_term(term: LossTerm) -> str:
    """The term as the formula shows it, with its schedule: `ce[linear 1->0 over 1000]`."""
    schedule = term.spec.schedule
    return term.describe() if schedule is None else f"{term.describe()}[{schedule.describe()}]"


def build_composer(composition: Composition) -> LossComposer:
    """Instantiate every term of a resolved composition through the registry."""
    return LossComposer.from_composition(composition)


def describe_terms(composer: LossComposer) -> Sequence[dict[str, object]]:
    """One JSON-friendly row per term (active or not), as `kdcompose validate --json` prints."""
    rows = []
    for t in composer.terms:
        needs = t.needs
        rows.append(
            {
                "name": t.name,
                "type": t.type_name,
                "weight": t.weight,
                "active": t.active,
                "metric": t.metric_key,
                "needs_teacher": needs.teacher,
                "formula": t.describe(),
                "schedule": t.spec.schedule.describe() if t.spec.schedule is not None else None,
                "spec": t.spec.model_dump(mode="json", exclude_none=True),
            }
        )
    return rows
