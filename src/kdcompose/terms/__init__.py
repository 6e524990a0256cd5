"""Built-in loss terms. Importing this package registers `lm_jsd`, `lm_kd`, `ce`, `visual_kd`, `hidden_kd`."""

from kdcompose.terms.base import FeaturePair, LossContext, LossTerm, Tap, TermNeeds, TermSpec, TermValue
from kdcompose.terms.ce import CeSpec, CeTerm
from kdcompose.terms.hidden_kd import HiddenKdSpec, HiddenKdTerm, HiddenPairSpec
from kdcompose.terms.lm_jsd import LmJsdSpec, LmJsdTerm
from kdcompose.terms.lm_kd import LmKdSpec, LmKdTerm, TokensSpec
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
    "LmKdSpec",
    "LmKdTerm",
    "LossContext",
    "LossTerm",
    "Tap",
    "TermNeeds",
    "TermSpec",
    "TermValue",
    "TokensSpec",
    "VisualKdSpec",
    "VisualKdTerm",
    "VisualTargetSpec",
]
