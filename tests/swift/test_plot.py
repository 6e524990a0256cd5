"""`kdcompose plot` on the logging.jsonl of a real (tiny, CPU) `kdcompose train` run.

The run is made once per module: a tiny Qwen2-VL teacher/student, lm_jsd + scheduled ce
(with log_raw) + visual_kd on the vision tower, 4 steps with evaluation at steps 2 and 4.
What only a real log can show lives here: the logged terms add up to the logged loss, the logged
weight follows the schedule, evaluation points are found. The rules on hand-written rows and the
command's errors are in tests/core/test_plot_rules.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from forked_cli import run_cli

from kdcompose.plot import LOG_FILE, classify, load_plot_data, read_rows
from kdcompose.schedules import ScheduleSpec, multiplier

CE_SCHEDULE = {"kind": "linear", "start": 1.0, "end": 0.2, "total_steps": 3}
CE_WEIGHT = 0.5
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cli(*args: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """The command as a user runs it (a process of its own: `tests/support/forked_cli.py`)."""
    return run_cli(list(args), os.environ if env is None else env, timeout=timeout)


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory) -> Path:
    """ms-swift output_dir of one real `kdcompose train` run (holds v0-<time>/logging.jsonl)."""
    from kdcompose.testing import tiny_gkd_args, tiny_run_env

    root = tmp_path_factory.mktemp("plot_run")
    out = root / "out"
    args = tiny_gkd_args(
        "qwen2_vl", out, max_steps=4, eval_strategy="steps", eval_steps=2, split_dataset_ratio=0.1
    )
    config = {
        "training": args,
        "rlhf": {
            "loss_terms": {
                "lm_jsd": {"weight": 1.0},
                "ce": {"weight": CE_WEIGHT, "log_raw": True, "schedule": CE_SCHEDULE},
                # vit: same width for the tiny teacher and student (the aligner's widths differ)
                "visual_kd": {"weight": 0.3, "vit": {"weight": 1.0, "distance": "mse"}},
            }
        },
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, **tiny_run_env()}
    result = _cli("train", str(path), env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def run_dir(output_dir: Path) -> Path:
    (run,) = [d for d in output_dir.iterdir() if (d / LOG_FILE).is_file()]
    return run


def _check_png(path: Path) -> None:
    import matplotlib.image as mpimg
    import numpy as np

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    height, width = image.shape[:2]
    assert height >= 400 and width >= 800, image.shape
    rgb = image[..., :3]
    assert float(np.std(rgb)) > 0.05, "the image is (nearly) blank"
    # coloured areas, not only black lines on white: the stacked terms are drawn
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    assert float((saturation > 0.25).mean()) > 0.05


@pytest.mark.swift
def test_plot_of_a_real_run_writes_a_png_and_names_the_run(output_dir, run_dir, tmp_path):
    out = tmp_path / "composition.png"
    result = _cli("plot", str(output_dir), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert str(run_dir / LOG_FILE) in result.stdout
    assert f"wrote {out}" in result.stdout
    _check_png(out)


@pytest.mark.swift
def test_the_real_log_is_classified_into_terms_parts_weights_and_eval_points(run_dir):
    rows, bad = read_rows(run_dir / LOG_FILE)
    assert bad == 0
    data = classify(rows)
    assert set(data.terms) == {"llm_kd_loss", "sft_loss", "vision_kd_loss"}
    assert set(data.parts) == {"vision_kd_loss_vit"}
    assert set(data.weights) == {"sft_loss_weight"}
    assert {"eval_loss", "eval_llm_kd_loss", "eval_sft_loss", "eval_vision_kd_loss"} <= set(data.evals)
    assert not any(k.endswith(("_raw", "_weight")) for k in data.evals)
    assert data.total[0] == [1, 2, 3, 4]
    assert data.evals["eval_loss"][0] == [2, 4]


@pytest.mark.swift
def test_stacked_weighted_terms_add_up_to_the_logged_loss(run_dir):
    """One micro-batch per logged step: the logged terms must sum to the logged total."""
    _, data = load_plot_data(run_dir)
    steps, stacked = data.stacked()
    assert steps == data.total[0]
    for i, total in enumerate(data.total[1]):
        assert sum(series[i] for series in stacked.values()) == pytest.approx(total, rel=1e-5)


@pytest.mark.swift
def test_logged_weight_follows_the_schedule_of_the_global_step(run_dir):
    """A row logged at step N covers the optimizer step that ran with global_step N-1."""
    _, data = load_plot_data(run_dir)
    spec = ScheduleSpec.model_validate(CE_SCHEDULE)
    xs, ys = data.weights["sft_loss_weight"]
    expected = [CE_WEIGHT * multiplier(spec, n - 1) for n in xs]
    assert ys == pytest.approx(expected, rel=1e-6)
    assert ys[0] > ys[-1]  # the ramp is visible in the log
    raw = {
        int(r["global_step/max_steps"].split("/")[0]): r
        for r in read_rows(run_dir / LOG_FILE)[0]
        if "sft_loss_raw" in r and "loss" in r
    }
    for n, weight in zip(xs, ys, strict=True):
        assert raw[n]["sft_loss"] == pytest.approx(weight * raw[n]["sft_loss_raw"], rel=1e-5)
