"""The chunk engine's own jobs: token selection, plugin divergences through the autograd fallback
(chunked, fused, top-K), the entry-point group, and its guard rails.

Oracles are float64 autograd formulas written here, independent of ``kdcompose.functional``.
"""

from __future__ import annotations

import math
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdcompose.registry as registry
from kdcompose.functional import (
    Divergence,
    TokenSelection,
    divergence_loss,
    fused_linear_divergence_loss,
    fused_linear_topk_divergence_loss,
    get_divergence,
    topk_divergence_loss,
)
from kdcompose.functional.grads import LogitsGrad
from kdcompose.registry import register_divergence, unregister_divergence

IGNORE = -100
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second OpenMP thread only adds wake-ups (ms each on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _grad(fn, *leaves):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    got, want = got.double(), want.double()
    atol = rel * max(want.abs().max().item(), 1e-6)
    assert torch.all((got - want).abs() <= atol + rel * want.abs()), f"{got}\nvs\n{want}"


def _log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.log_softmax(logits.double() / temperature, -1)


# --------------------------------------------------------------------------------------------
# Token selection
# --------------------------------------------------------------------------------------------


def _scores(by: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    ls, lt = _log_probs(student), _log_probs(teacher)
    if by == "teacher_entropy":
        return -(lt.exp() * lt).sum(-1)
    if by == "student_entropy":
        return -(ls.exp() * ls).sum(-1)
    return (lt.exp() * (lt - ls)).sum(-1)  # the divergence (fkl here)


@pytest.mark.parametrize("by", ["teacher_entropy", "student_entropy", "divergence"])
@pytest.mark.parametrize(("keep", "order"), [(0.5, "high"), (0.3, "low"), (1.0, "high")])
def test_token_selection_keeps_the_ranked_fraction_and_averages_over_it(by, keep, order):
    gen = torch.Generator().manual_seed(21)
    student, teacher = torch.randn(2, 6, 9, generator=gen) * 2, torch.randn(2, 6, 9, generator=gen) * 2
    labels = torch.randint(0, 5, (2, 6), generator=gen)
    labels[0, 1] = labels[1, 4] = IGNORE
    selection = TokenSelection(by=by, keep=keep, order=order)
    value, (grad,) = _grad(
        lambda s: divergence_loss(s, teacher, labels, divergence="fkl", chunk_size=3, tokens=selection),
        student,
    )
    valid = (labels != IGNORE).reshape(-1).nonzero().flatten()
    n_keep = math.ceil(keep * valid.numel())
    scores = _scores(by, student, teacher).reshape(-1)[valid]
    kept = valid[scores.topk(n_keep, largest=order == "high").indices]
    flat_s, flat_t = student.reshape(-1, 9)[kept], teacher.reshape(-1, 9)[kept]
    ref, (ref_grad,) = _grad(
        lambda s: (_log_probs(flat_t).exp() * (_log_probs(flat_t) - _log_probs(s))).sum(-1).mean(), flat_s
    )
    assert value.item() == pytest.approx(ref.item(), rel=1e-6)
    grad = grad.reshape(-1, 9)
    _close(grad[kept], ref_grad)
    dropped = torch.ones(12, dtype=torch.bool)
    dropped[kept] = False
    assert torch.all(grad[dropped] == 0)


def test_rows_not_kept_get_no_gradient_storage(monkeypatch):
    """The differentiable pass runs on the kept rows only: its stored gradient has n_kept rows."""
    shapes = []

    original_finish = LogitsGrad.finish_forward

    def spy(self, parallel):
        shapes.append(self.stored_rows)
        original_finish(self, parallel)

    monkeypatch.setattr(LogitsGrad, "finish_forward", spy)
    student = torch.randn(40, 16, requires_grad=True)
    value = divergence_loss(
        student,
        torch.randn(40, 16),
        divergence="rkl",
        tokens=TokenSelection("divergence", 0.25),
        chunk_size=3,
    )
    assert shapes == [10]
    value.backward()
    assert int((student.grad.abs().sum(-1) > 0).sum()) == 10


def test_token_selection_in_fused_and_topk_modes_matches_logits_mode():
    gen = torch.Generator().manual_seed(2)
    h, w = torch.randn(8, 4, generator=gen), torch.randn(11, 4, generator=gen)
    h_t, w_t = torch.randn(8, 4, generator=gen), torch.randn(11, 4, generator=gen)
    labels = torch.tensor([1, 1, IGNORE, 1, 1, 1, IGNORE, 1])
    sel = TokenSelection("teacher_entropy", 0.5, "low")
    fused = fused_linear_divergence_loss(h, w, h_t, w_t, labels, divergence="tvd", tokens=sel, chunk_size=2)
    logits = divergence_loss(h @ w.t(), h_t @ w_t.t(), labels, divergence="tvd", tokens=sel)
    assert fused.item() == pytest.approx(logits.item(), rel=1e-5)
    # top-K: entropies of the K-bucket distributions rank the tokens
    lp, ids = torch.log_softmax(h_t @ w_t.t(), -1).topk(4, -1)
    topk = topk_divergence_loss(h @ w.t(), lp, ids, labels, divergence="fkl", tokens=sel)
    fused_topk = fused_linear_topk_divergence_loss(
        h, w, labels, divergence="fkl", teacher_hidden=h_t, teacher_weight=w_t, k=4, tokens=sel, chunk_size=3
    )
    assert fused_topk.item() == pytest.approx(topk.item(), rel=1e-5)
    assert (
        TokenSelection("divergence", 0.5).count(7) == 4 and TokenSelection("divergence", 0.01).count(7) == 1
    )


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [({"by": "entropy"}, "tokens.by"), ({"keep": 0.0}, "tokens.keep"), ({"keep": 1.5}, "tokens.keep"),
     ({"order": "up"}, "tokens.order")],
)  # fmt: skip
def test_token_selection_rejects_bad_settings(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        TokenSelection(**{"by": "divergence", "keep": 0.5, **kwargs})


# --------------------------------------------------------------------------------------------
# A plugin divergence: value only, the engine differentiates it chunk by chunk
# --------------------------------------------------------------------------------------------


class Hellinger(Divergence):
    """Squared Hellinger distance 1 - sum sqrt(p_s p_t): no closed form here."""

    def value(self, ls, lt, ops):
        return 1.0 - ops.rowsum(torch.exp(0.5 * (ls + lt)))


def _hellinger(s_logits, t_logits, temperature=1.0):
    return 1.0 - torch.exp(0.5 * (_log_probs(s_logits, temperature) + _log_probs(t_logits, temperature))).sum(
        -1
    )


@pytest.fixture
def hellinger():
    register_divergence("test_hellinger")(Hellinger)
    yield get_divergence("test_hellinger")
    unregister_divergence("test_hellinger")


def test_a_value_only_plugin_divergence_trains_chunked_fused_and_topk(hellinger):
    assert not hellinger.has_closed_form
    gen = torch.Generator().manual_seed(6)
    h, w, b = (
        torch.randn(6, 3, generator=gen),
        torch.randn(10, 3, generator=gen),
        torch.randn(10, generator=gen),
    )
    h_t, w_t = torch.randn(6, 3, generator=gen), torch.randn(10, 3, generator=gen) * 2
    labels = torch.tensor([1, IGNORE, 2, 3, 4, 5])
    keep = labels != IGNORE

    def oracle(hh, ww, bb):
        return _hellinger(hh @ ww.t() + bb, h_t @ w_t.t(), 1.5)[keep].mean()

    ref, ref_grads = _grad(oracle, h, w, b)
    chunked, (g_logits,) = _grad(
        lambda z: divergence_loss(
            z, h_t @ w_t.t(), labels, divergence=hellinger, temperature=1.5, chunk_size=2
        ),
        h @ w.t() + b,
    )
    fused, grads = _grad(
        lambda hh, ww, bb: fused_linear_divergence_loss(
            hh, ww, h_t, w_t, labels, divergence="test_hellinger", temperature=1.5, chunk_size=2,
            student_bias=bb,
        ),
        h, w, b,
    )  # fmt: skip
    assert chunked.item() == pytest.approx(ref.item(), rel=1e-6)
    assert fused.item() == pytest.approx(ref.item(), rel=1e-6)
    _close(g_logits @ w, ref_grads[0])  # chain rule through the head: dL/dh = dL/dz W
    for got, want in zip(grads, ref_grads, strict=True):
        _close(got, want)
    # top-K renorm / tail through the fallback; zero is refused for a plugin that did not opt in
    lp, ids = torch.log_softmax(h_t @ w_t.t(), -1).topk(10, -1)  # K = V: renorm is the full divergence
    full_k = topk_divergence_loss(h @ w.t() + b, lp, ids, labels, divergence=hellinger, temperature=1.5)
    assert full_k.item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(ValueError, match="missing_mass: zero"):
        topk_divergence_loss(h @ w.t(), lp, ids, labels, divergence=hellinger, missing_mass="zero")


def test_a_chunk_body_that_fails_to_compile_falls_back_to_the_eager_engine(monkeypatch):
    """What the engine does when torch.compile fails (a missing compiler...): the guarded body
    returns None, and the run continues eagerly from that chunk, same value and gradient."""
    import kdcompose.functional.kd as kd

    monkeypatch.setattr(kd, "compiled_body", lambda *_: lambda u, v: None)
    gen = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(7, 11, generator=gen), torch.randn(7, 11, generator=gen)
    labels = torch.tensor([1, IGNORE, 2, 3, 4, 5, 6])
    results = [
        _grad(
            lambda s, c=c: divergence_loss(s, teacher, labels, divergence="ab", chunk_size=2, compile=c),
            student,
        )
        for c in (False, True)
    ]
    assert results[0][0].item() == results[1][0].item()
    assert torch.equal(results[0][1][0], results[1][1][0])
    with pytest.raises(ValueError, match="cannot be compiled"):
        divergence_loss(student, teacher, divergence="akl", compile=True)


def test_a_plugin_value_must_be_one_number_per_row():
    class Flat(Divergence):
        def value(self, ls, lt, ops):
            return (ls - lt).sum()

    with pytest.raises(ValueError, match="one value per row"):
        divergence_loss(torch.randn(3, 5, requires_grad=True), torch.randn(3, 5), divergence=Flat())


def test_the_entry_point_group_registers_the_example_divergence(monkeypatch):
    """`examples/custom_divergence.py` loaded the way an installed plugin is: through the
    `kdcompose.divergences` entry-point group."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    point = EntryPoint(
        name="renyi", value="custom_divergence:Renyi", group=registry.DIVERGENCE_ENTRY_POINT_GROUP
    )
    monkeypatch.setattr(registry, "entry_points", lambda group: [point] if group == point.group else [])
    monkeypatch.setattr(registry, "_divergence_entry_points_loaded", False)
    monkeypatch.delitem(registry._DIVERGENCES, "renyi", raising=False)
    try:
        divergence = get_divergence({"kind": "renyi", "order": 2.0})
        gen = torch.Generator().manual_seed(1)
        student, teacher = torch.randn(4, 7, generator=gen), torch.randn(4, 7, generator=gen)
        value, (grad,) = _grad(
            lambda s: divergence_loss(s, teacher, divergence=divergence, chunk_size=3), student
        )

        def oracle(s):  # Renyi divergence of order a: log(sum p_t^a p_s^(1-a)) / (a - 1)
            lt, ls = _log_probs(teacher), _log_probs(s)
            return torch.logsumexp(2.0 * lt - ls, -1).mean()

        ref, (ref_grad,) = _grad(oracle, student)
        assert value.item() == pytest.approx(ref.item(), rel=1e-6)
        _close(grad, ref_grad)
    finally:
        registry._DIVERGENCES.pop("renyi", None)
        sys.modules.pop("custom_divergence", None)


# --------------------------------------------------------------------------------------------
# Guard rails
# --------------------------------------------------------------------------------------------


def test_second_backward_through_one_call_raises_and_no_grad_computes_the_value_only():
    student = torch.randn(3, 6, requires_grad=True)
    value = divergence_loss(student, torch.randn(3, 6), divergence="akl")
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        value.backward()
    with torch.no_grad():
        assert not divergence_loss(student, torch.randn(3, 6), divergence="ab").requires_grad


def test_bad_divergence_specs_and_parallel_without_a_group_are_refused():
    s, t = torch.randn(2, 4), torch.randn(2, 4)
    with pytest.raises(KeyError, match=r"unknown divergence 'nope'.*registered divergences: ab, akl"):
        divergence_loss(s, t, divergence="nope")
    with pytest.raises(ValueError, match="alpha"):
        divergence_loss(s, t, divergence={"kind": "skew_fkl", "alpha": 1.0})
    with pytest.raises(ValueError, match="kind"):
        divergence_loss(s, t, divergence={"alpha": 0.1})
    from kdcompose.functional import VocabParallel

    if not torch.distributed.is_initialized():
        with pytest.raises(ValueError, match=r"initialized torch\.distributed"):
            divergence_loss(s, t, divergence="fkl", vocab_parallel=VocabParallel(group=None))


def test_registering_a_divergence_checks_the_class_and_the_key():
    with pytest.raises(TypeError, match="Divergence subclass"):
        register_divergence("x")(int)
    with pytest.raises(ValueError, match="already registered"):
        register_divergence("fkl")(Hellinger)
    with pytest.raises(ValueError, match="identifier"):
        register_divergence("not a name")(Hellinger)
