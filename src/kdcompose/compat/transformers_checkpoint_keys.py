"""Restore a fully fine-tuned transformers model from a Trainer checkpoint written in the hub layout.

Upstream behaviour worked around (transformers 5.19, measured on the tiny Qwen2-VL models):
transformers 5 writes a checkpoint in the model's *original* (hub) key layout -- `save_pretrained`
reverts the load-time key renamings (`revert_weight_conversion`, transformers/modeling_utils.py),
so a Qwen2-VL checkpoint holds `model.layers.*` / `visual.*` while the loaded model's keys are
`model.language_model.layers.*` / `model.visual.*`. `Trainer._load_from_checkpoint` loads that
file with `model.load_state_dict(state_dict, strict=False)`: no key matches, nothing is loaded,
and only a "missing keys" warning is logged, so a resumed run trains the *initial* weights with
the restored optimizer state. `load_full_weights` maps each saved key back to the model's key
(the same renaming, applied to the model's own keys) and loads strictly enough that a trainable
weight that cannot be restored stops the run (`ResumeError`).

Remove when: transformers' `Trainer._load_from_checkpoint` loads its own checkpoints through the
weight-conversion path (`tests/swift/test_compat.py::test_transformers_still_drops_hub_layout_keys`
fails then, saying so).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX = "pytorch_model.bin.index.json"


class ResumeError(RuntimeError):
    """A resume that cannot continue the run it resumes (refused before any step is trained)."""


def saved_key_map(model: torch.nn.Module) -> tuple[dict[str, str], list[str]]:
    """Map each on-disk key of `model.save_pretrained` to the model's own key.

    Applies `transformers.core_model_loading.revert_weight_conversion` (what `save_pretrained`
    does to the whole state dict) to each of the model's keys on its own, with meta tensors (no
    memory, no copies). Returns the map and the model keys whose saved form is not a plain
    renaming (a weight converter fuses or splits tensors): those cannot be mapped one to one.
    """
    state = model.state_dict(keep_vars=True)
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: checkpoints are written with the model's own keys
        return {key: key for key in state}, []
    if not hasattr(model, "config"):  # not a transformers model: `save_pretrained` did not write it
        return {key: key for key in state}, []
    mapping: dict[str, str] = {}
    unmapped: list[str] = []
    for key, tensor in state.items():
        meta = torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device="meta")
        try:
            saved = list(revert_weight_conversion(model, {key: meta}))
        except Exception:  # a converter that needs its sibling tensors
            saved = []
        if len(saved) == 1:
            mapping[saved[0]] = key
        else:
            unmapped.append(key)
    return mapping, unmapped


def full_weight_files(checkpoint: str | Path) -> list[Path] | None:
    """The full-model weight files of a checkpoint folder (None: none, e.g. an adapter checkpoint)."""
    folder = Path(checkpoint)
    for index_name in (SAFE_WEIGHTS_INDEX, TORCH_WEIGHTS_INDEX):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            return [folder / name for name in sorted(set(weight_map.values()))]
    for name in (SAFE_WEIGHTS, TORCH_WEIGHTS):
        if (folder / name).is_file():
            return [folder / name]
    return None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        import safetensors.torch

        return safetensors.torch.load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _tied_keys(model: torch.nn.Module) -> set[str]:
    """Model keys that share storage with another key (saved once, e.g. a tied LM head)."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tied: set[str] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        ident = (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident in seen:
            tied.add(key)
        else:
            seen[ident] = key
    return tied


def load_full_weights(model: torch.nn.Module, checkpoint: str | Path) -> int | None:
    """Restore a fully fine-tuned student from `checkpoint`; returns the tensors loaded.

    None when this is not a full-weights checkpoint of a plain `nn.Module` (a PEFT adapter, an
    FSDP/DeepSpeed folder): the caller then uses the stock loader, which handles those. Raises
    `ResumeError` naming the keys when a trainable weight of the model is not in the checkpoint
    (training on from initial weights is never what a resume means).
    """
    if _is_peft(model):
        return None
    files = full_weight_files(checkpoint)
    if files is None:
        return None
    mapping, unmapped = saved_key_map(model)
    own_keys = set(model.state_dict(keep_vars=True))
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for path in files:
        for key, tensor in _read_weights(path).items():
            target = mapping.get(key, key if key in own_keys else None)
            if target is None:
                unexpected.append(key)
            else:
                converted[target] = tensor
    result = model.load_state_dict(converted, strict=False)
    # not in the weights file on purpose: tied copies, and keys the model drops on save (kdcompose's
    # projectors, restored from their own file by `kdcompose.training.projectors.load_projectors`)
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    missing = set(result.missing_keys) - _tied_keys(model) - ignored
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lost = sorted(missing & trainable)
    if lost or unexpected:
        detail = []
        if lost:
            detail.append(f"{len(lost)} trainable weights not found in it (e.g. {', '.join(lost[:3])})")
        if unexpected:
            examples = ", ".join(unexpected[:3])
            detail.append(f"{len(unexpected)} of its tensors match no weight (e.g. {examples})")
        if unmapped:
            detail.append(f"keys saved through a weight converter: {', '.join(unmapped[:3])}")
        raise ResumeError(
            f"kdcompose: cannot restore the student from {checkpoint}: {'; '.join(detail)}. Training on "
            "would start from the initial weights, not continue the run; check that the checkpoint belongs "
            "to this model (model, tuner_type)"
        )
    return len(converted)


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


__all__ = ["ResumeError", "full_weight_files", "load_full_weights", "saved_key_map"]
