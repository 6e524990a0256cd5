"""Exact resume under DeepSpeed and with several processes: `kdcompose train` on the CPU (gloo),
6 steps uninterrupted vs resumed from checkpoint-3 (DeepSpeed saves and restores its own
partitioned optimizer state; kdcompose restores the sampler's epoch, the GKD micro-batch counter,
the projector and its own state). Runs: ZeRO-3 full fine-tuning in one process and DDP full fine-tuning
on 2 ranks (ZeRO-2 LoRA on 2 ranks resumes exactly in tests/swift/test_preemption.py, from a
checkpoint written on SIGTERM). Fused lm_jsd, a scheduled ce and visual_kd through a linear projector;
4 samples per rank in batches of 2, so the checkpoint sits inside epoch 2 and the resumed steps
cross into epoch 3. Compared for steps 4-6: loss, every per-term metric, the scheduled weight
and the learning rate within 1e-5. Before the sampler started in the resumed epoch, the 2-rank
runs replayed epoch 1's batches at step 4 (3.57485 against 3.57295)."""

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


"""LoRA, with each generation batch split over 2 steps (the checkpoint falls inside one)."""


def _train(tmp: Path, name: str, stage: str | None, nproc: int | None, **extra) -> dict[int, dict]:
    out = tmp / name
    data = sections(
        out,
        dataset_size=4 * (nproc or 1),
        max_steps=STEPS,
        save_strategy="steps",
        save_steps=SAVE_EVERY,
        save_only_model=False,
        freeze_vit=False,
        freeze_aligner=False,
        rlhf={"loss_terms": TERMS},
        **extra,
    )
    if stage is None:
        data["training"].update(use_cpu=True, ddp_backend="gloo")
    else:
        data["training"]["deepspeed"] = stage
    config = write_config(tmp / f"{name}.yaml", data)
    result = train_as_user(config, tmp, nproc)
    assert result.returncode == 0, result.stderr[-4000:]
    return {int(str(r["global_step/max_steps"]).split("/")[0]): r for r in step_logs(out)}


@pytest.mark.parametrize(
    ("stage", "nproc", "tuner"),
    [
        ("zero3", None, {}),  # full fine-tuning, one process: zero3 partitions the most
        (None, 2, {}),  # DDP on two ranks (gloo): the resumed epoch's order reaches every rank
    ],
    ids=["zero3-full-1proc", "ddp-full-2proc"],
)
def test_a_sharded_or_multi_process_run_resumes_exactly(tmp_path, stage, nproc, tuner):
    whole = _train(tmp_path, "whole", stage, nproc, **tuner)
    (checkpoint,) = sorted((tmp_path / "whole").glob(f"**/checkpoint-{SAVE_EVERY}"))
    resumed = _train(tmp_path, "resumed", stage, nproc, resume_from_checkpoint=str(checkpoint), **tuner)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in COMPARED:
            assert resumed[step][key] == pytest.approx(whole[step][key], rel=1e-5, abs=1e-8), (
                stage,
                step,
                key,
            )
