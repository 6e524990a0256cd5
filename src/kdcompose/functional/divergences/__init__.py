"""Divergences between student and teacher token distributions, one small class each.

Importing this package registers the built-ins: ``jsd`` (``beta``), ``fkl``, ``rkl``, ``skew_fkl`` /
``skew_rkl`` (``alpha``), ``tvd``, ``akl`` (``mu``), ``ab`` (``alpha``, ``beta``). Plugins register
more with ``@kdcompose.registry.register_divergence`` or the ``kdcompose.divergences`` entry-point
group; :func:`get_divergence` turns a name, a ``{kind: NAME, ...}`` mapping or an instance into a
:class:`Divergence`. See ``docs/divergences.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdcompose.functional.divergences.ab import AbParams, AlphaBeta
from kdcompose.functional.divergences.akl import AdaptiveKL, AklParams
from kdcompose.functional.divergences.base import LOG_ZERO, ChunkOps, Divergence, DivergenceParams
from kdcompose.functional.divergences.jsd import GeneralizedJSD, JsdParams
from kdcompose.functional.divergences.kl import ForwardKL, ReverseKL
from kdcompose.functional.divergences.skew import SkewForwardKL, SkewParams, SkewReverseKL
from kdcompose.functional.divergences.tvd import TotalVariation


def get_divergence(divergence: Divergence | str | Mapping[str, Any], **params: Any) -> Divergence:
    """A :class:`Divergence` from an instance, a registered name (``params`` as keywords) or a
    mapping ``{"kind": NAME, <params>}`` (the YAML form). Unknown names list the registered ones;
    bad parameters raise pydantic's ``ValidationError`` (a ``ValueError``)."""
    from kdcompose.registry import get_divergence_class

    if isinstance(divergence, Divergence):
        if params:
            raise TypeError("parameters go into the Divergence instance, not next to it")
        return divergence
    if isinstance(divergence, Mapping):
        if params:
            raise TypeError("pass parameters inside the mapping or as keywords, not both")
        mapping = dict(divergence)
        kind = mapping.pop("kind", None)
        if not isinstance(kind, str):
            raise ValueError(f"a divergence mapping needs `kind: NAME`, got {divergence!r}")
        return get_divergence_class(kind)(**mapping)
    if isinstance(divergence, str):
        return get_divergence_class(divergence)(**params)
    raise TypeError(f"divergence must be a Divergence, a name or a mapping, got {type(divergence).__name__}")


class AutogradOnly(Divergence):
    """Wraps a divergence so the engine ignores its closed form and differentiates ``value`` with
    autograd per chunk: how the tests pin every closed form to its own definition, and how the
    benchmark measures the fallback on the built-ins."""

    def __init__(self, inner: Divergence) -> None:
        self.inner = inner
        super().__init__(inner.params)

    @property
    def Params(self):  # type: ignore[override]  # mirrors the class attribute
        return type(self.inner.params)

    def value(self, ls, lt, ops):  # type: ignore[override]
        return self.inner.value(ls, lt, ops)

    @property
    def compilable(self) -> bool:  # type: ignore[override]
        return self.inner.compilable

    def teacher_zeros_ok(self) -> bool:
        return self.inner.teacher_zeros_ok()

    def missing_mass_issue(self, missing_mass: str) -> str | None:
        return self.inner.missing_mass_issue(missing_mass)

    def describe(self) -> str:
        return f"{self.inner.describe()} (autograd)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AutogradOnly) and other.inner == self.inner

    def __hash__(self) -> int:
        return hash(("autograd", self.inner))


__all__ = [
    "LOG_ZERO",
    "AbParams",
    "AdaptiveKL",
    "AklParams",
    "AlphaBeta",
    "AutogradOnly",
    "ChunkOps",
    "Divergence",
    "DivergenceParams",
    "ForwardKL",
    "GeneralizedJSD",
    "JsdParams",
    "ReverseKL",
    "SkewForwardKL",
    "SkewParams",
    "SkewReverseKL",
    "TotalVariation",
    "get_divergence",
]
