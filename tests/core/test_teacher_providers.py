"""Teacher sources as providers: a kind is one registered class that parses and checks its own
YAML block; the config loop never branches on a kind."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch

from kdcompose import ConfigError, parse_config
from kdcompose.registry import _TEACHER_SOURCES, get_teacher_source, register_teacher_source
from kdcompose.teachers.provider import PREFETCHED, TeacherProvider


@pytest.fixture
def echo_kind():
    """A user's kind of teacher source, registered for one test."""

    @register_teacher_source("echo")
    class EchoTeacher(TeacherProvider):
        location_help = "a word to echo"
        options = ("scale",)

        @classmethod
        def config_issues(cls, source, composer, swift_args, paths):
            scale = source.options.get("scale", 1)
            return (
                []
                if isinstance(scale, int)
                else [_issue(f"{source.origin[:-5]}.scale", "must be an integer")]
            )

        def topk(self, batch: Mapping[str, Any], model_inputs: Mapping[str, Any], k: int):
            shape = (*model_inputs["input_ids"].shape, k)
            return torch.zeros(shape), torch.zeros(shape, dtype=torch.long)

    yield EchoTeacher
    _TEACHER_SOURCES.pop("echo", None)


def _issue(path: str, message: str):
    from kdcompose.errors import ConfigIssue

    return ConfigIssue(path, message)


KD = {"type": "lm_jsd", "teacher": "tutor", "topk": 4}


def _config(teachers: dict, **terms: Any):
    loss_terms = {"lm_jsd": {"weight": 0}, "ce": {"weight": 1}, **terms}
    return parse_config({"rlhf": {"teachers": teachers, "loss_terms": loss_terms}})


def test_a_registered_kind_parses_its_block_with_options(echo_kind):
    config = _config(
        {"tutor": {"echo": "hello", "scale": 2}},
        kd=KD,
    )
    source = config.teachers["tutor"]
    assert (source.kind, source.location, source.origin, dict(source.options)) == (
        "echo",
        "hello",
        "rlhf.teachers.tutor.echo",
        {"scale": 2},
    )
    assert isinstance(source.provider(), echo_kind)
    assert config.composer.needs.teacher is False, "a term reading only a provider needs no teacher model"


def test_a_kinds_own_checks_and_unknown_options_name_their_keys(echo_kind):
    with pytest.raises(ConfigError) as info:
        _config({"tutor": {"echo": "hello", "scael": 2}}, kd=KD)
    assert info.value.issues[0].path == "rlhf.teachers.tutor.scael"
    assert "options: `scale`" in info.value.issues[0].message
    with pytest.raises(ConfigError) as info:
        _config({"tutor": {"echo": "hello", "scale": "x"}}, kd=KD)
    assert [i.path for i in info.value.issues] == ["rlhf.teachers.tutor.scale"]


def test_a_block_must_name_exactly_one_known_kind(echo_kind):
    for block in ({"mirror": "x"}, {"echo": "a", "cache": "b"}, "echo"):
        with pytest.raises(ConfigError) as info:
            _config({"tutor": block})
        issue = next(i for i in info.value.issues if i.path == "rlhf.teachers.tutor")
        assert "`{cache: ...}`" in issue.message and "`{echo: ...}`" in issue.message


def test_a_kind_is_registered_once_and_only_for_providers(echo_kind):
    with pytest.raises(ValueError, match="already registered"):
        register_teacher_source("echo")(type("Other", (TeacherProvider,), {}))
    with pytest.raises(TypeError, match="TeacherProvider subclass"):
        register_teacher_source("thing")(object)
    with pytest.raises(KeyError, match="known: cache, echo, server"):
        get_teacher_source("mirror")


def test_a_prefetching_kind_hands_over_what_was_fetched_for_the_micro_batch():
    server = get_teacher_source("server")
    source = _config({"tutor": {"server": "http://127.0.0.1:9"}}).teachers["tutor"]
    provider = server(source)
    logprobs, ids = torch.zeros(1, 3, 2), torch.ones(1, 3, 2, dtype=torch.long)
    assert provider.topk({PREFETCHED: {"tutor": (logprobs, ids)}}, {}, 2) == (logprobs, ids)
    with pytest.raises(RuntimeError, match="no top-K was fetched"):
        provider.topk({}, {}, 2)
