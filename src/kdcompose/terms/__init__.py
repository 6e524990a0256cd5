"""Built-in loss terms. Importing this package registers `lm_jsd`, `ce`, `visual_kd` and `hidden_kd`."""

from kdcompose.terms.base import FeaturePair, LossContext, LossTerm, Tap, TermNeeds, TermSpec, TermValue
from kdcompose.terms.ce import CeSpec, CeTerm
from kdcompose.terms.hidden_kd import HiddenKdSpec, HiddenKdTerm, HiddenPairSpec
from kdcompose.terms.lm_jsd import LmJsdSpec, LmJsdTerm
from kdcompose.terms.visual_kd import VISUAL_TARGETS, VisualKdSpec, VisualKdTerm, VisualTargetSpec

__all__ = [
    "VISUAL_TARGETS",
    "CeSpec",
    "CeTerm",
    "FeaturePair",
    "HiddenKdSpec",
    "HiddenKdTerm",
    "HiddenPairSpec",
    "LmJsdSpec",
    "LmJsdTerm",
    "LossContext",
    "LossTerm",
    "Tap",
    "TermNeeds",
    "TermSpec",
    "TermValue",
    "VisualKdSpec",
    "VisualKdTerm",
    "VisualTargetSpec",
]
