"""Token normalization of token-level terms: per micro-batch (ms-swift's default) or per optimizer step.

Why a choice: ms-swift's GKD divides the JSD of each micro-batch by that micro-batch's own
valid tokens, and the trainer then averages micro-batches (and DDP averages ranks). With
uneven token counts the optimized objective therefore depends on how a batch is split
across gradient-accumulation micro-batches and ranks (TRL #4719, ms-swift PR #6006): a
micro-batch with 3 labelled tokens weighs as much as one with 300. That stays the default,
so configs keep training exactly as before. `normalize: global_tokens` on a term divides its
token sum by the valid tokens of the whole optimizer step instead, across micro-batches and
ranks, so every token of the step weighs the same however the step is split.

The arithmetic, with G micro-batches per optimizer step, R data-parallel ranks, `S_i` the
term's token sum and `n_i` its valid tokens on micro-batch i, and `N = sum of n_i` over the
step's micro-batches on every rank::

    the trainer divides each micro-batch loss by G, DDP averages the ranks' gradients, so
    micro_batch:    step objective = 1/(R G) * sum_i S_i / n_i
    global_tokens:  a micro-batch contributes S_i / D with D = N / (R G)
                    step objective = 1/(R G) * sum_i S_i / D = sum_i S_i / N

which is also how transformers' Trainer scales a loss normalised by `num_items_in_batch`
(multiply by the world size, do not divide by G). A term computes its micro-batch mean
`m_i = S_i / n_i` as always; `token_normalized` turns it into `m_i * n_i / D`, so the term
itself needs no second code path and every implementation of its mean (chunked, fused)
gets the option for free. Pure functions, no trainer imports.
"""

from __future__ import annotations

from typing import Literal

import torch

from kdcompose.defaults import IGNORE_INDEX

TokenNormalization = Literal["micro_batch", "global_tokens"]
"""`micro_batch`: mean over the micro-batch's valid tokens (ms-swift, the default);
`global_tokens`: token sum over the valid tokens of the whole optimizer step, all ranks."""
MICRO_BATCH: TokenNormalization = "micro_batch"
GLOBAL_TOKENS: TokenNormalization = "global_tokens"


def valid_token_count(labels: torch.Tensor) -> torch.Tensor:
    """Positions that carry a label (`!= -100`), as a 0-d int64 tensor on the labels' device.

    The trainer counts the *unshifted* labels of a micro-batch: ms-swift aligns logits and
    labels with `torch.roll(labels, -1)`, a permutation, so the count is the same.
    """
    return (labels != IGNORE_INDEX).sum()


def step_token_denominator(
    step_tokens: torch.Tensor, world_size: int, accumulation_steps: int
) -> torch.Tensor:
    """`D = max(N, 1) / (R G)`: what a `global_tokens` term divides its micro-batch token sum by.

    `step_tokens` is N, the valid tokens of the optimizer step summed over its micro-batches
    and over ranks. `max(N, 1)`: a step without a single labelled token gives 0, not NaN.
    """
    if world_size < 1 or accumulation_steps < 1:
        raise ValueError(
            f"world_size and accumulation_steps must be >= 1, got {world_size}, {accumulation_steps}"
        )
    return step_tokens.clamp_min(1).to(torch.float32) / float(world_size * accumulation_steps)


def token_normalized(
    mean: torch.Tensor,
    labels: torch.Tensor | None,
    normalize: TokenNormalization,
    denominator: torch.Tensor | None,
) -> torch.Tensor:
    """A term's micro-batch token mean, renormalized as `normalize` asks.

    `micro_batch`, or no `denominator` / `labels`: `mean` unchanged. `global_tokens`:
    `mean * n / D` (= token sum / D), with n the valid positions of `labels`; the gradient is
    the mean's gradient scaled by `n / D`, and a micro-batch without labels stays a
    graph-connected 0.
    """
    if normalize == MICRO_BATCH or denominator is None or labels is None:
        return mean
    count = valid_token_count(labels).to(device=mean.device, dtype=mean.dtype)
    return mean * (count / denominator.to(device=mean.device, dtype=mean.dtype))


__all__ = [
    "GLOBAL_TOKENS",
    "MICRO_BATCH",
    "TokenNormalization",
    "step_token_denominator",
    "token_normalized",
    "valid_token_count",
]
