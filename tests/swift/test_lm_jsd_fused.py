"""`lm_jsd: {fused: true}` without ms-swift: the config field, the term, and the LM-head tap.

The trainer-level checks (real tiny models through ms-swift's pipeline) are in
`test_swift_fused.py`; here the term is fed a `LossContext` by hand and compared with the
same term computing on logits, and the tap runs on a small torch module.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import config_error, config_from
from torch import nn

from kdcompose import LossContext, TermNeeds, build_composer
from kdcompose.training.lm_head import LmHeadUnsupported, lm_head_of, tap_lm_head

pytestmark = pytest.mark.swift

V, H_S, H_T = 50, 8, 12


# ----------------------------------------------------------------------- schema


def test_fused_defaults_to_false_and_keeps_logit_needs():
    term = build_composer(config_from().composition).term("lm_jsd")
    assert term.spec.fused is False
    assert term.needs == TermNeeds(student_logits=True, teacher_logits=True, labels=True, token_mean=True)


def test_fused_true_needs_hidden_states_instead_of_logits():
    composer = build_composer(config_from(rlhf={"loss_terms": {"lm_jsd": {"fused": True}}}).composition)
    term = composer.term("lm_jsd")
    assert term.needs == TermNeeds(student_hidden=True, teacher_hidden=True, labels=True, token_mean=True)
    assert composer.needs_teacher and composer.needs.teacher_language_model
    assert composer.formula() == "Loss = 1*lm_jsd(beta=0.5, T=0.9, fused)"


def test_fused_keeps_the_legacy_weight_and_knobs():
    config = config_from(rlhf={"llm_kd_weight": 0.3, "beta": 0, "loss_terms": {"lm_jsd": {"fused": True}}})
    term = build_composer(config.composition).term("lm_jsd")
    assert (term.weight, term.beta, term.spec.fused) == (0.3, 0.0, True)


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, None, [True], {"on": True}])
def test_fused_must_be_a_boolean(value):
    error = config_error({"rlhf": {"loss_terms": {"lm_jsd": {"fused": value}}}})
    assert error.paths == ("rlhf.loss_terms.lm_jsd.fused",), str(error)


def test_fused_on_a_second_instance_has_its_own_path():
    error = config_error({"rlhf": {"loss_terms": {"rkl": {"type": "lm_jsd", "beta": 1, "fused": "no"}}}})
    assert error.paths == ("rlhf.loss_terms.rkl.fused",), str(error)


def test_validate_json_and_schema_show_the_field(tmp_path, capsys):
    from kdcompose.cli import main
    from kdcompose.testing import build_tiny_pair

    teacher, _ = build_tiny_pair("qwen2_vl")
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"rlhf:\n  teacher_model: {teacher}\n  teacher_model_type: qwen2_vl\n"
        "  loss_terms:\n    lm_jsd: {fused: true}\n",
        encoding="utf-8",
    )
    assert main(["validate", str(config), "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out)["terms"] if r["name"] == "lm_jsd")
    assert row["spec"]["fused"] is True and row["needs_teacher"] is True
    assert main(["schema"]) == 0
    assert '"fused"' in capsys.readouterr().out


# ----------------------------------------------------------------------- the term on a hand-made context


def _heads(bias: bool) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    student, teacher = nn.Linear(H_S, V, bias=bias), nn.Linear(H_T, V, bias=bias)
    with torch.no_grad():
        student.weight.mul_(4)
        teacher.weight.mul_(4)
    return student, teacher


def _term(fused: bool, **spec):
    rlhf = {"loss_terms": {"lm_jsd": {"fused": fused, **spec}}}
    return build_composer(config_from(rlhf=rlhf).composition).term("lm_jsd")


@pytest.mark.parametrize(("beta", "bias"), [(0.5, False), (0.0, True), (1.0, False)])
def test_fused_term_equals_the_term_on_logits(beta, bias):
    student_head, teacher_head = _heads(bias)
    hidden = torch.randn(2, 7, H_S, requires_grad=True)
    teacher_hidden = torch.randn(2, 7, H_T)
    labels = torch.randint(0, V, (2, 7))
    labels[0, :3] = -100
    grads = []
    values = []
    for fused in (False, True):
        term = _term(fused, beta=beta, chunk_size=3)
        ctx = LossContext(labels=labels)
        if fused:
            ctx.student_hidden, ctx.teacher_hidden = hidden, teacher_hidden
            ctx.student_lm_head, ctx.teacher_lm_head = student_head, teacher_head
        else:
            ctx.student_logits, ctx.teacher_logits = (
                student_head(hidden),
                teacher_head(teacher_hidden).detach(),
            )
        value = term.compute(ctx)
        params = [hidden, student_head.weight] + ([student_head.bias] if bias else [])
        grads.append(torch.autograd.grad(value, params))
        values.append(value)
    assert values[1].item() == pytest.approx(values[0].item(), rel=1e-5, abs=1e-7)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert teacher_head.weight.grad is None


def test_fused_term_names_the_fix_for_heads_of_different_rows():
    student_head, _ = _heads(False)
    ctx = LossContext(
        labels=torch.zeros(1, 3, dtype=torch.long),
        student_hidden=torch.randn(1, 3, H_S),
        teacher_hidden=torch.randn(1, 3, H_T),
        student_lm_head=student_head,
        teacher_lm_head=nn.Linear(H_T, V + 64),
    )
    with pytest.raises(ValueError, match=r"50 rows.*114.*rlhf\.loss_terms\.lm_jsd\.fused: false"):
        _term(True).compute(ctx)


def test_fused_term_without_hidden_states_says_what_is_missing():
    with pytest.raises(ValueError, match="student_hidden / teacher_hidden"):
        _term(True).compute(LossContext(labels=torch.zeros(1, 3, dtype=torch.long)))


# ----------------------------------------------------------------------- the LM-head tap


class _TinyLM(nn.Module):
    """A causal-LM-shaped module: body, final norm, `lm_head` called once on the kept positions."""

    def __init__(self, **config) -> None:
        super().__init__()
        self.body = nn.Linear(H_S, H_S)
        self.norm = nn.LayerNorm(H_S)
        self.lm_head = nn.Linear(H_S, V, bias=False)
        self.config = SimpleNamespace(**config)
        self.head_calls = 1

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, x: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        hidden = self.norm(self.body(x))
        logits = hidden @ self.lm_head.weight.t()  # a head computed without calling the module
        for _ in range(self.head_calls):
            logits = self.lm_head(hidden[:, -logits_to_keep:, :])
        return logits


def test_tap_records_the_head_input_and_suppresses_the_logits():
    model = _TinyLM()
    x = torch.randn(2, 5, H_S)
    full = model(x, logits_to_keep=3)
    with tap_lm_head(model, hidden=True, logits=False) as tap:
        empty = model(x, logits_to_keep=3)
    assert empty.shape == (2, 0, V) and tap.logits(empty) is None
    assert tap.hidden.shape == (2, 3, H_S) and tap.head is model.lm_head
    torch.testing.assert_close(model.lm_head(tap.hidden), full)
    assert not model.lm_head._forward_pre_hooks  # removed after the block


def test_tap_can_keep_the_logits_and_is_a_no_op_without_hidden():
    model = _TinyLM()
    x = torch.randn(2, 5, H_S)
    with tap_lm_head(model, hidden=True, logits=True) as tap:
        logits = model(x)
    assert logits.shape == (2, 5, V) and tap.logits(logits) is logits
    torch.testing.assert_close(model.lm_head(tap.hidden), logits)
    with tap_lm_head(model, hidden=False, logits=True) as tap:
        model(x)
    assert tap.hidden is None and tap.head is None and not model.lm_head._forward_pre_hooks


def test_a_frozen_tap_keeps_the_weights_the_forward_used():
    """ms-swift's `offload_teacher_model` swaps the teacher's `param.data` to the CPU after its
    forward; the loss, computed afterwards, must still read what the forward used."""
    model = _TinyLM()
    used = model.lm_head.weight.detach().clone()
    with torch.no_grad(), tap_lm_head(model, hidden=True, logits=False, freeze=True) as tap:
        model(torch.randn(1, 4, H_S))
    model.lm_head.weight.data = torch.zeros_like(model.lm_head.weight)  # what the offload does, in kind
    assert tap.head is not model.lm_head and not list(tap.head.parameters())
    torch.testing.assert_close(tap.head.weight, used)
    assert tap.head.bias is None


@pytest.mark.parametrize("calls", [0, 2])
def test_tap_refuses_a_head_that_does_not_run_exactly_once(calls):
    model = _TinyLM()
    model.head_calls = calls
    with (
        pytest.raises(RuntimeError, match=f"ran {calls} times.*fused: false"),
        tap_lm_head(model, hidden=True, logits=True),
    ):
        model(torch.randn(1, 2, H_S))
    assert not model.lm_head._forward_pre_hooks


@pytest.mark.parametrize(
    "config",
    [{"final_logit_softcapping": 30.0}, {"logit_scale": 0.0625}, {"logits_scaling": 8.0}],
)
def test_models_that_transform_their_logits_are_refused(config):
    with pytest.raises(LmHeadUnsupported, match=next(iter(config))):
        lm_head_of(_TinyLM(**config))


def test_neutral_logit_settings_are_fine():
    model = _TinyLM(final_logit_softcapping=None, logit_scale=1.0, logits_scaling=1.0)
    assert lm_head_of(model) is model.lm_head


def test_a_head_that_is_not_a_plain_linear_layer_is_refused():
    model = _TinyLM()
    model.lm_head = nn.Sequential(nn.Linear(H_S, V))
    with pytest.raises(LmHeadUnsupported, match=r"Sequential, not a plain torch\.nn\.Linear"):
        lm_head_of(model)
