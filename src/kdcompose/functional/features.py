"""Distances between student and teacher feature tensors (visual feature KD)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

Distance = Literal["mse", "cosine", "smooth_l1"]
DISTANCES: tuple[str, ...] = ("mse", "cosine", "smooth_l1")


def _check_shapes(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        hint = ""
        if student.shape[:-1] == teacher.shape[:-1]:
            hint = (
                f" The feature widths differ ({student.shape[-1]} vs {teacher.shape[-1]}): "
                "set `projector: linear` on the visual_kd target to learn a map from the student's "
                "width to the teacher's."
            )
        raise ValueError(
            f"student feature shape {tuple(student.shape)} != teacher feature shape "
            f"{tuple(teacher.shape)}.{hint}"
        )


def mse_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element, in fp32."""
    _check_shapes(student, teacher)
    return F.mse_loss(student.float(), teacher.detach().float(), reduction="mean")


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over feature vectors (last dim) of 1 - cosine similarity; scale invariant."""
    _check_shapes(student, teacher)
    sim = F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1, eps=1e-8)
    return (1.0 - sim).mean()


def smooth_l1_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Huber-style distance (beta 1.0), mean over elements; robust to outlier activations."""
    _check_shapes(student, teacher)
    return F.smooth_l1_loss(student.float(), teacher.detach().float(), reduction="mean", beta=1.0)


_DISTANCE_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": mse_distance,
    "cosine": cosine_distance,
    "smooth_l1": smooth_l1_distance,
}


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, distance: str = "mse") -> torch.Tensor:
    """Distance between two feature tensors of the same shape; the teacher gets no gradient."""
    try:
        fn = _DISTANCE_FUNCTIONS[distance]
    except KeyError:
        raise ValueError(
            f"unknown feature distance {distance!r}; choose one of {', '.join(DISTANCES)}"
        ) from None
    return fn(student, teacher)
