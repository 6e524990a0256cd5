"""LossComposer: the weighted sum of the active loss terms.

Zero-weight terms are never computed, never hooked and never logged; the composer's
`needs` is the union over *active* terms only, which is what lets the trainer skip the
teacher. The composer returns the total and, per term, the weighted value under the term's
metric key, so what is logged is exactly what was optimized. No normalization by the sum
of weights: a weight means what it says.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce

import torch

from kdcompose.registry import get_term_class
from kdcompose.schema.composition import Composition
from kdcompose.terms.base import LossContext, LossTerm, TermNeeds, TermValue


@dataclass(frozen=True)
class TermResult:
    """One active term's contribution on one batch."""

    name: str
    metric_key: str
    weight: float
    raw: torch.Tensor
    """The unweighted value."""
    weighted: torch.Tensor
    """weight * raw: what was added to the total."""
    parts: Mapping[str, torch.Tensor] = field(default_factory=dict)
    """Weighted parts by metric key (e.g. `vision_kd_loss_aligner`); they sum to `weighted`."""


@dataclass(frozen=True)
class CompositionOutput:
    """The total loss and what each active term contributed to it."""

    total: torch.Tensor
    terms: tuple[TermResult, ...]

    def metrics(self) -> dict[str, torch.Tensor]:
        """Weighted per-term values (and parts) by metric key, detached for logging."""
        out: dict[str, torch.Tensor] = {}
        for result in self.terms:
            out[result.metric_key] = result.weighted.detach()
            for key, part in result.parts.items():
                out[key] = part.detach()
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
        return cls(get_term_class(t.type)(t.name, t.spec) for t in composition.terms)

    @property
    def active_terms(self) -> tuple[LossTerm, ...]:
        return tuple(t for t in self.terms if t.active)

    @property
    def needs(self) -> TermNeeds:
        """What the active terms need, merged: drives teacher forward, hooks and labels."""
        return reduce(lambda a, b: a | b, (t.needs for t in self.active_terms), TermNeeds())

    @property
    def needs_teacher(self) -> bool:
        return self.needs.teacher

    def term(self, name: str) -> LossTerm:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(f"no term named {name!r}; terms: {[t.name for t in self.terms]}")

    def formula(self) -> str:
        """E.g. `Loss = 0.5*lm_jsd(beta=0.5) + 0.3*ce`."""
        parts = [f"{t.weight:g}*{t.describe()}" for t in self.active_terms]
        return "Loss = " + (" + ".join(parts) if parts else "0")

    def __str__(self) -> str:
        return self.formula()

    def __call__(self, ctx: LossContext) -> CompositionOutput:
        results: list[TermResult] = []
        for term in self.active_terms:
            if not term.applies_to(ctx):
                continue
            results.append(self._run(term, ctx))
        total = torch.stack([r.weighted for r in results]).sum() if results else _connected_zero(ctx)
        return CompositionOutput(total=total, terms=tuple(results))

    @staticmethod
    def _run(term: LossTerm, ctx: LossContext) -> TermResult:
        value = term.compute(ctx)
        if isinstance(value, TermValue):
            raw, raw_parts = value.value, value.parts
        else:
            raw, raw_parts = value, {}
        if not isinstance(raw, torch.Tensor) or raw.dim() != 0:
            raise TypeError(f"term {term.name!r} must return a scalar tensor, got {raw!r}")
        weight = term.weight
        parts = {f"{term.metric_key}_{key}": weight * part for key, part in raw_parts.items()}
        return TermResult(term.name, term.metric_key, weight, raw, weight * raw.float(), parts)


def _connected_zero(ctx: LossContext) -> torch.Tensor:
    anchor = ctx.anchor()
    if anchor is None:
        return torch.zeros(())
    return anchor.sum() * 0.0


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
                "spec": t.spec.model_dump(mode="json", exclude_none=True),
            }
        )
    return rows
