"""kdcompose: pluggable loss composition for knowledge distillation with ms-swift.

Typical use from Python::

    from kdcompose import load_config, build_composer, LossContext
    composer = build_composer(load_config("configs/full_composition.yaml").composition)
    out = composer(LossContext(student_logits=s, teacher_logits=t, labels=y))
    out.total.backward(); print(out.metrics())

Importing kdcompose never imports ms-swift; the trainer integration lives in
`kdcompose.integrations.swift`.
"""

from kdcompose.composer import CompositionOutput, LossComposer, TermResult, build_composer
from kdcompose.composition import Composition, ResolvedTerm
from kdcompose.config import KDConfig, load_config, parse_config, parse_config_text
from kdcompose.errors import ConfigError, ConfigIssue, UnknownTermError
from kdcompose.nonfinite import NonFiniteLossError
from kdcompose.registry import get_term_class, register_term, registered_terms
from kdcompose.terms import FeaturePair, LossContext, LossTerm, Tap, TermNeeds, TermSpec, TermValue
from kdcompose.training.distiller import Distiller, DistillOutput

__version__ = "0.3.1"

__all__ = [
    "Composition",
    "CompositionOutput",
    "ConfigError",
    "ConfigIssue",
    "DistillOutput",
    "Distiller",
    "FeaturePair",
    "KDConfig",
    "LossComposer",
    "LossContext",
    "LossTerm",
    "NonFiniteLossError",
    "ResolvedTerm",
    "Tap",
    "TermNeeds",
    "TermResult",
    "TermSpec",
    "TermValue",
    "UnknownTermError",
    "__version__",
    "build_composer",
    "get_term_class",
    "load_config",
    "parse_config",
    "parse_config_text",
    "register_term",
    "registered_terms",
]
