"""Exact resume (`kdcompose.integrations.swift.resume`): a resumed run logs what the
uninterrupted run logged.

Real ms-swift runs on the tiny Qwen2-VL pair, in-process through `build_trainer` (the trainer a
`kdcompose train` config gets): 6 optimizer steps, a checkpoint every 3, then a second trainer
resumes from `checkpoint-3`. The dataset has 4 samples in batches of 2, so the checkpoint sits in
epoch 2 and the resumed steps cross into epoch 3 (the sampler's per-epoch order is part of what
must be restored); the LoRA run also splits each generation batch over 2 steps, so its checkpoint
falls inside one. Compared for steps 4-6: `loss`, every per-term metric, the scheduled `ce`
weight (`sft_loss_weight`), `learning_rate` and `grad_norm`, within 1e-5 (relative).

Without exact_resume, the full fine-tuning run resumes from the *initial* weights (transformers
loads a hub-layout checkpoint into renamed keys with strict=False) and the LoRA run replays
epoch 1's sample order in epoch 2 and restarts the split generation batch at its first half; both
comparisons fail (each of the three fixes disabled alone fails its test).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from swift_support import sections, step_logs

from kdcompose import build_composer, parse_config
from kdcompose.compat import transformers_checkpoint_keys as checkpoint_keys
from kdcompose.errors import ConfigError
from kdcompose.integrations.swift import resume as exact_resume
from kdcompose.training import checkpoints, records
from kdcompose.training.records import COMPOSITION_FILE

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

STEPS, SAVE_EVERY = 6, 3
STEP_KEY = "global_step/max_steps"
NOT_COMPARED = ("epoch", "memory", "speed", "time")
"""Substrings of logged keys that measure the machine or the clock, not the training."""
CE = {"weight": 0.3, "schedule": {"kind": "linear", "start": 1.0, "end": 0.1, "total_steps": STEPS}}
VISUAL = {"weight": 1.0, "aligner": {"distance": "mse", "projector": "linear"}}


def _config(out: Path, tuner: str, *, ce: dict[str, Any] = CE) -> Any:
    extra: dict[str, Any] = {}
    if tuner == "lora":
        # steps_per_generation 2: each dataloader batch is split into 2 micro-batches, and the checkpoint
        # at step 3 falls in the middle of one (the GKD counter `_step` picks the second half)
        extra = {"lora_rank": 4, "target_modules": ["all-linear"], "steps_per_generation": 2}
    return parse_config(
        sections(
            out,
            dataset_size=4,
            tuner_type=tuner,
            max_steps=STEPS,
            save_strategy="steps",
            save_steps=SAVE_EVERY,
            save_only_model=False,
            freeze_aligner=False,
            rlhf={"loss_terms": {"lm_jsd": {}, "ce": ce}},
            custom={"visual_kd": VISUAL} if tuner == "full" else None,
            **extra,
        )
    )


def _rows(output_dir: str | Path) -> dict[int, dict[str, Any]]:
    return {int(str(r[STEP_KEY]).split("/")[0]): r for r in step_logs(Path(output_dir))}


def _run_pair(tmp: Path, tuner: str) -> dict[str, Any]:
    from kdcompose.integrations.swift.launch.pipeline import build_trainer

    first = build_trainer(_config(tmp / "whole", tuner))
    first.train()
    checkpoint = Path(first.args.output_dir) / f"checkpoint-{SAVE_EVERY}"
    resumed = build_trainer(_config(tmp / "resumed", tuner))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    return {
        "whole": _rows(first.args.output_dir),
        "resumed": _rows(resumed.args.output_dir),
        "checkpoint": checkpoint,
        "trainer": resumed,
    }


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> dict[str, Any]:
    return _run_pair(tmp_path_factory.mktemp("full"), "full")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> dict[str, Any]:
    return _run_pair(tmp_path_factory.mktemp("lora"), "lora")


def _compared(row: dict[str, Any]) -> set[str]:
    return {
        k
        for k, v in row.items()
        if isinstance(v, (int, float)) and not any(part in k for part in NOT_COMPARED)
    }


def _assert_same_steps(run: dict[str, Any], expect_keys: tuple[str, ...]) -> None:
    whole, resumed = run["whole"], run["resumed"]
    assert sorted(resumed) == list(range(SAVE_EVERY + 1, STEPS + 1))
    for step, row in resumed.items():
        before = whole[step]
        for key in expect_keys:
            assert key in row, (step, key, sorted(row))
        keys = _compared(before)
        assert keys == _compared(row)
        for key in sorted(keys):
            assert row[key] == pytest.approx(before[key], rel=1e-5, abs=1e-8), (
                step,
                key,
                row[key],
                before[key],
            )


@pytest.mark.swift
def test_full_fine_tuning_resumes_exactly(full_run):
    _assert_same_steps(
        full_run,
        (
            "loss",
            "llm_kd_loss",
            "sft_loss",
            "sft_loss_weight",
            "vision_kd_loss",
            "learning_rate",
            "grad_norm",
        ),
    )
    assert full_run["trainer"].kd_resume_plan.weights_loaded > 0, "the student came from the checkpoint"
    assert full_run["trainer"].kd_resume_plan.not_exact == []


@pytest.mark.swift
def test_lora_resumes_exactly(lora_run):
    _assert_same_steps(lora_run, ("loss", "llm_kd_loss", "sft_loss", "sft_loss_weight", "learning_rate"))
    plan = lora_run["trainer"].kd_resume_plan
    assert plan.weights_loaded == 0 and plan.not_exact == []  # adapters: the stock loader restores them


@pytest.mark.swift
def test_the_checkpoint_is_in_a_later_epoch_than_the_first(lora_run):
    """What makes the sampler's per-epoch order part of the test (4 samples, batches of 2)."""
    assert lora_run["whole"][SAVE_EVERY + 1]["epoch"] > 1.0


@pytest.mark.swift
def test_a_changed_composition_is_refused_at_start_naming_the_change(lora_run, tmp_path):
    from kdcompose.integrations.swift.launch.pipeline import build_trainer

    changed = {**CE, "weight": 0.5}
    trainer = build_trainer(_config(tmp_path / "changed", "lora", ce=changed))
    with pytest.raises(ConfigError) as info:
        trainer.train(resume_from_checkpoint=str(lora_run["checkpoint"]))
    message = str(info.value)
    assert "rlhf.loss_terms" in message and "ce.weight: 0.3 -> 0.5" in message
    assert records.ALLOW_CHANGES_ENV in message
    assert trainer.state.global_step == 0
    assert not list(Path(trainer.args.output_dir).glob("checkpoint-*"))


@pytest.mark.swift
def test_the_override_allows_a_changed_composition(lora_run, monkeypatch):
    composer = build_composer(
        parse_config({"rlhf": {"loss_terms": {"lm_jsd": {}, "ce": {**CE, "weight": 0.5}}}}).composition
    )
    with pytest.raises(ConfigError):
        records.check_resume_composition(lora_run["checkpoint"], composer)
    monkeypatch.setenv(records.ALLOW_CHANGES_ENV, "1")
    assert records.check_resume_composition(lora_run["checkpoint"], composer) == ["ce.weight: 0.3 -> 0.5"]
    assert (lora_run["checkpoint"].parent / COMPOSITION_FILE).is_file()


@pytest.mark.swift
def test_a_model_only_checkpoint_is_announced_as_not_exact(lora_run, tmp_path):
    """`save_only_model: true` leaves out optimizer, scheduler and RNG states: said at start."""
    checkpoint = tmp_path / "run" / f"checkpoint-{SAVE_EVERY}"
    shutil.copytree(lora_run["checkpoint"], checkpoint)
    shutil.copy(lora_run["checkpoint"].parent / COMPOSITION_FILE, checkpoint.parent / COMPOSITION_FILE)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (checkpoint / name).unlink()
    checkpoints.write_completion_marker(checkpoint, SAVE_EVERY)  # as a save_only_model save marks it
    trainer = lora_run["trainer"]
    step = trainer._step
    try:
        plan = exact_resume.begin_train(trainer, (), {"resume_from_checkpoint": str(checkpoint)})
    finally:
        trainer._step = step
    reasons = " | ".join(plan.not_exact)
    assert "optimizer.pt" in reasons and "scheduler.pt" in reasons and "save_only_model" in reasons
    assert "rng_state.pth" in reasons


@pytest.mark.swift
def test_full_weights_in_the_hub_layout_map_back_to_the_model(full_run):
    """The root cause of the full fine-tuning resume: saved keys are not the model's keys."""
    model = full_run["trainer"].accelerator.unwrap_model(full_run["trainer"].model)
    mapping, unmapped = checkpoint_keys.saved_key_map(model)
    assert unmapped == []
    renamed = {saved: own for saved, own in mapping.items() if saved != own}
    assert renamed, "transformers 5 saves Qwen2-VL under its original (hub) key names"
    assert renamed.get("model.norm.weight") == "model.language_model.norm.weight"
    files = checkpoint_keys.full_weight_files(full_run["checkpoint"])
    assert files and files[0].name == "model.safetensors"
