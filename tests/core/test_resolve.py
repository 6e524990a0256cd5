"""Legacy knobs -> composition: every existing config keeps its meaning.

Seed cases of the original proposal (`llm_kd_weight` default, positive, zero,
negative/invalid) plus the conflict and emptiness rules.
"""

from __future__ import annotations

import math

import pytest
from helpers import config_error, config_from

from kdcompose import build_composer
from kdcompose.defaults import SWIFT_GKD_BETA, SWIFT_GKD_TEMPERATURE


def _weights(config) -> dict[str, float]:
    return {t.name: t.weight for t in config.composition.terms}


def test_no_new_field_is_stock_gkd_loss():
    config = config_from(rlhf={"rlhf_type": "gkd", "teacher_model": "t"})
    assert _weights(config) == {"lm_jsd": 1.0, "ce": 0.0}
    jsd = config.composition.term("lm_jsd").spec
    assert (jsd.beta, jsd.temperature) == (SWIFT_GKD_BETA, SWIFT_GKD_TEMPERATURE)
    composer = build_composer(config.composition)
    assert [t.name for t in composer.active_terms] == ["lm_jsd"]
    assert composer.needs.teacher_logits


def test_stock_knobs_flow_into_terms():
    config = config_from(rlhf={"beta": 0.2, "temperature": 1.5, "sft_alpha": 0.3})
    jsd = config.composition.term("lm_jsd").spec
    assert (jsd.beta, jsd.temperature) == (0.2, 1.5)
    assert _weights(config) == {"lm_jsd": 1.0, "ce": 0.3}


def test_stock_knobs_are_read_from_any_section():
    config = config_from(training={"sft_alpha": 0.25}, rlhf={"beta": 0.1})
    assert _weights(config)["ce"] == 0.25
    assert config.composition.term("lm_jsd").spec.beta == 0.1


def test_llm_kd_weight_default_is_one():
    assert config_from(rlhf={}).llm_kd_weight == 1.0


@pytest.mark.parametrize("weight", [0.5, 2, 1e-3, 3.0])
def test_llm_kd_weight_positive_scales_lm_jsd(weight):
    config = config_from(rlhf={"llm_kd_weight": weight})
    assert config.llm_kd_weight == float(weight)
    assert _weights(config)["lm_jsd"] == float(weight)
    assert build_composer(config.composition).formula().startswith(f"Loss = {float(weight):g}*lm_jsd")


def test_llm_kd_weight_zero_with_visual_kd_is_visual_only():
    config = config_from(
        rlhf={"llm_kd_weight": 0},
        custom={"visual_kd": {"aligner": {"enabled": True, "weight": 1.0}}},
    )
    composer = build_composer(config.composition)
    assert [t.name for t in composer.active_terms] == ["visual_kd"]
    needs = composer.needs
    assert not needs.teacher_logits and not needs.teacher_language_model
    assert {(t.side, t.path) for t in needs.all_taps} == {
        ("student", "model.visual.merger"),
        ("teacher", "model.visual.merger"),
    }
    assert config.llm_kd_weight == 0.0


def test_llm_kd_weight_zero_alone_has_no_active_term():
    error = config_error({"rlhf": {"llm_kd_weight": 0}})
    assert error.paths == ("rlhf.llm_kd_weight",)
    assert "no active loss term" in str(error)


def test_llm_kd_weight_zero_with_ce_keeps_ce_only_and_no_teacher():
    config = config_from(rlhf={"llm_kd_weight": 0.0, "sft_alpha": 1.0})
    composer = build_composer(config.composition)
    assert [t.name for t in composer.active_terms] == ["ce"]
    assert not composer.needs.teacher


@pytest.mark.parametrize(
    "value", [-1, -0.5, -1e-9, "0.5", "abc", True, False, math.nan, math.inf, -math.inf, [1.0], {"w": 1}]
)
def test_llm_kd_weight_invalid_is_rejected_with_its_path(value):
    error = config_error({"rlhf": {"llm_kd_weight": value}})
    assert error.paths == ("rlhf.llm_kd_weight",)


def test_llm_kd_weight_conflicting_with_loss_terms_names_both_paths():
    error = config_error({"rlhf": {"llm_kd_weight": 0.5, "loss_terms": {"lm_jsd": {"weight": 0.7}}}})
    assert error.paths == ("rlhf.llm_kd_weight",)
    assert "rlhf.loss_terms.lm_jsd.weight" in str(error)


def test_llm_kd_weight_agreeing_with_loss_terms_is_fine():
    config = config_from(rlhf={"llm_kd_weight": 0.5, "loss_terms": {"lm_jsd": {"weight": 0.5, "beta": 0.1}}})
    assert _weights(config)["lm_jsd"] == 0.5


def test_llm_kd_weight_sets_weight_of_declared_lm_jsd_without_weight():
    config = config_from(rlhf={"llm_kd_weight": 0.25, "loss_terms": {"lm_jsd": {"beta": 0.1}}})
    term = config.composition.term("lm_jsd")
    assert (term.weight, term.spec.beta) == (0.25, 0.1)


def test_beta_conflict_names_both_paths():
    error = config_error({"rlhf": {"beta": 0.3, "loss_terms": {"lm_jsd": {"beta": 0.7}}}})
    assert error.paths == ("rlhf.beta",)
    assert "rlhf.loss_terms.lm_jsd.beta" in str(error)


def test_sft_alpha_conflict_names_both_paths():
    error = config_error({"training": {"sft_alpha": 0.3}, "rlhf": {"loss_terms": {"ce": {"weight": 0.7}}}})
    assert error.paths == ("training.sft_alpha",)
    assert "rlhf.loss_terms.ce.weight" in str(error)


def test_lm_jsd_temperature_may_differ_from_sampling_temperature():
    config = config_from(rlhf={"temperature": 0.7, "loss_terms": {"lm_jsd": {"temperature": 1.0}}})
    assert config.composition.term("lm_jsd").spec.temperature == 1.0


def test_legacy_visual_kd_becomes_a_term_with_its_targets():
    config = config_from(
        custom={
            "visual_kd": {
                "weight": 0.5,
                "vit": {"enabled": True, "weight": 0.3, "distance": "cosine"},
                "aligner": {"enabled": False},
            }
        }
    )
    term = config.composition.term("visual_kd")
    assert term.origin == "custom.visual_kd"
    assert term.weight == 0.5
    assert list(term.spec.active_targets()) == ["vit"]
    assert term.spec.vit.distance == "cosine"
    composer = build_composer(config.composition)
    assert {t.path for t in composer.needs.side_taps("student")} == {"model.visual"}


def test_legacy_visual_kd_disabled_block_is_inactive():
    config = config_from(custom={"visual_kd": {"enabled": False, "aligner": {"enabled": True}}})
    assert not config.composition.term("visual_kd").active
    assert [t.name for t in build_composer(config.composition).active_terms] == ["lm_jsd"]


def test_visual_kd_declared_twice_is_an_error():
    error = config_error(
        {"rlhf": {"loss_terms": {"visual_kd": {"aligner": {}}}}, "custom": {"visual_kd": {"aligner": {}}}}
    )
    assert error.paths == ("custom.visual_kd",)
    assert "rlhf.loss_terms.visual_kd" in str(error)


@pytest.mark.parametrize(
    "block",
    [
        {"weight": 1.0},
        {"weight": 1.0, "aligner": {"enabled": False}},
        {"weight": 1.0, "vit": {"weight": 0}, "deepstack": {"enabled": False}},
    ],
)
def test_visual_kd_enabled_without_enabled_target_is_an_error(block):
    error = config_error({"custom": {"visual_kd": block}})
    assert error.paths == ("custom.visual_kd",)
    assert "no target" in str(error)


def test_everything_zero_is_an_error():
    error = config_error({"rlhf": {"loss_terms": {"lm_jsd": {"weight": 0}, "ce": {"weight": 0}}}})
    assert "no active loss term" in str(error)


def test_unknown_term_type_lists_registered_types():
    error = config_error({"rlhf": {"loss_terms": {"hidden_mse": {"weight": 1.0}}}})
    assert error.paths == ("rlhf.loss_terms.hidden_mse",)
    for known in ("lm_jsd", "ce", "visual_kd"):
        assert known in str(error)


def test_second_instance_of_a_type_gets_its_own_metric():
    config = config_from(
        rlhf={"loss_terms": {"lm_jsd_hot": {"type": "lm_jsd", "weight": 0.1, "temperature": 4.0}}}
    )
    composer = build_composer(config.composition)
    keys = [t.metric_key for t in composer.active_terms]
    assert keys == ["llm_kd_loss", "lm_jsd_hot_loss"]
    assert composer.term("lm_jsd_hot").spec.beta == SWIFT_GKD_BETA


def test_misplaced_own_keys_and_duplicate_args_are_named():
    error = config_error(
        {
            "training": {"llm_kd_weight": 0.5, "learning_rate": 1e-4},
            "model": {"learning_rate": 2e-4},
            "rlhf": {"visual_kd": {}},
            "rlhf_typo": {},
        }
    )
    assert set(error.paths) == {
        "training.llm_kd_weight",
        "model.learning_rate",
        "rlhf.visual_kd",
        "rlhf_typo",
    }


def test_every_problem_is_reported_at_once():
    error = config_error(
        {
            "rlhf": {
                "llm_kd_weight": -1,
                "beta": 2,
                "loss_terms": {"ce": {"weight": "x"}, "visual_kd": {"aligner": {"distance": "l2"}}},
            }
        }
    )
    assert set(error.paths) == {
        "rlhf.llm_kd_weight",
        "rlhf.beta",
        "rlhf.loss_terms.ce.weight",
        "rlhf.loss_terms.visual_kd.aligner.distance",
    }


def test_unknown_key_in_term_spec_lists_allowed_keys():
    error = config_error({"rlhf": {"loss_terms": {"lm_jsd": {"wieght": 0.5}}}})
    assert error.paths == ("rlhf.loss_terms.lm_jsd.wieght",)
    assert "allowed keys" in str(error) and "weight" in str(error)


def test_rlhf_type_other_than_gkd_is_rejected():
    assert config_error({"rlhf": {"rlhf_type": "dpo"}}).paths == ("rlhf.rlhf_type",)
