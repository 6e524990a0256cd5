"""The chunk body through ``torch.compile`` (opt-in: ``compile=True`` / ``compile: true``).

One chunk -- the log-softmax of both sides at the temperature, the divergence's ``value`` and its
gradient w.r.t. the student's raw logits by ``torch.func.grad`` -- compiled into fused kernels, as
Liger compiles its chunks. It replaces the closed form (or the per-chunk autograd fallback) in the
full-vocabulary modes, logits and fused; the engine's loop, row selection and gradient sinks stay.

Why opt-in: measured on 2 CPU cores (docs/performance.md) it halves the alpha-beta divergence and
the autograd fallback of a value-only plugin, but is no faster than the JSD's closed form, costs a
compilation (seconds to a minute) in every process, and needs a C++ compiler at run time. It is as
exact as the eager path against the float64 oracle (tests/swift/test_compiled_chunks.py). A body
that fails to compile warns once and the engine continues with the eager path.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from kdcompose.functional.divergences.base import ChunkOps, Divergence

Body = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
_BODIES: dict[tuple[Divergence, float, torch.dtype], Body | None] = {}


def compile_issue(divergence: Divergence) -> str | None:
    """Why ``divergence`` cannot be compiled, or None."""
    if not divergence.compilable:
        return (
            f"{divergence.describe()} cannot be compiled (its value has data-dependent control flow); "
            "remove `compile`"
        )
    return None


def compiled_body(divergence: Divergence, temperature: float, dtype: torch.dtype) -> Body | None:
    """The compiled ``(raw student chunk, raw teacher chunk) -> (per-row value, d value / d raw student)``
    for this divergence, temperature and compute dtype (one per process); None after a failure."""
    key = (divergence, temperature, dtype)
    if key not in _BODIES:
        _BODIES[key] = _Guarded(torch.compile(_body(divergence, temperature, dtype), dynamic=True), key)
    return _BODIES[key]


def _body(divergence: Divergence, temperature: float, dtype: torch.dtype) -> Body:
    ops = ChunkOps()

    def body(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        lt = torch.log_softmax(v.to(dtype) / temperature, -1)

        def per_row(z: Tensor) -> tuple[Tensor, Tensor]:
            value = divergence.value(torch.log_softmax(z / temperature, -1), lt, ops)
            return value.sum(), value

        grad, value = torch.func.grad(per_row, has_aux=True)(u.to(dtype))
        return value, grad

    return body


class _Guarded:
    """Calls the compiled body; on the first failure warns, forgets it and returns None."""

    def __init__(self, fn: Body, key: tuple[Divergence, float, torch.dtype]):
        self.fn, self.key = fn, key

    def __call__(self, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | None:
        try:
            return self.fn(u, v)
        except Exception as exc:  # a missing compiler, an unsupported op: keep training, eagerly
            _BODIES[self.key] = None
            warnings.warn(
                f"torch.compile of the {self.key[0].describe()} chunk body failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); continuing with the eager chunk body",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
