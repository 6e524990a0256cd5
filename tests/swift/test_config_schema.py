"""`kdcompose schema` is complete: a JSON Schema validator (jsonschema, Draft 2020-12) accepts
every config in the repository and every YAML example of the docs, and rejects the mistakes an
editor should flag. Marked swift: the schema lists ms-swift's arguments, read off ms-swift."""

from __future__ import annotations

import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from test_docs_yaml import BLOCKS  # the docs' YAML examples, as that module finds them

from kdcompose.json_schema import config_json_schema
from kdcompose.registry import registered_terms, unregister_term

pytestmark = pytest.mark.swift

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = config_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def errors(validator, data) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(data)]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_in_the_repo_is_valid(validator, path):
    assert errors(validator, yaml.safe_load(path.read_text())) == []


DOC_BLOCKS = [b for b in BLOCKS if "swift-flat" not in b.markers and "invalid" not in b.markers]


@pytest.mark.parametrize("index", range(len(DOC_BLOCKS)), ids=[b.id for b in DOC_BLOCKS])
def test_every_yaml_example_of_the_docs_is_valid(validator, index):
    block = DOC_BLOCKS[index]
    assert errors(validator, yaml.safe_load(block.body)) == [], block.id


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"rlhf": {"lora_rnk": 8}}, "rlhf"),  # an ms-swift argument misspelt
        ({"rlhf": {"loss_terms": {"lm_jsd": {"wieght": 1}}}}, "rlhf.loss_terms.lm_jsd"),
        ({"rlhf": {"loss_terms": {"aux": {"type": "visual_kd", "bogus": 1}}}}, "rlhf.loss_terms.aux"),
        ({"rlhf": {"loss_terms": {"ce": {"on_student_generated": "yes"}}}}, "rlhf.loss_terms.ce"),
        ({"rlhf": {"loss_terms": {"bad-name": {}}}}, "rlhf.loss_terms"),
        ({"rlhf": {"teachers": {"a": {"cache": "x", "server": "http://h"}}}}, "rlhf.teachers.a"),
        ({"rlhf": {"teachers": {"a": {"server": "ftp://h"}}}}, "rlhf.teachers.a"),
        ({"rlhf": {"teacher_cache": 3}}, "rlhf.teacher_cache"),
        ({"plugins": "my_terms.py"}, "plugins"),
        ({"rlhf": {"visual_kd": {}}}, "rlhf"),  # belongs under custom
        ({"trainin": {}}, ""),
    ],
)
def test_mistakes_are_flagged(validator, data, where):
    found = list(validator.iter_errors(data))
    assert found, f"{data} was accepted"
    assert any(".".join(map(str, e.absolute_path)) == where for e in found), errors(validator, data)


def test_kdcompose_keys_and_plugin_terms_are_accepted(validator):
    config = {
        "plugins": ["my_terms.py", "my_package.terms"],
        "model": {"model": "Qwen/Qwen2.5-VL-3B-Instruct"},
        "rlhf": {
            "teacher_cache": "cache/top64",
            "teachers": {"served": {"server": "http://127.0.0.1:8000"}, "cached": {"cache": "c2"}},
            "loss_terms": {
                "lm_jsd": {"topk": 64},
                "ce": None,
                "my_term": {"weight": 0.5, "anything": [1, 2]},  # a plug-in type named after itself
                "second": {"type": "my_term", "k": 3},
                "aligner_kd": {"type": "visual_kd", "aligner": {"projector": "linear"}},
            },
        },
    }
    assert errors(validator, config) == []


def test_a_plugin_passed_to_the_schema_command_is_checked_strictly(tmp_path):
    """`kdcompose schema --plugin FILE` describes the plug-in's terms; its knobs are then strict."""
    before, modules = set(registered_terms()), set(sys.modules)
    try:
        from kdcompose.config import load_plugins

        issues: list = []
        load_plugins([str(REPO / "examples" / "relation_kd_term.py")], None, issues)
        assert not issues
        schema = config_json_schema()
    finally:  # leave no trace: a later `plugins:` of the same file must import and register it again
        for key in set(registered_terms()) - before:
            unregister_term(key)
        for name in set(sys.modules) - modules:
            if name.startswith("kdcompose_plugin_"):  # the plug-in file's own module, nothing else
                del sys.modules[name]
    assert "term_relation_kd" in schema["$defs"]
    strict = jsonschema.Draft202012Validator(schema)
    good = {"rlhf": {"loss_terms": {"relation_kd": {"weight": 0.5, "student_layer": "model.x"}}}}
    assert errors(strict, good) == []
    assert errors(strict, {"rlhf": {"loss_terms": {"relation_kd": {"student_layr": "x"}}}})
