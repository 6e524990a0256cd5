"""Per-term metrics through ms-swift's own metric containers, without a sync per micro-step.

ms-swift's `SwiftMixin.log` reads `trainer.custom_metrics[mode]` at every logging step:
it syncs the keys across ranks, calls `compute()` (which all-reduces `[sum, count]`) and
`reset()` on each, and adds the values to the logs (with the `eval_` prefix in evaluation).
Its stock `MeanMetric.update` calls `.item()` on every value, a device sync per micro-batch
and per term. `TensorMean` keeps the running sum on the device instead and speaks the same
protocol (one float32 all-reduce of `[sum, count]` in `compute`), so ranks that hold a stock
`MeanMetric` for the same key still meet it in the same collective. A term that did not
apply on any micro-batch of a logging step (e.g. `sft_loss` on student-generated batches)
reports nothing rather than 0.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
import torch.distributed as dist


class TensorMean:
    """Mean of scalar tensors over a logging step (and over ranks)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, value: torch.Tensor | float) -> None:
        value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        self.total = value if self.total is None else self.total + value.to(self.total.device)
        self.count += 1

    def compute(self) -> dict[str, float | None]:
        device = self.device or (self.total.device if self.total is not None else torch.device("cpu"))
        total = self.total.to(device) if self.total is not None else torch.zeros((), device=device)
        state = torch.stack([total, torch.tensor(float(self.count), device=device)]).to(torch.float32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(state, op=dist.ReduceOp.SUM)
        value_sum, count = state.tolist()
        return {"value": value_sum / count if count else None}

    def reset(self) -> None:
        self.total = None
        self.count = 0


def record(
    containers: MutableMapping[str, Any],
    values: Mapping[str, torch.Tensor],
    device: torch.device | str | None,
) -> None:
    """Add each value to its key's `TensorMean` in `containers` (a `custom_metrics[mode]`)."""
    for key, value in values.items():
        metric = containers.get(key)
        if not isinstance(metric, TensorMean):
            if metric is not None and getattr(metric, "count", 0):
                metric.update(value)  # a stock metric that already holds values: keep feeding it
                continue
            metric = containers[key] = TensorMean(device)
        metric.update(value)
