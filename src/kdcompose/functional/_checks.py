"""Argument checks and dtype rules shared by every public loss function of `kdcompose.functional`.

Why one module: the chunk engine serves several public signatures (logits, fused linear, top-K,
each for every divergence), and a bad argument must get the same clear message whichever one
the caller used. No tensor math here beyond choosing a compute dtype.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
from torch import Tensor

IGNORE_INDEX = -100


def check_beta(beta: float) -> float:
    try:
        value = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(
            f"beta must be in [0, 1] (0 = KL(teacher||student), 1 = KL(student||teacher)), got {beta!r}"
        )
    return value


def check_temperature(temperature: float) -> float:
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}") from None
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"temperature must be a positive finite number (e.g. 1.0), got {temperature!r}")
    return value


def check_chunk_size(chunk_size: int | None) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk) or None, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(
            f"chunk_size must be >= 1 (tokens per chunk), or None for the automatic size; got {chunk_size}"
        )
    return int(chunk_size)


def check_floating(name: str, tensor: Tensor) -> None:
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")


def check_labels(labels: Tensor | None, leading_shape: torch.Size, what: str) -> None:
    if labels is None:
        return
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.shape != leading_shape:
        raise ValueError(
            f"labels must have the {what} leading shape {tuple(leading_shape)}, got {tuple(labels.shape)}; "
            "pass labels already aligned with the logits (shift them before calling, -100 = ignored)"
        )


def check_logits_pair(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None) -> None:
    check_floating("student_logits", student_logits)
    check_floating("teacher_logits", teacher_logits)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (the vocabulary)")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have the same shape; different vocabulary sizes (e.g. 151936 vs 152064) must be "
            "aligned by the caller (slice or pad the extra columns) before calling"
        )
    check_labels(labels, student_logits.shape[:-1], "logits'")


def check_linear(side: str, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    check_floating(f"{side}_hidden", hidden)
    check_floating(f"{side}_weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{side}_weight must be [V, H] (nn.Linear layout), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{side}_hidden's last dimension must equal {side}_weight.shape[1] = {weight.shape[1]} "
            f"(weight is [V, H]; pass lm_head.weight, not its transpose), got hidden {tuple(hidden.shape)}"
        )
    if bias is not None:
        check_floating(f"{side}_bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{side}_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def check_k(k: int, vocab: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"{name} must be a positive int (teacher tokens kept per position), got {k!r}")
    if not 1 <= k <= vocab:
        raise ValueError(f"{name} must be in [1, vocabulary size {vocab}], got {k}")
    return int(k)


def check_topk(lp: Tensor, ids: Tensor, leading: torch.Size, what: str) -> None:
    check_floating("teacher_topk_logprobs", lp)
    if not isinstance(ids, Tensor):
        raise ValueError(f"teacher_topk_ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(
            f"teacher_topk_ids must be an integer tensor (int64 token ids), got dtype {ids.dtype}"
        )
    if lp.shape != ids.shape:
        raise ValueError(
            f"teacher_topk_logprobs {tuple(lp.shape)} and teacher_topk_ids {tuple(ids.shape)} must have "
            "the same shape [..., K]"
        )
    if lp.dim() < 1 or lp.shape[-1] < 1:
        raise ValueError(f"teacher_topk_logprobs must be [..., K] with K >= 1, got {tuple(lp.shape)}")
    if lp.shape[:-1] != leading:
        raise ValueError(
            f"teacher_topk_logprobs' leading shape {tuple(lp.shape[:-1])} must equal the {what} leading "
            f"shape {tuple(leading)} (one top-K row per position, aligned, no shifting)"
        )


MISSING_MASS_MODES = ("renorm", "tail", "zero")


def check_missing_mass(missing_mass: str) -> str:
    if missing_mass not in MISSING_MASS_MODES:
        raise ValueError(
            f"missing_mass must be one of {', '.join(MISSING_MASS_MODES)} (renorm: renormalize both sides "
            f"over the teacher's top-K, as ms-swift; tail: a bucket for the rest, as TRL; zero: truncated "
            f"teacher vs full student, as DistillKit), got {missing_mass!r}"
        )
    return missing_mass


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp32 for the softmax math (fp64 if an input is fp64), whatever the inputs' precision."""
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Our dtypes are deliberate (fp32 softmax math, matmuls into fp32 buffers): keep autocast out."""
    if device.type in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def empty_zero(anchor: Tensor, dtype: torch.dtype) -> Tensor:
    """A 0 that is connected to ``anchor``'s graph without touching its values.

    ``anchor.sum() * 0`` would be NaN if a value is +-inf; summing an empty slice is exactly 0,
    still gives the anchor a (zero) gradient, and keeps DDP's reducer from waiting forever.
    """
    return anchor[..., :0].to(dtype).sum()
