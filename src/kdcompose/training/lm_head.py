"""Final hidden states without full logits: a tap on the model's LM head.

Why a tap and not `model.model(...)` (what ms-swift's Liger path runs): the tap keeps the
model's own forward exactly as a non-fused step runs it, so everything that wraps or
trims that forward still applies -- ms-swift's template pre-forward hook (image
embeddings, `position_ids`), the DDP / PEFT wrappers, gradient checkpointing, feature
hooks, and `logits_to_keep` (the head's input is already trimmed to the kept positions).
Row `i` of the tapped hidden states is therefore exactly the row that produces row `i` of
the logits, so the labels align with them as they align with the logits (position `i`
predicts `labels[i + 1]`, ms-swift's roll), with no second alignment rule to get wrong.

How: a forward pre-hook on the LM head (`get_output_embeddings()`, an `nn.Linear`) keeps its
input and, unless the logits are wanted as well, replaces it with an empty slice of
positions, so the head computes `[batch, 0, vocab]` logits and the full logits never exist.
The hook is on the model only inside the `with` block (never during on-policy generation).
For the teacher (`freeze=True`) the hook also keeps the head's weight and bias tensors as they
are during the forward: ms-swift's `offload_teacher_model` moves the teacher to the CPU when its
forward ends (`param.data = param.data.to("cpu")`), and the loss runs after that, so it must read
the on-device tensors the forward used. Keeping references costs no copy.

Model-side glue only: no loss math (that is `kdcompose.functional.fused_linear_generalized_jsd`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdcompose.sharding import zero3_partitioned

LOGIT_TRANSFORMS: dict[str, object] = {
    "final_logit_softcapping": None,  # Gemma 2/3: tanh soft-capping of the logits
    "logit_scale": 1.0,  # Cohere: logits * logit_scale
    "logits_scaling": 1.0,  # Granite: logits / logits_scaling
}
"""Text-config fields with which a model transforms its LM head's output before returning the
logits (and the value at which it does not). The fused JSD reads the head's weights directly
and would miss the transform, so such models are refused rather than silently mis-distilled."""


class LmHeadUnsupported(ValueError):
    """The model's LM head cannot be read as `hidden @ weight.T + bias`."""


def lm_head_of(model: nn.Module) -> nn.Linear:
    """The model's LM head (`get_output_embeddings()`), checked to be a plain linear layer whose
    output is the logits. `model` is unwrapped (no DDP wrapper); PEFT models are fine."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear):
        raise LmHeadUnsupported(
            f"{type(model).__name__}'s LM head (get_output_embeddings()) is {type(head).__name__}, not a "
            "plain torch.nn.Linear (e.g. LoRA or modules_to_save on lm_head, or a model without an LM head)"
        )
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(text_config, key, neutral)
        if value is not None and value != neutral:
            raise LmHeadUnsupported(
                f"{type(model).__name__} transforms its LM head's output ({key}={value!r}); the fused JSD "
                "reads the head's weights directly and would not apply it"
            )
    return head


class FrozenLinear(nn.Module):
    """An LM head's weight and bias as they were during a no-grad forward (plain tensor
    attributes, not parameters: nothing trains them, nothing moves them)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight, self.bias)


@dataclass
class LmHeadTap:
    """What one forward fed the LM head. `hidden` is None when nothing was tapped; `head` is what
    a loss term should read: the head module itself, or its `FrozenLinear` snapshot (`freeze`)."""

    head: nn.Module | None = None
    keep_logits: bool = True
    hidden: torch.Tensor | None = None
    calls: int = 0

    def logits(self, model_logits: torch.Tensor | None) -> torch.Tensor | None:
        """The model's logits, or None where the tap suppressed them (they are empty)."""
        return model_logits if self.keep_logits else None


@contextmanager
def tap_lm_head(model: nn.Module, *, hidden: bool, logits: bool, freeze: bool = False) -> Iterator[LmHeadTap]:
    """Record the LM head's input during the block (when `hidden`); unless `logits`, the head
    computes logits for zero positions; with `freeze` (a no-grad model, e.g. the teacher) `head`
    becomes a snapshot of its weights as the forward saw them. Raises `LmHeadUnsupported` up front
    for heads it cannot read, and `RuntimeError` after the block unless the head ran exactly once."""
    if not hidden:
        yield LmHeadTap()
        return
    head = lm_head_of(model)
    tap = LmHeadTap(head=head, keep_logits=logits)

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        states = args[0] if args else kwargs["input"]
        tap.hidden, tap.calls = states, tap.calls + 1
        if freeze:  # ZeRO-3 frees the gathered weight after the forward: keep a copy then
            copy = zero3_partitioned(module.weight)
            weight = module.weight.detach().clone() if copy else module.weight.detach()
            bias = None if module.bias is None else module.bias.detach()
            tap.head = FrozenLinear(weight, bias.clone() if copy and bias is not None else bias)
        if tap.keep_logits:
            return None
        empty = states.narrow(-2, 0, 0) if states.dim() >= 2 else states[:0]
        if args:
            return (empty, *args[1:]), kwargs
        return args, {**kwargs, "input": empty}

    handle = head.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield tap
    finally:
        handle.remove()
    if tap.calls != 1:
        raise RuntimeError(
            f"the LM head of {type(model).__name__} ran {tap.calls} times in one forward; reading hidden "
            "states from it (fused lm_jsd) needs a model that computes its logits with one call of "
            "get_output_embeddings(): set `fused: false`"
        )


def lm_head_width(model: nn.Module) -> int | None:
    """Rows of the model's LM head, read from its structure (works under ZeRO-3, where the weight
    itself is partitioned), else its config's `vocab_size`; None when neither says."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        width = getattr(head, "out_features", None)
        if width:
            return int(width)
        weight = getattr(head, "weight", None)
        shape = getattr(weight, "ds_shape", None) or getattr(weight, "shape", None)
        if shape is not None and len(shape) and shape[0]:
            return int(shape[0])
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "vocab_size", None)
