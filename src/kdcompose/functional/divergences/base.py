"""What a divergence is to the chunk engine: one small class, its value per row, optionally its gradient.

A divergence compares the student's and the teacher's distributions of one position, given as
log-probabilities ``ls`` and ``lt`` (``[rows, V]``, after temperature; ``V`` is the vocabulary,
the local slice of it under vocabulary parallelism, or the K / K+1 buckets of a top-K teacher).
Everything else -- which rows count, chunking, temperature, fused LM heads, top-K buckets,
vocabulary parallelism, scaling the stored gradient in backward -- is the engine's
(:mod:`kdcompose.functional.engine`), so a new divergence is a few lines of math:

* :meth:`Divergence.value` (required): the per-row value ``[rows]``, written with plain torch ops
  and :class:`ChunkOps`'s row reductions. It must be differentiable in ``ls``; the engine takes
  the gradient per chunk with autograd when there is no closed form (the "autograd fallback").
* :meth:`Divergence.value_and_grad` (optional): the same value plus the gradient written into
  reused work buffers. This is what keeps the built-ins at a few ``[chunk, V]`` buffers: the
  autograd fallback keeps its graph's intermediates for one chunk at a time.

Parameters are a pydantic model (``Params``) so that a YAML ``divergence: {kind: NAME, ...}``
is validated with dotted paths like every other key, with the strict number types of
:mod:`kdcompose.schema.types`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

LOG_ZERO = -1e30
"""Finite stand-in for ``log 0`` in bucket (top-K) tensors: absent entries on both sides then give
``0 * finite = 0`` instead of ``0 * (-inf - -inf) = NaN``, and ``exp(c * LOG_ZERO) == 0`` for any
positive ``c`` a divergence may scale by."""


class DivergenceParams(BaseModel):
    """Base of a divergence's parameters. Unknown keys are errors; subclasses add fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ChunkOps:
    """What a divergence's per-chunk code may use besides elementwise torch ops.

    ``rowsum`` / ``rowdot`` reduce over the last dimension **and across the vocabulary-parallel
    process group** when there is one, so a divergence written with them runs unchanged on a
    vocabulary slice; a plain ``x.sum(-1)`` would give only this rank's share. The per-row value a
    divergence returns must be the whole-vocabulary value (built from those reductions).

    Closed forms also get ``scratch`` (``Divergence.scratch_buffers`` free ``[rows, V]`` buffers
    in the compute dtype), ``grad_out`` (where ``coef * d value / d logits`` goes, or None when no
    gradient is wanted; it may share memory with ``ls``, so write it last) and ``grad_scratch``
    (``grad_out`` when it is a separate buffer of the compute dtype that may serve as one more
    scratch buffer before the final write; None otherwise). ``state`` is a dict kept across the
    chunks of one call.
    """

    def __init__(
        self,
        group: Any = None,
        scratch: Sequence[Tensor] = (),
        grad_out: Tensor | None = None,
        coef: float = 1.0,
        grad_scratch: Tensor | None = None,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.group = group
        self.scratch = list(scratch)
        self.grad_out = grad_out
        self.coef = coef
        self.grad_scratch = grad_scratch
        self.state = {} if state is None else state
        """Kept across the chunks of one call: what a divergence learns on one chunk and reuses on
        the next (e.g. AKL's top-k width). Must evolve the same on every rank of a group."""

    @property
    def parallel(self) -> bool:
        return self.group is not None

    def rowsum(self, x: Tensor) -> Tensor:
        """``x.sum(-1)`` over the whole vocabulary (all ranks of the group); differentiable."""
        total = x.sum(-1)
        if self.group is None:
            return total
        if total.requires_grad:
            return _GroupSum.apply(total, self.group)
        torch.distributed.all_reduce(total, group=self.group)
        return total

    def rowdot(self, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
        """Per-row dot product over the whole vocabulary, through the free buffer ``out``.

        ``(a * b).sum(-1)`` would allocate a ``[rows, V]`` temporary; ``out`` may be ``a`` or ``b``.
        """
        if out is None:
            return self.rowsum(a * b)
        return self.rowsum(torch.mul(a, b, out=out))

    def rowmax(self, x: Tensor) -> Tensor:
        """Per-row maximum over the whole vocabulary (no gradient)."""
        top = x.detach().amax(-1)
        if self.group is not None:
            torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return top

    def write_grad(self, x: Tensor, scale: float = 1.0) -> None:
        """``grad_out = coef * scale * x`` (one pass; ``x`` may be ``grad_out`` itself)."""
        assert self.grad_out is not None
        torch.mul(x, self.coef * scale, out=self.grad_out)

    def write_centered_grad(self, h: Tensor, mean: Tensor, p: Tensor, scale: float = 1.0) -> None:
        """``grad_out = coef * scale * p * (h - mean[:, None])`` in two passes, the shape of every
        gradient through a softmax (``p`` the student's probabilities, ``mean = <p, h>``); ``h`` is
        overwritten."""
        assert self.grad_out is not None
        torch.add((mean * -(self.coef * scale)).unsqueeze(-1), h, alpha=self.coef * scale, out=h)
        torch.mul(h, p, out=self.grad_out)


class _GroupSum(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces too: correct when every rank backpropagates
    its copy of a replicated value divided by the group size (the engine's autograd fallback)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = x.clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class Divergence:
    """Base class of a divergence between the student's and the teacher's token distributions.

    Subclass it, set ``Params`` (a :class:`DivergenceParams` subclass) if it has parameters,
    implement :meth:`value`, and register it with ``@kdcompose.registry.register_divergence("name")``
    (or the ``kdcompose.divergences`` entry-point group). Instances are immutable and compare equal
    when type and parameters are equal.
    """

    name: ClassVar[str] = ""
    """Set by ``register_divergence`` to the key it is registered under."""
    Params: ClassVar[type[DivergenceParams]] = DivergenceParams
    scratch_buffers: ClassVar[int] = 0
    """``[rows, V]`` work buffers :meth:`value_and_grad` needs besides ``ls`` and ``lt``."""
    short_names: ClassVar[dict[str, str]] = {}
    """How parameters appear in the printed formula (``{"alpha": "a"}`` -> ``skew_rkl a=0.1``)."""
    zero_mass_reason: ClassVar[str] = (
        "it does not declare teacher_zeros_ok() (finite against a teacher with zeros, and exact with "
        "the tokens outside the top-K merged into one bucket)"
    )
    """Why ``missing_mass: zero`` is refused when :meth:`teacher_zeros_ok` is False."""
    compilable: ClassVar[bool] = True
    """Whether :meth:`value` can go through ``torch.compile`` (no data-dependent Python control flow)."""

    def __init__(self, params: DivergenceParams | None = None, **kwargs: Any) -> None:
        if params is not None and kwargs:
            raise TypeError("pass either a Params instance or keyword parameters, not both")
        if params is None:
            params = self.Params(**kwargs)  # pydantic ValidationError (a ValueError) on bad values
        elif not isinstance(params, self.Params):
            raise TypeError(
                f"{type(self).__name__} expects {self.Params.__name__}, got {type(params).__name__}"
            )
        self.params = params

    # ------------------------------------------------------------------ the math

    def value(self, ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
        """Per-row divergence ``[rows]`` of ``softmax(ls)`` (student) from ``softmax(lt)`` (teacher).

        ``ls``/``lt`` are log-probabilities in fp32 (fp64 for fp64 inputs). Reduce over the
        vocabulary only with ``ops.rowsum`` / ``ops.rowdot``. Must be differentiable in ``ls``;
        ``lt`` never needs a gradient. Absent top-K entries hold :data:`LOG_ZERO` on both sides.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement value(ls, lt, ops)")

    def value_and_grad(self, ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
        """Optional closed form: return the per-row value and, when ``ops.grad_out`` is not None,
        write ``ops.coef * d value / d u`` into it, ``u`` being the student's logits after
        temperature (through the softmax: ``g - p_s * sum(g)`` with ``g = d value / d ls``).
        ``ls``, ``lt`` and ``ops.scratch`` may be overwritten."""
        raise NotImplementedError

    @property
    def has_closed_form(self) -> bool:
        return type(self).value_and_grad is not Divergence.value_and_grad

    # ------------------------------------------------------------------ what it allows

    def teacher_zeros_ok(self) -> bool:
        """Whether the divergence is finite, and exact when the teacher's zero-mass tokens are merged
        into one bucket, against a teacher with zero mass where the student has some
        (``missing_mass: zero``). True for f-divergences whose generator is finite at 0 (forward
        KL, TVD, ...); False by default, so a plugin must opt in."""
        return False

    def missing_mass_issue(self, missing_mass: str) -> str | None:
        """Why ``missing_mass`` cannot be used with this divergence, or None when it can.

        ``renorm`` and ``tail`` compare two proper distributions over K (K+1) buckets, which every
        divergence can. ``zero`` compares a truncated teacher with the student's full distribution.
        """
        if missing_mass != "zero" or self.teacher_zeros_ok():
            return None
        return (
            f"missing_mass: zero compares a teacher truncated to its top-K (zero mass elsewhere) with the "
            f"student's full distribution, which {self.describe()} cannot: {self.zero_mass_reason}. Use "
            "missing_mass: renorm or tail, or a divergence that allows it (fkl, skew_fkl, tvd)"
        )

    # ------------------------------------------------------------------ naming

    def describe(self) -> str:
        """How the divergence appears in the printed formula, e.g. ``skew_rkl a=0.1``."""
        name = self.name or type(self).__name__
        parts = [f"{self.short_names.get(k, k)}={_fmt(v)}" for k, v in self.params.model_dump().items()]
        return " ".join([name, *parts])

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.params == self.params  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.params.model_dump().items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}({args})"


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
