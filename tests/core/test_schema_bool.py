"""`kdcompose.schema.types.Bool`: a switch accepts YAML's true/false and nothing else, in the
built-in specs and in a user's own spec, and the error names the dotted path."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import config_error, config_from
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from kdcompose.schema.types import Bool

SWITCHES: dict[str, Any] = {
    "rlhf.loss_terms.ce.on_student_generated": lambda v: {
        "rlhf": {"loss_terms": {"ce": {"on_student_generated": v}}}
    },
    "rlhf.loss_terms.lm_jsd.fused": lambda v: {"rlhf": {"loss_terms": {"lm_jsd": {"fused": v}}}},
    "rlhf.loss_terms.ce.log_raw": lambda v: {"rlhf": {"loss_terms": {"ce": {"log_raw": v}}}},
    "rlhf.loss_terms.visual_kd.enabled": lambda v: {
        "rlhf": {"loss_terms": {"visual_kd": {"enabled": v, "aligner": {}}}}
    },
    "rlhf.loss_terms.visual_kd.aligner.enabled": lambda v: {
        "rlhf": {"loss_terms": {"visual_kd": {"aligner": {"enabled": v}, "vit": {}}}}
    },
}

not_bools = st.one_of(
    st.sampled_from(["yes", "no", "true", "false", "on", "off", "1", "0", "", "True"]),
    st.integers(),
    st.floats(allow_nan=True),
    st.none(),
    st.lists(st.booleans(), max_size=2),
)


class UserSpec(BaseModel):
    enabled: Bool = True


@pytest.mark.parametrize("path", sorted(SWITCHES))
@given(value=not_bools)
def test_a_switch_rejects_anything_but_true_or_false_naming_its_path(path, value):
    error = config_error(SWITCHES[path](value))
    assert error.paths == (path,)
    assert "true or false" in error.issues[0].message


@pytest.mark.parametrize("path", sorted(SWITCHES))
@pytest.mark.parametrize("value", [True, False])
def test_a_switch_keeps_true_and_false(path, value):
    config_from(**SWITCHES[path](value))  # no error


@given(value=not_bools)
def test_a_user_spec_gets_the_same_strictness(value):
    with pytest.raises(ValidationError, match="true or false"):
        UserSpec.model_validate({"enabled": value})
    assert UserSpec.model_validate({"enabled": False}).enabled is False


def test_json_schema_says_boolean():
    assert UserSpec.model_json_schema()["properties"]["enabled"]["type"] == "boolean"
