"""Loss math next to sharded LM heads (DeepSpeed ZeRO-3, PyTorch FSDP2), without ms-swift.

A fused term reads the LM head's weight directly; under ZeRO-3 or FSDP2 each rank holds only a
shard of it. These helpers make a fused computation see the full weight and send its gradient
back into the shards (tests/test_engines_deepspeed.py, tests/test_fsdp2_loss.py). They are
no-ops when nothing is sharded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def zero3_partitioned(param: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned this parameter (it carries a `ds_id`)."""
    return hasattr(param, "ds_id")


def is_sharded(module: nn.Module) -> bool:
    """Whether the module's own parameters are sharded by ZeRO-3 or FSDP2 (DTensor parameters)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch >= 2.4 has it
        DTensor = ()
    return any(zero3_partitioned(p) or isinstance(p, DTensor) for p in module.parameters(recurse=False))


@contextmanager
def gathered_lm_head(model_or_head: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the LM head's full `weight` (and `bias`) are materialised on every rank.

    `model_or_head`: the head itself (`nn.Linear`) or a model whose `get_output_embeddings()` is
    it (unwrapped; PEFT is fine). Yields the head. Under ZeRO-3 the parameters are gathered with
    `deepspeed.zero.GatheredParameters(..., modifier_rank=None)`: read-only (no rank's edits are
    broadcast back), and gradients of a loss computed *from the gathered weight inside the block*
    flow to the partitioned parameter -- DeepSpeed's hooks reduce-scatter them into the owner's
    partition at backward as they do for a module forward. Elsewhere (no DeepSpeed, ZeRO-0/1/2,
    DDP, already-gathered parameters) it is a no-op. Every rank must enter the block (it is a
    collective), including ranks whose micro-batch has no labelled token.
    """
    head = model_or_head
    if not hasattr(head, "weight"):
        get_head = getattr(model_or_head, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if head is None or not hasattr(head, "weight"):
            raise TypeError(f"{type(model_or_head).__name__} has no LM head (get_output_embeddings())")
    params = [p for p in (head.weight, getattr(head, "bias", None)) if isinstance(p, torch.Tensor)]
    partitioned = [p for p in params if zero3_partitioned(p)]
    if not partitioned:
        yield head
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield head


def call_through_head(
    head: nn.Module, compute: Callable[..., torch.Tensor], *inputs: torch.Tensor
) -> torch.Tensor:
    """`compute(head, *inputs)` run *as the head module's forward*, so that DeepSpeed ZeRO-3's
    module hooks gather the head's parameters for it and gather them again in backward.

    Why not just `gathered_lm_head` for a trainable head: the fused JSD hands the weight gradient
    to autograd in backward, which runs after `compute_loss` returns, when ZeRO-3 has already
    re-partitioned the weight (`param.data` is empty). Autograd then refuses the full-size
    gradient (`The size of tensor a (0) must match the size of tensor b (H)`, measured with
    DeepSpeed 0.19.8). A module's forward is the unit ZeRO-3 manages both ways: pre-forward it
    gathers the parameters, post-forward it releases them and wraps the outputs so that backward
    re-gathers them before any gradient reaches them, then reduce-scatters the gradients.

    The same holds for PyTorch FSDP2 (`fully_shard`): its pre-forward hook unshards the head (the
    DTensor parameters become plain full tensors inside the call), its pre-backward hook unshards
    again and its post-backward hook reduce-scatters the weight gradient into the shards
    (tests/test_fsdp2_loss.py).

    `compute` must return tensors (the loss); `inputs` are passed through the module call (the
    hidden states). Elsewhere (nothing sharded) it is simply `compute(head, *inputs)`. Forward hooks on
    the head (e.g. an open `tap_lm_head`) fire for this call too: close them first.
    """
    if not is_sharded(head):
        return compute(head, *inputs)

    def forward(*args: torch.Tensor) -> torch.Tensor:
        return compute(head, *args)

    head.forward = forward  # an instance attribute shadows the class's forward for this call only
    try:
        return head(*inputs)
    finally:
        del head.forward
