"""Hand the resolved loss composition from the launcher or the plugin to the trainer.

ms-swift builds the trainer itself (`TrainerFactory`, fixed keyword arguments), so the
composition cannot be passed as an argument. It travels as plain data instead:

* `kdcompose train` resolves it from the YAML and attaches it to the `RLHFArguments` and to
  the nested `training_args` (`kdcompose_loss_terms`, plus the runtime `llm_kd_weight` for
  other tooling; ms-swift also saves both in `args.json`);
* the `--external_plugins` route resolves it while ms-swift parses the command line and
  parks it here (`set_plugin_composition`), where the trainer of that run takes it;
  `kdcompose train` parks its resolved composition here too, so the trainer gets the very
  object (with each term's YAML origin) instead of resolving the attached block again.

Either way it is the explicit `loss_terms` block of the resolved composition
(`Composition.to_loss_terms`), which resolves back to the same composition. With neither,
the trainer resolves the stock GKD loss from ms-swift's own `beta`, `temperature` and
`sft_alpha`, so using the trainer class directly still trains exactly like ms-swift.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdcompose.composition import Composition
from kdcompose.errors import ConfigError, ConfigIssue
from kdcompose.resolve import GkdKnobs, legacy_llm_kd_weight, parse_gkd_knobs, resolve_composition

LOSS_TERMS_ATTR = "kdcompose_loss_terms"
LLM_KD_WEIGHT_ATTR = "llm_kd_weight"
TEACHERS_ATTR = "kdcompose_teachers"
"""The run's cache / server teachers by name (`TeacherSource.to_dict()`), as `kdcompose train` attaches."""

_plugin_composition: Composition | None = None


def llm_kd_weight(composition: Composition) -> float:
    return legacy_llm_kd_weight(composition.terms)


def attach(target: Any, composition: Composition) -> None:
    """Record the composition and the runtime `llm_kd_weight` as attributes of an arguments object."""
    setattr(target, LOSS_TERMS_ATTR, composition.to_loss_terms())
    setattr(target, LLM_KD_WEIGHT_ATTR, llm_kd_weight(composition))


def from_loss_terms(loss_terms: Mapping[str, Any], source: str | None = None) -> Composition:
    """Resolve an explicit `loss_terms` block (as `attach` stores it) back into a composition."""
    issues: list[ConfigIssue] = []
    composition = resolve_composition(loss_terms, None, None, GkdKnobs(), issues)
    if issues or composition is None:
        raise ConfigError(issues or [ConfigIssue("rlhf.loss_terms", "invalid composition")], source=source)
    return composition


def stock_composition(
    beta: Any, temperature: Any, sft_alpha: Any, gkd_logits_topk: Any = None
) -> Composition:
    """ms-swift's own GKD loss for these argument values (no kdcompose field set)."""
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


def set_plugin_composition(composition: Composition | None) -> None:
    """Park (or clear, with None) the composition the plugin resolved from the command line."""
    global _plugin_composition
    _plugin_composition = composition


def plugin_composition() -> Composition | None:
    return _plugin_composition


def take_plugin_composition() -> Composition | None:
    """The parked composition, cleared: it belongs to the one run whose command line the
    plugin parsed, never to a later run in the same process."""
    global _plugin_composition
    parked, _plugin_composition = _plugin_composition, None
    return parked


def composition_for(training_args: Any, gkd_logits_topk: int | None = None) -> tuple[Composition, str]:
    """The composition the trainer must optimise, and where it came from (for the log)."""
    attached = getattr(training_args, LOSS_TERMS_ATTR, None)
    parked = take_plugin_composition()
    if parked is not None and (attached is None or attached == parked.to_loss_terms()):
        # The composition object itself, resolved once: its terms keep the YAML paths they were
        # declared at (`custom.visual_kd`, `--loss_terms`) for every later message.
        return parked, "kdcompose train" if attached is not None else "the kdcompose ms-swift plugin"
    if attached is not None:
        return from_loss_terms(attached, source="training_args." + LOSS_TERMS_ATTR), "kdcompose train"
    composition = stock_composition(
        getattr(training_args, "beta", None),
        getattr(training_args, "temperature", None),
        getattr(training_args, "sft_alpha", None),
        gkd_logits_topk,
    )
    return composition, "ms-swift's GKD arguments (no kdcompose keys given)"
