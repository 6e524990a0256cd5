"""Forward and reverse Kullback-Leibler divergence (the endpoints of the generalized JSD).

``fkl``: KL(p_t || p_s), "mode covering" (Qwen3's on-policy distillation, classic Hinton KD
without the T^2 factor). ``rkl``: KL(p_s || p_t), "mode seeking" (DeepSeek-V4, GLM-5, MiniLLM).
The closed forms are shared with ``jsd`` at beta 0 / 1 and with ``skew_*`` at alpha 0, so
those identities hold exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdcompose.functional.divergences.base import ChunkOps, Divergence
from kdcompose.registry import register_divergence


def forward_kl_chunk(ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
    """KL(t || s) per row; gradient ``coef * (s - t)``. One scratch buffer."""
    diff = torch.sub(lt, ls, out=ops.scratch[0])
    t = lt.exp_()
    per_row = ops.rowdot(t, diff, out=diff)
    if ops.grad_out is not None:
        s = ls.exp_()
        ops.write_grad(s.sub_(t))
    return per_row


def reverse_kl_chunk(ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
    """KL(s || t) per row; gradient ``coef * s * (log s - log t - KL)``. One scratch buffer."""
    diff = torch.sub(ls, lt, out=lt)
    s = ls.exp_()
    per_row = ops.rowdot(s, diff, out=ops.scratch[0])
    if ops.grad_out is not None:
        ops.write_centered_grad(diff, per_row, s)
    return per_row


@register_divergence("fkl")
class ForwardKL(Divergence):
    """KL(p_t || p_s) = sum p_t (log p_t - log p_s)."""

    scratch_buffers = 1

    def value(self, ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
        return ops.rowsum(lt.exp() * (lt - ls))

    def value_and_grad(self, ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
        return forward_kl_chunk(ls, lt, ops)

    def teacher_zeros_ok(self) -> bool:
        return True  # p_t = 0 contributes nothing


@register_divergence("rkl")
class ReverseKL(Divergence):
    """KL(p_s || p_t) = sum p_s (log p_s - log p_t)."""

    scratch_buffers = 1
    zero_mass_reason = "KL(p_s || p_t) is infinite where the truncated teacher has no mass"

    def value(self, ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
        return ops.rowsum(ls.exp() * (ls - lt))

    def value_and_grad(self, ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
        return reverse_kl_chunk(ls, lt, ops)
