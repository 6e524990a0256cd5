"""`kdcompose.Distiller`: the composition in a plain loop, equal to what `kdcompose train` computes.

One composition with every kind of input a term can declare -- LM-head logits (`lm_jsd`), labels
(`ce`), a feature pair through a trainable projector (`hidden_kd`, 64 -> 96 wide) and a plug-in
term tapping decoder layers and an LM head's input (`examples/relation_kd_term.py`) -- on the
tiny Qwen2-VL pair. The oracle is ms-swift's own trainer path: `KDComposeGKDTrainer.compute_loss`
on the very batch ms-swift prepared, with the same models.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from swift_support import composed, fresh, metric_values, prepared_inputs, shared_trainer

from kdcompose import ConfigError, Distiller, NonFiniteLossError, parse_config
from kdcompose.training.projectors import PROJECTOR_ATTR

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SECTIONS = {
    "plugins": [str(EXAMPLES / "relation_kd_term.py")],
    "rlhf": {
        "loss_terms": {
            "lm_jsd": {"weight": 1.0},
            "ce": {"weight": 0.3},
            "hidden_kd": {
                "weight": 0.5,
                "pairs": [
                    {
                        "student": "model.language_model.layers.1",
                        "teacher": "model.language_model.layers.2",
                        "projector": "linear",
                    }
                ],
            },
            "relation_kd": {
                "weight": 0.2,
                "student_layer": "model.language_model.layers.1",
                "teacher_layer": "model.language_model.layers.2",
            },
        }
    },
}


def _hooks(*models) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for model in models for m in model.modules())


@pytest.fixture(scope="module")
def run():
    """The trainer's step-1 loss and metrics, and the Distiller's on the same batch and models."""
    trainer = shared_trainer()
    inputs = prepared_inputs(trainer)
    # Whole-sequence logits on both sides: the plug-in term averages over the positions the LM head
    # saw, which ms-swift's `logits_to_keep` would trim to the completion (the Distiller never trims).
    with composed(trainer, SECTIONS, use_logits_to_keep=False):
        with torch.no_grad():
            trainer_loss = trainer.compute_loss(trainer.model, fresh(inputs))
        trainer_metrics = metric_values(trainer)
    student, teacher = trainer.model, trainer.teacher_model
    hooks_before = _hooks(student, teacher)
    kd = Distiller(parse_config(SECTIONS), student, teacher, vocab_size=len(trainer.template.tokenizer))
    batch = dict(inputs["model_inputs"])
    with torch.no_grad():
        out = kd.loss(batch)
    return {
        "trainer": trainer,
        "kd": kd,
        "batch": batch,
        "trainer_loss": float(trainer_loss),
        "trainer_metrics": trainer_metrics,
        "out": out,
        "hooks_before": hooks_before,
    }


def test_step_one_loss_and_every_term_equal_the_trainers(run):
    out, expected = run["out"], run["trainer_metrics"]
    assert float(out.total) == pytest.approx(run["trainer_loss"], rel=1e-5, abs=1e-7)
    metrics = {k: float(v) for k, v in out.metrics().items()}
    assert (
        set(metrics)
        == set(expected)
        == {
            "llm_kd_loss",
            "sft_loss",
            "hidden_kd_loss",
            "hidden_kd_loss_0",
            "relation_kd_loss",
        }
    )
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-8), key
    assert all(v > 0 for v in metrics.values())


def test_the_projector_belongs_to_the_distiller_and_trains(run):
    kd, trainer = run["kd"], run["trainer"]
    names = [name for name, _ in kd.named_parameters()]
    assert names == ["hidden_kd__0.weight", "hidden_kd__0.bias"]
    assert not hasattr(trainer.model, PROJECTOR_ATTR), "the student's own modules are left alone"
    weight = dict(kd.named_parameters())["hidden_kd__0.weight"]
    assert torch.equal(weight.detach(), torch.eye(96, 64)), "a projector starts as the identity"
    optimizer = torch.optim.SGD(list(kd.parameters()), lr=1.0)
    kd.loss(dict(run["batch"])).total.backward()
    optimizer.step()
    assert not torch.equal(weight.detach(), torch.eye(96, 64))
    saved = {k: v.clone() for k, v in kd.state_dict().items()}
    assert set(saved) == {"hidden_kd__0.weight", "hidden_kd__0.bias"}
    with torch.no_grad():
        weight.zero_()
    kd.load_state_dict(saved)
    assert torch.equal(weight.detach(), saved["hidden_kd__0.weight"])
    trainer.model.zero_grad(set_to_none=True)


def test_close_removes_every_hook_and_refuses_further_use(run):
    kd = run["kd"]
    assert _hooks(run["trainer"].model, run["trainer"].teacher_model) > run["hooks_before"]
    kd.close()
    assert _hooks(run["trainer"].model, run["trainer"].teacher_model) == run["hooks_before"]
    with pytest.raises(RuntimeError, match="closed"):
        kd.loss(dict(run["batch"]))


def test_what_a_plain_loop_must_pass_is_asked_for_by_name(run):
    trainer = run["trainer"]
    scheduled = {
        "rlhf": {
            "loss_terms": {
                "ce": {
                    "weight": 0.5,
                    "schedule": {"kind": "linear", "start": 1.0, "end": 0.0, "total_steps": 10},
                }
            }
        }
    }
    with Distiller(parse_config(scheduled), trainer.model, trainer.teacher_model) as kd:
        with pytest.raises(ValueError, match=r"rlhf\.loss_terms\.ce\.schedule.*step="):
            kd.loss(dict(run["batch"]))
        assert "sft_loss" in kd.loss(dict(run["batch"]), step=0).metrics()
        assert "sft_loss" not in kd.loss(dict(run["batch"]), step=10).metrics(), "weight 0 at the end"
    global_tokens = {"rlhf": {"loss_terms": {"ce": {"weight": 0.5, "normalize": "global_tokens"}}}}
    with Distiller(parse_config(global_tokens), trainer.model, trainer.teacher_model) as kd:
        with pytest.raises(ValueError, match=r"rlhf\.loss_terms\.ce\.normalize.*step_tokens"):
            kd.loss(dict(run["batch"]))
        labelled = int((run["batch"]["labels"] != -100).sum())
        micro = kd.loss(dict(run["batch"]), step_tokens=labelled).metrics()["sft_loss"]
        halves = kd.loss(dict(run["batch"]), step_tokens=2 * labelled).metrics()["sft_loss"]
        assert float(halves) == pytest.approx(float(micro) / 2, rel=1e-6)
    with pytest.raises(ConfigError, match=r"lm_jsd.*needs a teacher"):
        Distiller(parse_config({}), trainer.model)


def test_a_non_finite_term_stops_or_skips_as_its_policy_says(run):
    trainer = run["trainer"]
    batch = dict(run["batch"])
    batch["labels"] = batch["labels"].clone()
    for policy in ("error", "skip_step"):
        config = parse_config({"rlhf": {"llm_kd_weight": 0, "loss_terms": {"ce": {"on_nonfinite": policy}}}})
        with Distiller(config, trainer.model) as kd, torch.no_grad():
            saved = trainer.model.lm_head.weight.detach().clone()
            trainer.model.lm_head.weight.data[0, 0] = float("nan")
            try:
                if policy == "error":
                    with pytest.raises(NonFiniteLossError, match=r"term 'ce' \(sft_loss\)"):
                        kd.loss(batch)
                else:
                    out = kd.loss(batch)
                    assert out.skipped and float(out.total) == 0.0
            finally:
                trainer.model.lm_head.weight.data.copy_(saved)


def test_the_plain_pytorch_example_trains(tmp_path):
    spec = importlib.util.spec_from_file_location("plain_pytorch_loop", EXAMPLES / "plain_pytorch_loop.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    history = example.main(steps=3)
    assert len(history) == 3
    assert {"llm_kd_loss", "sft_loss", "hidden_kd_loss", "relation_kd_loss"} <= set(history[0])
    assert all(torch.isfinite(torch.tensor(list(row.values()))).all() for row in history)
