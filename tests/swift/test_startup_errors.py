"""ms-swift start-up failures become exit-2 config errors naming the key (startup_errors.py);
anything else keeps its traceback.

The phases are recognised from real ms-swift frames: exceptions raised by ms-swift 4.6's own
model-info and template functions in-process, and one `kdcompose train` whose teacher checkpoint
passes every file check but cannot be loaded (a truncated weights file).
"""

from __future__ import annotations

import shutil

import pytest
import yaml
from forked_cli import run_cli
from swift_support import sections, subprocess_env

from kdcompose.errors import ConfigError
from kdcompose.integrations.swift.launch.startup_errors import (
    DEBUG_ENV,
    startup_errors_as_config_errors,
    startup_issue,
)

pytestmark = pytest.mark.swift


def raised_by(function, *args, **kwargs) -> BaseException:
    try:
        function(*args, **kwargs)
    except Exception as exc:
        return exc
    raise AssertionError(f"{function.__name__} did not raise")


def test_a_model_ms_swift_cannot_find_is_blamed_on_model():
    from swift.model import get_model_info_meta

    exc = raised_by(get_model_info_meta, "/nonexistent/checkpoint")
    issue = startup_issue(exc, {"model": "/nonexistent/checkpoint"}, {"model": "model.model"})
    assert issue is not None and issue.path == "model.model"
    assert "could not load the student model" in issue.message
    assert "path: '/nonexistent/checkpoint' not found" in issue.message  # ms-swift's own words


def test_an_unknown_template_is_blamed_on_template():
    from swift.model import MODEL_MAPPING
    from swift.template import get_template_meta

    exc = raised_by(get_template_meta, None, MODEL_MAPPING["qwen2_vl"], "qwen2-vl")
    values = {"model": "/m", "model_type": "qwen2_vl", "template": "qwen2-vl"}
    issue = startup_issue(exc, values, {"template": "template.template"})
    assert issue is not None and issue.path == "template.template"
    assert "could not build the template" in issue.message and "qwen2-vl" in issue.message


def test_failures_outside_ms_swift_start_up_are_left_alone():
    def kdcompose_bug():
        raise KeyError("a genuine bug")

    assert startup_issue(raised_by(kdcompose_bug), {"model": "m"}, {}) is None
    assert startup_issue(ConfigError.single("x", "y"), {}, {}) is None


def test_the_block_converts_and_debug_keeps_the_traceback(monkeypatch):
    from swift.model import get_model_info_meta

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(ConfigError) as caught, startup_errors_as_config_errors({"model": "/no/such"}, {}):
        get_model_info_meta("/no/such")
    assert caught.value.paths == ("model",)
    assert isinstance(caught.value.__cause__, ValueError)
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError), startup_errors_as_config_errors({"model": "/no/such"}, {}):
        get_model_info_meta("/no/such")
    with pytest.raises(KeyError), startup_errors_as_config_errors({}, {}):
        raise KeyError("not a start-up failure")


def test_train_names_the_teacher_whose_weights_ms_swift_cannot_load(tmp_path):
    data = sections(tmp_path / "out")
    teacher = tmp_path / "broken-teacher"
    shutil.copytree(data["model"]["teacher_model"], teacher)
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])  # truncated: every file check still passes
    data["model"]["teacher_model"] = str(teacher)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {k: v for k, v in subprocess_env(tmp_path).items() if k != DEBUG_ENV}
    result = run_cli(["train", str(config)], env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("  - model.teacher_model:"))
    assert "could not load the teacher model" in line and str(teacher) in line
    assert "KDCOMPOSE_DEBUG=1" in line
