"""`compile=True`: the chunk body through torch.compile gives the eager engine's values and
gradients (logits and fused), for a built-in divergence and a value-only plugin, within the fp32
noise of the float64 oracle. Slow: each body compiles once per process (seconds to a minute)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdcompose.functional import Divergence, divergence_loss, fused_linear_divergence_loss

pytestmark = [pytest.mark.swift, pytest.mark.filterwarnings("ignore::UserWarning")]


class Hellinger(Divergence):
    """Squared Hellinger distance, value only: the engine's autograd fallback, or the compiled body."""

    def value(self, ls, lt, ops):
        return 1.0 - ops.rowsum(torch.exp(0.5 * (ls + lt)))


def _ab_oracle(s_logits, t_logits, labels, temperature, a=0.2, b=0.7):
    q = F.softmax(s_logits.double() / temperature, -1)
    p = F.softmax(t_logits.double() / temperature, -1)
    terms = p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)
    return (-terms.sum(-1) / (a * b))[labels != -100].mean()


def _grad(fn, *leaves):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


@pytest.mark.parametrize(
    "divergence", [{"kind": "ab", "alpha": 0.2, "beta": 0.7}, Hellinger()], ids=["ab", "plugin"]
)
def test_compiled_chunks_equal_the_eager_engine(divergence):
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(9, 40, generator=gen) * 3, torch.randn(9, 40, generator=gen) * 3
    labels = torch.tensor([1, -100, 2, 3, 4, -100, 5, 6, 7])
    results = [
        _grad(
            lambda s, c=compiled: divergence_loss(
                s, teacher, labels, divergence=divergence, temperature=1.5, chunk_size=4, compile=c
            ),
            student,
        )
        for compiled in (False, True)
    ]
    (v_eager, (g_eager,)), (v_comp, (g_comp,)) = results
    assert v_comp.item() == pytest.approx(v_eager.item(), rel=1e-6)
    assert torch.allclose(g_comp, g_eager, rtol=1e-5, atol=1e-7)
    if isinstance(divergence, dict):
        ref, (g_ref,) = _grad(lambda s: _ab_oracle(s, teacher, labels, 1.5), student.double())
        assert v_comp.item() == pytest.approx(ref.item(), rel=1e-6)
        assert torch.allclose(g_comp.double(), g_ref.double(), rtol=1e-4, atol=1e-7)
    # fused: the same compiled body (dynamic chunk length) behind the LM-head matmuls
    h, w, h_t, w_t = (torch.randn(*shape, generator=gen) for shape in ((9, 6), (40, 6), (9, 6), (40, 6)))
    fused = [
        _grad(
            lambda hh, ww, c=compiled: fused_linear_divergence_loss(
                hh, ww, h_t, w_t, labels, divergence=divergence, chunk_size=3, compile=c
            ),
            h,
            w,
        )
        for compiled in (False, True)
    ]
    (fv_eager, fg_eager), (fv_comp, fg_comp) = fused
    assert fv_comp.item() == pytest.approx(fv_eager.item(), rel=1e-6)
    for got, want in zip(fg_comp, fg_eager, strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
