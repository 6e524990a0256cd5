"""Every divergence in every mode of the chunk engine, against float64 textbook formulas.

The oracles below are written from the papers' reference code (DistiLLM's ``skewed_*_kl``,
the AKL authors' ``get_ratio`` with a full sort, ABKD's ``ab_div``, TRL's generalized JSD), in
float64 with plain autograd, independently of ``kdcompose.functional``. Top-K modes are checked
against the bucket distributions built the textbook way (``1 - sum`` tails), and ``zero`` against
the *full-vocabulary* divergence with the teacher truncated to its top-K, which is what the
engine's one-bucket shortcut must equal.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcompose.functional import (
    divergence_loss,
    divergence_loss_sum,
    fused_linear_divergence_loss,
    fused_linear_topk_divergence_loss,
    get_divergence,
    topk_divergence_loss,
)
from kdcompose.functional.divergences import AutogradOnly

IGNORE = -100


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second OpenMP thread only adds wake-ups (ms each on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CASES = [
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("fkl", {}),
    ("rkl", {}),
    ("skew_fkl", {"alpha": 0.1}),
    ("skew_rkl", {"alpha": 0.1}),
    ("tvd", {}),
    ("akl", {"mu": 0.5}),
    ("ab", {"alpha": 0.2, "beta": 0.7}),
    ("ab", {"alpha": 1.0, "beta": 0.0}),
    ("ab", {"alpha": 0.0, "beta": 0.5}),
]
IDS = [f"{name}-{'-'.join(f'{k}{v}' for k, v in params.items())}" for name, params in CASES]
# Divergences finite against a truncated teacher (missing_mass: zero); the rest must be refused.
ZERO_OK = {"fkl", "skew_fkl", "skew_rkl", "tvd"}


# --------------------------------------------------------------------------------------------
# Oracles (float64, plain autograd, zero-safe through xlogy)
# --------------------------------------------------------------------------------------------


def textbook(name: str, params: dict, ls: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
    """Per-row divergence of the distributions with log-probabilities ``ls`` (student), ``lt``."""
    s, t = ls.exp(), lt.exp()
    if name == "jsd" and params["beta"] in (0.0, 1.0):
        name = "fkl" if params["beta"] == 0.0 else "rkl"
    if name == "fkl":
        return (torch.xlogy(t, t) - torch.xlogy(t, s)).sum(-1)
    if name == "rkl":
        return (torch.xlogy(s, s) - torch.xlogy(s, t)).sum(-1)
    if name == "jsd":  # TRL: stacked logsumexp mixture
        b = params["beta"]
        lm = torch.logsumexp(torch.stack([ls + math.log1p(-b), lt + math.log(b)]), 0)
        kl_t = (torch.xlogy(t, t) - t * lm).sum(-1)
        kl_s = (torch.xlogy(s, s) - s * lm).sum(-1)
        return b * kl_t + (1 - b) * kl_s
    if name == "skew_fkl":  # DistiLLM: -sum t log(a t + (1-a) s), plus the teacher entropy term
        a = params["alpha"]
        return (torch.xlogy(t, t) - torch.xlogy(t, a * t + (1 - a) * s)).sum(-1)
    if name == "skew_rkl":
        a = params["alpha"]
        return (torch.xlogy(s, s) - torch.xlogy(s, (1 - a) * t + a * s)).sum(-1)
    if name == "tvd":
        return 0.5 * (t - s).abs().sum(-1)
    if name == "akl":  # the authors' get_ratio: full sort, cumsum > mu is tail, first always head
        sorted_t, order = t.sort(-1, descending=True)
        errors = (sorted_t - s.detach().gather(-1, order)).abs()
        tail = sorted_t.cumsum(-1) > params["mu"]
        tail[..., 0] = False
        g_head, g_tail = errors.masked_fill(tail, 0).sum(-1), errors.masked_fill(~tail, 0).sum(-1)
        total = g_head + g_tail
        h = torch.where(total > 0, g_head / total, torch.zeros_like(total))
        l_tail = torch.where(total > 0, g_tail / total, torch.zeros_like(total))
        fkl = (torch.xlogy(t, t) - torch.xlogy(t, s)).sum(-1)
        rkl = (torch.xlogy(s, s) - torch.xlogy(s, t)).sum(-1)
        return h * fkl + l_tail * rkl
    if name == "ab":  # ABKD ab_div with p = teacher, q = student; Cichocki's limits on the axes
        a, b = params["alpha"], params["beta"]
        p, q = t, s
        if b == 0.0:
            return (p**a * a * (lt - ls) - p**a + q**a).sum(-1) / a**2
        if a == 0.0:
            return (q**b * b * (ls - lt) - q**b + p**b).sum(-1) / b**2
        return -(p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)).sum(-1) / (a * b)
    raise KeyError(name)


def oracle_logits(name, params, student, teacher, labels, temperature):
    """Mean over counted rows of the textbook divergence of the logits, float64."""
    ls = F.log_softmax(student.double() / temperature, -1)
    lt = F.log_softmax(teacher.double() / temperature, -1)
    keep = torch.ones(ls.shape[:-1], dtype=torch.bool) if labels is None else labels != IGNORE
    per_row = textbook(name, params, ls[keep], lt[keep])
    return per_row.sum() / max(1, per_row.numel())


def oracle_topk(name, params, student, lp, ids, labels, temperature, mode):
    """Mean over counted rows of the divergence between the top-K bucket distributions."""
    z = student.double().reshape(-1, student.shape[-1])
    lp, ids = lp.double().reshape(-1, lp.shape[-1]), ids.reshape(-1, ids.shape[-1])
    rows = (
        range(z.shape[0]) if labels is None else (labels.reshape(-1) != IGNORE).nonzero().flatten().tolist()
    )
    values = []
    for r in rows:
        present = torch.isfinite(lp[r])
        if not present.any():
            continue  # uncovered: dropped from the sum and the count
        k_ids, k_lp = ids[r][present], lp[r][present]
        if mode == "renorm":
            ls = F.log_softmax(z[r, k_ids] / temperature, -1)
            lt = F.log_softmax(k_lp / temperature, -1)
        elif mode == "tail":
            full = F.log_softmax(z[r] / temperature, -1)
            s_k, t_k = full[k_ids].exp(), k_lp.exp()
            ls = torch.log(torch.cat([s_k, (1 - s_k.sum()).clamp_min(1e-300).reshape(1)]))
            lt = torch.log(torch.cat([t_k, (1 - t_k.sum()).clamp_min(1e-300).reshape(1)]))
        else:  # zero: the truncated teacher over the whole vocabulary
            ls = F.log_softmax(z[r] / temperature, -1)
            q = torch.zeros_like(ls).index_put((k_ids,), F.softmax(k_lp, -1))
            lt = torch.log(q)
        values.append(textbook(name, params, ls.unsqueeze(0), lt.unsqueeze(0))[0])
    return torch.stack(values).sum() / len(values) if values else z.sum() * 0


def grad_of(fn, *leaves):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    value = fn(*leaves)
    grads = torch.autograd.grad(value, leaves)
    return value.detach(), grads


def assert_grads_close(got, want, rel=2e-4, floor=0.0):
    """Close relative to the gradient's scale, or within ``floor``: the fp32 noise of the closed
    forms, which subtract O(log-prob) terms (``8 eps L / (n T)``, L the log-probabilities' range)."""
    got, want = got.double(), want.double()
    scale = max(want.abs().max().item(), 1e-6) if want.numel() else 1.0
    atol = max(rel * scale, floor)
    excess = ((got - want).abs() - (atol + rel * want.abs())).max().item() if want.numel() else 0.0
    assert excess <= 0, f"gradient off by {excess:.3g} beyond atol {atol:.3g}:\n{got}\nvs\n{want}"


def fp32_floor(student, teacher, counted, temperature):
    if not counted.any():
        return 0.0
    spread = (student[counted].abs().max() + teacher[counted].abs().max()).item() / temperature
    n = int(counted.sum())
    return 8 * torch.finfo(torch.float32).eps * (spread + math.log(student.shape[-1]) + 1) / (n * temperature)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@st.composite
def problems(draw, max_rows: int = 5, max_vocab: int = 9):
    """Logits (extreme ones included, distinct teacher values), labels (maybe none counted) with
    non-finite garbage at ignored positions, a temperature and a chunk size."""
    rows, vocab = draw(st.integers(1, max_rows)), draw(st.integers(2, max_vocab))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.3, 3.0, 25.0]))
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=gen) * scale
    # distinct teacher values: AKL's head is ambiguous at ties (the reference's sort is too)
    teacher = torch.randn(rows, vocab, generator=gen) * scale + torch.arange(vocab) * 1e-3
    labels = None
    if draw(st.booleans()):
        keep = torch.rand(rows, generator=gen) < draw(st.sampled_from([0.0, 0.5, 1.0]))
        labels = torch.where(keep, torch.ones(rows, dtype=torch.long), IGNORE)
        garbage = torch.tensor([math.inf, -math.inf, math.nan])[
            torch.randint(0, 3, (rows, vocab), generator=gen)
        ]
        student = torch.where(keep.unsqueeze(-1), student, garbage)
        teacher = torch.where(keep.unsqueeze(-1), teacher, garbage.flip(-1))
    temperature = draw(st.sampled_from([0.5, 1.0, 2.5]))
    chunk = draw(st.sampled_from([None, 1, 2, 3]))
    return student, teacher, labels, temperature, chunk


case_index = st.integers(0, len(CASES) - 1)


# --------------------------------------------------------------------------------------------
# Logits and fused, value and gradient
# --------------------------------------------------------------------------------------------


@settings(deadline=None)
@given(case_index, problems())
def test_logits_value_and_gradient_match_the_float64_oracle(i, problem):
    name, params = CASES[i]
    student, teacher, labels, temperature, chunk = problem
    div = get_divergence(name, **params)
    value, (grad,) = grad_of(
        lambda s: divergence_loss(
            s, teacher, labels, divergence=div, temperature=temperature, chunk_size=chunk
        ),
        student,
    )
    ref, (ref_grad,) = grad_of(
        lambda s: oracle_logits(name, params, s, teacher, labels, temperature), student
    )
    assert value.item() == pytest.approx(ref.item(), rel=2e-4, abs=2e-5)
    assert value.item() >= -1e-6  # every divergence is >= 0
    counted = torch.ones(student.shape[0], dtype=torch.bool) if labels is None else labels != IGNORE
    assert torch.all(grad[~counted] == 0)  # garbage at ignored positions touches nothing
    assert_grads_close(
        grad[counted], ref_grad[counted], floor=fp32_floor(student, teacher, counted, temperature)
    )


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_fused_equals_the_oracle_through_the_lm_heads(name, params):
    gen = torch.Generator().manual_seed(3)
    tokens, hidden, vocab = 5, 4, 11
    h_s, w_s, b_s = (
        torch.randn(*shape, generator=gen) for shape in ((tokens, hidden), (vocab, hidden), (vocab,))
    )
    h_t, w_t = torch.randn(tokens, hidden, generator=gen), torch.randn(vocab, hidden, generator=gen) * 2
    labels = torch.tensor([3, IGNORE, 1, 2, 2])
    div = get_divergence(name, **params)
    value, grads = grad_of(
        lambda h, w, b: fused_linear_divergence_loss(
            h, w, h_t, w_t, labels, divergence=div, temperature=1.7, chunk_size=2, student_bias=b
        ),
        h_s,
        w_s,
        b_s,
    )
    ref, ref_grads = grad_of(
        lambda h, w, b: oracle_logits(name, params, h @ w.t() + b, h_t @ w_t.t(), labels, 1.7), h_s, w_s, b_s
    )
    assert value.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    for got, want in zip(grads, ref_grads, strict=True):
        assert_grads_close(got, want, rel=1e-4)


@settings(deadline=None)
@given(case_index, problems(max_rows=4, max_vocab=7))
def test_closed_forms_equal_autograd_of_their_own_value(i, problem):
    """The autograd fallback (per chunk) and the closed form agree: every hand-written gradient is
    the derivative of the divergence's own definition."""
    name, params = CASES[i]
    student, teacher, labels, temperature, chunk = problem
    div = get_divergence(name, **params)
    results = [
        grad_of(
            lambda s, d=d: divergence_loss(
                s, teacher, labels, divergence=d, temperature=temperature, chunk_size=chunk
            ),
            student,
        )
        for d in (div, AutogradOnly(div))
    ]
    (v1, (g1,)), (v2, (g2,)) = results
    assert v1.item() == pytest.approx(v2.item(), rel=1e-5, abs=1e-6)
    counted = torch.ones(student.shape[0], dtype=torch.bool) if labels is None else labels != IGNORE
    assert_grads_close(g1, g2, rel=1e-4, floor=fp32_floor(student, teacher, counted, temperature))


# --------------------------------------------------------------------------------------------
# Top-K teachers
# --------------------------------------------------------------------------------------------


def topk_problem(seed: int, rows: int = 5, vocab: int = 10, k: int = 4):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=gen) * 2
    teacher = torch.randn(rows, vocab, generator=gen) * 2 + torch.arange(vocab) * 1e-3
    lp, ids = torch.log_softmax(teacher, -1).topk(k, -1)
    lp[1, -1] = -math.inf  # a padded (absent) entry
    lp[3] = -math.inf  # an uncovered position
    labels = torch.tensor([1, 2, IGNORE, 4, 5])
    return student, lp, ids, labels


@pytest.mark.parametrize("mode", ["renorm", "tail", "zero"])
@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_topk_modes_match_the_bucket_oracle_or_are_refused(name, params, mode):
    student, lp, ids, labels = topk_problem(11)
    div = get_divergence(name, **params)
    if mode == "zero" and not (name in ZERO_OK or (name == "jsd" and params["beta"] == 0.0)):
        with pytest.raises(ValueError, match="missing_mass"):
            topk_divergence_loss(student, lp, ids, labels, divergence=div, missing_mass=mode)
        assert div.missing_mass_issue("zero") is not None
        return
    temperature = 1.0 if mode != "renorm" else 1.6  # tail / zero read log-probs at the training T
    value, (grad,) = grad_of(
        lambda s: topk_divergence_loss(
            s, lp, ids, labels, divergence=div, temperature=temperature, missing_mass=mode, chunk_size=2
        ),
        student,
    )
    ref, (ref_grad,) = grad_of(
        lambda s: oracle_topk(name, params, s, lp, ids, labels, temperature, mode), student
    )
    assert value.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    assert_grads_close(grad, ref_grad)
    # fused with the same given top-K: the student's logits built from hidden states
    gen = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(5, 3, generator=gen), torch.randn(10, 3, generator=gen)
    fused = fused_linear_topk_divergence_loss(
        hidden, weight, labels, divergence=div, teacher_topk_logprobs=lp, teacher_topk_ids=ids,
        temperature=temperature, missing_mass=mode, chunk_size=3,
    )  # fmt: skip
    assert fused.item() == pytest.approx(
        oracle_topk(name, params, hidden @ weight.t(), lp, ids, labels, temperature, mode).item(),
        rel=1e-5,
        abs=1e-6,
    )


# --------------------------------------------------------------------------------------------
# Identities and properties
# --------------------------------------------------------------------------------------------


def _value(divergence, student, teacher, **kw):
    return grad_of(lambda s: divergence_loss(s, teacher, divergence=divergence, **kw), student)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("jsd", {"beta": 0.0}), ("fkl", {})),
        (("jsd", {"beta": 1.0}), ("rkl", {})),
        (("skew_fkl", {"alpha": 0.0}), ("fkl", {})),
        (("skew_rkl", {"alpha": 0.0}), ("rkl", {})),
        (("ab", {"alpha": 1.0, "beta": 0.0}), ("fkl", {})),
        (("ab", {"alpha": 0.0, "beta": 1.0}), ("rkl", {})),
        (("akl", {"mu": 1.0}), ("fkl", {})),  # everything is head: pure forward KL
    ],
)
def test_identities_between_divergences(left, right):
    gen = torch.Generator().manual_seed(8)
    student, teacher = torch.randn(4, 13, generator=gen) * 2, torch.randn(4, 13, generator=gen) * 2
    v1, (g1,) = _value(get_divergence(left[0], **left[1]), student, teacher, temperature=1.3)
    v2, (g2,) = _value(get_divergence(right[0], **right[1]), student, teacher, temperature=1.3)
    assert v1.item() == pytest.approx(v2.item(), rel=1e-6, abs=1e-7)
    assert_grads_close(g1, g2, rel=1e-5)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_zero_exactly_when_the_distributions_agree(name, params):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 17, generator=gen) * 4
    div = get_divergence(name, **params)
    same, (g_same,) = _value(div, logits, logits.clone(), temperature=0.7)
    shifted, _ = _value(div, logits, logits + 5.0, temperature=0.7)  # a per-row shift: same distribution
    other, (g_other,) = _value(div, logits, logits.flip(-1), temperature=0.7)
    assert abs(same.item()) < 1e-6 and abs(shifted.item()) < 1e-6
    assert g_same.abs().max().item() < 1e-6
    assert other.item() > 1e-3 and g_other.abs().max().item() > 1e-4


def test_sum_and_count_compose_to_the_mean():
    gen = torch.Generator().manual_seed(9)
    student, teacher = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    labels = torch.tensor([[1, IGNORE, 2], [IGNORE, 3, 3]])
    for name, params in CASES:
        total, count = divergence_loss_sum(student, teacher, labels, divergence={"kind": name, **params})
        mean = divergence_loss(student, teacher, labels, divergence={"kind": name, **params})
        assert count.item() == 4
        assert (total / count).item() == pytest.approx(mean.item(), rel=1e-6)


def test_akl_finds_a_head_larger_than_its_first_topk():
    """A flat teacher over 300 tokens puts ~150 of them in the head: the engine's top-k grows past
    its first 64 candidates and still splits head and tail exactly as the full sort does."""
    gen = torch.Generator().manual_seed(12)
    student, teacher = torch.randn(3, 300, generator=gen), torch.randn(3, 300, generator=gen) * 0.1
    params = {"mu": 0.5}
    value, (grad,) = grad_of(
        lambda s: divergence_loss(s, teacher, divergence={"kind": "akl", **params}), student
    )
    ref, (ref_grad,) = grad_of(lambda s: oracle_logits("akl", params, s, teacher, None, 1.0), student)
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)
    assert_grads_close(grad, ref_grad, rel=1e-4)
