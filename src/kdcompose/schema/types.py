"""Field types shared by every spec (the built-in terms' and users' own).

YAML users write `weight: 1` as often as `weight: 1.0`, so integers are accepted; but a
string ("0.5"), a boolean (`yes` parses to True), NaN, inf or a negative number is always
a mistake in a loss weight, and silently coercing it would train the wrong objective.

The same goes for switches: a plain `bool` field in a pydantic model accepts the strings
"yes", "off", "1" and the numbers 0 and 1, so `enabled: "no"` (quoted) would silently turn
something on or off by pydantic's reading of a word. `Bool` accepts only YAML's true/false.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BeforeValidator, Field


def _finite_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {type(value).__name__} {value!r}; write it without quotes")
    try:
        result = float(value)
    except OverflowError:
        raise ValueError(
            f"must be a finite number, got an integer with {len(str(abs(value)))} digits"
        ) from None
    if not math.isfinite(result):
        raise ValueError(f"must be a finite number, got {value!r}")
    return result


def _non_negative(value: Any) -> float:
    result = _finite_number(value)
    if result < 0:
        raise ValueError(f"must be >= 0, got {result!r}; use 0 to disable")
    return result


def _positive(value: Any) -> float:
    result = _finite_number(value)
    if result <= 0:
        raise ValueError(f"must be > 0, got {result!r}")
    return result


def _probability(value: Any) -> float:
    result = _finite_number(value)
    if not 0.0 <= result <= 1.0:
        raise ValueError(f"must be in [0, 1], got {result!r}")
    return result


def _strict_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(
            f"must be true or false, got {type(value).__name__} {value!r}; write true or false without quotes"
        )
    return value


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a whole number, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"must be >= 0, got {value!r}")
    return value


def _positive_int(value: Any) -> int:
    result = _non_negative_int(value)
    if result < 1:
        raise ValueError(f"must be >= 1, got {value!r}")
    return result


Weight = Annotated[float, BeforeValidator(_non_negative), Field(json_schema_extra={"minimum": 0})]
"""A loss weight: a finite number >= 0 (0 disables the term)."""

PositiveFloat = Annotated[float, BeforeValidator(_positive), Field(json_schema_extra={"exclusiveMinimum": 0})]
"""A finite number > 0 (temperatures)."""

Probability = Annotated[
    float, BeforeValidator(_probability), Field(json_schema_extra={"minimum": 0, "maximum": 1})
]
"""A finite number in [0, 1] (JSD beta)."""

PositiveInt = Annotated[int, BeforeValidator(_positive_int), Field(json_schema_extra={"minimum": 1})]
"""A whole number >= 1 (chunk sizes, schedule lengths)."""

NonNegativeInt = Annotated[int, BeforeValidator(_non_negative_int), Field(json_schema_extra={"minimum": 0})]
"""A whole number >= 0 (warm-up steps)."""

Bool = Annotated[bool, BeforeValidator(_strict_bool)]
"""A switch: only `true` / `false` (never "yes", "1", 0 or 1). Use it for a user's term spec too:
`enabled: Bool = True`."""
