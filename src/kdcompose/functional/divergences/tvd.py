"""Total variation distance, as DistillKit and Liger-Kernel ship it: ``1/2 sum |p_t - p_s|``.

Bounded in [0, 1] and symmetric. Its gradient is the (sub)gradient ``1/2 sign(p_s - p_t)`` pushed
through the softmax (``sign(0) = 0``, as autograd's ``abs``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdcompose.functional.divergences.base import ChunkOps, Divergence
from kdcompose.registry import register_divergence


@register_divergence("tvd")
class TotalVariation(Divergence):
    """1/2 sum |p_t - p_s|."""

    scratch_buffers = 1

    def value(self, ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
        return 0.5 * ops.rowsum((ls.exp() - lt.exp()).abs())

    def value_and_grad(self, ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
        s = ls.exp_()
        t = lt.exp_()
        d = torch.sub(s, t, out=ops.scratch[0])
        per_row = ops.rowsum(torch.abs(d, out=t)).mul_(0.5)
        if ops.grad_out is not None:
            sign = torch.sign(d, out=d)
            r = ops.rowdot(s, sign, out=t)
            ops.write_centered_grad(sign, r, s, 0.5)
        return per_row

    def teacher_zeros_ok(self) -> bool:
        return True  # the student's mass outside the teacher's support counts once, as one bucket
