"""Schedules as `kdcompose validate` and `kdcompose schema` show them."""

from __future__ import annotations

import json

import pytest

# --------------------------------------------------------------------------------------------
# Reference formula (docs/schedules.md) and strategies
# --------------------------------------------------------------------------------------------


@pytest.mark.swift
def test_validate_prints_a_schedule_column_and_json_keeps_its_keys(tmp_path, capsys):
    from kdcompose.cli import main
    from kdcompose.testing import build_tiny_pair

    teacher, _ = build_tiny_pair("qwen2_vl")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"rlhf:\n  teacher_model: {teacher}\n  teacher_model_type: qwen2_vl\n"
        "  loss_terms:\n    ce:\n      weight: 0.5\n"
        "      schedule: {kind: linear, start: 1, end: 0, total_steps: 1000}\n"
    )
    assert main(["validate", str(cfg)]) == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    header = table.splitlines()[1].split()
    assert header[:4] == ["term", "type", "weight", "schedule"]
    ce_row = next(line for line in table.splitlines() if line.split()[:1] == ["ce"])
    assert "linear 1->0 over 1000" in ce_row
    assert main(["validate", str(cfg), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in payload["terms"]}
    contract = {"name", "type", "weight", "active", "metric", "needs_teacher", "formula", "spec"}
    assert contract <= rows["ce"].keys()
    assert rows["ce"]["schedule"] == "linear 1->0 over 1000" and rows["lm_jsd"]["schedule"] is None
    assert rows["ce"]["spec"]["schedule"]["total_steps"] == 1000
    assert "ce[linear 1->0 over 1000]" in payload["formula"]


@pytest.mark.swift
def test_json_schema_documents_the_schedule_for_every_term():
    from kdcompose.json_schema import config_json_schema

    schema = config_json_schema()
    for term in ("lm_jsd", "ce", "visual_kd"):
        props = schema["$defs"][f"term_{term}"]["properties"]
        assert "schedule" in props and "log_raw" in props
    fields = set(schema["$defs"]["ScheduleSpec"]["properties"])
    assert fields == {"kind", "warmup_steps", "total_steps", "start", "end"}
