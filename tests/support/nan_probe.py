"""A test-only loss term that goes NaN (or inf, or raises KeyboardInterrupt) at chosen steps.

It behaves like a real faulty term: at a listed step it returns `mean(student logits) * nan`,
which is connected to the student's graph, so its gradient is NaN as well; at other steps
a graph-connected 0. `nan_value` is NaN in the value only: the gradient that reaches the
weights is finite (zero, once the trainer masks the step's loss), so an engine's own
overflow check cannot see it and only kdcompose's verdict skips the step. Registered only
inside `registered()`, or by importing `nan_probe_plugin` (a `plugins:` entry for a
`kdcompose train` child process), so no other test sees it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from kdcompose.registry import register_term, unregister_term
from kdcompose.terms.base import LossContext, LossTerm, TermNeeds, TermSpec

TYPE = "nan_probe"


class NanProbeSpec(TermSpec):
    at_steps: tuple[int, ...] = ()
    kind: Literal["nan", "inf", "nan_value", "interrupt"] = "nan"
    """`interrupt` raises KeyboardInterrupt instead: Ctrl-C arriving in the middle of a loss."""


class NanProbeTerm(LossTerm):
    spec_class = NanProbeSpec
    spec: NanProbeSpec

    @property
    def needs(self) -> TermNeeds:
        return TermNeeds(student_logits=True)

    def compute(self, ctx: LossContext) -> torch.Tensor:
        assert ctx.student_logits is not None
        bad = ctx.step in self.spec.at_steps
        if bad and self.spec.kind == "interrupt":
            raise KeyboardInterrupt
        connected = ctx.student_logits.float().abs().mean()
        if self.spec.kind == "nan_value":
            return connected * 0.0 + (float("nan") if bad else 0.0)
        return connected * (float(self.spec.kind) if bad else 0.0)


@contextmanager
def registered() -> Iterator[type[NanProbeTerm]]:
    register_term(TYPE)(NanProbeTerm)
    try:
        yield NanProbeTerm
    finally:
        unregister_term(TYPE)
