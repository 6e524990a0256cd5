"""Top-K log-probabilities straight from hidden states and the LM head, one vocabulary slice at a time.

What a teacher server needs per scored position: the K most probable tokens with their
log-probabilities, the log-probability of the actual next token, and that token's rank. Computing
the full logits first costs a ``[positions, vocab]`` tensor (about 600 kB per position for a
151,936-token vocabulary) and, when it is made a few rows at a time to bound memory, one read of
the whole LM-head weight per chunk of rows. Here the rows of a whole forward are kept together
and the vocabulary is walked in slices: each slice's logits ``[rows, slice]`` stay small enough to
live in the CPU caches while the running statistics are updated -- an online log-sum-exp (as in
flash-attention's softmax), a running top-K merged with the slice's top-K, and the count of
tokens whose logit beats the actual token's. The weight is read once per forward, so rows that
share a forward (concurrent calls) share that read.

The actual token's logit comes from its own weight row (a dot product in float32) rather than
from the slice that holds it; a token whose logit is within rounding of it may count on either
side for the rank (the rank is informational in vLLM's layout; ms-swift does not read it). Pure
tensor math, no gradient; the logits of a slice are the head's own output (``F.linear`` in the
model's dtype) upcast to float32, as the full-logits path computes them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SLICE_BYTES", "SLICE_BYTES_ACCELERATOR", "head_topk"]

SLICE_BYTES = 4 << 20
"""Float32 logits of one slice on a CPU (rows x slice columns x 4 bytes): cache-sized."""
SLICE_BYTES_ACCELERATOR = 1 << 30
_MIN_SLICE = 256


@torch.no_grad()
def head_topk(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    k: int,
    *,
    slice_bytes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For rows ``hidden [N, H]`` of a head ``weight [V, H]`` (+ ``bias [V]``) and the actual
    next tokens ``targets [N]``: ``(top_logprobs [N, K] float32, top_ids [N, K] int64,
    target_logprobs [N] float32, target_rank [N] int64)``, by descending probability; rank 1 is
    the most probable token. ``K = min(k, V)``; ``k = 0`` gives empty top-K columns."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    k = min(int(k), vocab)
    device = hidden.device
    budget = slice_bytes or (SLICE_BYTES if device.type == "cpu" else SLICE_BYTES_ACCELERATOR)
    width = max(_MIN_SLICE, budget // (4 * max(1, rows)))
    targets = targets.to(device=device, dtype=torch.int64)
    own = (hidden.float() * weight[targets].float()).sum(-1)
    if bias is not None:
        own = own + bias[targets].float()
    running_max = torch.full((rows,), float("-inf"), device=device)
    running_sum = torch.zeros(rows, device=device)
    above = torch.zeros(rows, dtype=torch.int32, device=device)
    top_values = torch.full((rows, k), float("-inf"), device=device)
    top_ids = torch.zeros((rows, k), dtype=torch.int64, device=device)
    for start in range(0, vocab, width):
        end = min(start + width, vocab)
        logits = torch.nn.functional.linear(
            hidden, weight[start:end], None if bias is None else bias[start:end]
        ).float()
        slice_max = logits.max(dim=-1).values
        new_max = torch.maximum(running_max, slice_max)
        running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(
            logits - new_max[:, None]
        ).sum(-1)
        running_max = new_max
        beats = logits > own[:, None]
        inside = (targets >= start) & (targets < end)
        if bool(inside.any()):  # the actual token never counts against itself
            beats[inside, targets[inside] - start] = False
        above += beats.sum(-1, dtype=torch.int32)  # int32: twice as fast as the default int64 sum
        if k:
            values, ids = torch.topk(logits, min(k, end - start), dim=-1)
            merged_values = torch.cat([top_values, values], dim=-1)
            merged_ids = torch.cat([top_ids, ids + start], dim=-1)
            top_values, order = torch.topk(merged_values, k, dim=-1)
            top_ids = merged_ids.gather(-1, order)
    log_total = running_max + torch.log(running_sum)
    return top_values - log_total[:, None], top_ids, own - log_total, above.to(torch.int64) + 1
