"""Cross-entropy on aligned logits/labels, as ms-swift's SFT term computes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcompose.defaults import IGNORE_INDEX
from kdcompose.primitives import connected_zero


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over positions whose label is not -100.

    Same value as `torch.nn.functional.cross_entropy(..., ignore_index=-100)` computed in
    fp32 (transformers upcasts logits before its loss too). Unlike it, a batch with no
    valid label yields a graph-connected 0 instead of NaN, so one empty micro-batch cannot
    poison a step or hang DDP.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the logits' leading shape "
            f"{tuple(logits.shape[:-1])} (labels already aligned with the logits)"
        )
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    if not bool((flat_labels != IGNORE_INDEX).any()):
        return connected_zero(logits)
    # ignore_index rather than `logits[valid]`: selecting the rows would copy the logits in forward
    # and scatter a zero-filled logits-sized gradient in backward (2x the CE time on a CPU).
    return F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="mean")
