"""The resolver: the loss composition from `rlhf.loss_terms` and ms-swift's GKD knobs.

The one module that knows built-in term names: it turns `rlhf.llm_kd_weight`,
`rlhf.sft_alpha`, `rlhf.beta` / `rlhf.temperature` and `custom.visual_kd` into explicit
terms. Everything after it (composer, trainer, projectors, loop) reads only what the terms
declare.

The base composition is always ms-swift's stock GKD loss: `lm_jsd` (weight
`rlhf.llm_kd_weight`, default 1.0, with `rlhf.beta` / `rlhf.temperature`) plus `ce`
(weight `rlhf.sft_alpha`, default 0). `rlhf.loss_terms` overrides those two by name and
adds any other term; `custom.visual_kd` adds a `visual_kd` term. So a config with no new
field resolves to exactly the stock loss, and a knob stated twice with different values is
an error naming both places instead of one silently winning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

from kdcompose.composition import LOSS_TERMS_PATH, Composition, ResolvedTerm
from kdcompose.defaults import (
    LLM_KD_WEIGHT_DEFAULT,
    SWIFT_GKD_BETA,
    SWIFT_GKD_SFT_ALPHA,
    SWIFT_GKD_TEMPERATURE,
)
from kdcompose.errors import ConfigError, ConfigIssue, UnknownTermError
from kdcompose.registry import get_term_class
from kdcompose.schema.types import PositiveFloat, PositiveInt, Probability, Weight
from kdcompose.schema.validation import join_path, validate_model, validate_value
from kdcompose.terms.base import TermSpec

LLM_KD_WEIGHT_PATH = "rlhf.llm_kd_weight"
GKD_KNOB_NAMES: tuple[str, ...] = ("beta", "temperature", "sft_alpha", "gkd_logits_topk")
"""ms-swift's GKD arguments that the composition reads (translated into `lm_jsd` / `ce`)."""
LEGACY_VISUAL_PATH = "custom.visual_kd"

_WEIGHT = TypeAdapter(Weight)
_PROBABILITY = TypeAdapter(Probability)
_POSITIVE = TypeAdapter(PositiveFloat)
_TOPK = TypeAdapter(PositiveInt)


@dataclass(frozen=True)
class GkdKnobs:
    """The ms-swift GKD arguments the composition depends on, as the user wrote them
    (None = absent), with their dotted paths for error messages."""

    beta: float | None = None
    temperature: float | None = None
    sft_alpha: float | None = None
    gkd_logits_topk: int | None = None
    beta_path: str = "rlhf.beta"
    temperature_path: str = "rlhf.temperature"
    sft_alpha_path: str = "rlhf.sft_alpha"
    gkd_logits_topk_path: str = "rlhf.gkd_logits_topk"


def parse_gkd_knobs(args: Mapping[str, Any], paths: Mapping[str, str], issues: list[ConfigIssue]) -> GkdKnobs:
    """Validate `beta`, `temperature`, `sft_alpha` wherever they were written."""
    values: dict[str, Any] = {}
    knobs = (
        ("beta", _PROBABILITY),
        ("temperature", _POSITIVE),
        ("sft_alpha", _WEIGHT),
        ("gkd_logits_topk", _TOPK),
    )
    for key, adapter in knobs:
        if args.get(key) is not None:
            values[key] = validate_value(adapter, args[key], paths.get(key, f"rlhf.{key}"), issues)
        values[f"{key}_path"] = paths.get(key, f"rlhf.{key}")
    return GkdKnobs(**values)


def _parse_term(name: Any, raw: Any, path: str, issues: list[ConfigIssue]) -> tuple[str, TermSpec] | None:
    if not isinstance(name, str) or not name.isidentifier():
        issues.append(
            ConfigIssue(path, "a term name must be an identifier (letters, digits, _): it names metrics")
        )
        return None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        issues.append(
            ConfigIssue(path, f"must be a mapping of the term's settings, got {type(raw).__name__}")
        )
        return None
    type_name = raw.get("type", name)
    if not isinstance(type_name, str):
        issues.append(ConfigIssue(join_path(path, "type"), f"must be a term type name, got {type_name!r}"))
        return None
    try:
        term_class = get_term_class(type_name)
    except UnknownTermError as exc:
        where = join_path(path, "type") if "type" in raw else path
        advice = "" if "type" in raw else f" (`type` defaults to the term's name {name!r}; set it explicitly)"
        issues.append(ConfigIssue(where, f"{exc}{advice}"))
        return None
    spec = validate_model(term_class.spec_class, dict(raw), path, issues)
    if spec is None:
        return None
    return type_name, spec.model_copy(update={"type": type_name})


def _conflict(path_a: str, value_a: Any, path_b: str, value_b: Any) -> ConfigIssue:
    return ConfigIssue(
        path_a,
        f"conflicts with {path_b} ({value_a!r} here vs {value_b!r} there); state it in one place",
    )


def resolve_composition(
    loss_terms: Any,
    llm_kd_weight: Any,
    legacy_visual: Any,
    knobs: GkdKnobs,
    issues: list[ConfigIssue],
) -> Composition | None:
    """Build the composition; append every problem to `issues` (None if any)."""
    start = len(issues)
    kd_weight = None
    if llm_kd_weight is not None:
        kd_weight = validate_value(_WEIGHT, llm_kd_weight, LLM_KD_WEIGHT_PATH, issues)

    declared: dict[str, tuple[str, TermSpec, str]] = {}
    if loss_terms is not None and not isinstance(loss_terms, Mapping):
        issues.append(
            ConfigIssue(
                LOSS_TERMS_PATH, "must map term names to their settings, e.g. `lm_jsd: {weight: 0.5}`"
            )
        )
    elif loss_terms:
        for name, raw in loss_terms.items():
            path = join_path(LOSS_TERMS_PATH, name)
            parsed = _parse_term(name, raw, path, issues)
            if parsed is not None:
                declared[name] = (parsed[0], parsed[1], path)

    terms = translate_gkd_knobs(declared, kd_weight, knobs, issues)

    if legacy_visual is not None:
        if "visual_kd" in terms:
            issues.append(
                ConfigIssue(
                    LEGACY_VISUAL_PATH,
                    f"visual KD is declared twice: here and in {LOSS_TERMS_PATH}.visual_kd; keep one of them",
                )
            )
        else:
            parsed = _parse_term("visual_kd", legacy_visual, LEGACY_VISUAL_PATH, issues)
            if parsed is not None:
                terms["visual_kd"] = ResolvedTerm("visual_kd", parsed[0], parsed[1], LEGACY_VISUAL_PATH)

    if len(issues) > start:
        return None
    composition = Composition(tuple(terms.values()))
    lm_jsd = composition.term("lm_jsd")
    where = lm_jsd.origin if lm_jsd is not None and lm_jsd.origin != "default" else LOSS_TERMS_PATH
    check_composition(composition, issues, where)
    return composition if len(issues) == start else None


def translate_gkd_knobs(
    declared: Mapping[str, tuple[str, TermSpec, str]],
    kd_weight: float | None,
    knobs: GkdKnobs,
    issues: list[ConfigIssue],
) -> dict[str, ResolvedTerm]:
    """ms-swift's GKD knobs as terms, merged with the declared `loss_terms`: the one place where
    ms-swift's loss is spelled out. `lm_jsd` takes `llm_kd_weight` (default 1.0), `beta`,
    `temperature` and `gkd_logits_topk`; `ce` takes `sft_alpha` (default 0); a `loss_terms` entry of
    the same name overrides them (stating a knob in both places with different values is an issue
    naming both); every other `lm_jsd` instance inherits `beta` / `temperature` it does not set.
    Returns every term in order: `lm_jsd`, `ce`, then the other declared terms."""
    rest = dict(declared)
    terms = {
        "lm_jsd": _resolve_lm_jsd(rest.pop("lm_jsd", None), kd_weight, knobs, issues),
        "ce": _resolve_ce(rest.pop("ce", None), knobs, issues),
    }
    for name, (type_name, spec, path) in rest.items():
        if type_name == "lm_jsd":
            spec = _inherit_jsd_knobs(spec, knobs)
        terms[name] = ResolvedTerm(name, type_name, spec, path)
    return terms


def _inherit_jsd_knobs(spec: TermSpec, knobs: GkdKnobs) -> TermSpec:
    update: dict[str, Any] = {}
    if getattr(spec, "beta", None) is None:
        update["beta"] = SWIFT_GKD_BETA if knobs.beta is None else knobs.beta
    if getattr(spec, "temperature", None) is None:
        update["temperature"] = SWIFT_GKD_TEMPERATURE if knobs.temperature is None else knobs.temperature
    return spec.model_copy(update=update) if update else spec


def _resolve_lm_jsd(
    declared: tuple[str, TermSpec, str] | None,
    kd_weight: float | None,
    knobs: GkdKnobs,
    issues: list[ConfigIssue],
) -> ResolvedTerm:
    from kdcompose.terms.lm_jsd import LmJsdSpec

    if declared is None:
        weight = LLM_KD_WEIGHT_DEFAULT if kd_weight is None else kd_weight
        origin = LLM_KD_WEIGHT_PATH if kd_weight is not None else "default"
        spec = LmJsdSpec(type="lm_jsd", weight=weight, topk=knobs.gkd_logits_topk)
        return ResolvedTerm("lm_jsd", "lm_jsd", _inherit_jsd_knobs(spec, knobs), origin)
    type_name, spec, path = declared
    if type_name != "lm_jsd":
        issues.append(ConfigIssue(join_path(path, "type"), "the term named lm_jsd must have type lm_jsd"))
    if kd_weight is not None:
        if "weight" in spec.model_fields_set and spec.weight != kd_weight:
            issues.append(_conflict(LLM_KD_WEIGHT_PATH, kd_weight, join_path(path, "weight"), spec.weight))
        spec = spec.model_copy(update={"weight": kd_weight})
    if knobs.gkd_logits_topk is not None:  # ms-swift's top-k knob is lm_jsd's topk
        if spec.topk is not None and spec.topk != knobs.gkd_logits_topk:
            issues.append(
                _conflict(
                    knobs.gkd_logits_topk_path, knobs.gkd_logits_topk, join_path(path, "topk"), spec.topk
                )
            )
        spec = spec.model_copy(update={"topk": knobs.gkd_logits_topk})
    explicit_beta = getattr(spec, "beta", None)
    if explicit_beta is not None and knobs.beta is not None and explicit_beta != knobs.beta:
        issues.append(_conflict(knobs.beta_path, knobs.beta, join_path(path, "beta"), explicit_beta))
    return ResolvedTerm("lm_jsd", type_name, _inherit_jsd_knobs(spec, knobs), path)


def _resolve_ce(
    declared: tuple[str, TermSpec, str] | None, knobs: GkdKnobs, issues: list[ConfigIssue]
) -> ResolvedTerm:
    from kdcompose.terms.ce import CeSpec

    if declared is None:
        weight = SWIFT_GKD_SFT_ALPHA if knobs.sft_alpha is None else knobs.sft_alpha
        origin = knobs.sft_alpha_path if knobs.sft_alpha is not None else "default"
        return ResolvedTerm("ce", "ce", CeSpec(type="ce", weight=weight), origin)
    type_name, spec, path = declared
    if type_name != "ce":
        issues.append(ConfigIssue(join_path(path, "type"), "the term named ce must have type ce"))
    if knobs.sft_alpha is not None:
        if "weight" in spec.model_fields_set and spec.weight != knobs.sft_alpha:
            issues.append(
                _conflict(knobs.sft_alpha_path, knobs.sft_alpha, join_path(path, "weight"), spec.weight)
            )
        spec = spec.model_copy(update={"weight": knobs.sft_alpha})
    return ResolvedTerm("ce", type_name, spec, path)


def check_composition(
    composition: Composition, issues: list[ConfigIssue], where: str = LOSS_TERMS_PATH
) -> None:
    """What each active term says about its own settings, and that something is active
    (`where`: the path to name when nothing is)."""
    for term in composition.active_terms:
        issues.extend(get_term_class(term.type)(term.name, term.spec, term.path).config_issues())
    if not composition.active_terms:
        issues.append(
            ConfigIssue(
                where,
                "no active loss term: every term has weight 0. Give at least one term a positive weight "
                "(e.g. rlhf.llm_kd_weight > 0, or enable custom.visual_kd)",
            )
        )


def stock_gkd_composition(
    beta: Any, temperature: Any, sft_alpha: Any, gkd_logits_topk: Any = None
) -> Composition:
    """ms-swift's own GKD loss for these argument values: what a run with no kdcompose key trains."""
    issues: list[ConfigIssue] = []
    values = {
        "beta": beta,
        "temperature": temperature,
        "sft_alpha": sft_alpha,
        "gkd_logits_topk": gkd_logits_topk,
    }
    knobs = parse_gkd_knobs(values, {k: k for k in values}, issues)
    composition = resolve_composition(None, None, None, knobs, issues)
    if issues or composition is None:
        raise ConfigError(issues or [ConfigIssue("", "invalid GKD arguments")], source="ms-swift arguments")
    return composition


def raise_if(issues: list[ConfigIssue], source: str | None = None) -> None:
    if issues:
        raise ConfigError(issues, source=source)


def legacy_llm_kd_weight(terms: Iterable[Any]) -> float:
    """The runtime value of ms-swift's `llm_kd_weight` knob: the weight of the active term
    named `lm_jsd` (0 when there is none), attached to the train arguments for old callers."""
    return next((float(t.weight) for t in terms if t.name == "lm_jsd"), 0.0)
