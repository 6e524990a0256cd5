"""`--set DOTTED.KEY=VALUE` (kdcompose.overrides): applied to the parsed YAML before
validation, so an override is checked exactly like the same line in the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from kdcompose.config import load_config, parse_config
from kdcompose.errors import ConfigError
from kdcompose.overrides import apply_overrides, parse_override, parse_overrides, split_path

BASE = {"rlhf": {"llm_kd_weight": 0, "sft_alpha": 1.0}, "training": {"max_steps": 5}}


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_values_are_parsed_as_yaml():
    cases = {"2": 2, "0.5": 0.5, "true": True, "[a, b]": ["a", "b"], '"2"': "2", "": None, "{k: 1}": {"k": 1}}
    for text, value in cases.items():
        assert parse_override(f"training.x={text}").value == value


def test_a_value_may_contain_equals_signs():
    assert parse_override("data.dataset=a=b.jsonl").value == "a=b.jsonl"


def test_quoted_segments_hold_dots():
    assert split_path('rlhf.loss_terms."a.b".weight') == ["rlhf", "loss_terms", "a.b", "weight"]
    with pytest.raises(ValueError, match="empty segment"):
        split_path("rlhf..weight")
    with pytest.raises(ValueError, match="quoted"):
        split_path('rlhf."open')


def test_missing_mappings_are_created_and_later_overrides_win(tmp_path):
    out = apply_overrides(
        BASE,
        parse_overrides(["rlhf.loss_terms.ce.weight=0.25", "training.max_steps=2", "training.max_steps=3"]),
    )
    assert out["rlhf"]["loss_terms"] == {"ce": {"weight": 0.25}}
    assert out["training"]["max_steps"] == 3
    assert BASE["training"]["max_steps"] == 5, "the parsed document itself is not changed"


def test_list_items_are_indexed_by_number():
    data = {"data": {"dataset": ["a.jsonl", "b.jsonl"]}}
    assert apply_overrides(data, parse_overrides(["data.dataset.1=c.jsonl"]))["data"]["dataset"] == [
        "a.jsonl",
        "c.jsonl",
    ]
    with pytest.raises(ConfigError) as caught:
        apply_overrides(data, parse_overrides(["data.dataset.5=c.jsonl"]))
    assert caught.value.paths == ("data.dataset.5",)
    assert "2 item(s)" in caught.value.issues[0].message


def test_a_path_through_a_scalar_names_the_path():
    with pytest.raises(ConfigError) as caught:
        apply_overrides(BASE, parse_overrides(["training.max_steps.x=1"]))
    assert caught.value.paths == ("training.max_steps.x",)
    assert "training.max_steps is 5" in caught.value.issues[0].message


def test_malformed_overrides_are_all_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        parse_overrides(["novalue", "=3", "rlhf.beta=[1"])
    assert caught.value.paths == ("--set", "--set", "rlhf.beta")
    assert "not valid YAML" in caught.value.issues[2].message


def test_an_override_is_validated_like_the_file_and_says_where_it_came_from(tmp_path):
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as caught:
        load_config(path, ['rlhf.loss_terms.ce.on_student_generated="yes"'])
    (issue,) = caught.value.issues
    assert issue.path == "rlhf.loss_terms.ce.on_student_generated"
    assert "true or false" in issue.message
    assert issue.message.endswith('(from --set rlhf.loss_terms.ce.on_student_generated="yes")')
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["trainin.max_steps=2"])
    (issue,) = caught.value.issues
    assert issue.path == "trainin"
    assert "unknown top-level section" in issue.message and "--set trainin.max_steps=2" in issue.message


def test_an_override_changes_the_composition(tmp_path):
    path = write(tmp_path, {"rlhf": {"llm_kd_weight": 0.5}})
    assert load_config(path).composition == parse_config({"rlhf": {"llm_kd_weight": 0.5}}).composition
    config = load_config(path, ["rlhf.llm_kd_weight=0", "rlhf.loss_terms.ce.weight=1"])
    assert config.llm_kd_weight == 0.0
    assert [t.name for t in config.composition.terms if t.spec.weight > 0] == ["ce"]


keys = st.text(alphabet="abcdefgh_", min_size=1, max_size=6)
scalars = st.one_of(st.integers(-1000, 1000), st.booleans(), st.text(alphabet="xyz", min_size=1, max_size=4))


@given(path=st.lists(keys, min_size=1, max_size=4), value=scalars)
def test_any_path_and_scalar_round_trip(path, value):
    dumped = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    text = f"{'.'.join(path)}={dumped}"
    out = apply_overrides({}, parse_overrides([text]))
    node = out
    for segment in path:
        node = node[segment]
    assert node == value
