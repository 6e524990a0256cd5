"""Exact resume under DeepSpeed: `kdcompose train` on the CPU (gloo), ZeRO-3 full fine-tuning in
one process, 6 steps uninterrupted vs resumed from checkpoint-3 (DeepSpeed saves and restores its
own partitioned optimizer state; kdcompose restores the sampler's epoch, the GKD micro-batch
counter, the projector and its own state). Fused lm_jsd, a scheduled ce and visual_kd through a
linear projector; 4 samples in batches of 2, so the checkpoint sits inside epoch 2 and the resumed
steps cross into epoch 3. Compared for steps 4-6: loss, every per-term metric, the scheduled
weight and the learning rate within 1e-5.

Several processes resume exactly in tests/swift/test_preemption.py: DDP on 2 ranks from a
checkpoint inside epoch 2 (written on SIGTERM), and ZeRO-2 + LoRA on 2 ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
from swift_support import sections, step_logs, train_as_user, write_config

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


def _train(tmp: Path, name: str, **extra) -> dict[int, dict]:
    """The ZeRO-3 run, one process; its per-step rows by step."""
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
    data["training"]["deepspeed"] = "zero3"
    config = write_config(tmp / f"{name}.yaml", data)
    result = train_as_user(config, tmp)
    assert result.returncode == 0, result.stderr[-4000:]
    return {int(str(r["global_step/max_steps"]).split("/")[0]): r for r in step_logs(out)}


def test_a_zero3_run_resumes_exactly(tmp_path):
    whole = _train(tmp_path, "whole")
    (checkpoint,) = sorted((tmp_path / "whole").glob(f"**/checkpoint-{SAVE_EVERY}"))
    resumed = _train(tmp_path, "resumed", resume_from_checkpoint=str(checkpoint))
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in COMPARED:
            assert resumed[step][key] == pytest.approx(whole[step][key], rel=1e-5, abs=1e-8), (step, key)
