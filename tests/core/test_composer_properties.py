"""Property tests of the LossComposer: the total is exactly the weighted sum of the active
terms, zero-weight terms cost nothing, and each weight scales only its own term."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdcompose import LossComposer, LossContext, LossTerm, TermNeeds, TermSpec, register_term
from kdcompose.functional import feature_distance, generalized_jsd, masked_cross_entropy
from kdcompose.registry import unregister_term
from kdcompose.terms import (
    CeSpec,
    CeTerm,
    LmJsdSpec,
    LmJsdTerm,
    Tap,
    VisualKdSpec,
    VisualKdTerm,
    VisualTargetSpec,
)


class ExplodingTerm(LossTerm):
    """A term whose compute must never run: it raises. Needs the teacher, so an inactive
    instance must not make the composer ask for one."""

    @property
    def needs(self) -> TermNeeds:
        return TermNeeds(teacher_logits=True, taps=frozenset({Tap("teacher", "model.visual")}))

    def compute(self, ctx):
        raise AssertionError(f"zero-weight term {self.name} was computed")


@pytest.fixture(autouse=True, scope="module")
def _register_exploding():
    register_term("exploding_for_test")(ExplodingTerm)
    yield
    unregister_term("exploding_for_test")


ALIGNER = VisualKdTerm("visual_kd", VisualKdSpec(aligner=VisualTargetSpec())).pair("aligner")


def _context(seed: int, batch: int = 2, seq: int = 5, vocab: int = 11) -> LossContext:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[:, 0] = -100
    return LossContext(
        labels=labels,
        student_logits=torch.randn(batch, seq, vocab, generator=gen, requires_grad=True),
        teacher_logits=torch.randn(batch, seq, vocab, generator=gen),
        taps={
            ALIGNER.student: [torch.randn(6, 8, generator=gen, requires_grad=True)],
            ALIGNER.teacher: [torch.randn(6, 8, generator=gen)],
        },
        has_images=True,
    )


def _composer(w_jsd: float, w_ce: float, w_vis: float, w_explode: float = 0.0) -> LossComposer:
    return LossComposer(
        [
            LmJsdTerm("lm_jsd", LmJsdSpec(weight=w_jsd, beta=0.3, temperature=1.0)),
            CeTerm("ce", CeSpec(weight=w_ce)),
            VisualKdTerm("visual_kd", VisualKdSpec(weight=w_vis, aligner=VisualTargetSpec(weight=0.5))),
            ExplodingTerm("boom", TermSpec(weight=w_explode)),
        ]
    )


weights = st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=10.0))


@given(w_jsd=weights, w_ce=weights, w_vis=weights, seed=st.integers(0, 2**16))
def test_total_is_the_weighted_sum_of_independently_computed_active_terms(w_jsd, w_ce, w_vis, seed):
    ctx = _context(seed)
    out = _composer(w_jsd, w_ce, w_vis)(ctx)
    expected = torch.zeros(())
    metrics = out.metrics()
    if w_jsd > 0:
        raw = generalized_jsd(ctx.student_logits, ctx.teacher_logits, ctx.labels, beta=0.3)
        expected = expected + w_jsd * raw
        torch.testing.assert_close(metrics["llm_kd_loss"], (w_jsd * raw).detach())
    if w_ce > 0:
        raw = masked_cross_entropy(ctx.student_logits, ctx.labels)
        expected = expected + w_ce * raw
        torch.testing.assert_close(metrics["sft_loss"], (w_ce * raw).detach())
    if w_vis > 0:
        raw = 0.5 * feature_distance(ctx.taps[ALIGNER.student][0], ctx.taps[ALIGNER.teacher][0])
        expected = expected + w_vis * raw
        torch.testing.assert_close(metrics["vision_kd_loss"], (w_vis * raw).detach())
        torch.testing.assert_close(metrics["vision_kd_loss_aligner"], (w_vis * raw).detach())
    torch.testing.assert_close(out.total.detach(), expected.detach())
    # every metric is a weighted active term: their sum (without the per-target parts) is the total
    summed = sum(v for k, v in metrics.items() if not k.startswith("vision_kd_loss_"))
    torch.testing.assert_close(torch.as_tensor(summed, dtype=torch.float32), out.total.detach())
    expected_keys = {
        k for k, w in (("llm_kd_loss", w_jsd), ("sft_loss", w_ce), ("vision_kd_loss", w_vis)) if w > 0
    }
    assert {k for k in metrics if not k.startswith("vision_kd_loss_")} == expected_keys


@given(w_jsd=weights, w_ce=weights, w_vis=weights)
def test_zero_weight_term_is_never_computed_and_never_needed(w_jsd, w_ce, w_vis):
    composer = _composer(w_jsd, w_ce, w_vis, w_explode=0.0)
    if not composer.active_terms:
        return
    out = composer(_context(0))  # ExplodingTerm.compute would raise
    assert "boom_loss" not in out.metrics()
    assert composer.needs.teacher_logits == (w_jsd > 0)
    assert composer.needs.teacher == (w_jsd > 0 or w_vis > 0)
    assert not any(tap.path == "model.visual" for tap in composer.needs.all_taps)


def test_active_exploding_term_is_computed():
    with pytest.raises(AssertionError, match="was computed"):
        _composer(1.0, 0.0, 0.0, w_explode=1.0)(_context(0))


@given(
    base=st.tuples(weights, weights, weights),
    which=st.integers(0, 2),
    factor=st.floats(min_value=0.01, max_value=100.0),
    seed=st.integers(0, 1000),
)
def test_scaling_one_weight_scales_only_that_term(base, which, factor, seed):
    scaled = list(base)
    scaled[which] = base[which] * factor
    ctx = _context(seed)
    before = _composer(*base)(ctx).metrics()
    after = _composer(*scaled)(ctx).metrics()
    key = ("llm_kd_loss", "sft_loss", "vision_kd_loss")[which]
    assert before.keys() == after.keys()
    for k in before:
        if k == key or (key == "vision_kd_loss" and k.startswith("vision_kd_loss_")):
            torch.testing.assert_close(after[k], before[k] * factor, rtol=1e-5, atol=1e-7)
        else:
            torch.testing.assert_close(after[k], before[k])


def test_gradient_of_total_matches_weighted_gradients():
    ctx = _context(3)
    out = _composer(0.7, 0.3, 0.0)(ctx)
    (grad,) = torch.autograd.grad(out.total, ctx.student_logits)
    ctx2 = _context(3)
    ref = 0.7 * generalized_jsd(ctx2.student_logits, ctx2.teacher_logits, ctx2.labels, beta=0.3)
    ref = ref + 0.3 * masked_cross_entropy(ctx2.student_logits, ctx2.labels)
    (ref_grad,) = torch.autograd.grad(ref, ctx2.student_logits)
    torch.testing.assert_close(grad, ref_grad)


def test_ce_skipped_on_student_generated_batches_unless_asked():
    ctx = _context(1)
    ctx.student_generated = True
    out = _composer(1.0, 0.5, 0.0)(ctx)
    assert "sft_loss" not in out.metrics()
    on_all = LossComposer([CeTerm("ce", CeSpec(weight=0.5, on_student_generated=True))])
    assert "sft_loss" in on_all(ctx).metrics()


def test_visual_term_skips_batches_without_images_and_total_stays_connected():
    ctx = _context(2)
    ctx.has_images = False
    composer = LossComposer([VisualKdTerm("visual_kd", VisualKdSpec(aligner=VisualTargetSpec()))])
    out = composer(ctx)
    assert out.metrics() == {}
    assert out.total.item() == 0.0
    out.total.backward()  # graph-connected zero: DDP would otherwise hang on this rank


def test_formula_lists_active_terms_with_weights():
    formula = _composer(0.5, 0.3, 0.0).formula()
    assert formula == "Loss = 0.5*lm_jsd(beta=0.3) + 0.3*ce"
    assert math.isclose(_composer(2, 0, 0).active_terms[0].weight, 2.0)


def test_duplicate_names_and_metric_clashes_are_rejected():
    with pytest.raises(ValueError, match="duplicate term names"):
        LossComposer([CeTerm("ce", CeSpec()), CeTerm("ce", CeSpec())])
    with pytest.raises(ValueError, match="metric keys"):
        LossComposer([CeTerm("ce", CeSpec()), LmJsdTerm("sft", LmJsdSpec())])
