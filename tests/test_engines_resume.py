"""Exact resume under DeepSpeed: `kdcompose train` with ZeRO-3 (one process, CPU, gloo),
6 steps uninterrupted vs resumed from checkpoint-3 (DeepSpeed saves and restores its own
partitioned optimizer state; kdcompose restores the sampler's epoch, the GKD micro-batch counter,
the projector and its own state). Full fine-tuning with fused lm_jsd, a scheduled ce and visual_kd
through a linear projector; 4 samples in batches of 2, so the resumed steps cross an epoch.
Compared for steps 4-6: loss and every per-term metric within 1e-5."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdcompose.integrations.swift import engines
from swift_support import kdcompose_command, run_command, sections, step_logs, write_config

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]
pytest.importorskip("deepspeed")

STEPS, SAVE_EVERY = 6, 3
TERMS = {
    "lm_jsd": {"fused": True},
    "ce": {"weight": 0.3, "schedule": {"kind": "linear", "start": 1.0, "end": 0.1, "total_steps": STEPS}},
    "visual_kd": {"weight": 0.5, "aligner": {"distance": "mse", "projector": "linear"}},
}
COMPARED = ("loss", "llm_kd_loss", "sft_loss", "sft_loss_weight", "vision_kd_loss", "learning_rate")


def _train(tmp: Path, name: str, stage: str, **extra) -> dict[int, dict]:
    out = tmp / name
    data = sections(
        out,
        dataset_size=4,
        max_steps=STEPS,
        save_strategy="steps",
        save_steps=SAVE_EVERY,
        save_only_model=False,
        freeze_vit=False,
        freeze_aligner=False,
        rlhf={"loss_terms": TERMS},
        **extra,
    )
    data["training"]["deepspeed"] = stage
    config = write_config(tmp / f"{name}.yaml", data)
    env_keys = (*engines.SINGLE_PROCESS_ENV, "NPROC_PER_NODE")
    saved = {key: os.environ.pop(key, None) for key in env_keys}
    try:
        result = run_command(kdcompose_command("train", str(config)), tmp, timeout=900)
    finally:
        os.environ.update({key: value for key, value in saved.items() if value is not None})
    assert result.returncode == 0, result.stderr[-4000:]
    return {int(str(r["global_step/max_steps"]).split("/")[0]): r for r in step_logs(out)}


@pytest.mark.parametrize("stage", ["zero3"])  # zero2 passed too (measured once); zero3 partitions the most
def test_a_deepspeed_run_resumes_exactly(tmp_path, stage):
    whole = _train(tmp_path, "whole", stage)
    (checkpoint,) = sorted((tmp_path / "whole").glob(f"**/checkpoint-{SAVE_EVERY}"))
    resumed = _train(tmp_path, "resumed", stage, resume_from_checkpoint=str(checkpoint))
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in COMPARED:
            assert resumed[step][key] == pytest.approx(whole[step][key], rel=1e-5, abs=1e-8), (
                stage,
                step,
                key,
            )
