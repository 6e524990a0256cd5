"""Shared helper of feature terms: compare a declared `FeaturePair` as recorded in the context."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kdcompose.terms.base import FeaturePair, LossContext


class FeatureWidthError(ValueError):
    """Student and teacher tensors of a pair have different widths and no projector maps them."""


def compare_features(
    ctx: LossContext,
    pair: FeaturePair,
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    select: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Mean over the pair's recorded calls of `distance(project(student), teacher)`.

    `select` may restrict both tensors first (e.g. to labelled positions). The student goes
    through the pair's projector when one was declared; without one, widths must agree.
    """
    student, teacher = ctx.tapped(pair.student), ctx.tapped(pair.teacher)
    if len(student) != len(teacher):
        raise ValueError(
            f"{pair.origin}: recorded {len(student)} tensor(s) at {pair.student.describe()} but "
            f"{len(teacher)} at {pair.teacher.describe()}; both modules must run equally often in one "
            "forward (set `call` to pick one call)"
        )
    if not student:
        raise ValueError(f"{pair.origin}: nothing was recorded at {pair.student.describe()} in this forward")
    project = ctx.projectors.get(pair.key) if pair.projector is not None else None
    if pair.projector is not None and project is None and pair.key not in ctx.projected:
        raise ValueError(
            f"{pair.origin} asks for `projector: {pair.projector}` but the loss context carries none for "
            f"{pair.key!r}: kdcompose's trainers build them; in your own loop use kdcompose.Distiller, "
            "which builds, trains and saves them"
        )
    projected = list(ctx.projected.get(pair.key, ())) if pair.projector is not None else []
    if projected and len(projected) != len(student):
        raise ValueError(f"{pair.origin}: {len(projected)} projected tensors for {len(student)} recorded")
    distances = []
    for index, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if projected:  # already through the projector (inside the forward)
            s = projected[index]
        if select is not None:
            s, t = select(s, t)
        if not projected and project is not None:
            s = project(s)
        elif not projected and s.shape[-1] != t.shape[-1]:
            raise FeatureWidthError(
                f"{pair.origin}: {pair.student.describe()} is {s.shape[-1]} wide but "
                f"{pair.teacher.describe()} is {t.shape[-1]} wide; set `{pair.origin}.projector: linear`"
            )
        distances.append(distance(s, t))
    return torch.stack(distances).mean()
