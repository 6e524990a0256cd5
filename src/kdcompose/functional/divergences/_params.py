"""Parameter field types of the built-in divergences (strict numbers, as every YAML knob)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from kdcompose.schema.types import Probability


def _non_negative(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {type(value).__name__} {value!r}; write it without quotes")
    result = float(value)
    if not result >= 0.0 or result == float("inf"):  # rejects NaN, inf and negatives
        raise ValueError(f"must be a finite number >= 0, got {value!r}")
    return result


NonNegativeFloat = Annotated[float, BeforeValidator(_non_negative), Field(json_schema_extra={"minimum": 0})]
"""A finite number >= 0 (powers of the alpha-beta divergence)."""

__all__ = ["NonNegativeFloat", "Probability"]
