"""A hundred and fifty real steps: memory stays flat, NaN steps are skipped, a resume continues the run.

One uninterrupted run (module scope, in-process, the prepared trainer of a `kdcompose train`
config): 150 optimizer steps of batch 1 on tiny Qwen2-VL models (LoRA student, so the feature
hooks sit under PEFT's `base_model.model.`) with all three terms —
lm_jsd, ce on a linear schedule, visual_kd on the vision tower (forward hooks) — plus the
test-only `nan_probe` term (tests/nan_probe.py) that goes NaN at three steps with
`on_nonfinite: skip_step`. A checkpoint is saved at step 140. RSS is sampled every 25 steps
after `gc.collect()`. Then a second run resumes from checkpoint-140 and must log the same
values for steps 141-150 (all 150 steps stay in the first epoch: TRL's RepeatSampler draws a
new permutation per epoch from a generator that is not checkpointed, so only a resume inside
an epoch replays the same samples).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from loop_support import log_rows, probe_micro_batches, step_of, train_rows
from nan_probe import TYPE as NAN_PROBE
from nan_probe import registered
from swift_support import sections
from transformers import TrainerCallback

from kdcompose import parse_config
from kdcompose.testing import build_caption_dataset
from kdcompose.training.records import COMPOSITION_FILE, STATE_FILE, read_loss_terms

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]

STEPS, SAVE_AT = 150, 140
NAN_AT = (40, 80, 120)
"""global_step values (0-based) at which the probe term goes NaN."""
RSS_FROM, RSS_BOUND_MB = 50, 64.0
CE_SCHEDULE = {"kind": "linear", "start": 1.0, "end": 0.1, "total_steps": STEPS}
COMPARED = ("loss", "llm_kd_loss", "sft_loss", "sft_loss_weight", "vision_kd_loss", "nonfinite_skipped_steps")


def _config(out: Path, dataset: Path, **overrides) -> dict:
    return sections(
        out,
        dataset=[str(dataset)],
        per_device_train_batch_size=1,
        tuner_type="lora",  # the common production set-up, and a cheap optimizer step on 2 CPU cores
        lora_rank=4,
        target_modules=["all-linear"],
        max_steps=STEPS,
        max_completion_length=8,
        save_strategy="steps",
        save_steps=SAVE_AT,
        save_only_model=False,
        rlhf={
            "loss_terms": {
                "lm_jsd": {},
                "ce": {"weight": 0.3, "schedule": CE_SCHEDULE},
                "nan": {"type": NAN_PROBE, "at_steps": list(NAN_AT), "on_nonfinite": "skip_step"},
            }
        },
        custom={"visual_kd": {"weight": 0.5, "vit": {"enabled": True, "weight": 1.0, "distance": "mse"}}},
        **overrides,
    )


class _Watch(TrainerCallback):
    """RSS every 25 steps; that no feature record outlives its step; when hooks exist."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.rss_mb: dict[int, float] = {}
        self.leftover_records = 0

    def on_step_end(self, args, state, control, **kwargs):
        for recorder in self.trainer.kd_attachments.module_taps():
            self.leftover_records += sum(len(v) for v in recorder.recorded().values())
        if state.global_step % 25 == 0:
            gc.collect()
            self.rss_mb[state.global_step] = psutil.Process().memory_info().rss / 2**20


def _hook_count(*models) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for model in models for m in model.modules())


def _recorder_hooks(trainer) -> int:
    """Hooks on the modules kdcompose's feature recorders hook (0 when none is installed)."""
    count = 0
    for recorder in trainer.kd_attachments.module_taps():
        for hooked in recorder.hooked:
            for model in (trainer.model, trainer.teacher_model):
                try:
                    count += len(model.get_submodule(hooked.name)._forward_hooks)
                except AttributeError:
                    continue
    return count


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    from kdcompose.integrations.swift.launch.pipeline import build_trainer

    tmp = tmp_path_factory.mktemp("long_run")
    dataset = build_caption_dataset(n=STEPS + 20, seed=0, image=True)
    with registered(), probe_micro_batches() as records:
        trainer = build_trainer(parse_config(_config(tmp / "out", dataset)))
        watch = _Watch(trainer)
        trainer.add_callback(watch)
        hooks_before = _hook_count(trainer.model, trainer.teacher_model)
        trainer.train()
        hooks_after = _hook_count(trainer.model, trainer.teacher_model), _recorder_hooks(trainer)
        run_dir = Path(trainer.args.output_dir)
        checkpoint = run_dir / f"checkpoint-{SAVE_AT}"

        resumed = build_trainer(parse_config(_config(tmp / "resumed", dataset)))
        resumed.train(resume_from_checkpoint=str(checkpoint))
        resumed_dir = Path(resumed.args.output_dir)
    print(f"\nRSS MiB by step: {watch.rss_mb}")
    return {
        "rows": train_rows(log_rows(run_dir)),
        "resumed_rows": train_rows(log_rows(resumed_dir)),
        "records": records,
        "watch": watch,
        "hooks": (hooks_before, hooks_after),
        "run_dir": run_dir,
        "resumed_dir": resumed_dir,
        "checkpoint": checkpoint,
    }


def test_memory_stays_flat_over_a_hundred_steps(long_run):
    rss = long_run["watch"].rss_mb
    assert sorted(rss) == list(range(25, STEPS + 1, 25))
    growth = rss[STEPS] - rss[RSS_FROM]
    assert growth < RSS_BOUND_MB, f"RSS grew {growth:.1f} MiB from step {RSS_FROM} to {STEPS}: {rss}"


def test_no_feature_tensor_outlives_its_step_and_hooks_are_removed(long_run):
    assert long_run["watch"].leftover_records == 0
    before, (after, on_feature_modules) = long_run["hooks"]
    assert on_feature_modules == 0  # the vision-tower hooks are gone once training returns
    assert after <= before  # and nothing else was left behind


def test_nonfinite_steps_are_skipped_and_counted(long_run):
    rows = {step_of(r): r for r in long_run["rows"]}
    assert len(rows) == STEPS
    for step, row in rows.items():
        computed_at = step - 1
        assert row["nonfinite_skipped_steps"] == sum(s < step for s in NAN_AT)
        if computed_at in NAN_AT:  # the skipped step counts 0 in the loss and in every term
            assert row["loss"] == 0.0 and row["llm_kd_loss"] == 0.0
        else:
            assert row["loss"] > 0 and torch.isfinite(torch.tensor(row["loss"]))
        terms = sum(v for k, v in row.items() if k.endswith("_loss") and k != "loss")
        assert terms == pytest.approx(row["loss"], rel=2e-5, abs=1e-7)
    bad = [r for r in long_run["records"] if r["mode"] == "train" and r["global_step"] in NAN_AT]
    assert len(bad) == len(NAN_AT)  # all before the checkpoint: the resumed run never reaches them
    assert all(r["loss"] == 0.0 for r in bad)


def test_the_composition_is_recorded_next_to_the_checkpoints(long_run):
    run_dir, checkpoint = long_run["run_dir"], long_run["checkpoint"]
    record = yaml.safe_load((run_dir / COMPOSITION_FILE).read_text())
    assert record["formula"].startswith("Loss = 1*lm_jsd(beta=0.5, T=0.9) + 0.3*ce[linear 1->0.1 over 150]")
    assert read_loss_terms(run_dir)["nan"]["on_nonfinite"] == "skip_step"
    assert (run_dir / "args.json").is_file() and checkpoint.is_dir()
    assert json.loads((checkpoint / STATE_FILE).read_text())["nonfinite_skipped_steps"] == 3
    assert read_loss_terms(long_run["resumed_dir"]) == read_loss_terms(run_dir)


def test_a_resumed_run_continues_with_the_same_schedule_and_metrics(long_run):
    original = {step_of(r): r for r in long_run["rows"]}
    resumed = long_run["resumed_rows"]
    assert [step_of(r) for r in resumed] == list(range(SAVE_AT + 1, STEPS + 1))
    for row in resumed:
        before = original[step_of(row)]
        for key in COMPARED:
            assert row[key] == pytest.approx(before[key], rel=1e-4), (step_of(row), key)
