"""Fused LM-head mode (`lm_jsd: {fused: true}`) in `KDComposeGKDTrainer`, on tiny Qwen2-VL models.

The oracle is the same trainer with `fused: false` on the same micro-batch (which in turn
matches ms-swift's `GKDTrainer.compute_loss`, see test_swift_trainer.py): same loss, same
gradients on every student parameter, while the LM heads compute no full logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from swift_support import (
    ForwardCounter,
    composed,
    fresh,
    kdcompose_command,
    metric_values,
    prepared_inputs,
    run_command,
    sections,
    shared_trainer,
    step_logs,
    write_config,
)

from kdcompose import LossContext, TermNeeds, TermSpec, build_composer, parse_config, register_term
from kdcompose.errors import ConfigError
from kdcompose.registry import unregister_term
from kdcompose.terms import LossTerm

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]

LOSS_TOL = 1e-5
FUSED = {"rlhf": {"loss_terms": {"lm_jsd": {"fused": True}}}}
UNFUSED = {"rlhf": {"loss_terms": {"lm_jsd": {"fused": False}}}}


@pytest.fixture(scope="module")
def trainer():
    return shared_trainer()


@pytest.fixture(scope="module")
def dataset_inputs(trainer):
    return prepared_inputs(trainer)


@pytest.fixture(scope="module")
def student_inputs(trainer):
    return prepared_inputs(trainer, student_generated=True)


class OutputShapes:
    """Shapes of what a module returned during the block (a real forward hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.shapes = module, []

    def __enter__(self) -> OutputShapes:
        self.handle = self.module.register_forward_hook(
            lambda _m, _i, out: self.shapes.append(tuple(out.shape))
        )
        return self

    def __exit__(self, *_: object) -> None:
        self.handle.remove()


def _step(trainer, inputs, composition, **gkd):
    """Loss, logged metrics and student gradients of one `compute_loss` + backward."""
    with composed(trainer, composition, **gkd):
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(trainer.model, fresh(inputs))
        loss.backward()
        logged = metric_values(trainer)
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    return loss.detach(), logged, grads


def _assert_same_step(fused, unfused) -> None:
    (loss_f, logged_f, grads_f), (loss_u, logged_u, grads_u) = fused, unfused
    assert loss_f.item() == pytest.approx(loss_u.item(), abs=LOSS_TOL)
    assert logged_f.keys() == logged_u.keys()
    for key, value in logged_u.items():
        assert logged_f[key] == pytest.approx(value, abs=LOSS_TOL), key
    assert grads_f.keys() == grads_u.keys() and len(grads_u) > 20  # every trainable student tensor
    for name, grad in grads_u.items():
        torch.testing.assert_close(grads_f[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    assert all(grads_u[name].abs().sum() > 0 for name in grads_u if "lm_head" in name or "lora_B" in name)


# ----------------------------------------------------------------------- same loss, same gradients


def test_fused_matches_unfused_loss_and_gradients(trainer, dataset_inputs):
    _assert_same_step(_step(trainer, dataset_inputs, FUSED), _step(trainer, dataset_inputs, UNFUSED))


def test_fused_with_ce_matches_unfused(trainer, dataset_inputs):
    fused = _step(trainer, dataset_inputs, FUSED, sft_alpha=0.3)
    assert set(fused[1]) == {"llm_kd_loss", "sft_loss"}
    _assert_same_step(fused, _step(trainer, dataset_inputs, UNFUSED, sft_alpha=0.3))


def test_fused_matches_unfused_on_a_student_generated_batch(trainer, student_inputs):
    fused = _step(trainer, student_inputs, FUSED, sft_alpha=0.3)
    assert set(fused[1]) == {"llm_kd_loss"}  # no CE on what the student sampled
    _assert_same_step(fused, _step(trainer, student_inputs, UNFUSED, sft_alpha=0.3))


def test_fused_matches_without_logits_to_keep(trainer, dataset_inputs):
    """Whole sequences instead of ms-swift's completion-region trim: alignment is unchanged."""
    saved = trainer.args.use_logits_to_keep
    trainer.args.use_logits_to_keep = False
    try:
        fused = _step(trainer, dataset_inputs, FUSED, sft_alpha=0.3)
        unfused = _step(trainer, dataset_inputs, UNFUSED, sft_alpha=0.3)
    finally:
        trainer.args.use_logits_to_keep = saved
    _assert_same_step(fused, unfused)


def test_fused_matches_in_evaluation(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    losses = []
    trainer.model.eval()
    try:
        for composition in (FUSED, UNFUSED):
            with composed(trainer, composition):
                loss, _, _ = trainer.prediction_step(trainer.model, copy.deepcopy(batch), True)
                assert set(metric_values(trainer, "eval")) == {"eval_llm_kd_loss"}
            losses.append(loss.item())
    finally:
        trainer.model.train()
    assert losses[0] == pytest.approx(losses[1], abs=LOSS_TOL)


# ----------------------------------------------------------------------- what runs and what never exists


def test_fused_never_builds_full_logits(trainer, dataset_inputs):
    student_head, teacher_head = trainer.model.lm_head, trainer.teacher_model.lm_head
    vocab = student_head.out_features
    with (
        composed(trainer, FUSED),
        OutputShapes(student_head) as s,
        OutputShapes(teacher_head) as t,
        torch.no_grad(),
    ):
        trainer.compute_loss(trainer.model, fresh(dataset_inputs))
    assert [shape[1:] for shape in s.shapes + t.shapes] == [(0, vocab), (0, vocab)]


def test_fused_with_ce_builds_only_the_student_logits(trainer, dataset_inputs):
    student_head, teacher_head = trainer.model.lm_head, trainer.teacher_model.lm_head
    with (
        composed(trainer, FUSED, sft_alpha=0.3),
        OutputShapes(student_head) as s,
        OutputShapes(teacher_head) as t,
        torch.no_grad(),
    ):
        trainer.compute_loss(trainer.model, fresh(dataset_inputs))
    assert len(s.shapes) == 1 and s.shapes[0][1] > 0  # CE reads the student's logits
    assert len(t.shapes) == 1 and t.shapes[0][1] == 0  # the teacher's never exist


def test_a_term_that_needs_only_the_student_hidden_states_gets_them(trainer, dataset_inputs):
    """Any registered term may ask for hidden states; the teacher then never runs."""
    seen: list[LossContext] = []

    @register_term("hidden_probe")
    class HiddenProbe(LossTerm):
        spec_class = TermSpec

        @property
        def needs(self) -> TermNeeds:
            return TermNeeds(student_hidden=True, labels=True)

        def compute(self, ctx: LossContext) -> torch.Tensor:
            seen.append(ctx)
            return ctx.student_hidden.pow(2).mean()

    try:
        composition = {"rlhf": {"llm_kd_weight": 0, "loss_terms": {"probe": {"type": "hidden_probe"}}}}
        with composed(trainer, composition), ForwardCounter(trainer.teacher_model) as teacher:
            with torch.no_grad():
                loss = trainer.compute_loss(trainer.model, fresh(dataset_inputs))
            logged = metric_values(trainer)
    finally:
        unregister_term("hidden_probe")
    (ctx,) = seen
    assert teacher.calls == 0 and ctx.teacher_hidden is None
    assert ctx.student_logits is None and ctx.student_lm_head is trainer.model.lm_head
    assert ctx.student_hidden.shape[:2] == ctx.labels.shape
    assert ctx.student_hidden.shape[2] == trainer.model.config.text_config.hidden_size
    assert logged == {"probe_loss": pytest.approx(loss.item(), rel=1e-6)}


# ----------------------------------------------------------------------- what it refuses


def test_fused_with_vocabularies_padded_differently_fails_at_construction(trainer):
    wide = copy.deepcopy(trainer.teacher_model)
    wide.resize_token_embeddings(trainer.model.lm_head.out_features + 128)
    original = trainer.teacher_model
    trainer.teacher_model = wide
    try:
        with pytest.raises(ConfigError, match=r"rlhf\.loss_terms\.lm_jsd.*151936 rows.*152064.*fused: false"):
            trainer.use_composer(build_composer(parse_config(FUSED).composition))
    finally:
        trainer.teacher_model = original
    assert trainer.kd_composer.formula() == "Loss = 1*lm_jsd(beta=0.5, T=0.9)"


def test_fused_under_accelerate_fsdp_fails_at_construction(trainer, monkeypatch):
    """ZeRO-3 is supported (the loss runs as the head's forward, tests/test_engines_deepspeed.py);
    accelerate's FSDP flattens the head into its parent unit and is refused, naming the fix."""
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
    with pytest.raises(ConfigError, match=r"rlhf\.loss_terms\.lm_jsd.*FSDP.*fused: false"):
        trainer.use_composer(build_composer(parse_config(FUSED).composition))
    assert trainer.kd_composer.formula() == "Loss = 1*lm_jsd(beta=0.5, T=0.9)"


# ----------------------------------------------------------------------- LoRA: the base model as teacher


def test_fused_with_the_lora_base_model_as_teacher(tmp_path_factory):
    from kdcompose.integrations.swift.launch.pipeline import build_trainer

    out = tmp_path_factory.mktemp("fused_lora")
    data = sections(out, tuner_type="lora", lora_rank=4, target_modules=["all-linear"])
    data["model"]["teacher_model"] = data["model"]["model"]
    lora = build_trainer(parse_config(data))
    lora.model.train()
    with torch.no_grad():  # make the adapters matter, so the teacher (adapters off) differs
        for name, param in lora.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    inputs = prepared_inputs(lora)
    fused = _step(lora, inputs, FUSED, sft_alpha=0.3)
    assert fused[1]["llm_kd_loss"] > 0
    _assert_same_step(fused, _step(lora, inputs, UNFUSED, sft_alpha=0.3))


# ----------------------------------------------------------------------- a real run


def test_kdcompose_train_with_fused_lm_jsd(tmp_path):
    """`kdcompose train` with `fused: true` trains, logs `llm_kd_loss`, and (same seed, data and
    weights) logs the same losses as the run with `fused: false`."""
    logs = {}
    for fused in (True, False):
        rlhf = {"sft_alpha": 0.2, "loss_terms": {"lm_jsd": {"weight": 0.5, "fused": fused}}}
        data = sections(tmp_path / f"out{fused}", rlhf=rlhf)
        result = run_command(
            kdcompose_command("train", str(write_config(tmp_path / f"{fused}.yaml", data))), tmp_path
        )
        assert result.returncode == 0, result.stderr[-4000:]
        logs[fused] = step_logs(tmp_path / f"out{fused}")
        if fused:
            assert "Loss = 0.5*lm_jsd(beta=0.5, T=0.9, fused) + 0.2*ce" in result.stdout
    assert len(logs[True]) == len(logs[False]) == 3
    for row, reference in zip(logs[True], logs[False], strict=True):
        assert row["llm_kd_loss"] > 0 and row["loss"] == pytest.approx(
            row["llm_kd_loss"] + row["sft_loss"], rel=1e-4
        )
        for key in ("loss", "llm_kd_loss", "sft_loss"):
            assert row[key] == pytest.approx(reference[key], rel=1e-4), key
