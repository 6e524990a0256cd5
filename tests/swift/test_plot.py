"""`kdcompose plot` on the logging.jsonl of a real (tiny, CPU) `kdcompose train` run.

The run is made once per module: a tiny Qwen2-VL teacher/student, lm_jsd + scheduled ce
(with log_raw) + visual_kd on the vision tower, 4 steps with evaluation at steps 2 and 4.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdcompose.cli import main
from kdcompose.plot import LOG_FILE, PlotError, classify, find_run_log, load_plot_data, read_rows
from kdcompose.schedules import ScheduleSpec, multiplier

CE_SCHEDULE = {"kind": "linear", "start": 1.0, "end": 0.2, "total_steps": 3}
CE_WEIGHT = 0.5
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cli(*args: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """The command as a user runs it (a real process)."""
    command = [sys.executable, "-m", "kdcompose.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """The same entry point in-process (cheaper than a process for the error cases)."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


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
def test_default_output_goes_into_the_run_folder(run_dir, tmp_path, capsys):
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    code, out, err = _main(capsys, "plot", str(copy))
    assert code == 0, err
    assert "wrote" in out
    _check_png(copy / "loss_composition.png")


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


@pytest.mark.swift
def test_newest_run_under_an_output_dir_is_chosen_by_version(run_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run_dir, out / "v10-20250101-000000")
    for stale in ("v9-20250101-000000", "v2-20990101-000000"):
        (out / stale).mkdir(parents=True)
        (out / stale / LOG_FILE).write_text('{"global_step": 0, "log_history": []}\n')  # nothing to plot
    run = find_run_log(out)
    assert run.path == out / "v10-20250101-000000" / LOG_FILE
    assert "newest of 3 runs" in run.note
    result = _cli("plot", str(out), "-o", str(tmp_path / "p.png"))
    assert result.returncode == 0, result.stderr
    assert "v10-20250101-000000" in result.stdout and "newest of 3 runs" in result.stdout


@pytest.mark.swift
def test_a_truncated_last_line_does_not_hide_the_rest(run_dir, tmp_path):
    log = tmp_path / LOG_FILE
    log.write_text((run_dir / LOG_FILE).read_text() + '{"loss": 1.2, "global_step/max_')
    rows, bad = read_rows(log)
    assert bad == 1
    assert classify(rows).total[0] == [1, 2, 3, 4]


@pytest.mark.swift
def test_folder_without_logging_jsonl_exits_2_naming_it(tmp_path):
    empty = tmp_path / "not_a_run"
    (empty / "checkpoint-1").mkdir(parents=True)
    result = _cli("plot", str(empty))
    assert result.returncode == 2
    assert str(empty) in result.stderr and LOG_FILE in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(empty.rglob("*.png"))


@pytest.mark.swift
def test_missing_folder_exits_2(tmp_path, capsys):
    code, _, err = _main(capsys, "plot", str(tmp_path / "nope"))
    assert code == 2
    assert "no such folder" in err


@pytest.mark.swift
def test_log_without_plottable_rows_exits_2_naming_the_file(tmp_path, capsys):
    run = tmp_path / "v0-20250101-000000"
    run.mkdir()
    (run / LOG_FILE).write_text(
        '{"model_parameter_info": "x", "global_step": 0, "log_history": [], "memory": null}\n'
        '{"grad_norm": 1.0, "learning_rate": 1e-4, "global_step/max_steps": "1/4"}\n'
    )
    code, _, err = _main(capsys, "plot", str(tmp_path))
    assert code == 2
    assert str(run / LOG_FILE) in err and "no plottable rows" in err
    with pytest.raises(PlotError, match="no plottable rows"):
        load_plot_data(run)


def test_classification_rules_on_hand_written_rows():
    rows = [
        {
            "loss": 3.0,
            "llm_kd_loss": 1.0,
            "aux_ce_loss": 0.5,
            "vision_kd_loss": 1.5,
            "vision_kd_loss_vit": 0.5,
            "vision_kd_loss_aligner": 1.0,
            "vision_kd_loss_weight": 0.3,
            "vision_kd_loss_raw": 5.0,
            "grad_norm": 2.0,
            "learning_rate": 1e-4,
            "global_step/max_steps": "1/3",
        },
        {"loss": 2.0, "llm_kd_loss": 2.0, "global_step/max_steps": "2/3"},  # other terms skipped here
        {"loss": 2.5, "llm_kd_loss": 2.5, "global_step/max_steps": "2/3"},  # a resumed run logs step 2 again
        {
            "eval_loss": 1.8,
            "eval_llm_kd_loss": 1.8,
            "eval_runtime": 3.0,
            "eval_vision_kd_loss_weight": 0.3,
            "global_step/max_steps": "2/3",
        },
        {"train_loss": 2.4, "train_runtime": 9.0, "global_step/max_steps": "3/3"},
        {"global_step": 3, "log_history": [{"loss": 9.0, "step": 1}]},
    ]
    data = classify(rows)
    assert set(data.terms) == {"llm_kd_loss", "aux_ce_loss", "vision_kd_loss"}
    assert set(data.parts) == {"vision_kd_loss_vit", "vision_kd_loss_aligner"}
    assert set(data.weights) == {"vision_kd_loss_weight"}
    assert set(data.evals) == {"eval_loss", "eval_llm_kd_loss"}
    assert data.total == ([1, 2], [3.0, 2.5])
    steps, stacked = data.stacked()
    assert steps == [1, 2]
    assert stacked["aux_ce_loss"] == [0.5, 0.0] and stacked["llm_kd_loss"] == [1.0, 2.5]
