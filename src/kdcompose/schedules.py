"""Per-term weight schedules: a multiplier of the configured weight, a pure function of the step.

Why multiply and not replace: a schedule that *replaces* the weight (TextBrewer's schedulers)
silently discards what the user wrote under `weight`; here `weight` keeps its meaning and the
schedule only scales it, so `effective_weight(step) = weight * multiplier(step)`.

Why a pure function of the global step: nothing to checkpoint. A run resumed at step k gets
exactly the multiplier an uninterrupted run has at step k, on every rank.

The formula (w = `warmup_steps`, T = `total_steps`, a = `start`, b = `end`)::

    progress(step) = 0                        if step < w
                   = min(1, (step - w) / T)   if step >= w   (linear, cosine)
                   = 1                        if step >= w   (constant: a switch at step w)
    shape(p)       = p                        (linear, constant)
                   = (1 - cos(pi * p)) / 2    (cosine)
    multiplier     = a                        if progress == 0
                   = b                        if progress == 1
                   = a + (b - a) * shape(progress), clamped into [min(a, b), max(a, b)]

So the multiplier holds `start` up to step `warmup_steps`, moves to `end` over the next
`total_steps` steps (linearly or along a half cosine), and holds `end` afterwards; a
`constant` schedule holds `start` before `warmup_steps` and `end` from it on.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from kdcompose.schema.types import NonNegativeInt, PositiveInt, Weight

ScheduleKind = Literal["constant", "linear", "cosine"]
RAMP_KINDS: tuple[str, ...] = ("linear", "cosine")


Steps = NonNegativeInt
PositiveSteps = PositiveInt


class ScheduleSpec(BaseModel):
    """A term's `schedule:` block. `start`/`end` are multipliers of the term's `weight`
    (finite, >= 0; above 1 is allowed). Steps count optimizer steps (the trainer's
    global step), not micro-batches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ScheduleKind = Field(description="constant (a switch at warmup_steps), linear or cosine")
    warmup_steps: Steps = Field(0, description="optimizer steps the multiplier holds `start` before it moves")
    # validate_default: "required for kind linear" is reported at `total_steps` even when it is absent.
    total_steps: PositiveSteps | None = Field(
        None,
        validate_default=True,
        description="steps the multiplier takes from `start` to `end` (linear and cosine only)",
    )
    start: Weight = Field(description="multiplier up to step `warmup_steps`")
    end: Weight = Field(description="multiplier from step `warmup_steps + total_steps` on")

    @field_validator("total_steps", mode="after")
    @classmethod
    def _total_steps_matches_kind(cls, value: int | None, info: ValidationInfo) -> int | None:
        kind = info.data.get("kind")
        if kind in RAMP_KINDS and value is None:
            message = "required for kind {kind}: the number of steps from `start` to `end`"
            raise PydanticCustomError("missing", message, {"kind": kind})
        if kind == "constant" and value is not None:
            raise ValueError(
                "not used by kind constant (it switches from `start` to `end` at `warmup_steps`); "
                "remove it, or use kind linear for a ramp"
            )
        return value

    @field_validator("end", mode="after")
    @classmethod
    def _constant_start_is_used(cls, value: float, info: ValidationInfo) -> float:
        data = info.data
        if value == 0 and data.get("start") == 0:
            raise ValueError(
                "start and end are both 0, so the multiplier is 0 at every step and the term never runs "
                "(yet its teacher would still be loaded): set the term's weight to 0 instead"
            )
        constant_from_zero = data.get("kind") == "constant" and data.get("warmup_steps") == 0
        if constant_from_zero and "start" in data and data["start"] != value:
            raise ValueError(
                f"a constant schedule with warmup_steps 0 is `end` ({value:g}) from step 0, so `start` "
                f"({data['start']:g}) is never used: set warmup_steps > 0, or make start equal end"
            )
        return value

    def describe(self) -> str:
        """Short form for the printed formula, e.g. `linear 1->0 over 1000 after 200`."""
        after = f" after {self.warmup_steps}" if self.warmup_steps else ""
        if self.kind == "constant":
            if self.start == self.end:
                return f"constant {self.end:g}"
            return f"constant {self.start:g}->{self.end:g}{after}"
        return f"{self.kind} {self.start:g}->{self.end:g} over {self.total_steps}{after}"


def progress(spec: ScheduleSpec, step: int) -> float:
    """Fraction of the way from `start` to `end` at `step`, in [0, 1]."""
    offset = step - spec.warmup_steps
    if offset < 0:
        return 0.0
    if spec.total_steps is None:  # constant: a switch
        return 1.0
    return min(1.0, offset / spec.total_steps)


def _shape(kind: str, p: float) -> float:
    if kind == "cosine":
        return (1.0 - math.cos(math.pi * p)) / 2.0
    return p


def multiplier(spec: ScheduleSpec | None, step: int) -> float:
    """The schedule's multiplier at `step` (1.0 without a schedule). Pure: same step, same value."""
    if spec is None:
        return 1.0
    p = progress(spec, step)
    if p <= 0.0:
        return spec.start
    if p >= 1.0:
        return spec.end
    value = spec.start + (spec.end - spec.start) * _shape(spec.kind, p)
    low, high = min(spec.start, spec.end), max(spec.start, spec.end)
    return min(high, max(low, value))


def effective_weight(weight: float, spec: ScheduleSpec | None, step: int) -> float:
    """`weight * multiplier(step)`; exactly `weight` without a schedule."""
    if spec is None:
        return weight
    return weight * multiplier(spec, step)
