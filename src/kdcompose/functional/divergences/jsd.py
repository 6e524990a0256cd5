"""Generalized Jensen-Shannon divergence, exactly as TRL's ``generalized_jsd_loss`` and ms-swift 4.6.

``beta == 0``: KL(t || s); ``beta == 1``: KL(s || t); otherwise
``beta * KL(t || m) + (1 - beta) * KL(s || m)`` with ``m = (1 - beta) s + beta t``. The endpoints are
full KL divergences while ``beta -> 0+`` / ``1-`` tends to 0: a jump inherited on purpose so configs
keep their meaning (see :mod:`kdcompose.functional.jsd`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdcompose.functional.divergences._params import Probability
from kdcompose.functional.divergences.base import ChunkOps, Divergence, DivergenceParams
from kdcompose.functional.divergences.kl import forward_kl_chunk, reverse_kl_chunk
from kdcompose.registry import register_divergence


class JsdParams(DivergenceParams):
    beta: Probability = 0.5
    """Interpolation in [0, 1]: 0 = KL(teacher||student), 1 = KL(student||teacher)."""


@register_divergence("jsd")
class GeneralizedJSD(Divergence):
    """Generalized JSD (TRL / ms-swift semantics, including the jump at beta 0 and 1)."""

    Params = JsdParams
    params: JsdParams
    scratch_buffers = 2

    @property
    def beta(self) -> float:
        return self.params.beta

    def value(self, ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
        beta = self.beta
        s, t = ls.exp(), lt.exp()
        if beta == 0.0:
            return ops.rowsum(t * (lt - ls))
        if beta == 1.0:
            return ops.rowsum(s * (ls - lt))
        lm = torch.lerp(s, t, beta).clamp_min(torch.finfo(ls.dtype).tiny).log()
        return beta * ops.rowsum(t * (lt - lm)) + (1.0 - beta) * ops.rowsum(s * (ls - lm))

    def value_and_grad(self, ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
        """Gradient ``coef * (1 - beta) * s * (log s - log m - KL(s || m))`` inside (0, 1).

        The mixture is formed in probability space (cheaper than a stacked logsumexp); where both
        probabilities underflow, clamping keeps ``log m`` finite so ``0 * (log t - log m)`` stays 0.
        With a spare buffer (``ops.grad_scratch``) ``exp(log s)`` is computed once, else twice.
        """
        beta = self.beta
        if beta == 0.0:
            return forward_kl_chunk(ls, lt, ops)
        if beta == 1.0:
            return reverse_kl_chunk(ls, lt, ops)
        tiny = torch.finfo(ls.dtype).tiny
        c, d = ops.scratch[0], ops.scratch[1]
        t = torch.exp(lt, out=d)
        spare = ops.grad_scratch
        if spare is not None:
            s = torch.exp(ls, out=c)
            lm = torch.lerp(s, t, beta, out=spare).clamp_min_(tiny).log_()
            kl_t = ops.rowdot(t, torch.sub(lt, lm, out=lt), out=lt)
            diff_s = torch.sub(ls, lm, out=ls)
            kl_s = ops.rowdot(s, diff_s, out=d)
            grad_src = diff_s
        else:
            lm = torch.lerp(torch.exp(ls, out=c), t, beta, out=c).clamp_min_(tiny).log_()
            kl_t = ops.rowdot(t, torch.sub(lt, lm, out=lt), out=lt)
            diff_s = torch.sub(ls, lm, out=d)
            s = ls.exp_()
            kl_s = ops.rowdot(s, diff_s, out=c)
            grad_src = diff_s
        if ops.grad_out is not None:
            ops.write_centered_grad(grad_src, kl_s, s, 1.0 - beta)
        return kl_t.mul_(beta).add_(kl_s, alpha=1.0 - beta)

    def teacher_zeros_ok(self) -> bool:
        # As lm_jsd: against a truncated teacher only the forward KL (beta 0) is used.
        return self.beta == 0.0

    def missing_mass_issue(self, missing_mass: str) -> str | None:
        if missing_mass == "zero" and self.beta != 0.0:
            return (
                "missing_mass: zero compares a truncated teacher with the full student, which only a "
                f"forward KL does meaningfully: set `beta: 0` (got {self.beta:g}), or use renorm / tail"
            )
        return None
