"""The `lm_kd` term: YAML validation with dotted paths, names, metrics and what it computes;
`lm_jsd` staying what it was (it is `lm_kd` with `jsd` under its own keys)."""

from __future__ import annotations

import pytest
import torch
from helpers import config_error, config_from
from torch import nn

from kdcompose import LossContext, build_composer, parse_config
from kdcompose.functional import (
    TokenSelection,
    divergence_loss,
    generalized_jsd,
    teacher_topk,
    topk_divergence_loss,
)
from kdcompose.terms import LmKdSpec

IGNORE = -100


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _terms(**terms):
    return config_from(rlhf={"llm_kd_weight": 0, "loss_terms": terms}).composition


def _issues(**terms) -> dict[str, str]:
    error = config_error({"rlhf": {"loss_terms": terms}})
    return {issue.path: issue.message for issue in error.issues}


KD = "rlhf.loss_terms.kd"


@pytest.mark.parametrize(
    ("spec", "path", "words"),
    [
        ({}, f"{KD}.divergence", "required"),
        (
            {"divergence": "kl"},
            f"{KD}.divergence",
            "unknown divergence 'kl'; registered divergences: ab, akl",
        ),
        ({"divergence": {"alpha": 0.1}}, f"{KD}.divergence.kind", "needs `kind: NAME`"),
        ({"divergence": {"kind": "skew_rkl", "alpha": 1.0}}, f"{KD}.divergence", "alpha must be < 1"),
        ({"divergence": {"kind": "skew_rkl", "aplha": 0.2}}, f"{KD}.divergence.aplha", "allowed: alpha"),
        ({"divergence": {"kind": "ab", "beta": "0.5"}}, f"{KD}.divergence.beta", "without quotes"),
        ({"divergence": {"kind": "ab", "alpha": -0.1}}, f"{KD}.divergence.alpha", ">= 0"),
        ({"divergence": {"kind": "jsd", "beta": True}}, f"{KD}.divergence.beta", "bool"),
        ({"divergence": {"kind": "akl", "mu": 2}}, f"{KD}.divergence.mu", "[0, 1]"),
        ({"divergence": "rkl", "topk": 4, "missing_mass": "zero"}, f"{KD}.missing_mass", "renorm or tail"),
        ({"divergence": "akl", "topk": 4, "missing_mass": "zero"}, f"{KD}.missing_mass", "renorm or tail"),
        ({"divergence": "fkl", "missing_mass": "tail"}, f"{KD}.missing_mass", "set `topk: K`"),
        (
            {"divergence": "fkl", "tokens": {"by": "entropy", "keep": 0.5}},
            f"{KD}.tokens.by",
            "teacher_entropy",
        ),
        (
            {"divergence": "fkl", "tokens": {"by": "divergence", "keep": 0}},
            f"{KD}.tokens",
            "keep must be > 0",
        ),
        ({"divergence": "fkl", "tokens": {"by": "divergence"}}, f"{KD}.tokens.keep", "required"),
        ({"divergence": "fkl", "temperature": 0}, f"{KD}.temperature", "> 0"),
        ({"divergence": "akl", "compile": True}, f"{KD}.compile", "cannot be compiled"),
        ({"divergence": "ab", "compile": True, "topk": 8}, f"{KD}.compile", "remove `compile` or `topk`"),
        ({"divergence": "ab", "compile": "yes"}, f"{KD}.compile", "true or false"),
    ],
)
def test_bad_settings_name_the_dotted_path(spec, path, words):
    issues = _issues(kd={"type": "lm_kd", **spec})
    assert path in issues, issues
    assert words in issues[path]


def test_every_problem_of_a_divergence_block_is_reported_at_once():
    issues = _issues(kd={"type": "lm_kd", "divergence": {"kind": "skew_fkl", "alpha": 2, "bogus": 1}})
    assert set(issues) == {f"{KD}.divergence.alpha", f"{KD}.divergence.bogus"}


def test_lm_jsd_keeps_its_refusal_of_zero_with_a_nonzero_beta():
    issues = _issues(lm_jsd={"topk": 4, "missing_mass": "zero", "beta": 0.5})
    assert "set `beta: 0` (got 0.5)" in issues["rlhf.loss_terms.lm_jsd.beta"]
    assert config_from(rlhf={"loss_terms": {"lm_jsd": {"topk": 4, "missing_mass": "zero", "beta": 0}}})


def test_names_metrics_and_formula():
    composition = _terms(
        lm_kd={"divergence": {"kind": "skew_rkl", "alpha": 0.1}, "weight": 0.5},
        kd_ab={
            "type": "lm_kd",
            "divergence": "ab",
            "fused": True,
            "tokens": {"by": "divergence", "keep": 0.5},
        },
        kd_tvd={"type": "lm_kd", "divergence": "tvd", "topk": 8, "missing_mass": "zero", "temperature": 2},
    )
    composer = build_composer(composition)
    assert composer.formula() == (
        "Loss = 0.5*lm_kd(skew_rkl a=0.1, T=1)"
        " + 1*kd_ab(ab a=0.2 b=0.7, T=1, fused, tokens high divergence 0.5)"
        " + 1*kd_tvd(tvd, T=2, top8 zero)"
    )
    assert [t.metric_key for t in composer.active_terms] == ["lm_kd_loss", "kd_ab_loss", "kd_tvd_loss"]
    # the explicit block resolves back to the same terms (divergences written as YAML)
    block = composition.to_loss_terms()
    assert block["lm_kd"]["divergence"] == "skew_rkl" and block["kd_ab"]["divergence"] == "ab"
    again = config_from(rlhf={"loss_terms": block}).composition
    assert [t.spec for t in again.terms] == [t.spec for t in composition.terms]
    # lm_kd reads no ms-swift knob: rlhf.beta / rlhf.temperature feed lm_jsd only
    stock = config_from(
        rlhf={"beta": 0.2, "temperature": 0.7, "loss_terms": {"kd": {"type": "lm_kd", "divergence": "jsd"}}}
    )
    assert (
        build_composer(stock.composition).formula()
        == "Loss = 1*lm_jsd(beta=0.2, T=0.7) + 1*kd(jsd beta=0.5, T=1)"
    )


def test_the_json_schema_describes_the_divergence_key():
    term = LmKdSpec.model_json_schema()
    assert "divergence" in term["required"]
    assert {"type": "string"} in term["properties"]["divergence"]["anyOf"]


# --------------------------------------------------------------------------------------------
# What the term computes
# --------------------------------------------------------------------------------------------


def _batch(seed=0, vocab=12):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 5, vocab, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 5, vocab, generator=gen)
    labels = torch.tensor([[IGNORE, 1, 2, 3, 4], [5, 6, IGNORE, IGNORE, 7]])
    return student, teacher, labels


def test_lm_kd_logs_the_divergence_the_kept_fraction_and_the_topk_mass():
    student, teacher, labels = _batch()
    composer = build_composer(
        _terms(
            kd_rkl={"type": "lm_kd", "divergence": "rkl", "temperature": 1.5},
            kd_sel={"type": "lm_kd", "divergence": "fkl", "tokens": {"by": "teacher_entropy", "keep": 0.5}},
            kd_top={
                "type": "lm_kd",
                "divergence": {"kind": "akl", "mu": 0.3},
                "topk": 4,
                "missing_mass": "tail",
            },
        )
    )
    out = composer(LossContext(labels=labels, student_logits=student, teacher_logits=teacher))
    metrics = {k: v.item() for k, v in out.metrics().items()}
    assert metrics["kd_rkl_loss"] == pytest.approx(
        divergence_loss(student, teacher, labels, divergence="rkl", temperature=1.5).item(), rel=1e-6
    )
    selected = divergence_loss(
        student, teacher, labels, divergence="fkl", tokens=TokenSelection("teacher_entropy", 0.5)
    )
    assert metrics["kd_sel_loss"] == pytest.approx(selected.item(), rel=1e-6)
    assert metrics["kd_sel_loss_kept_frac"] == pytest.approx(4 / 7)  # ceil(0.5 * 7) of 7 labelled tokens
    lp, ids = teacher_topk(teacher, 4, temperature=1.0)
    expected = topk_divergence_loss(
        student, lp, ids, labels, divergence={"kind": "akl", "mu": 0.3}, missing_mass="tail"
    )
    assert metrics["kd_top_loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert 0 < metrics["kd_top_loss_topk_mass"] < 1
    out.total.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_fused_lm_kd_equals_the_logits_path():
    torch.manual_seed(3)
    s_head, t_head = nn.Linear(6, 12), nn.Linear(5, 12)
    h_s, h_t = torch.randn(2, 5, 6), torch.randn(2, 5, 5)
    _, _, labels = _batch()
    spec = {
        "type": "lm_kd",
        "divergence": {"kind": "skew_fkl", "alpha": 0.2},
        "tokens": {"by": "divergence", "keep": 0.6},
    }
    fused = build_composer(_terms(kd={**spec, "fused": True}))
    plain = build_composer(_terms(kd=spec))
    assert fused.needs.student_hidden and not fused.needs.student_logits
    out_f = fused(
        LossContext(
            labels=labels,
            student_hidden=h_s,
            teacher_hidden=h_t,
            student_lm_head=s_head,
            teacher_lm_head=t_head,
        )
    )
    out_f.total.backward()
    grad_fused = s_head.weight.grad.clone()
    s_head.zero_grad()
    out_p = plain(LossContext(labels=labels, student_logits=s_head(h_s), teacher_logits=t_head(h_t).detach()))
    out_p.total.backward()
    assert out_f.total.item() == pytest.approx(out_p.total.item(), rel=1e-5)
    assert out_f.metrics()["kd_loss_kept_frac"].item() == pytest.approx(5 / 7)
    assert torch.allclose(grad_fused, s_head.weight.grad, rtol=1e-4, atol=1e-6)


def test_lm_jsd_is_unchanged_stock_ms_swift_gkd():
    config = parse_config({"rlhf": {}})
    composer = build_composer(config.composition)
    assert composer.formula() == "Loss = 1*lm_jsd(beta=0.5, T=0.9)"
    student, teacher, labels = _batch(7)
    out = composer(LossContext(labels=labels, student_logits=student, teacher_logits=teacher))
    expected = generalized_jsd(student, teacher, labels, beta=0.5, temperature=0.9)
    assert list(out.metrics()) == ["llm_kd_loss"]
    assert out.metrics()["llm_kd_loss"].item() == pytest.approx(expected.item(), rel=1e-7)
