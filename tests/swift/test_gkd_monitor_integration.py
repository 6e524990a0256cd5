"""The `rlhf.llm_kd_weight` knob from the original proposal, loader to trained run.

`pytest tests/test_gkd_monitor_integration.py -k llm_kd` runs every case: the loader
(default 1.0, positive, zero, negative / invalid), the values surfaced on ms-swift's train
arguments and nested `training_args`, and the trainer (scaled loss and weighted metric,
teacher skipped and metric absent at 0, visual KD still hooked and trained at 0), down to
real ms-swift training loops on tiny local models.
"""

from __future__ import annotations

import pytest
import torch
from swift_support import (
    SESSION_DIR,
    ForwardCounter,
    composed,
    fresh,
    metric_values,
    prepared_inputs,
    sections,
    shared_trainer,
)

from kdcompose import parse_config
from kdcompose.errors import ConfigError

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]

VIT_KD = {"weight": 1.0, "vit": {"enabled": True, "weight": 1.0, "distance": "mse"}}
TOL = 1e-6


# ----------------------------------------------------------------------- the loader


def test_llm_kd_weight_defaults_to_one():
    config = parse_config({"rlhf": {"beta": 0.5}})
    assert config.llm_kd_weight == 1.0
    assert config.composition.term("lm_jsd").active
    assert config.needs_teacher


@pytest.mark.parametrize("weight", [0.5, 1, 2.5])
def test_llm_kd_weight_positive_scales_the_lm_term(weight):
    config = parse_config({"rlhf": {"llm_kd_weight": weight}})
    assert config.llm_kd_weight == float(weight)
    assert config.composition.term("lm_jsd").weight == float(weight)


def test_llm_kd_weight_zero_disables_lm_kd_and_the_teacher():
    config = parse_config({"rlhf": {"llm_kd_weight": 0, "sft_alpha": 1.0}})
    assert config.llm_kd_weight == 0.0
    assert not config.composition.term("lm_jsd").active
    assert not config.needs_teacher


def test_llm_kd_weight_zero_with_visual_kd_is_visual_only_distillation():
    config = parse_config({"rlhf": {"llm_kd_weight": 0}, "custom": {"visual_kd": VIT_KD}})
    assert [t.name for t in config.composition.active_terms] == ["visual_kd"]
    assert config.needs_teacher  # the teacher's vision tower, not its language model


def test_llm_kd_weight_zero_alone_leaves_nothing_to_train():
    with pytest.raises(ConfigError) as info:
        parse_config({"rlhf": {"llm_kd_weight": 0}})
    assert "rlhf.llm_kd_weight" in info.value.paths


@pytest.mark.parametrize("value", [-0.5, -1, "abc", float("nan"), float("inf"), True, [1.0]])
def test_llm_kd_weight_negative_or_invalid_is_rejected_with_its_path(value):
    with pytest.raises(ConfigError) as info:
        parse_config({"rlhf": {"llm_kd_weight": value}})
    assert info.value.paths == ("rlhf.llm_kd_weight",)


def test_llm_kd_weight_in_the_wrong_section_is_rejected():
    with pytest.raises(ConfigError) as info:
        parse_config({"training": {"llm_kd_weight": 0.5}})
    assert "training.llm_kd_weight" in info.value.paths


def test_llm_kd_weight_is_surfaced_on_train_args_and_nested_training_args(tmp_path):
    from kdcompose.integrations.swift.launch.command import build_arguments, swift_kwargs

    config = parse_config(sections(tmp_path / "out", rlhf={"llm_kd_weight": 0.5}))
    args = build_arguments(config, swift_kwargs(config))
    assert args.llm_kd_weight == 0.5
    assert args.training_args.llm_kd_weight == 0.5
    assert args.training_args.kdcompose_loss_terms["lm_jsd"]["weight"] == 0.5


# ----------------------------------------------------------------------- the trainer, one micro-batch


@pytest.fixture(scope="module")
def trainer():
    return shared_trainer()


@pytest.fixture(scope="module")
def batch(trainer):
    return prepared_inputs(trainer)


def _loss(trainer, inputs) -> torch.Tensor:
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, fresh(inputs))


def test_llm_kd_weight_half_gives_half_the_stock_jsd_and_logs_the_weighted_value(trainer, batch):
    from swift.rlhf_trainers.gkd_trainer import GKDTrainer

    with torch.no_grad():
        stock = GKDTrainer.compute_loss(trainer, trainer.model, fresh(batch))
    with composed(trainer, {"rlhf": {"llm_kd_weight": 0.5}}):
        assert trainer.args.llm_kd_weight == 0.5
        loss = _loss(trainer, batch)
        logged = metric_values(trainer)
    assert loss.item() == pytest.approx(0.5 * stock.item(), abs=TOL)
    assert logged["llm_kd_loss"] == pytest.approx(0.5 * stock.item(), abs=TOL)


def test_llm_kd_weight_zero_skips_the_teacher_and_the_metric(trainer, batch):
    with (
        composed(trainer, {"rlhf": {"llm_kd_weight": 0}}, sft_alpha=0.3),
        ForwardCounter(trainer.teacher_model) as teacher,
    ):
        loss = _loss(trainer, batch)
        logged = metric_values(trainer)
        assert trainer.args.llm_kd_weight == 0.0
    assert teacher.calls == 0
    assert "llm_kd_loss" not in logged
    assert logged["sft_loss"] == pytest.approx(loss.item(), abs=TOL)


def test_llm_kd_weight_zero_keeps_visual_kd_hooks_running(trainer, batch):
    teacher = trainer.teacher_model
    with composed(trainer, {"rlhf": {"llm_kd_weight": 0}, "custom": {"visual_kd": VIT_KD}}):
        assert (
            trainer.kd_attachments.recorders["student"] is not None
            and trainer.kd_attachments.recorders["student"].active
        )
        with ForwardCounter(teacher.lm_head) as lm_head, ForwardCounter(teacher.model.visual) as tower:
            loss = _loss(trainer, batch)
        logged = metric_values(trainer)
    assert lm_head.calls == 0 and tower.calls == 1
    assert "llm_kd_loss" not in logged
    assert logged["vision_kd_loss"] == pytest.approx(loss.item(), rel=1e-6) and loss.item() > 0


# ----------------------------------------------------------------------- real training loops


def _train(rlhf: dict, custom: dict | None, name: str, steps: int = 2):
    """Train the tiny models for `steps` optimizer steps through ms-swift's own loop."""
    from kdcompose.integrations.swift.launch.pipeline import build_trainer

    config = parse_config(sections(SESSION_DIR / name, max_steps=steps, rlhf=rlhf, custom=custom))
    trainer = build_trainer(config)
    with (
        ForwardCounter(trainer.teacher_model.lm_head) as lm_head,
        ForwardCounter(trainer.teacher_model.model.visual) as tower,
    ):
        trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    return rows, lm_head.calls, tower.calls


def test_llm_kd_weight_positive_end_to_end():
    rows, lm_head_calls, _ = _train({"llm_kd_weight": 0.5, "sft_alpha": 0.1}, None, "llm_kd_half")
    assert len(rows) == 2 and lm_head_calls == 2
    for row in rows:
        assert row["loss"] == pytest.approx(row["llm_kd_loss"] + row["sft_loss"], rel=1e-4)
        assert 0 < row["llm_kd_loss"] < row["sft_loss"]


def test_llm_kd_weight_zero_end_to_end_trains_visual_kd_only():
    rows, lm_head_calls, tower_calls = _train(
        {"llm_kd_weight": 0, "sft_alpha": 0.1}, {"visual_kd": VIT_KD}, "llm_kd_0"
    )
    assert len(rows) == 2
    assert lm_head_calls == 0 and tower_calls == 2  # one teacher vision pass per step, no LM
    for row in rows:
        assert "llm_kd_loss" not in row
        assert row["loss"] == pytest.approx(row["vision_kd_loss"] + row["sft_loss"], rel=1e-4)
