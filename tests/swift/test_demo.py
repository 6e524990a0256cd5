"""`kdcompose demo` as a user runs it: a child process, a fresh output folder, real training.

A short run (`--steps 3`) checks everything the demo promises: the formula and a progress
bar on screen, one metric per loss term in `logging.jsonl`, TensorBoard events, a
checkpoint with the aligner's projector, a config that `kdcompose validate` accepts, and a
summary that says where all of it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from swift_support import kdcompose_command, run_command

from kdcompose import parse_config
from kdcompose.demo import CONFIG_NAME, TERM_METRICS, demo_config_text
from kdcompose.training.projectors import PROJECTOR_FILE

pytestmark = pytest.mark.swift

STEPS = 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "kdcompose-demo"
    result = run_command(
        kdcompose_command("demo", "--steps", str(STEPS), "--output-dir", str(out)), out.parent, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    runs = sorted((out / "runs").glob("v*-*"))
    assert len(runs) == 1, runs
    return out, runs[0], result.stdout, result.stderr


def test_demo_prints_the_formula_the_projector_choice_and_a_summary(demo):
    out, run, stdout, stderr = demo
    assert (
        "Loss = 1*lm_jsd(beta=0.5, T=0.9) + 0.5*ce + 1*visual_kd(vit:cosine, aligner:mse+linear_projector)"
        in stdout
    )
    assert "projector: linear" in stdout and "64" in stdout and "96" in stdout
    assert "Train:" in stdout + stderr, "a progress bar"
    summary = stdout[stdout.index("kdcompose demo: done") :]
    for needle in (
        str(run),
        str(run / "logging.jsonl"),
        "tensorboard --logdir",
        f"checkpoint-{STEPS}",
        f"kdcompose plot {run}",
        f"kdcompose train {out / CONFIG_NAME}",
        "configs/",
    ):
        assert needle in summary, needle


def test_demo_logs_every_term(demo):
    _, run, _, _ = demo
    rows = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r and "train_loss" not in r]
    assert len(steps) == STEPS
    for row in steps:
        assert set(TERM_METRICS) <= set(row), row
        total = row["llm_kd_loss"] + row["sft_loss"] + row["vision_kd_loss"]
        assert row["loss"] == pytest.approx(total, rel=1e-3)


def test_demo_writes_tensorboard_events_and_a_checkpoint_with_the_trained_projector(demo):
    import torch
    from safetensors.torch import load_file

    _, run, _, _ = demo
    args = json.loads((run / "args.json").read_text())
    assert args["report_to"] == ["tensorboard"]
    assert list(Path(args["logging_dir"]).glob("events.out.tfevents.*"))
    checkpoint = run / f"checkpoint-{STEPS}"
    assert (checkpoint / "model.safetensors").is_file()
    weight = load_file(str(checkpoint / PROJECTOR_FILE))["visual_kd__aligner.weight"]
    assert weight.shape == (96, 64) and not torch.equal(weight, torch.eye(96, 64)), "the projector trained"


def test_demo_config_is_a_valid_kdcompose_config(demo):
    out, _, _, _ = demo
    config = parse_config(yaml.safe_load((out / CONFIG_NAME).read_text()))
    assert config.composition.term("visual_kd").spec.aligner.projector == "linear"
    assert config.swift_args["report_to"] == ["tensorboard"]


def test_demo_config_text_is_stable_yaml(tmp_path):
    text = demo_config_text(tmp_path / "t", tmp_path / "s", tmp_path / "d.jsonl", tmp_path / "o", 40)
    config = parse_config(yaml.safe_load(text))
    assert config.swift_args["max_steps"] == 40 and config.swift_args["logging_steps"] == 5
    assert config.swift_args["eval_strategy"] == "no"  # quoted: a bare `no` would be YAML false
