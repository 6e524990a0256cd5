"""Visual feature KD in real ms-swift 4.6 training runs on tiny local Qwen-VL models.

Each expensive run happens once, in a module-scoped fixture that records what the tests
then check (logs, gradients, hook calls, checkpoints), so a test reads evidence instead of
training again. Nothing is mocked: counting is done by a real custom loss term (`probe`,
registered for this module) that sees exactly the `LossContext` the trainer builds, and by
real forward hooks (`ForwardCounter`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from swift_support import SECTION_OF, SESSION_DIR, ForwardCounter
from transformers import TrainerCallback

from kdcompose import LossContext, Tap, TermNeeds, TermSpec, build_composer, parse_config, register_term
from kdcompose.errors import ConfigError
from kdcompose.registry import unregister_term
from kdcompose.terms import LossTerm
from kdcompose.testing import build_caption_dataset, load_rows, tiny_gkd_args
from kdcompose.training.projectors import PROJECTOR_ATTR, PROJECTOR_FILE
from kdcompose.training.records import ALLOW_CHANGES_ENV

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]

PROBE = "feature_count_probe"
EXPLODE = "exploding_probe"
PROBED_BLOCK = "model.visual.blocks.0"
"""A vision block: reentrant gradient checkpointing runs it again during backward."""
VISUAL = {"weight": 1.0, "vit": {"distance": "mse"}, "aligner": {"distance": "mse", "projector": "linear"}}
VISION_PARAM = "model.visual.blocks.0.attn.qkv.weight"
ALIGNER_KEY = "visual_kd__aligner"


PROBE_PATHS = {"vit": "model.visual", "aligner": "model.visual.merger", "block0": PROBED_BLOCK}


def _probe_tap(side: str, name: str) -> Tap:
    return Tap(side, PROBE_PATHS[name], vision_only=True)


class FeatureCountProbe(LossTerm):
    """Adds 0 to the loss and writes down what the trainer handed over for this loss forward:
    it declares module taps like any user term (no framework knowledge needed)."""

    spec_class = TermSpec
    calls: ClassVar[list[dict[str, Any]]] = []

    @property
    def needs(self) -> TermNeeds:
        return TermNeeds(
            taps=frozenset(_probe_tap(side, n) for side in ("student", "teacher") for n in PROBE_PATHS)
        )

    def compute(self, ctx: LossContext) -> torch.Tensor:
        self.calls.append(
            {
                side: {n: len(ctx.tapped(_probe_tap(side, n))) for n in PROBE_PATHS}
                for side in ("student", "teacher")
            }
            | {"generated": ctx.student_generated}
        )
        return ctx.zero()


class ExplodingProbe(FeatureCountProbe):
    def compute(self, ctx: LossContext) -> torch.Tensor:
        raise RuntimeError("boom inside the loss")


@pytest.fixture(scope="module", autouse=True)
def probe_terms():
    register_term(PROBE)(FeatureCountProbe)
    register_term(EXPLODE)(ExplodingProbe)
    yield
    unregister_term(PROBE)
    unregister_term(EXPLODE)


def _config(
    family: str, name: str, *, rlhf: Mapping[str, Any], custom: Mapping[str, Any] | None = None, **kw: Any
) -> Any:
    data: dict[str, dict[str, Any]] = {}
    for key, value in tiny_gkd_args(family, str(SESSION_DIR / name), **kw).items():
        data.setdefault(SECTION_OF.get(key, "training"), {})[key] = value
    data["rlhf"].update(rlhf)
    if custom:
        data["custom"] = dict(custom)
    return parse_config(data)


def _build(config, **overrides):
    from kdcompose.integrations.swift.launch.pipeline import build_trainer

    return build_trainer(config, **overrides)


class _Snapshots(TrainerCallback):
    """Weights when training starts (after a resume has loaded them) and gradients before each
    optimizer step."""

    def __init__(self) -> None:
        self.at_start: dict[str, torch.Tensor] = {}
        self.grads: list[dict[str, float]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.at_start = {k: v.detach().clone() for k, v in _watched(model).items()}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(
            {
                k: (p.grad.norm().item() if p.grad is not None else 0.0)
                for k, p in _watched_params(model).items()
            }
        )


def _watched_params(model) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    return {k: params[k] for k in (VISION_PARAM, f"{PROJECTOR_ATTR}.{ALIGNER_KEY}.weight") if k in params}


def _watched(model) -> dict[str, torch.Tensor]:
    return dict(_watched_params(model))


def _kd_hooks(model) -> int:
    visual = model.get_submodule("model.visual")
    return sum(len(m._forward_hooks) for m in (visual, visual.merger, visual.blocks[0]))


def _rows(trainer) -> list[dict[str, Any]]:
    return [r for r in trainer.state.log_history if "loss" in r and "train_loss" not in r]


@dataclass
class Run:
    trainer: Any
    rows: list[dict[str, Any]]
    probe: list[dict[str, Any]]
    snapshots: _Snapshots
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    counts: dict[str, int] = field(default_factory=dict)
    hooks_after: dict[str, int] = field(default_factory=dict)

    @property
    def checkpoint(self) -> Path:
        found = sorted(Path(self.trainer.args.output_dir).glob("checkpoint-*"))
        assert found, f"no checkpoint under {self.trainer.args.output_dir}"
        return found[-1]


def _train_qwen2_vl(name: str, steps: int, **overrides) -> Run:
    """Visual-only on-policy distillation: LM KD off, CE off, visual_kd + the probe."""
    rlhf = {"llm_kd_weight": 0, "loss_terms": {"visual_kd": VISUAL, "probe": {"type": PROBE}}}
    config = _config(
        "qwen2_vl",
        name,
        rlhf=rlhf,
        freeze_vit=False,
        freeze_aligner=False,
        lmbda=1.0,
        max_steps=steps,
        **overrides,
    )
    trainer = _build(config)
    snapshots = _Snapshots()
    trainer.add_callback(snapshots)
    student, teacher = trainer.model, trainer.teacher_model
    before = {k: v.detach().clone() for k, v in _watched(student).items()}
    FeatureCountProbe.calls.clear()
    with (
        ForwardCounter(student.model.visual) as s_tower,
        ForwardCounter(teacher.model.visual) as t_tower,
        ForwardCounter(student.get_submodule(PROBED_BLOCK)) as s_block,
        ForwardCounter(teacher.lm_head) as t_head,
    ):
        trainer.train()
    return Run(
        trainer=trainer,
        rows=_rows(trainer),
        probe=list(FeatureCountProbe.calls),
        snapshots=snapshots,
        before=before,
        after={k: v.detach().clone() for k, v in _watched(student).items()},
        counts={
            "student_tower": s_tower.calls,
            "teacher_tower": t_tower.calls,
            "student_block0": s_block.calls,
            "teacher_lm_head": t_head.calls,
        },
        hooks_after={"student": _kd_hooks(student), "teacher": _kd_hooks(teacher)},
    )


@pytest.fixture(scope="module")
def visual_run() -> Run:
    return _train_qwen2_vl(
        "visual_only", 2, save_strategy="steps", save_steps=2, save_only_model=False, logging_steps=1
    )


@pytest.fixture(scope="module")
def checkpointed_run(visual_run) -> Run:
    return _train_qwen2_vl("visual_only_gc", 1, gradient_checkpointing=True, logging_steps=1)


# ----------------------------------------------------------------------- visual-only distillation


def test_visual_only_logs_vision_kd_and_no_lm_kd(visual_run):
    assert len(visual_run.rows) == 2
    for row in visual_run.rows:
        assert "llm_kd_loss" not in row and "sft_loss" not in row
        assert row["vision_kd_loss"] > 0
        assert row["vision_kd_loss"] == pytest.approx(
            row["vision_kd_loss_vit"] + row["vision_kd_loss_aligner"], rel=1e-4
        )
        assert row["loss"] == pytest.approx(row["vision_kd_loss"], rel=1e-4)
    assert visual_run.counts["teacher_lm_head"] == 0, "only the teacher's vision tower runs"


def test_hooks_fire_on_both_models_once_per_loss_forward(visual_run):
    probe = visual_run.probe
    assert len(probe) == 2 and all(call["generated"] for call in probe), "lmbda 1: every batch on-policy"
    for call in probe:
        assert call["student"] == {"vit": 1, "aligner": 1, "block0": 1}
        assert call["teacher"] == {"vit": 1, "aligner": 1, "block0": 1}
    assert visual_run.counts["teacher_tower"] == 2


def test_features_seen_during_on_policy_generation_are_not_used(visual_run):
    # Generation ran the student's vision tower too (prefill), yet each loss saw one record.
    assert visual_run.counts["student_tower"] > len(visual_run.probe)


def test_student_vision_parameters_get_gradients_and_move(visual_run):
    grads = visual_run.snapshots.grads
    assert len(grads) == 2
    assert all(g[VISION_PARAM] > 0 for g in grads)
    assert not torch.equal(visual_run.before[VISION_PARAM], visual_run.after[VISION_PARAM])


def test_no_hook_is_left_after_training(visual_run):
    assert visual_run.hooks_after == {"student": 0, "teacher": 0}


def test_gradient_checkpointing_gives_the_same_value_and_one_record_per_forward(visual_run, checkpointed_run):
    assert checkpointed_run.trainer.args.gradient_checkpointing
    # The block is recomputed during backward (its hook fires again), but that is not recorded.
    assert checkpointed_run.counts["student_block0"] > checkpointed_run.counts["student_tower"]
    assert checkpointed_run.probe[0]["student"] == {"vit": 1, "aligner": 1, "block0": 1}
    first, reference = checkpointed_run.rows[0], visual_run.rows[0]
    for key in ("vision_kd_loss", "vision_kd_loss_vit", "vision_kd_loss_aligner"):
        assert first[key] == pytest.approx(reference[key], rel=1e-5), key
    assert checkpointed_run.hooks_after == {"student": 0, "teacher": 0}


# ----------------------------------------------------------------------- the projector


def test_projector_is_trained(visual_run):
    key = f"{PROJECTOR_ATTR}.{ALIGNER_KEY}.weight"
    assert all(g[key] > 0 for g in visual_run.snapshots.grads)
    assert visual_run.before[key].shape == (96, 64)
    assert not torch.equal(visual_run.before[key], visual_run.after[key])


def test_projector_is_saved_with_the_student_but_not_inside_its_weights(visual_run):
    from safetensors import safe_open
    from safetensors.torch import load_file

    checkpoint = visual_run.checkpoint
    saved = load_file(str(checkpoint / PROJECTOR_FILE))
    assert set(saved) == {f"{ALIGNER_KEY}.weight", f"{ALIGNER_KEY}.bias"}
    trained = visual_run.after[f"{PROJECTOR_ATTR}.{ALIGNER_KEY}.weight"]
    torch.testing.assert_close(saved[f"{ALIGNER_KEY}.weight"], trained)
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(PROJECTOR_ATTR in key for key in keys)


def test_resume_restores_the_projector(visual_run, monkeypatch):
    monkeypatch.setenv(ALLOW_CHANGES_ENV, "1")  # the resumed config drops the test-only probe term
    checkpoint = visual_run.checkpoint
    rlhf = {"llm_kd_weight": 0, "loss_terms": {"visual_kd": VISUAL}}
    config = _config(
        "qwen2_vl", "visual_only_resume", rlhf=rlhf, freeze_vit=False, freeze_aligner=False, max_steps=3
    )
    trainer = _build(config)
    snapshots = _Snapshots()
    trainer.add_callback(snapshots)
    key = f"{PROJECTOR_ATTR}.{ALIGNER_KEY}.weight"
    fresh = dict(trainer.model.named_parameters())[key].detach().clone()
    assert torch.equal(fresh, torch.eye(96, 64)), "a new projector starts as the identity"
    trainer.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(snapshots.at_start[key], visual_run.after[key])
    # transformers 5.19 writes the checkpoint in the original key layout, which its own loader does not
    # map back; kdcompose's `exact_resume.load_full_weights` does, so the student is restored too.
    torch.testing.assert_close(snapshots.at_start[VISION_PARAM], visual_run.after[VISION_PARAM])
    assert trainer.state.global_step == 3


def test_resume_only_model_restores_the_student_and_the_projector(visual_run, monkeypatch):
    """ms-swift's model-only resume: the student is reloaded from the checkpoint folder and the
    pipeline still passes the checkpoint to `train`, which restores the projector."""
    monkeypatch.setenv(ALLOW_CHANGES_ENV, "1")  # the resumed config drops the test-only probe term
    checkpoint = str(visual_run.checkpoint)
    rlhf = {"llm_kd_weight": 0, "loss_terms": {"visual_kd": VISUAL}}
    config = _config(
        "qwen2_vl",
        "visual_only_resume_model",
        rlhf=rlhf,
        freeze_vit=False,
        freeze_aligner=False,
        max_steps=3,
        resume_from_checkpoint=checkpoint,
        resume_only_model=True,
        ignore_data_skip=True,
    )
    trainer = _build(config)
    snapshots = _Snapshots()
    trainer.add_callback(snapshots)
    trainer.train(checkpoint)  # as ms-swift's SwiftRLHF.train passes it
    for key in (f"{PROJECTOR_ATTR}.{ALIGNER_KEY}.weight", VISION_PARAM):
        torch.testing.assert_close(snapshots.at_start[key], visual_run.after[key])


def test_width_mismatch_fails_when_the_trainer_is_built_naming_target_widths_and_option():
    visual = {"weight": 1.0, "aligner": {"enabled": True, "distance": "mse"}}
    config = _config("qwen2_vl", "mismatch", rlhf={"llm_kd_weight": 0}, custom={"visual_kd": visual})
    with pytest.raises(ConfigError) as info:
        _build(config)
    message = str(info.value)
    for needle in (
        "custom.visual_kd.aligner",
        "model.visual.merger",
        "64",
        "96",
        "custom.visual_kd.aligner.projector: linear",
    ):
        assert needle in message, needle


def test_no_hook_is_left_when_training_fails(visual_run):
    trainer = visual_run.trainer
    composition = parse_config(
        {"rlhf": {"llm_kd_weight": 0, "loss_terms": {"visual_kd": VISUAL, "boom": {"type": EXPLODE}}}}
    ).composition
    trainer.use_composer(build_composer(composition))
    assert _kd_hooks(trainer.model) > 0 and _kd_hooks(trainer.teacher_model) > 0
    with pytest.raises(RuntimeError, match="boom inside the loss"):
        trainer.train()
    assert _kd_hooks(trainer.model) == 0 and _kd_hooks(trainer.teacher_model) == 0


# ----------------------------------------------------------------------- other families, LoRA, mixed data


def _mixed_dataset() -> Path:
    """Image and text-only samples alternating (no shuffling), so batches of one alternate too."""
    images = load_rows(build_caption_dataset(n=4, seed=3, image=True))
    texts = load_rows(build_caption_dataset(n=4, seed=3, image=False))
    path = SESSION_DIR / "mixed.jsonl"
    rows = [row for pair in zip(images, texts, strict=True) for row in pair]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def qwen3_vl_run():
    visual = {"weight": 1.0, "vit": {}, "deepstack": {"distance": "smooth_l1", "projector": "linear"}}
    config = _config(
        "qwen3_vl",
        "qwen3_vl",
        rlhf={"loss_terms": {"visual_kd": visual}},
        dataset=[str(_mixed_dataset())],
        per_device_train_batch_size=1,
        train_dataloader_shuffle=False,
        freeze_vit=False,
        max_steps=4,
    )
    trainer = _build(config)
    hooked = [h.name for h in trainer.kd_attachments.recorders["student"].hooked if h.tap.children]
    trainer.train()
    return SimpleNamespace(trainer=trainer, rows=_rows(trainer), hooked=hooked)


def test_qwen3_vl_deepstack_is_distilled_through_a_projector(qwen3_vl_run):
    mergers = qwen3_vl_run.trainer.model.model.visual.deepstack_merger_list
    assert qwen3_vl_run.hooked == [f"model.visual.deepstack_merger_list.{i}" for i in range(len(mergers))]
    with_images = [r for r in qwen3_vl_run.rows if "vision_kd_loss" in r]
    assert with_images and all(
        r["vision_kd_loss_deepstack"] > 0 and r["vision_kd_loss_vit"] > 0 for r in with_images
    )


def test_text_only_batches_skip_visual_kd_on_a_mixed_dataset(qwen3_vl_run):
    rows = qwen3_vl_run.rows
    assert len(rows) == 4
    text_only = [r for r in rows if "vision_kd_loss" not in r]
    assert len(text_only) == 2, "every other batch of one sample has no image"
    for row in text_only:
        assert not any(k.startswith("vision_kd_loss") for k in row)
        assert row["loss"] == pytest.approx(row["llm_kd_loss"], rel=1e-4)


@pytest.fixture(scope="module")
def qwen2_5_vl_lora_run():
    config = _config(
        "qwen2_5_vl",
        "qwen2_5_vl_lora",
        rlhf={"loss_terms": {"visual_kd": VISUAL}},
        tuner_type="lora",
        lora_rank=4,
        target_modules=["all-linear"],
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
    )
    trainer = _build(config)
    hooked = [h.name for h in trainer.kd_attachments.recorders["student"].hooked]
    key = f"{PROJECTOR_ATTR}.{ALIGNER_KEY}.weight"  # on the PEFT model itself, next to base_model
    params = dict(trainer.model.named_parameters())
    before = params[key].detach().clone() if key in params else None
    trainer.train()
    return SimpleNamespace(trainer=trainer, rows=_rows(trainer), hooked=hooked, before=before, key=key)


def test_qwen2_5_vl_lora_student_resolves_its_paths_and_trains(qwen2_5_vl_lora_run):
    run = qwen2_5_vl_lora_run
    peft_model = run.trainer.model
    hooked = {peft_model.get_submodule(path) for path in run.hooked}
    inner = peft_model.base_model.model.model  # PEFT wraps the Qwen2.5-VL model: base_model.model.
    assert hooked == {inner.visual, inner.visual.merger}
    assert len(run.rows) == 2
    for row in run.rows:
        assert row["vision_kd_loss_vit"] > 0 and row["vision_kd_loss_aligner"] > 0 and row["llm_kd_loss"] > 0


def test_lora_checkpoint_holds_adapters_and_the_projector(qwen2_5_vl_lora_run):
    from safetensors import safe_open
    from safetensors.torch import load_file

    run = qwen2_5_vl_lora_run
    assert run.before is not None, "the projector sits on the PEFT model and is trainable"
    checkpoint = sorted(Path(run.trainer.args.output_dir).glob("checkpoint-*"))[-1]
    with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("lora_" in k for k in keys) and not any(PROJECTOR_ATTR in k for k in keys)
    saved = load_file(str(checkpoint / PROJECTOR_FILE))[f"{ALIGNER_KEY}.weight"]
    assert not torch.equal(saved, run.before), "the projector was optimized"
