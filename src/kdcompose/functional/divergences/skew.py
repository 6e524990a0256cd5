"""Skew KL divergences of DistiLLM (Ko et al., ICML 2024, arXiv 2402.03898).

``skew_fkl``: KL(p_t || alpha p_t + (1 - alpha) p_s); ``skew_rkl``: KL(p_s || alpha p_s + (1 - alpha) p_t).
Mixing a little of the target side into the second argument keeps the divergence and its
gradient bounded where one distribution has almost no mass (DistiLLM's reference code:
``distillm/losses.py``, ``skewed_forward_kl`` / ``skewed_reverse_kl``, ``lam = 0.1``). DistiLLM's
``skewed_forward_kl`` returns the cross-entropy ``-sum p_t log m``; kdcompose returns the KL,
which differs by the teacher's entropy (a constant for the student: same gradient) and is 0 when
the distributions agree. ``alpha = 0`` is plain forward / reverse KL (the same code path).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import model_validator
from torch import Tensor

from kdcompose.functional.divergences._params import Probability
from kdcompose.functional.divergences.base import ChunkOps, Divergence, DivergenceParams
from kdcompose.functional.divergences.kl import forward_kl_chunk, reverse_kl_chunk
from kdcompose.registry import register_divergence


class SkewParams(DivergenceParams):
    alpha: Probability = 0.1
    """Share of the target side in the mixture, in [0, 1); DistiLLM's default 0.1."""

    @model_validator(mode="after")
    def _below_one(self) -> SkewParams:
        if self.alpha >= 1.0:
            raise ValueError(
                f"alpha must be < 1 (at 1 the mixture is the first distribution itself and the divergence "
                f"is 0 whatever the student does), got {self.alpha:g}; DistiLLM uses 0.1"
            )
        return self


@register_divergence("skew_fkl")
class SkewForwardKL(Divergence):
    """KL(p_t || m), m = alpha p_t + (1 - alpha) p_s (DistiLLM skew KL)."""

    Params = SkewParams
    params: SkewParams
    scratch_buffers = 3
    short_names: ClassVar[dict[str, str]] = {"alpha": "a"}

    def value(self, ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
        t = lt.exp()
        lm = torch.lerp(ls.exp(), t, self.params.alpha).clamp_min(torch.finfo(ls.dtype).tiny).log()
        return ops.rowsum(t * (lt - lm))

    def value_and_grad(self, ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
        """Gradient ``-coef (1 - alpha) s (r - <s, r>)`` with ``r = t / m``."""
        alpha = self.params.alpha
        if alpha == 0.0:
            return forward_kl_chunk(ls, lt, ops)
        c, d, e = ops.scratch[0], ops.scratch[1], ops.scratch[2]
        s = torch.exp(ls, out=c)
        t = torch.exp(lt, out=d)
        m = torch.lerp(s, t, alpha, out=ls).clamp_min_(torch.finfo(ls.dtype).tiny)
        r = torch.div(t, m, out=e) if ops.grad_out is not None else None
        lm = m.log_()
        per_row = ops.rowdot(t, torch.sub(lt, lm, out=lt), out=lt)
        if r is not None:
            sr = ops.rowdot(s, r, out=d)
            ops.write_centered_grad(r, sr, s, -(1.0 - alpha))
        return per_row

    def teacher_zeros_ok(self) -> bool:
        return True  # p_t = 0 contributes nothing


@register_divergence("skew_rkl")
class SkewReverseKL(Divergence):
    """KL(p_s || m), m = alpha p_s + (1 - alpha) p_t (DistiLLM skew reverse KL)."""

    Params = SkewParams
    params: SkewParams
    scratch_buffers = 3
    short_names: ClassVar[dict[str, str]] = {"alpha": "a"}

    def value(self, ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
        s = ls.exp()
        lm = torch.lerp(lt.exp(), s, self.params.alpha).clamp_min(torch.finfo(ls.dtype).tiny).log()
        return ops.rowsum(s * (ls - lm))

    def value_and_grad(self, ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
        """Gradient ``coef s (h - <s, h>)`` with ``h = log s - log m - alpha s / m``."""
        alpha = self.params.alpha
        if alpha == 0.0:
            return reverse_kl_chunk(ls, lt, ops)
        c, d, e = ops.scratch[0], ops.scratch[1], ops.scratch[2]
        s = torch.exp(ls, out=c)
        m = torch.lerp(torch.exp(lt, out=d), s, alpha, out=d).clamp_min_(torch.finfo(ls.dtype).tiny)
        q = torch.div(s, m, out=e) if ops.grad_out is not None else None
        lm = m.log_()
        diff = torch.sub(ls, lm, out=ls)
        per_row = ops.rowdot(s, diff, out=lt)
        if q is not None:
            h = torch.add(diff, q, alpha=-alpha, out=diff)
            sh = ops.rowdot(s, h, out=lt)
            ops.write_centered_grad(h, sh, s)
        return per_row

    zero_mass_reason = "at alpha 0 it is KL(p_s || p_t), infinite where the truncated teacher has no mass"

    def teacher_zeros_ok(self) -> bool:
        # Where p_t = 0, m = alpha p_s: the term is p_s log(1 / alpha), finite only for alpha > 0.
        return self.params.alpha > 0.0
