"""Vocabulary parallelism: logits (or LM-head rows) sharded over a process group.

Each rank holds a contiguous slice of the vocabulary; row maxima and sums over the vocabulary are
all-reduced, so every rank computes the same per-row values and the gradient of its own slice
(the layout of Megatron's vocabulary-parallel LM head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class VocabParallel:
    """The vocabulary is sharded over ``group``: each rank passes its own contiguous slice of the
    logits' last dimension (or of the LM heads' rows), rows and labels are the same on every rank.

    Row maxima and sums over the vocabulary are all-reduced, so each rank computes the same value
    and the gradient of its own slice; with hidden states (fused) the hidden-state gradient is
    all-reduced too (every rank's head rows contribute to it). Every rank must call with the same
    rows, labels and settings (the collectives run in lockstep). Top-K teachers are not supported.
    """

    group: Any

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size(self.group)


def group_of(parallel: VocabParallel | None) -> Any:
    return None if parallel is None else parallel.group


def log_softmax_into(
    x: Tensor, out: Tensor, scratch: Tensor, temperature: float, group: Any = None
) -> Tensor:
    """``out = log_softmax(x / temperature)`` over the whole vocabulary, computed in ``out.dtype``.

    Never writes to ``x`` unless ``x`` *is* ``scratch``; upcasts before dividing so bf16 inputs lose
    nothing more. With a ``group`` the max and the sum of exponentials are all-reduced.
    """
    if temperature != 1.0 or (group is not None and x.dtype != out.dtype):
        if x.data_ptr() != scratch.data_ptr() or x.dtype != scratch.dtype:
            scratch.copy_(x)
            x = scratch
        if temperature != 1.0:
            x.div_(temperature)
    if group is None:
        return torch.log_softmax(x, dim=-1, dtype=out.dtype, out=out)
    top = x.amax(-1)
    torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=group)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    torch.sub(x, top.unsqueeze(-1), out=out)
    sums = torch.exp(out, out=scratch).sum(-1)
    torch.distributed.all_reduce(sums, group=group)
    return out.sub_(sums.log_().unsqueeze(-1))


def row_lse(x: Tensor, scratch: Tensor) -> Tensor:
    """Per-row log-sum-exp through a work buffer (``scratch`` may be ``x``); all -inf -> -inf."""
    m = x.amax(-1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return torch.sub(x, m.unsqueeze(-1), out=scratch).exp_().sum(-1).log_().add_(m)
