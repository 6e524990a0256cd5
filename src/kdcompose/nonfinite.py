"""What to do when a loss term yields NaN or inf: the policy, the flags, the verdict.

Why per term (`on_nonfinite` on every term's spec, default `error`): a skipped step is a
decision about the whole optimizer step, but whether a NaN is tolerable depends on the
term — a flaky experimental term may be allowed to skip its rare bad steps while a NaN in
the core KD term must stop the run. The step is skipped only when *every* term that went
non-finite says `skip_step`; otherwise the error names each offending term.

Why flags and not a check per micro-batch: testing `torch.isfinite(x)` in Python would sync
the device on every micro-batch. `nonfinite_flags` stays on the device; the trainer ORs the
flags of a step's micro-batches, reduces them over ranks once per optimizer step (so every
rank reaches the same verdict) and reads them then. Everything here is pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

OnNonFinite = Literal["error", "skip_step"]
"""`error` (default): stop with an error naming the term and the step, before the optimizer
applies the step. `skip_step`: discard the step's gradients, leave the weights and optimizer
state untouched, count the step in `nonfinite_skipped_steps`."""
ERROR: OnNonFinite = "error"
SKIP_STEP: OnNonFinite = "skip_step"

TOTAL = "<sum of terms>"
"""Pseudo term name for a total that overflowed although every term was finite."""

NAN, INF = 0, 1
"""Columns of a flag row: the value was NaN / was +-inf."""


class NonFiniteLossError(RuntimeError):
    """A loss term produced NaN or inf; the message names the term(s) and the step."""

    def __init__(self, message: str, terms: Sequence[str], step: int) -> None:
        super().__init__(message)
        self.terms = tuple(terms)
        self.step = step


def nonfinite_flags(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """`[len(values), 2]` bool tensor: row i is (isnan, isinf) of scalar i. No device sync."""
    if not values:
        return torch.zeros((0, 2), dtype=torch.bool)
    stacked = torch.stack([v.detach().reshape(()).float() for v in values])
    return torch.stack([torch.isnan(stacked), torch.isinf(stacked)], dim=1)


@dataclass(frozen=True)
class Verdict:
    """What one optimizer step's flags mean."""

    offending: Mapping[str, tuple[str, ...]]
    """Term name -> kinds seen ("NaN", "inf"), for every term that was non-finite."""
    skip: bool
    """True when the step must be skipped (every offending term allows it)."""

    @property
    def culprits(self) -> tuple[str, ...]:
        """The offending terms; `TOTAL` only when no term was non-finite itself."""
        terms = tuple(n for n in self.offending if n != TOTAL)
        return terms or tuple(self.offending)

    @property
    def ok(self) -> bool:
        return not self.offending

    @property
    def error(self) -> bool:
        return bool(self.offending) and not self.skip


def verdict(
    flags: Sequence[Sequence[bool]], names: Sequence[str], policies: Mapping[str, OnNonFinite]
) -> Verdict:
    """Decide from reduced flags (`flags[i] = (nan, inf)` for `names[i]`) and each term's policy.

    A non-finite term makes the sum non-finite too, so then the terms alone decide. `TOTAL`
    alone (finite terms whose sum overflowed) has no policy of its own: it skips only when
    every active term may skip. Any name without a policy is treated as `error`.
    """
    offending: dict[str, tuple[str, ...]] = {}
    for name, (nan, inf) in zip(names, flags, strict=True):
        kinds = tuple(kind for kind, seen in (("NaN", nan), ("inf", inf)) if seen)
        if kinds:
            offending[name] = kinds
    if not offending:
        return Verdict({}, skip=False)
    allows = {n: p == SKIP_STEP for n, p in policies.items()}
    terms = [n for n in offending if n != TOTAL]
    if terms:  # a NaN term makes the sum NaN too: the terms decide
        return Verdict(offending, skip=all(allows.get(n, False) for n in terms))
    return Verdict(offending, skip=bool(allows) and all(allows.values()))


def describe(offending: Mapping[str, tuple[str, ...]], metric_keys: Mapping[str, str] | None = None) -> str:
    """`term 'lm_jsd' (llm_kd_loss): NaN; term 'ce' (sft_loss): inf`."""
    parts = []
    terms_offending = any(name != TOTAL for name in offending)
    for name, kinds in offending.items():
        if name == TOTAL and terms_offending:
            continue  # the offending term made the sum non-finite; naming the sum adds nothing
        if name == TOTAL:
            parts.append(f"the sum of the terms (each finite): {'/'.join(kinds)}")
            continue
        key = (metric_keys or {}).get(name)
        parts.append(f"term {name!r}{f' ({key})' if key else ''}: {'/'.join(kinds)}")
    return "; ".join(parts)


def error_message(
    offending: Mapping[str, tuple[str, ...]],
    global_step: int,
    *,
    mode: str = "train",
    metric_keys: Mapping[str, str] | None = None,
) -> str:
    """The message of the error raised for an offending training step or evaluation (a
    training step's is raised before its update is applied, with or without DeepSpeed)."""
    what = describe(offending, metric_keys)
    if mode == "eval":
        return f"non-finite loss during evaluation at global_step {global_step}: {what}"
    where = (
        f"at optimizer step {global_step + 1} (global_step {global_step} while it was computed; "
        f"logging.jsonl labels it step {global_step + 1})"
    )
    state = "The step was not applied: the weights are those of the previous step."
    hint = (
        "Set `on_nonfinite: skip_step` on the term to skip such steps instead (counted in "
        "`nonfinite_skipped_steps`), or lower the learning rate / check the data."
    )
    return f"non-finite loss {where}: {what}. {state} {hint}"


__all__ = [
    "ERROR",
    "SKIP_STEP",
    "TOTAL",
    "NonFiniteLossError",
    "OnNonFinite",
    "Verdict",
    "describe",
    "error_message",
    "nonfinite_flags",
    "verdict",
]
