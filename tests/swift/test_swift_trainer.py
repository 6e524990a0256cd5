"""KDComposeGKDTrainer against ms-swift 4.6's own GKDTrainer, on tiny local Qwen2-VL models.

The oracle is ms-swift itself: our class subclasses `GKDTrainer`, so
`GKDTrainer.compute_loss(trainer, model, inputs)` is the stock loss on the very same models,
arguments and micro-batch (a real batch from ms-swift's dataloader and `_prepare_inputs`).
"""

from __future__ import annotations

import copy

import pytest
import torch
from swift_support import ForwardCounter, composed, fresh, metric_values, prepared_inputs, shared_trainer

from kdcompose import LossContext, build_composer, parse_config
from kdcompose.errors import ConfigError
from kdcompose.functional.vocab import VocabMismatchError
from kdcompose.training.taps import ModuleTaps

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]

TOL = 1e-6


@pytest.fixture(scope="module")
def trainer():
    return shared_trainer()


@pytest.fixture(scope="module")
def dataset_inputs(trainer):
    return prepared_inputs(trainer)


@pytest.fixture(scope="module")
def student_inputs(trainer):
    return prepared_inputs(trainer, student_generated=True)


def _stock(trainer, inputs) -> torch.Tensor:
    from swift.rlhf_trainers.gkd_trainer import GKDTrainer

    with torch.no_grad():
        return GKDTrainer.compute_loss(trainer, trainer.model, fresh(inputs))


def _ours(trainer, inputs) -> torch.Tensor:
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, fresh(inputs))


# ----------------------------------------------------------------------- backward compatibility


def test_trainer_is_a_swift_gkd_trainer_with_the_stock_composition(trainer):
    from swift.rlhf_trainers.gkd_trainer import GKDTrainer

    assert isinstance(trainer, GKDTrainer)
    assert trainer.kd_composer.formula() == "Loss = 1*lm_jsd(beta=0.5, T=0.9)"
    assert trainer.args.llm_kd_weight == 1.0


def test_stock_config_matches_swift_loss_on_a_dataset_batch(trainer, dataset_inputs):
    assert dataset_inputs["gkd_batch"].data_source.value == "dataset"
    stock = _stock(trainer, dataset_inputs)
    ours = _ours(trainer, dataset_inputs)
    assert stock.item() > 0
    assert abs(ours.item() - stock.item()) < TOL


def test_stock_config_with_sft_alpha_matches_swift_loss(trainer, dataset_inputs):
    with composed(trainer, sft_alpha=0.3) as composer:
        assert composer.formula() == "Loss = 1*lm_jsd(beta=0.5, T=0.9) + 0.3*ce"
        stock = _stock(trainer, dataset_inputs)
        ours = _ours(trainer, dataset_inputs)
        logged = metric_values(trainer)
    assert abs(ours.item() - stock.item()) < TOL
    assert set(logged) == {"llm_kd_loss", "sft_loss"}
    assert logged["llm_kd_loss"] + logged["sft_loss"] == pytest.approx(ours.item(), abs=TOL)


def test_student_generated_batch_matches_swift_and_skips_ce(trainer, student_inputs):
    assert student_inputs["gkd_batch"].data_source.value == "student"
    with composed(trainer, sft_alpha=0.3):
        stock = _stock(trainer, student_inputs)
        ours = _ours(trainer, student_inputs)
        logged = metric_values(trainer)
    assert abs(ours.item() - stock.item()) < TOL
    assert "sft_loss" not in logged  # ms-swift adds no CE on completions the student sampled
    assert logged["llm_kd_loss"] == pytest.approx(ours.item(), abs=TOL)


def test_gradients_match_swift(trainer, dataset_inputs):
    from swift.rlhf_trainers.gkd_trainer import GKDTrainer

    head = trainer.model.get_output_embeddings().weight
    grads = []
    with composed(trainer, sft_alpha=0.3):
        for compute in (GKDTrainer.compute_loss, type(trainer).compute_loss):
            trainer.model.zero_grad(set_to_none=True)
            compute(trainer, trainer.model, fresh(dataset_inputs)).backward()
            grads.append(head.grad.detach().clone())
        metric_values(trainer)
    trainer.model.zero_grad(set_to_none=True)
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_vocab_sizes_that_differ_by_padding_match_swift(trainer, dataset_inputs):
    wide = copy.deepcopy(trainer.teacher_model)
    wide.resize_token_embeddings(trainer.model.get_output_embeddings().weight.shape[0] + 128)
    original = trainer.teacher_model
    trainer.teacher_model = wide
    try:
        with composed(trainer, sft_alpha=0.3):
            stock = _stock(trainer, dataset_inputs)
            ours = _ours(trainer, dataset_inputs)
            logged = metric_values(trainer)
    finally:
        trainer.teacher_model = original
    assert abs(ours.item() - stock.item()) < TOL
    assert set(logged) == {"llm_kd_loss", "sft_loss"}


def test_real_vocab_mismatch_fails_when_the_composer_is_set(trainer):
    narrow = copy.deepcopy(trainer.teacher_model)
    narrow.resize_token_embeddings(1000)
    original = trainer.teacher_model
    trainer.teacher_model = narrow
    try:
        with pytest.raises(VocabMismatchError, match=r"151936.*teacher logits 1000.*tokenizer has 151669"):
            trainer.use_composer(build_composer(parse_config({}).composition))
    finally:
        trainer.teacher_model = original
    assert trainer.kd_composer.formula() == "Loss = 1*lm_jsd(beta=0.5, T=0.9)"


# ----------------------------------------------------------------------- composition behaviour


def test_scaled_lm_kd_is_a_fraction_of_swift_jsd(trainer, dataset_inputs):
    stock = _stock(trainer, dataset_inputs)
    with composed(trainer, {"rlhf": {"llm_kd_weight": 0.25}}):
        ours = _ours(trainer, dataset_inputs)
        logged = metric_values(trainer)
    assert ours.item() == pytest.approx(0.25 * stock.item(), abs=TOL)
    assert logged == {"llm_kd_loss": pytest.approx(ours.item(), abs=TOL)}


def test_inactive_teacher_terms_never_run_the_teacher(trainer, dataset_inputs):
    with (
        composed(trainer, {"rlhf": {"llm_kd_weight": 0.0}}, sft_alpha=0.5),
        ForwardCounter(trainer.teacher_model) as teacher,
    ):
        loss = _ours(trainer, dataset_inputs)
        logged = metric_values(trainer)
    assert teacher.calls == 0
    assert set(logged) == {"sft_loss"}
    assert logged["sft_loss"] == pytest.approx(loss.item(), abs=TOL)


def test_visual_only_runs_the_teacher_vision_tower_but_not_its_language_model(trainer, dataset_inputs):
    # `vit` (pre-merger patches): same width in the tiny student and teacher.
    visual = {"weight": 2.0, "vit": {"enabled": True, "weight": 1.0, "distance": "mse"}}
    teacher = trainer.teacher_model
    with composed(trainer, {"rlhf": {"llm_kd_weight": 0.0}, "custom": {"visual_kd": visual}}) as composer:
        with ForwardCounter(teacher.lm_head) as head, ForwardCounter(teacher.model.visual) as tower:
            loss = _ours(trainer, dataset_inputs)
        logged = metric_values(trainer)
    assert head.calls == 0 and tower.calls == 1
    assert set(logged) == {"vision_kd_loss", "vision_kd_loss_vit"}
    assert logged["vision_kd_loss"] == pytest.approx(loss.item(), rel=1e-6)

    # Oracle: the same term on features recorded from full forwards of both models.
    inputs = {k: v for k, v in dataset_inputs["model_inputs"].items() if k != "labels"}
    pair = composer.term("visual_kd").pair("vit")
    s_rec, t_rec = ModuleTaps(trainer.model, [pair.student]), ModuleTaps(teacher, [pair.teacher], detach=True)
    try:
        with torch.no_grad(), s_rec.recording(), t_rec.recording():
            trainer.model(**inputs)
            teacher(**inputs)
            ctx = LossContext(taps={**s_rec.recorded(), **t_rec.recorded()}, has_images=True)
            expected = 2.0 * composer.term("visual_kd").compute(ctx).value
    finally:
        s_rec.close()
        t_rec.close()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_metrics_are_recorded_in_eval_mode_with_the_eval_prefix(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    try:
        with composed(trainer, sft_alpha=0.2):
            loss, _, _ = trainer.prediction_step(trainer.model, batch, prediction_loss_only=True)
            logged = metric_values(trainer, "eval")
    finally:
        trainer.model.train()
    assert set(logged) == {"eval_llm_kd_loss", "eval_sft_loss"}
    assert logged["eval_llm_kd_loss"] + logged["eval_sft_loss"] == pytest.approx(loss.item(), abs=TOL)


def test_metrics_average_over_micro_batches_like_the_loss(trainer, dataset_inputs, student_inputs):
    """A term that did not run on a micro-batch counts 0 there, exactly as in the loss."""
    with composed(trainer, sft_alpha=0.3):
        a = _ours(trainer, dataset_inputs)
        alone = metric_values(trainer)
        b = _ours(trainer, student_inputs)
        metric_values(trainer)
        _ours(trainer, dataset_inputs)
        _ours(trainer, student_inputs)
        logged = metric_values(trainer)
    jsd_b = b.item()
    assert logged["sft_loss"] == pytest.approx(alone["sft_loss"] / 2, abs=TOL)
    assert logged["llm_kd_loss"] == pytest.approx((alone["llm_kd_loss"] + jsd_b) / 2, abs=TOL)
    assert logged["llm_kd_loss"] + logged["sft_loss"] == pytest.approx((a.item() + b.item()) / 2, abs=TOL)


# ----------------------------------------------------------------------- what it refuses


def test_liger_kernel_fails_at_construction(trainer):
    from kdcompose.integrations.swift.trainer import KDComposeGKDTrainer

    args = copy.copy(trainer.args)
    args.use_liger_kernel = True
    with pytest.raises(ConfigError, match="use_liger_kernel"):
        KDComposeGKDTrainer(trainer.model, args=args)


def test_no_teacher_for_a_teacher_term_fails(trainer):
    original = trainer.teacher_model
    trainer.teacher_model = None
    try:
        with pytest.raises(ConfigError, match=r"teacher_model.*lm_jsd need a teacher"):
            trainer.use_composer(build_composer(parse_config({}).composition))
        # ...while a composition without teacher terms is fine without one.
        trainer.use_composer(
            build_composer(parse_config({"rlhf": {"llm_kd_weight": 0, "sft_alpha": 1}}).composition)
        )
    finally:
        trainer.teacher_model = original
        trainer.use_composer(build_composer(parse_config({}).composition))


def test_opsd_dataset_is_rejected_when_the_teacher_is_needed(trainer):
    original = trainer.train_dataset
    trainer.train_dataset = original.add_column("teacher_prompt", ["Describe it."] * len(original))
    try:
        with pytest.raises(ConfigError, match=r"teacher_prompt.*OPSD"):
            trainer.use_composer(build_composer(parse_config({}).composition))
        # CE alone never reads the teacher-side encoding.
        trainer.use_composer(
            build_composer(parse_config({"rlhf": {"llm_kd_weight": 0, "sft_alpha": 1}}).composition)
        )
    finally:
        trainer.train_dataset = original
        trainer.use_composer(build_composer(parse_config({}).composition))


def test_opsd_batch_is_rejected(trainer, dataset_inputs):
    inputs = fresh(dataset_inputs)
    teacher_inputs = inputs["teacher_model_inputs"]
    teacher_inputs["input_ids"] = teacher_inputs["input_ids"].clone()
    with pytest.raises(ConfigError, match="OPSD"):
        trainer.compute_loss(trainer.model, inputs)


# ----------------------------------------------------------------------- LoRA: the base model as teacher


@pytest.fixture(scope="module")
def lora_trainer():
    """ms-swift's fixed self-distillation: LoRA student, `teacher_model` = `model`, so the
    teacher is the base model with the adapters disabled (no second model is loaded)."""
    from swift_support import SESSION_DIR, sections

    from kdcompose.integrations.swift.launch.pipeline import build_trainer

    data = sections(SESSION_DIR / "lora", tuner_type="lora", lora_rank=4, target_modules=["all-linear"])
    data["model"]["teacher_model"] = data["model"]["model"]
    trainer = build_trainer(parse_config(data))
    trainer.model.train()
    return trainer


def test_lora_base_model_as_teacher_matches_swift(lora_trainer):
    assert lora_trainer.teacher_model is None and lora_trainer._teacher_use_disable_adapter
    with torch.no_grad():  # make the adapters matter, so the teacher (adapters off) differs
        for name, param in lora_trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    inputs = prepared_inputs(lora_trainer)
    with composed(lora_trainer, sft_alpha=0.3):
        stock = _stock(lora_trainer, inputs)
        ours = _ours(lora_trainer, inputs)
        logged = metric_values(lora_trainer)
    assert logged["llm_kd_loss"] > 0
    assert abs(ours.item() - stock.item()) < TOL


def test_lora_base_model_as_teacher_for_visual_kd(lora_trainer):
    visual = {"weight": 1.0, "vit": {"enabled": True, "distance": "mse"}}
    inputs = prepared_inputs(lora_trainer)
    with composed(lora_trainer, {"rlhf": {"llm_kd_weight": 0.0}, "custom": {"visual_kd": visual}}):
        loss = _ours(lora_trainer, inputs)
        logged = metric_values(lora_trainer)
    assert set(logged) == {"vision_kd_loss", "vision_kd_loss_vit"}
    assert logged["vision_kd_loss"] == pytest.approx(loss.item(), rel=1e-6)
