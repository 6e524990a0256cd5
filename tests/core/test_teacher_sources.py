"""Where teachers are: refusals of what a cache or a server cannot do, named by key."""

from __future__ import annotations

import pytest

from kdcompose import ConfigError, parse_config


def test_an_on_policy_config_with_a_cache_is_refused_naming_lmbda(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_config({"rlhf": {"lmbda": 0.5, "gkd_logits_topk": 8, "teacher_cache": str(tmp_path)}})
    assert info.value.paths == ("rlhf.lmbda",)
    assert "lmbda: 0" in str(info.value)


def test_terms_that_need_the_teacher_model_are_refused_with_a_cache_or_server(tmp_path):
    visual = {"weight": 1.0, "aligner": {"distance": "mse"}}
    for rlhf in (
        {"teacher_cache": str(tmp_path), "loss_terms": {"visual_kd": visual}, "gkd_logits_topk": 8},
        {"teacher_model_server": "http://127.0.0.1:1", "loss_terms": {"lm_jsd": {"weight": 1.0}}},
    ):
        with pytest.raises(ConfigError) as info:
            parse_config({"rlhf": rlhf})
        assert any(p.startswith("rlhf.loss_terms.") for p in info.value.paths), info.value
        assert "top-K" in str(info.value)


def test_a_term_naming_an_undeclared_teacher_is_refused():
    with pytest.raises(ConfigError) as info:
        parse_config({"rlhf": {"loss_terms": {"lm_x": {"type": "lm_jsd", "teacher": "math", "topk": 4}}}})
    assert info.value.paths == ("rlhf.loss_terms.lm_x.teacher",)
    assert "rlhf.teachers.math" in str(info.value)
