"""The `kdcompose` CLI as a user runs it: a real subprocess on real files."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import forked_cli
import pytest

pytestmark = pytest.mark.swift

REPO = Path(__file__).resolve().parents[2]
# configs/*.yaml against the models they name: tests/swift/test_validate_models_cli.py


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`kdcompose ARGS` in a process of its own (`tests/support/forked_cli.py`); the installed
    console script itself: `test_console_script_is_installed`."""
    return forked_cli.run_cli(list(args), dict(os.environ), timeout=120)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_json_reports_terms_and_teacher_need(tmp_path):
    cfg = write(tmp_path, "rlhf:\n  llm_kd_weight: 0\n  sft_alpha: 1.0\n")
    payload = json.loads(run_cli("validate", cfg, "--json").stdout)
    assert payload["needs_teacher"] is False
    by_name = {t["name"]: t for t in payload["terms"]}
    assert by_name["lm_jsd"]["active"] is False and by_name["lm_jsd"]["weight"] == 0.0
    assert by_name["ce"]["active"] is True and by_name["ce"]["metric"] == "sft_loss"
    assert payload["formula"] == "Loss = 1*ce"


def test_invalid_config_exits_2_naming_every_dotted_path(tmp_path):
    cfg = write(
        tmp_path,
        "rlhf:\n  llm_kd_weight: -0.5\n  loss_terms:\n    ce: {weight: .nan}\n"
        "custom:\n  visual_kd:\n    aligner: {distance: l2}\n",
    )
    result = run_cli("validate", cfg)
    assert result.returncode == 2
    for path in ("rlhf.llm_kd_weight", "rlhf.loss_terms.ce.weight", "custom.visual_kd.aligner.distance"):
        assert path in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_yaml_syntax_error_reports_the_line(tmp_path):
    cfg = write(tmp_path, "rlhf:\n  llm_kd_weight: 0.5\n  loss_terms: [unclosed\n")
    result = run_cli("validate", cfg)
    assert result.returncode == 2
    assert "line 4" in result.stderr or "line 3" in result.stderr
    assert "Traceback" not in result.stderr


def test_duplicate_yaml_key_is_an_error_not_a_silent_override(tmp_path):
    cfg = write(tmp_path, "rlhf:\n  llm_kd_weight: 0.5\n  llm_kd_weight: 0.0\n")
    result = run_cli("validate", cfg)
    assert result.returncode == 2
    assert "duplicate key 'llm_kd_weight'" in result.stderr


def test_python_tags_are_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    cfg = write(tmp_path, f"rlhf: !!python/object/apply:os.system ['touch {marker}']\n")
    result = run_cli("validate", cfg)
    assert result.returncode == 2
    assert not marker.exists()


def test_missing_file_exits_2(tmp_path):
    result = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "not found" in result.stderr


def test_schema_is_json_schema_with_every_registered_term():
    """(Completeness against every config and doc example: tests/swift/test_config_schema.py.)"""
    result = run_cli("schema", "--plugin", str(REPO / "examples" / "relation_kd_term.py"))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) < 300_000, "small enough for an editor (ms-swift's arguments defined once)"
    schema = json.loads(result.stdout)
    assert "term_relation_kd" in schema["$defs"], "--plugin adds the plug-in's terms"
    assert schema["additionalProperties"] is False
    for term in ("lm_jsd", "ce", "visual_kd"):
        assert f"term_{term}" in schema["$defs"]
    weight = schema["$defs"]["term_lm_jsd"]["properties"]["weight"]
    assert weight["minimum"] == 0
    assert "llm_kd_weight" in schema["properties"]["rlhf"]["properties"]
    assert "visual_kd" in schema["properties"]["custom"]["properties"]


def test_console_script_is_installed():
    result = subprocess.run(["kdcompose", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("validate", "schema"):
        assert command in result.stdout
