"""Tests of kdcompose.functional.topk_jsd: top-K teacher generalized JSD (renorm / tail / zero).

Oracles, none of which shares the chunked code: the full-vocabulary ``generalized_jsd`` (K = V),
an independent float64 NumPy KL for ``zero``, ms-swift's own ``gkd_loss`` for ``renorm``, and
the float64 plain-autograd ``topk_generalized_jsd_reference`` for every gradient.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kdcompose.functional import (
    fused_linear_topk_generalized_jsd,
    generalized_jsd,
    teacher_topk,
    topk_generalized_jsd,
    topk_generalized_jsd_reference,
    topk_generalized_jsd_sum,
    topk_mass,
)

IGNORE = -100
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
MODES = ("renorm", "tail", "zero")


def randn(gen, *shape, scale=1.0, dtype=torch.float64):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def teacher_for(mode: str, teacher_logits: torch.Tensor, k: int, temperature: float):
    """What a local teacher hands over: T = 1 values for renorm, values at T for tail/zero."""
    return teacher_topk(teacher_logits, k, temperature=1.0 if mode == "renorm" else temperature)


def random_labels(gen, leading, p_keep=0.7):
    keep = torch.rand(leading, generator=gen) < p_keep
    return torch.where(keep, 1, IGNORE)


def betas_for(mode):
    return (0.0,) if mode == "zero" else BETAS


def value_and_grad(fn, logits, *args, **kwargs):
    leaf = logits.detach().clone().requires_grad_(True)
    value = fn(leaf, *args, **kwargs)
    (grad,) = torch.autograd.grad(value, leaf)
    return value, grad


# --------------------------------------------------------------------------------------------
# K = V: the top-K loss is the full generalized JSD
# --------------------------------------------------------------------------------------------


@settings(deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    leading=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple),
    vocab=st.integers(2, 12),
    beta=st.one_of(st.sampled_from(BETAS), st.floats(0.0, 1.0)),
    temperature=st.sampled_from([0.5, 1.0, 2.5]),
    mode=st.sampled_from(["renorm", "tail"]),
    masked=st.booleans(),
)
def test_full_k_equals_generalized_jsd(seed, leading, vocab, beta, temperature, mode, masked):
    gen = torch.Generator().manual_seed(seed)
    student, teacher = randn(gen, *leading, vocab, scale=2.0), randn(gen, *leading, vocab, scale=2.0)
    labels = random_labels(gen, leading) if masked else None
    lp, ids = teacher_for(mode, teacher, vocab, temperature)
    kwargs = {"beta": beta, "temperature": temperature}
    ours = value_and_grad(topk_generalized_jsd, student, lp, ids, labels, missing_mass=mode, **kwargs)
    full = value_and_grad(generalized_jsd, student, teacher, labels, **kwargs)
    torch.testing.assert_close(ours[0], full[0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ours[1], full[1], rtol=1e-8, atol=1e-11)


def test_renorm_accepts_raw_teacher_logits_and_shifted_logprobs():
    """The per-row constant cancels: raw top-K logits, T=1 log-probs, shifted values agree."""
    gen = torch.Generator().manual_seed(0)
    student, teacher = randn(gen, 3, 4, 20, scale=2.0), randn(gen, 3, 4, 20, scale=2.0)
    raw, ids = torch.topk(teacher, 6, dim=-1)
    lp, ids2 = teacher_topk(teacher, 6)
    assert torch.equal(ids, ids2)
    a = topk_generalized_jsd(student, raw, ids, beta=0.3, temperature=1.7)
    b = topk_generalized_jsd(student, lp, ids, beta=0.3, temperature=1.7)
    c = topk_generalized_jsd(student, lp + 5.0, ids, beta=0.3, temperature=1.7)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# zero: KL(truncated teacher || full student), independent float64 NumPy oracle
# --------------------------------------------------------------------------------------------


def np_zero_kl(student, lp, ids, labels, temperature):
    z = student.numpy().reshape(-1, student.shape[-1]) / temperature
    log_p = z - z.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    lp = lp.numpy().reshape(-1, lp.shape[-1])
    ids = ids.numpy().reshape(-1, ids.shape[-1])
    keep = np.ones(len(z), bool) if labels is None else labels.numpy().reshape(-1) != IGNORE
    total, count = 0.0, 0
    for row in range(len(z)):
        if not keep[row]:
            continue
        log_q = lp[row] - np.log(np.exp(lp[row]).sum())
        total += float((np.exp(log_q) * (log_q - log_p[row, ids[row]])).sum())
        count += 1
    return total / max(count, 1)


@settings(deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(3, 30),
    k_frac=st.floats(0.05, 1.0),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    masked=st.booleans(),
)
def test_zero_equals_truncated_teacher_kl(seed, vocab, k_frac, temperature, masked):
    gen = torch.Generator().manual_seed(seed)
    k = max(1, min(vocab, round(k_frac * vocab)))
    student, teacher = randn(gen, 2, 3, vocab, scale=2.0), randn(gen, 2, 3, vocab, scale=2.0)
    labels = random_labels(gen, (2, 3)) if masked else None
    lp, ids = teacher_topk(teacher, k, temperature=temperature)
    ours = topk_generalized_jsd(
        student, lp, ids, labels, beta=0.0, temperature=temperature, missing_mass="zero"
    )
    expected = np_zero_kl(student, lp, ids, labels, temperature)
    assert math.isclose(ours.item(), expected, rel_tol=1e-10, abs_tol=1e-12)
    assert ours.item() >= -1e-12


def test_zero_requires_beta_zero():
    gen = torch.Generator().manual_seed(1)
    student, lp, ids = randn(gen, 4, 9), randn(gen, 4, 3), torch.zeros(4, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"beta must be 0.*beta=0.5.*Set beta=0"):
        topk_generalized_jsd(student, lp, ids, beta=0.5, missing_mass="zero")
    with pytest.raises(ValueError, match="beta"):
        fused_linear_topk_generalized_jsd(
            randn(gen, 4, 5), randn(gen, 9, 5), teacher_topk_logprobs=lp, teacher_topk_ids=ids,
            beta=1.0, missing_mass="zero",
        )  # fmt: skip


def test_tail_differs_from_renorm_when_mass_is_missing():
    """A sanity check that the modes are not accidentally the same objective."""
    gen = torch.Generator().manual_seed(2)
    student, teacher = randn(gen, 5, 40, scale=0.5), randn(gen, 5, 40, scale=0.5)
    lp, ids = teacher_topk(teacher, 4)
    values = {m: topk_generalized_jsd(student, lp, ids, beta=0.0, missing_mass=m).item() for m in MODES}
    assert len({round(v, 6) for v in values.values()}) == 3
    assert topk_mass(lp).item() < 0.5


# --------------------------------------------------------------------------------------------
# renorm == ms-swift's gkd_loss / num_valid (ms-swift's own function is the oracle)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("teacher_form", ["logprobs", "raw_logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_renorm_equals_ms_swift_gkd_loss(beta, temperature, teacher_form, dtype):
    gkd = pytest.importorskip("swift.rlhf_trainers.gkd_loss")
    gen = torch.Generator().manual_seed(3)
    student = randn(gen, 2, 7, 50, scale=3.0, dtype=dtype)
    teacher = randn(gen, 2, 7, 50, scale=3.0, dtype=dtype)
    labels = torch.tensor([[IGNORE, 5, 6, IGNORE, 7, 8, 9], [1, 2, IGNORE, 3, 4, 5, IGNORE]])
    if teacher_form == "raw_logits":  # ms-swift's local-teacher path: top-K of raw logits
        out = gkd.TeacherOutput(full_logits=teacher, labels=labels).to_topk(8)
    else:  # a server / cache: log-probs at T = 1
        lp, ids = teacher_topk(teacher, 8)
        out = gkd.TeacherOutput(topk_logprobs=lp.to(dtype), topk_indices=ids, labels=labels)
    lp, ids = out.topk_logprobs.clone(), out.topk_indices.clone()
    lp[1, 1] = float("-inf")  # an uncovered position: dropped from sum and count by both
    out.topk_logprobs = lp.clone()

    s_theirs = student.clone().requires_grad_(True)
    total, num_valid = gkd.gkd_loss(s_theirs, out, labels, beta, temperature)
    theirs = total / num_valid
    theirs.backward()
    ours, grad = value_and_grad(
        topk_generalized_jsd, student, lp, ids, labels, beta=beta, temperature=temperature
    )
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(ours, theirs.to(ours.dtype), **tol)
    torch.testing.assert_close(grad, s_theirs.grad, **tol)
    _, count = topk_generalized_jsd_sum(student, lp, ids, labels, beta=beta, temperature=temperature)
    assert count.item() == int(num_valid) == 9


# --------------------------------------------------------------------------------------------
# Gradients and values vs the float64 autograd reference; chunking; padding
# --------------------------------------------------------------------------------------------


def pad_with_absent(lp, ids, gen, n_pad):
    """Append ``n_pad`` absent entries (-inf, arbitrary and duplicated ids) and shuffle columns."""
    lead, k = lp.shape[:-1], lp.shape[-1]
    pad_lp = torch.full((*lead, n_pad), float("-inf"), dtype=lp.dtype)
    pad_ids = torch.randint(0, 3, (*lead, n_pad), generator=gen)  # ids 0-2: often also a top-K id
    lp2, ids2 = torch.cat([lp, pad_lp], -1), torch.cat([ids, pad_ids], -1)
    perm = torch.randperm(k + n_pad, generator=gen)
    return lp2[..., perm], ids2[..., perm]


@settings(deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    leading=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple),
    vocab=st.integers(2, 16),
    k_frac=st.floats(0.05, 1.0),
    mode=st.sampled_from(MODES),
    beta=st.one_of(st.sampled_from(BETAS), st.floats(0.0, 1.0)),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    chunk=st.one_of(st.none(), st.integers(1, 5)),
    masked=st.booleans(),
    n_pad=st.integers(0, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
@example(  # once failed against an oracle fed the unrounded float64 inputs (see below)
    seed=0,
    leading=(1,),
    vocab=15,
    k_frac=0.5,
    mode="tail",
    beta=1.0,
    temperature=0.5,
    chunk=None,
    masked=False,
    n_pad=0,
    dtype=torch.float32,
)
def test_property_matches_float64_reference(
    seed, leading, vocab, k_frac, mode, beta, temperature, chunk, masked, n_pad, dtype
):
    if mode == "zero":
        beta = 0.0
    gen = torch.Generator().manual_seed(seed)
    k = max(1, min(vocab, round(k_frac * vocab)))
    student = randn(gen, *leading, vocab, scale=2.0)
    lp, ids = teacher_for(mode, randn(gen, *leading, vocab, scale=2.0), k, temperature)
    lp, ids = pad_with_absent(lp, ids, gen, n_pad)
    labels = random_labels(gen, leading) if masked else None
    kwargs = {"beta": beta, "temperature": temperature, "missing_mass": mode}
    student, lp = student.to(dtype), lp.to(dtype)
    # The oracle sees the same (rounded) inputs in float64: a float32 teacher log-prob already
    # carries eps-relative error, which `tail` amplifies by 1 / tail mass; that is the input's
    # rounding, not the kernel's (seen: 7e-6 on a 0.19 gradient with the float64 inputs).
    ref_v, ref_g = value_and_grad(
        topk_generalized_jsd_reference, student.double(), lp.double(), ids, labels, **kwargs
    )
    v, g = value_and_grad(topk_generalized_jsd, student, lp, ids, labels, chunk_size=chunk, **kwargs)
    assert v.dtype == dtype and g.dtype == dtype
    assert torch.isfinite(v) and torch.isfinite(g).all()
    tol = {"rtol": 2e-5, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-11}
    torch.testing.assert_close(v, ref_v.to(dtype), **tol)
    torch.testing.assert_close(g, ref_g.to(dtype), **tol)
    if labels is not None:
        assert torch.all(g[labels == IGNORE] == 0)


@pytest.mark.parametrize("mode", MODES)
def test_absent_entries_change_nothing(mode):
    """-inf padding (duplicated, overlapping ids) equals the unpadded top-K, with no NaN."""
    gen = torch.Generator().manual_seed(4)
    student = randn(gen, 3, 5, 17, scale=2.0, dtype=torch.float32)
    lp, ids = teacher_for(mode, randn(gen, 3, 5, 17, scale=2.0), 5, 1.5)
    lp = lp.float()
    lp_pad, ids_pad = pad_with_absent(lp, ids, gen, 4)
    beta = 0.0 if mode == "zero" else 0.5
    kwargs = {"beta": beta, "temperature": 1.5, "missing_mass": mode}
    v1, g1 = value_and_grad(topk_generalized_jsd, student, lp, ids, **kwargs)
    v2, g2 = value_and_grad(topk_generalized_jsd, student, lp_pad, ids_pad, **kwargs)
    torch.testing.assert_close(v1, v2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-8)
    # Absent entries may even carry ids outside the vocabulary.
    ids_bad = torch.where(torch.isinf(lp_pad), torch.full_like(ids_pad, -1), ids_pad)
    v3 = topk_generalized_jsd(student, lp_pad, ids_bad, **kwargs)
    torch.testing.assert_close(v1, v3, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_uncovered_positions_are_not_counted(mode):
    gen = torch.Generator().manual_seed(5)
    student = randn(gen, 6, 11)
    lp, ids = teacher_for(mode, randn(gen, 6, 11), 3, 1.0)
    lp[[1, 4]] = float("-inf")
    beta = 0.0 if mode == "zero" else 0.5
    keep = torch.tensor([0, 2, 3, 5])
    total, count = topk_generalized_jsd_sum(student, lp, ids, beta=beta, missing_mass=mode)
    assert count.item() == 4
    expected = topk_generalized_jsd(student[keep], lp[keep], ids[keep], beta=beta, missing_mass=mode)
    torch.testing.assert_close(total / count, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        topk_generalized_jsd(student, lp, ids, beta=beta, missing_mass=mode), expected, rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize("mode", MODES)
def test_chunk_size_invariance(mode):
    gen = torch.Generator().manual_seed(6)
    student = randn(gen, 4, 9, 33, scale=2.0, dtype=torch.float32)
    lp, ids = teacher_for(mode, randn(gen, 4, 9, 33, scale=2.0), 6, 2.0)
    labels = random_labels(gen, (4, 9))
    beta = 0.0 if mode == "zero" else 0.7
    results = [
        value_and_grad(
            topk_generalized_jsd, student, lp.float(), ids, labels,
            beta=beta, temperature=2.0, missing_mass=mode, chunk_size=chunk,
        )
        for chunk in (None, 1, 2, 7, 1000)
    ]  # fmt: skip
    for v, g in results[1:]:
        torch.testing.assert_close(v, results[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g, results[0][1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_finite_fp32(mode, dtype):
    gen = torch.Generator().manual_seed(7)
    student = randn(gen, 2, 8, 64, scale=4.0, dtype=dtype)
    lp, ids = teacher_for(mode, randn(gen, 2, 8, 64, scale=4.0), 10, 1.0)
    beta = 0.0 if mode == "zero" else 0.5
    v, g = value_and_grad(topk_generalized_jsd, student, lp.to(dtype), ids, beta=beta, missing_mass=mode)
    assert v.dtype == torch.float32 and g.dtype == dtype
    assert torch.isfinite(v) and torch.isfinite(g).all() and v.item() >= 0
    ref = topk_generalized_jsd_reference(student, lp.to(dtype), ids, beta=beta, missing_mass=mode)
    assert math.isclose(v.item(), ref.item(), rel_tol=1e-4, abs_tol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_extreme_logits_give_no_nan(mode):
    """Student sure of one token (tail mass underflows), teacher covering almost everything."""
    student = torch.full((3, 20), -60.0)
    student[:, 0] = 60.0
    teacher = torch.full((3, 20), -1.0e4)
    teacher[:, :4] = torch.tensor([5.0, 4.0, 3.0, 2.0])
    lp, ids = teacher_topk(teacher, 4)
    beta = 0.0 if mode == "zero" else 0.5
    for b in (beta,) if mode == "zero" else (0.0, 0.5, 1.0):
        v, g = value_and_grad(topk_generalized_jsd, student, lp, ids, beta=b, missing_mass=mode)
        assert torch.isfinite(v) and torch.isfinite(g).all(), (mode, b)


@pytest.mark.parametrize("mode", MODES)
def test_no_valid_position_gives_connected_zero(mode):
    gen = torch.Generator().manual_seed(8)
    student = randn(gen, 2, 3, 7).requires_grad_(True)
    lp, ids = teacher_topk(randn(gen, 2, 3, 7), 2)
    beta = 0.0 if mode == "zero" else 0.5
    for labels, lp_in in ((torch.full((2, 3), IGNORE), lp), (None, torch.full_like(lp, float("-inf")))):
        value = topk_generalized_jsd(student, lp_in, ids, labels, beta=beta, missing_mass=mode)
        assert value.item() == 0.0
        (grad,) = torch.autograd.grad(value, student)
        assert torch.all(grad == 0)
        total, count = topk_generalized_jsd_sum(student, lp_in, ids, labels, beta=beta, missing_mass=mode)
        assert total.item() == 0.0 and count.item() == 0


def test_teacher_gets_no_gradient_and_grad_output_scales():
    gen = torch.Generator().manual_seed(9)
    student = randn(gen, 5, 12).requires_grad_(True)
    lp, ids = teacher_topk(randn(gen, 5, 12), 4)
    lp = lp.clone().requires_grad_(True)
    for mode in ("renorm", "tail"):
        value = topk_generalized_jsd(student, lp, ids, missing_mass=mode)
        g_s, g_t = torch.autograd.grad(3.0 * value, [student, lp], allow_unused=True)
        assert g_t is None
        _, ref = value_and_grad(topk_generalized_jsd_reference, student, lp.detach(), ids, missing_mass=mode)
        torch.testing.assert_close(g_s, 3.0 * ref, rtol=1e-10, atol=1e-12)


def test_non_contiguous_logits_and_upstream_graph():
    gen = torch.Generator().manual_seed(10)
    base = randn(gen, 2, 6, 13).requires_grad_(True)
    lp, ids = teacher_topk(randn(gen, 2, 5, 13), 3)
    labels = random_labels(gen, (2, 5))
    for mode in ("renorm", "tail"):
        value = topk_generalized_jsd(base[:, :-1] * 2.0, lp, ids, labels, missing_mass=mode, chunk_size=2)
        (g,) = torch.autograd.grad(value, base)
        ref = topk_generalized_jsd_reference(base[:, :-1] * 2.0, lp, ids, labels, missing_mass=mode)
        (g_ref,) = torch.autograd.grad(ref, base)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_bad_inputs_raise_clear_errors():
    gen = torch.Generator().manual_seed(11)
    student, lp = randn(gen, 4, 9), randn(gen, 4, 3)
    ids = torch.zeros(4, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="missing_mass must be one of"):
        topk_generalized_jsd(student, lp, ids, missing_mass="drop")
    with pytest.raises(ValueError, match="integer tensor"):
        topk_generalized_jsd(student, lp, ids.float())
    with pytest.raises(ValueError, match="same shape"):
        topk_generalized_jsd(student, lp, ids[:, :2])
    with pytest.raises(ValueError, match="leading shape"):
        topk_generalized_jsd(student, lp[:3], ids[:3])
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        topk_generalized_jsd(student, lp, ids + 9)
    with pytest.raises(ValueError, match="k must be in"):
        teacher_topk(student, 10)


def test_backward_twice_raises():
    gen = torch.Generator().manual_seed(12)
    student = randn(gen, 3, 8).requires_grad_(True)
    lp, ids = teacher_topk(randn(gen, 3, 8), 2)
    value = topk_generalized_jsd(student, lp, ids)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        value.backward()


# --------------------------------------------------------------------------------------------
# teacher_topk and topk_mass
# --------------------------------------------------------------------------------------------


def test_teacher_topk_and_topk_mass():
    gen = torch.Generator().manual_seed(13)
    logits = randn(gen, 2, 3, 30, scale=2.0, dtype=torch.bfloat16)
    lp, ids = teacher_topk(logits, 5, temperature=2.0)
    assert lp.dtype == torch.float32 and ids.dtype == torch.int64 and lp.shape == (2, 3, 5)
    full = torch.log_softmax(logits.float() / 2.0, -1)
    expected_lp, expected_ids = full.topk(5, -1)
    torch.testing.assert_close(lp, expected_lp)
    assert torch.equal(ids, expected_ids)
    for chunk in (1, 4):
        lp_c, ids_c = teacher_topk(logits, 5, temperature=2.0, chunk_size=chunk)
        assert torch.equal(lp_c, lp) and torch.equal(ids_c, ids)
    labels = torch.tensor([[1, IGNORE, 1], [IGNORE, IGNORE, 1]])
    mass = topk_mass(lp, labels)
    expected = expected_lp.exp().sum(-1)[labels != IGNORE].mean()
    assert mass.dtype == torch.float32 and mass.dim() == 0 and not mass.requires_grad
    torch.testing.assert_close(mass, expected)
    assert 0 < mass.item() < 1
    assert topk_mass(teacher_topk(logits, 30)[0]).item() == pytest.approx(1.0, abs=1e-5)
    assert topk_mass(lp, torch.full((2, 3), IGNORE)).item() == 0.0


# --------------------------------------------------------------------------------------------
# Fused == unfused
# --------------------------------------------------------------------------------------------


def make_linear_case(seed, leading=(2, 5), h_s=6, h_t=4, vocab=13, bias=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return {
        "student_hidden": randn(gen, *leading, h_s, dtype=dtype),
        "student_weight": randn(gen, vocab, h_s, scale=0.9, dtype=dtype),
        "student_bias": randn(gen, vocab, scale=0.5, dtype=dtype) if bias else None,
        "teacher_hidden": randn(gen, *leading, h_t, dtype=dtype),
        "teacher_weight": randn(gen, vocab, h_t, scale=0.9, dtype=dtype),
        "teacher_bias": randn(gen, vocab, scale=0.5, dtype=dtype) if bias else None,
    }


def _student_leaves(case):
    names = [n for n in ("student_hidden", "student_weight", "student_bias") if case[n] is not None]
    return {n: case[n].detach().clone().requires_grad_(True) for n in names}


def run_fused_topk(case, labels, teacher, **kwargs):
    leaves = _student_leaves(case)
    if teacher == "local":
        extra = {n: case[n] for n in ("teacher_hidden", "teacher_weight", "teacher_bias")}
    else:
        lp, ids = teacher
        extra = {"teacher_topk_logprobs": lp, "teacher_topk_ids": ids}
    value, mass = fused_linear_topk_generalized_jsd(
        leaves["student_hidden"], leaves["student_weight"], labels,
        student_bias=leaves.get("student_bias"), return_topk_mass=True, **extra, **kwargs,
    )  # fmt: skip
    grads = torch.autograd.grad(value, list(leaves.values()))
    return value, mass, dict(zip(leaves, grads, strict=True))


def run_unfused_topk(case, labels, lp, ids, fn=topk_generalized_jsd_reference, **kwargs):
    leaves = _student_leaves(case)
    logits = torch.nn.functional.linear(
        leaves["student_hidden"], leaves["student_weight"], leaves.get("student_bias")
    )
    value = fn(logits, lp, ids, labels, **kwargs)
    grads = torch.autograd.grad(value, list(leaves.values()))
    return value, dict(zip(leaves, grads, strict=True))


def assert_grads_close(g1, g2, rtol=1e-5, atol=1e-6):
    assert g1.keys() == g2.keys()
    for name in g1:
        scale = g2[name].abs().max().item()
        assert (g1[name].double() - g2[name].double()).abs().max().item() <= rtol * scale + atol, name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("teacher", ["local", "given"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_equals_unfused(mode, teacher, bias, masked):
    case = make_linear_case(20, bias=bias)
    labels = torch.tensor([[1, IGNORE, 2, 3, IGNORE], [4, 4, IGNORE, 4, 0]]) if masked else None
    temperature, k = 1.5, 4
    t_logits = torch.nn.functional.linear(
        case["teacher_hidden"], case["teacher_weight"], case["teacher_bias"]
    )
    lp, ids = teacher_for(mode, t_logits, k, temperature)
    for beta in betas_for(mode)[::2]:
        kwargs = {"beta": beta, "temperature": temperature, "missing_mass": mode}
        ref_v, ref_g = run_unfused_topk(case, labels, lp, ids, **kwargs)
        for chunk in (None, 1, 3):
            source = "local" if teacher == "local" else (lp, ids)
            extra = {"k": k} if teacher == "local" else {}
            v, mass, g = run_fused_topk(case, labels, source, chunk_size=chunk, **extra, **kwargs)
            torch.testing.assert_close(v.double(), ref_v, rtol=1e-5, atol=1e-6)
            assert_grads_close(g, ref_g)
            torch.testing.assert_close(mass, topk_mass(lp, labels), rtol=1e-5, atol=1e-6)


@settings(deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 16),
    k_frac=st.floats(0.05, 1.0),
    mode=st.sampled_from(MODES),
    beta=st.one_of(st.sampled_from(BETAS), st.floats(0.0, 1.0)),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    chunk=st.one_of(st.none(), st.integers(1, 4)),
    bias=st.booleans(),
    teacher=st.sampled_from(["local", "given"]),
    masked=st.booleans(),
)
def test_property_fused_float64_exact(
    seed, vocab, k_frac, mode, beta, temperature, chunk, bias, teacher, masked
):
    if mode == "zero":
        beta = 0.0
    case = make_linear_case(seed, leading=(3, 2), vocab=vocab, bias=bias, dtype=torch.float64)
    k = max(1, min(vocab, round(k_frac * vocab)))
    labels = random_labels(torch.Generator().manual_seed(seed), (3, 2)) if masked else None
    t_logits = torch.nn.functional.linear(
        case["teacher_hidden"], case["teacher_weight"], case["teacher_bias"]
    )
    lp, ids = teacher_for(mode, t_logits, k, temperature)
    kwargs = {"beta": beta, "temperature": temperature, "missing_mass": mode}
    ref_v, ref_g = run_unfused_topk(case, labels, lp, ids, **kwargs)
    source = "local" if teacher == "local" else (lp, ids)
    extra = {"k": k} if teacher == "local" else {}
    v, _, g = run_fused_topk(case, labels, source, chunk_size=chunk, **extra, **kwargs)
    torch.testing.assert_close(v, ref_v, rtol=1e-9, atol=1e-11)
    assert_grads_close(g, ref_g, rtol=1e-9, atol=1e-11)


def test_fused_no_valid_position_and_argument_errors():
    case = make_linear_case(21)
    leaves = _student_leaves(case)
    labels = torch.full((2, 5), IGNORE)
    value = fused_linear_topk_generalized_jsd(
        leaves["student_hidden"], leaves["student_weight"], labels, student_bias=leaves["student_bias"],
        teacher_hidden=case["teacher_hidden"], teacher_weight=case["teacher_weight"], k=3,
    )  # fmt: skip
    assert value.item() == 0.0
    grads = torch.autograd.grad(value, list(leaves.values()))
    assert all(torch.all(g == 0) for g in grads)
    with pytest.raises(ValueError, match="not neither"):
        fused_linear_topk_generalized_jsd(case["student_hidden"], case["student_weight"])
    with pytest.raises(ValueError, match=r"k .* is required"):
        fused_linear_topk_generalized_jsd(
            case["student_hidden"], case["student_weight"],
            teacher_hidden=case["teacher_hidden"], teacher_weight=case["teacher_weight"],
        )  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_fused_bf16_is_finite_fp32_and_teacher_gets_no_gradient(mode):
    case = make_linear_case(22, leading=(3, 4), h_s=8, h_t=8, vocab=40, dtype=torch.bfloat16)
    teacher = {
        n: case[n].clone().requires_grad_(True) for n in ("teacher_hidden", "teacher_weight", "teacher_bias")
    }
    leaves = _student_leaves(case)
    beta = 0.0 if mode == "zero" else 0.5
    value = fused_linear_topk_generalized_jsd(
        leaves["student_hidden"], leaves["student_weight"], student_bias=leaves["student_bias"],
        k=6, beta=beta, temperature=1.5, missing_mass=mode, **teacher,
    )  # fmt: skip
    assert value.dtype == torch.float32 and torch.isfinite(value) and value.item() >= 0
    grads = torch.autograd.grad(value, [*leaves.values(), *teacher.values()], allow_unused=True)
    assert all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads[:3])
    assert all(g is None for g in grads[3:])
    lp, ids = teacher_for(mode, torch.nn.functional.linear(*(case[n] for n in teacher)).float(), 6, 1.5)
    ref, _ = run_unfused_topk(case, None, lp, ids, beta=beta, temperature=1.5, missing_mass=mode)
    assert math.isclose(value.item(), ref.item(), rel_tol=2e-2, abs_tol=1e-3)
