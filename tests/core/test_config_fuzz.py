"""Fuzzed configs: every mutated config either validates or is rejected with dotted paths.

Mutations start from the shipped example configs (so they are near-valid, the interesting
region) and apply wrong types, unknown keys, deletions, huge numbers, deep nesting and
YAML anchors/aliases. The contract: a ConfigError whose every issue names a path — never
any other exception (a traceback for the user).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcompose import ConfigError, parse_config, parse_config_text
from kdcompose.schema.validation import path_segment
from kdcompose.yaml_io import MAX_NODES

REPO = Path(__file__).resolve().parents[2]
BASES = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "configs").glob("*.yaml"))]

junk = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**30), max_value=10**30),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    return out


def _set(root: dict, path: tuple, value: Any) -> None:
    node = root
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _delete(root: dict, path: tuple) -> None:
    node = root
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]


@st.composite
def mutated_configs(draw) -> Any:
    config = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        if not isinstance(config, dict):
            break
        paths = [p for p in _paths(config) if p]
        op = draw(st.sampled_from(["replace", "delete", "add", "nest", "huge", "whole"]))
        if op == "whole":
            return draw(junk)
        if not paths:
            continue
        path = draw(st.sampled_from(paths))
        if op == "replace":
            _set(config, path, draw(junk))
        elif op == "delete":
            _delete(config, path)
        elif op == "add":
            parent = path[:-1]
            node = config
            for key in parent:
                node = node[key]
            if isinstance(node, dict):
                node[draw(st.text(min_size=1, max_size=10))] = draw(junk)
        elif op == "nest":
            value: Any = draw(junk)
            for _ in range(draw(st.integers(1, 30))):
                value = {"x": value}
            _set(config, path, value)
        elif op == "huge":
            _set(config, path, draw(st.sampled_from([10**400, -(10**400), 1e308 * 10, "9" * 5000])))
    return config


def _check(config: Any) -> None:
    try:
        parse_config(config)
    except ConfigError as exc:
        assert exc.issues
        top = [path_segment(k) for k in config] if isinstance(config, dict) else []
        for issue in exc.issues:
            assert isinstance(issue.path, str)
            if issue.path:
                assert any(issue.path == k or issue.path.startswith(k + ".") for k in top), (issue, top)


@settings(max_examples=120)
@given(mutated_configs())
def test_mutated_configs_validate_or_fail_with_dotted_paths(config):
    _check(config)


anchor_docs = st.sampled_from(
    [
        "base: &w {weight: 0.5}\n",
        "rlhf:\n  loss_terms:\n    ce: &c {weight: 0.5}\n    ce2: {<<: *c, type: ce}\n",
        "rlhf:\n  loss_terms:\n    lm_jsd: &j {weight: 0.5}\n    lm_jsd_b: *j\n",
        "custom:\n  visual_kd: &v {aligner: {weight: 1}}\nrlhf: {loss_terms: {visual_kd: *v}}\n",
        "rlhf: &r {llm_kd_weight: *r}\n",
        "rlhf: {llm_kd_weight: !!float .inf}\n",
        "[" * 3000 + "]" * 3000,
        "rlhf:\n  loss_terms:\n" + "".join(f"    t{i}: {{type: ce, weight: 0.1}}\n" for i in range(200)),
    ]
)


@given(anchor_docs)
def test_yaml_anchor_alias_and_tag_documents(text):
    try:
        parse_config_text(text)
    except ConfigError as exc:
        assert all(isinstance(issue.path, str) for issue in exc.issues)


ALIAS_BOMB = (
    "a: &a [1, 2]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b]\n"
    "d: &d [*c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d]\n"
    "f: [*e, *e, *e, *e, *e, *e, *e, *e]\n"
)


def test_alias_bomb_is_refused_by_the_expansion_limit():
    """~300 bytes that expand to ~75,000 values: refused by the node limit itself (without the
    limit the document would load and fail later on unknown sections, which this test rejects)."""
    with pytest.raises(ConfigError) as info:
        parse_config_text(ALIAS_BOMB)
    assert [i.message for i in info.value.issues] == [
        f"config expands to more than {MAX_NODES} values (YAML aliases?); refusing it"
    ]


def test_python_tags_are_refused_and_never_executed(tmp_path):
    marker = tmp_path / "executed"
    text = f'rlhf: !!python/object/apply:os.system ["touch {marker}"]\n'
    with pytest.raises(ConfigError) as info:
        parse_config_text(text)
    assert not marker.exists(), "a python tag was executed"
    (issue,) = info.value.issues
    assert "could not determine a constructor for the tag" in issue.message
    assert "python/object/apply:os.system" in issue.message
