"""Small primitives every layer uses, defined once: the ignore index, a graph-connected zero,
model unwrapping and the distributed check."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from kdcompose.defaults import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "connected_zero", "distributed", "unwrap_model"]


def connected_zero(anchor: torch.Tensor) -> torch.Tensor:
    """A 0-d zero that is part of `anchor`'s autograd graph, so a rank or micro-batch that
    contributes nothing still runs backward through the same parameters (DDP would hang
    otherwise). It is the sum of an empty slice: finite even when `anchor` holds ±inf or NaN,
    where the usual `anchor.sum() * 0` is NaN."""
    return anchor.reshape(-1)[:0].sum().float()


def distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def unwrap_model(model: Any) -> Any:
    """The model inside DDP / DeepSpeed engine wrappers (`.module` chains)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model
