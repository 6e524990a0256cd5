"""The resolved loss composition: which terms, with which validated specs, declared where.

Produced by `kdcompose.resolve.resolve_composition` (YAML + ms-swift's knobs), built into a
composer once per run, and written as an explicit `loss_terms` block wherever a run records what
it trained (`args.json`, `kdcompose_composition.yaml`). A record only: no checks, no building.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kdcompose.terms.base import TermSpec

LOSS_TERMS_PATH = "rlhf.loss_terms"


@dataclass(frozen=True)
class ResolvedTerm:
    """One term of the composition: its instance name, registered type, validated spec,
    and where it came from (a dotted config path, or `default` for ms-swift's stock terms)."""

    name: str
    type: str
    spec: TermSpec
    origin: str = field(compare=False)

    @property
    def weight(self) -> float:
        return self.spec.effective_weight()

    @property
    def path(self) -> str:
        """The dotted YAML path errors about this term name: where it was declared, or, for a
        term made from ms-swift's knobs, where it would be declared."""
        if self.origin.startswith((f"{LOSS_TERMS_PATH}.", "custom.", "--")):
            return self.origin
        return f"{LOSS_TERMS_PATH}.{self.name}"

    @property
    def active(self) -> bool:
        return self.weight > 0


@dataclass(frozen=True)
class Composition:
    """The resolved, validated list of loss terms (active and inactive)."""

    terms: tuple[ResolvedTerm, ...]

    @property
    def active_terms(self) -> tuple[ResolvedTerm, ...]:
        return tuple(t for t in self.terms if t.active)

    def term(self, name: str) -> ResolvedTerm | None:
        return next((t for t in self.terms if t.name == name), None)

    def to_loss_terms(self) -> dict[str, dict[str, Any]]:
        """The composition as an explicit `rlhf.loss_terms` block (legacy knobs folded in);
        loading it back gives the same composition."""
        return loss_terms_block((t.name, t.type, t.spec) for t in self.terms)


def loss_terms_block(terms: Iterable[tuple[str, str, TermSpec]]) -> dict[str, dict[str, Any]]:
    """`(name, type, spec)` triples as an explicit `rlhf.loss_terms` block, `type` spelled out,
    so that the block resolves back to the same terms whatever their names."""
    out: dict[str, dict[str, Any]] = {}
    for name, type_name, spec in terms:
        block = spec.model_dump(mode="json", exclude_none=True)
        block["type"] = type_name
        out[name] = block
    return out
