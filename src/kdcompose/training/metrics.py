"""Per-term metrics aggregated exactly like the logged `loss`, with no device sync per micro-step.

What transformers 5.19 / ms-swift 4.6 log as `loss` (GKD path; see docs/metrics.md):
`compute_loss` returns the micro-batch loss L; `training_step` divides it by the number of
micro-batches G of the optimizer step (ms-swift's GKD batches are lists of raw rows, so
`num_items_in_batch` is None and the loss counts as "not scaled for gradient
accumulation"); the per-rank running sum is all-gathered and averaged over ranks at each
logging step and divided by the number of optimizer steps in the window. So

    loss = 1 / (R * steps) * sum over ranks, steps, micro-batches of L / G

Evaluation: `eval_loss` is the mean of the gathered per-sample copies of each batch loss
(`eval_batch_size` copies per batch; on the last batch accelerate keeps only the first
`remainder` copies across ranks), i.e. a mean of batch losses weighted by those counts.

`TermWindow` aggregates every term's contribution the same way: each micro-batch adds
`value * weight` to the key's running sum (a device tensor) and `weight` to the window's
denominator (a Python float), where `weight` is `1 / G` in training and the sample count
above in evaluation. A term that did not run on a micro-batch adds 0 there, so the logged
terms add up to the logged `loss`. A term that ran on no micro-batch of the window (on any
rank) is left out of the row rather than logged as 0. `<metric>_weight` (a scheduled term's
effective weight) is not a contribution: it is averaged over the micro-batches the term ran
on. At a logging step one `all_reduce` of all sums and denominators makes every rank log the
same values (so best-model and early-stopping decisions agree), then the window restarts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

CONTRIBUTION, VALUE = "contribution", "value"


def zero_where_nonfinite(
    contributions: Mapping[str, torch.Tensor], finite: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Every contribution replaced by 0 where `finite` (a 0-d bool tensor) is False: the
    micro-batch then counts as 0 in the terms exactly as the masked loss does in `loss`."""
    return {k: torch.where(finite, v, torch.zeros_like(v)) for k, v in contributions.items()}


def train_micro_batch_weight(accumulation_steps: int) -> float:
    """A training micro-batch's weight: 1 / G, as `training_step` scales its loss."""
    return 1.0 / max(1, int(accumulation_steps))


def eval_batch_weight(batch_size: int, *, last: bool, remainder: int, rank: int) -> float:
    """How many of transformers' per-sample eval-loss copies of this batch survive.

    Every batch loss is repeated `batch_size` times and gathered rank by rank; on the last
    batch `gather_for_metrics` keeps the first `remainder` gathered copies (when > 0).
    """
    if not last or remainder <= 0:
        return float(batch_size)
    return float(min(max(remainder - rank * batch_size, 0), batch_size))


@dataclass
class _Running:
    total: torch.Tensor | None = None
    count: int = 0
    weight: float = 0.0
    """Only for VALUE keys: the sum of the weights of the micro-batches that reported it."""


@dataclass
class TermWindow:
    """Running per-key sums of one mode between two logging steps (see the module doc)."""

    weight: float = 0.0
    """Sum of the micro-batch weights recorded in the window (the contributions' denominator)."""
    contributions: dict[str, _Running] = field(default_factory=dict)
    values: dict[str, _Running] = field(default_factory=dict)

    def add(
        self, contributions: Mapping[str, torch.Tensor], values: Mapping[str, float], weight: float
    ) -> None:
        """Record one micro-batch (call it for every micro-batch, even when no term ran)."""
        self.weight += weight
        for key, value in contributions.items():
            running = self.contributions.setdefault(key, _Running())
            scaled = value.detach().float() * weight
            running.total = (
                scaled if running.total is None else running.total + scaled.to(running.total.device)
            )
            running.count += 1
        for key, value in values.items():
            running = self.values.setdefault(key, _Running())
            previous = 0.0 if running.total is None else running.total
            running.total = previous + float(value) * weight  # type: ignore[assignment]
            running.count += 1
            running.weight += weight

    def reset(self) -> None:
        self.weight = 0.0
        self.contributions.clear()
        self.values.clear()

    def reduce(self, prefix: str = "", device: torch.device | str | None = None) -> dict[str, float]:
        """The window's values (same on every rank), keyed with `prefix`; then restart the window.

        A collective when torch.distributed is initialized: every rank must call it at the
        same logging step, as ms-swift's own metrics require.
        """
        local = [(k, CONTRIBUTION) for k in self.contributions] + [(k, VALUE) for k in self.values]
        keys = _union_over_ranks(local)
        device = torch.device(device) if device is not None else _device_of(self.contributions)
        state = [torch.tensor(self.weight, dtype=torch.float32, device=device)]
        for key, kind in keys:
            running = (self.contributions if kind == CONTRIBUTION else self.values).get(key, _Running())
            if kind == CONTRIBUTION:
                total = running.total if running.total is not None else torch.zeros((), device=device)
                state += [total.to(device=device, dtype=torch.float32), _scalar(running.count, device)]
            else:
                state += [_scalar(running.total or 0.0, device), _scalar(running.weight, device)]
        reduced = torch.stack(state)
        if is_distributed():
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        numbers = reduced.tolist()  # the one host sync of the logging step
        self.reset()
        window, out = numbers[0], {}
        for i, (key, kind) in enumerate(keys):
            total, second = numbers[1 + 2 * i], numbers[2 + 2 * i]
            denominator = window if kind == CONTRIBUTION else second
            if second > 0 and denominator > 0:  # CONTRIBUTION: `second` = micro-batches it ran on
                out[f"{prefix}{key}"] = total / denominator
        return out


def _scalar(value: float, device: torch.device) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def _device_of(running: Mapping[str, _Running]) -> torch.device:
    for item in running.values():
        if item.total is not None:
            return item.total.device
    return torch.device("cpu")


def is_distributed() -> bool:
    """A process group of more than one rank is up (then reductions are collectives)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _union_over_ranks(local: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The sorted union of every rank's (key, kind) pairs, so every rank reduces the same
    layout (a rank where a term never ran contributes zeros to it)."""
    if not is_distributed():
        return sorted(set(local))
    gathered: list[list[tuple[str, str]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return sorted({item for items in gathered for item in (items or [])})


__all__ = [
    "TermWindow",
    "eval_batch_weight",
    "is_distributed",
    "train_micro_batch_weight",
    "zero_where_nonfinite",
]
