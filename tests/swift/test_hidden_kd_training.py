"""`hidden_kd` through `kdcompose train` on the tiny models, and a user term from a file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

LAYER_S, LAYER_T = "model.language_model.layers.1", "model.language_model.layers.2"


@pytest.mark.swift
def test_hidden_kd_trains_the_tiny_pair_with_a_projector_from_yaml_alone(tmp_path):
    from swift_support import kdcompose_command, run_command, sections, step_logs, write_config

    rlhf = {
        "llm_kd_weight": 0.5,
        "loss_terms": {
            "hidden_kd": {
                "weight": 0.5,
                "pairs": [{"student": LAYER_S, "teacher": LAYER_T, "distance": "mse", "projector": "linear"}],
            }
        },
    }
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "cfg.yaml", sections(out, rlhf=rlhf, max_steps=3, save_strategy="steps", save_steps=3)
    )
    result = run_command(kdcompose_command("train", str(config)), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = step_logs(out)
    assert len(rows) == 3
    for row in rows:
        assert row["hidden_kd_loss"] > 0 and row["hidden_kd_loss"] == pytest.approx(row["hidden_kd_loss_0"])
        assert row["loss"] == pytest.approx(row["hidden_kd_loss"] + row["llm_kd_loss"], rel=1e-3)
    assert "64->96" in result.stdout + result.stderr, "the projector's widths were discovered"
    from safetensors.torch import load_file

    (checkpoint,) = sorted(out.glob("**/checkpoint-3"))
    state = load_file(str(checkpoint / "kdcompose_projectors.safetensors"))
    weight = state["hidden_kd__0.weight"]
    assert weight.shape == (96, 64)
    assert not torch.equal(weight, torch.eye(96, 64)), "the projector trained with the student"


@pytest.mark.swift
def test_a_bad_module_path_or_width_fails_before_training_naming_the_key(tmp_path):
    from swift_support import kdcompose_command, run_command, sections, write_config

    pairs = [
        {"student": "model.language_model.layer.1", "teacher": LAYER_T},  # typo: layer
        {"student": LAYER_S, "teacher": LAYER_T},  # 64 vs 96 without a projector
    ]
    rlhf = {"loss_terms": {"hidden_kd": {"weight": 1.0, "pairs": pairs}}}
    config = write_config(tmp_path / "cfg.yaml", sections(tmp_path / "out", rlhf=rlhf, max_steps=1))
    result = run_command(kdcompose_command("train", str(config)), tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert (
        "rlhf.loss_terms.hidden_kd.pairs.1: student:model.language_model.layers.1 is 64 wide" in result.stderr
    )
    assert "rlhf.loss_terms.hidden_kd.pairs.1.projector: linear" in result.stderr
    assert not list((tmp_path / "out").glob("**/logging.jsonl")) or "'loss'" not in result.stdout


@pytest.mark.swift
def test_a_user_term_from_a_file_outside_the_package_taps_modules_and_trains(tmp_path):
    from swift_support import kdcompose_command, run_command, sections, step_logs, write_config

    plugin = tmp_path / "plugins" / "relation_kd_term.py"
    plugin.parent.mkdir()
    shutil.copy(Path(__file__).parents[2] / "examples" / "relation_kd_term.py", plugin)
    rlhf = {
        "llm_kd_weight": 0,
        "sft_alpha": 0.1,
        "loss_terms": {"relation_kd": {"weight": 0.5, "student_layer": LAYER_S, "teacher_layer": LAYER_T}},
    }
    data = {"plugins": [str(plugin)], **sections(tmp_path / "out", rlhf=rlhf, max_steps=2)}
    config = write_config(tmp_path / "cfg.yaml", data)
    result = run_command(kdcompose_command("train", str(config)), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = step_logs(tmp_path / "out")
    assert len(rows) == 2 and all(r["relation_kd_loss"] > 0 for r in rows)
    assert all(r["loss"] == pytest.approx(r["relation_kd_loss"] + r["sft_loss"], rel=1e-3) for r in rows)
