"""Alpha-beta divergence of ABKD (Wang et al., ICML 2025, arXiv 2505.04560; Cichocki et al. 2011).

With p = p_t (teacher), q = p_s (student), as ABKD's reference ``ab_div`` (``distillm/losses.py``)::

    D = -1/(a b) sum( p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b) ),   a = alpha, b = beta

``alpha`` weighs how much the loss focuses on the teacher's large probabilities, ``beta`` on the
student's ("hardness" and "confidence" concentration in the paper); ``(alpha, beta) = (1, 0)`` is
forward KL, ``(0, 1)`` reverse KL. Defaults ``alpha = 0.2``, ``beta = 0.7`` are ABKD's GPT-2 scripts'
(``scripts/gpt2/ab``: alpha + beta = 0.9, alpha = 0.2). On the axes kdcompose uses Cichocki's
continuous limits (``1/alpha^2 sum(p^a log(p^a/q^a) - p^a + q^a)`` for beta = 0, the mirror for
alpha = 0); ABKD's code divides those two cases by alpha (beta) instead of its square, which agrees
at the KL points (1, 0) and (0, 1). Negative powers are refused (they blow up where a probability is
0), as is alpha = beta = 0 (the squared log-ratio, unbounded at a zero probability).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import model_validator
from torch import Tensor

from kdcompose.functional.divergences._params import NonNegativeFloat
from kdcompose.functional.divergences.base import ChunkOps, Divergence, DivergenceParams
from kdcompose.registry import register_divergence


class AbParams(DivergenceParams):
    alpha: NonNegativeFloat = 0.2
    """Power of the teacher's probabilities (>= 0)."""
    beta: NonNegativeFloat = 0.7
    """Power of the student's probabilities (>= 0)."""

    @model_validator(mode="after")
    def _not_both_zero(self) -> AbParams:
        if self.alpha + self.beta <= 0.0:
            raise ValueError(
                "alpha + beta must be > 0 (alpha = beta = 0 is the squared log-ratio, unbounded where a "
                "probability is 0); ABKD's default is alpha: 0.2, beta: 0.7"
            )
        return self


def _scaled_exp(x: Tensor, scale: float, out: Tensor) -> Tensor:
    """``exp(scale * x)`` into ``out`` (``out`` may be ``x``)."""
    return torch.mul(x, scale, out=out).exp_()


@register_divergence("ab")
class AlphaBeta(Divergence):
    """Alpha-beta divergence D_AB^(alpha, beta)(p_t || p_s)."""

    Params = AbParams
    params: AbParams
    scratch_buffers = 2
    short_names: ClassVar[dict[str, str]] = {"alpha": "a", "beta": "b"}
    zero_mass_reason = (
        "it is not additive over merged tokens (powers of the probabilities), so the student's mass outside "
        "the top-K cannot stand as one bucket"
    )

    def value(self, ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
        a, b = self.params.alpha, self.params.beta
        if b == 0.0:
            pa, qa = (a * lt).exp(), (a * ls).exp()
            return ops.rowsum(pa * (a * (lt - ls)) - pa + qa) / (a * a)
        if a == 0.0:
            qb, pb = (b * ls).exp(), (b * lt).exp()
            return ops.rowsum(qb * (b * (ls - lt)) - qb + pb) / (b * b)
        ab = a + b
        terms = (a * lt).exp() * (b * ls).exp() - (a / ab) * (ab * lt).exp() - (b / ab) * (ab * ls).exp()
        return ops.rowsum(terms) / -(a * b)

    def value_and_grad(self, ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
        """``g = d D / d log q``: ``q^b (q^a - p^a) / a`` (``(q^a - p^a)/a`` at b = 0, ``q^b (log q - log p)``
        at a = 0); the logits' gradient is ``g - q sum(g)``."""
        a, b = self.params.alpha, self.params.beta
        c, d = ops.scratch[0], ops.scratch[1]
        if b == 0.0:
            pa = _scaled_exp(lt, a, c)
            qa = _scaled_exp(ls, a, d)
            term = torch.sub(lt, ls, out=lt).mul_(a).mul_(pa).sub_(pa).add_(qa)
            per_row = ops.rowsum(term).div_(a * a)
            g, g_scale = torch.sub(qa, pa, out=d), 1.0 / a
        elif a == 0.0:
            qb = _scaled_exp(ls, b, c)
            pb = _scaled_exp(lt, b, d)
            g = torch.mul(qb, torch.sub(ls, lt, out=lt), out=lt)  # q^b (log q - log p)
            term = torch.add(pb, g, alpha=b, out=d).sub_(qb)
            per_row = ops.rowsum(term).div_(b * b)
            g_scale = 1.0
        else:
            ab = a + b
            cross = _scaled_exp(lt, a, c)  # p^a
            cross.mul_(_scaled_exp(ls, b, d))  # p^a q^b
            pab = _scaled_exp(lt, ab, lt)  # p^(a+b)
            qab = _scaled_exp(ls, ab, d)  # q^(a+b)
            term = torch.add(cross, pab, alpha=-a / ab, out=pab).sub_(qab, alpha=b / ab)
            per_row = ops.rowsum(term).div_(-(a * b))
            g, g_scale = torch.sub(qab, cross, out=d), 1.0 / a
        if ops.grad_out is not None:
            q = ls.exp_()
            total = ops.rowsum(g)
            torch.addcmul(g, q, total.neg_().unsqueeze(-1), out=g)
            ops.write_grad(g, g_scale)
        return per_row
