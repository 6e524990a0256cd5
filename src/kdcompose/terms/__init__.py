"""Built-in loss terms. Importing this package registers `lm_jsd`, `ce` and `visual_kd`."""

from kdcompose.terms.base import LossContext, LossTerm, TermNeeds, TermSpec, TermValue
from kdcompose.terms.ce import CeSpec, CeTerm
from kdcompose.terms.lm_jsd import LmJsdSpec, LmJsdTerm
from kdcompose.terms.visual_kd import VISUAL_TARGETS, VisualKdSpec, VisualKdTerm, VisualTargetSpec

__all__ = [
    "VISUAL_TARGETS",
    "CeSpec",
    "CeTerm",
    "LmJsdSpec",
    "LmJsdTerm",
    "LossContext",
    "LossTerm",
    "TermNeeds",
    "TermSpec",
    "TermValue",
    "VisualKdSpec",
    "VisualKdTerm",
    "VisualTargetSpec",
]
