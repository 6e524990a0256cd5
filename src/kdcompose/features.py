"""FeatureRecorder: forward hooks that capture vision-side features for feature KD.

Hooks are registered only for the targets an active term needs, and they record only
inside `recording()` — the loss forward. Anything that runs the same modules outside it
(on-policy generation, the recomputation that gradient checkpointing does during
backward, evaluation generation) is ignored, so the features used are always the ones of
the forward whose loss is being built. Records are cleared on entry and on exit, so no
feature tensor outlives its step, and `close()` (or leaving the `with` block) removes
every hook even when training fails. A closed recorder keeps the modules it resolved:
`open()` hooks them again, and `recording()` on a closed recorder hooks them only for the
block, so a loss computed after training (e.g. a later `evaluate()`) still sees its
features without leaving a hook behind.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

# Default module paths (relative to the unwrapped model) for the Qwen2-VL, Qwen2.5-VL and
# Qwen3-VL families in transformers 5.x. `vit` is the vision tower: its output carries the
# pre-merger patch features in `last_hidden_state`. `deepstack` expands to every child of
# the merger list.
DEFAULT_TARGET_PATHS: dict[str, str] = {
    "vit": "model.visual",
    "aligner": "model.visual.merger",
    "deepstack": "model.visual.deepstack_merger_list",
}
EXPAND_CHILDREN: frozenset[str] = frozenset({"deepstack"})

# Prefixes that wrappers add in front of the model's own module names.
_WRAPPER_PREFIXES: tuple[str, ...] = (
    "",
    "module.",  # DistributedDataParallel / DeepSpeed engine
    "base_model.model.",  # PEFT (LoRA)
    "module.base_model.model.",
    "_orig_mod.",  # torch.compile
)


class FeatureModuleNotFound(LookupError):
    """A target's module path does not exist in the model; lists what does."""


def _vision_module_names(model: nn.Module, limit: int = 40) -> list[str]:
    names = [
        name
        for name, _ in model.named_modules()
        if name
        and any(key in name.rsplit(".", 1)[-1].lower() for key in ("visual", "vision", "merger", "deepstack"))
    ]
    return names[:limit]


def resolve_module(model: nn.Module, path: str, target: str) -> tuple[str, nn.Module]:
    """Find `path` in `model`, looking through DDP / PEFT / compile wrappers."""
    for prefix in _WRAPPER_PREFIXES:
        full = prefix + path
        try:
            return full, model.get_submodule(full)
        except AttributeError:
            continue
    found = _vision_module_names(model)
    listing = "\n    ".join(found) if found else "(no module with 'visual'/'vision'/'merger' in its name)"
    raise FeatureModuleNotFound(
        f"visual_kd target {target!r}: module {path!r} not found in {type(model).__name__} "
        f"(also tried the DDP/PEFT prefixes). Set `module:` for this target to one of the vision "
        f"modules that exist:\n    {listing}"
    )


def _extract(target: str, output: object) -> torch.Tensor:
    """The feature tensor in a module's output: the tensor itself, a model output's
    `last_hidden_state` (pre-merger patches of the vision tower), or a tuple's first item."""
    if isinstance(output, torch.Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"visual_kd target {target!r}: cannot find a feature tensor in a {type(output).__name__} output"
    )


@dataclass(frozen=True)
class HookedModule:
    target: str
    path: str


class FeatureRecorder:
    """Records the outputs of named modules of one model during `recording()`."""

    def __init__(self, model: nn.Module, targets: Mapping[str, str | None], *, detach: bool = False) -> None:
        """`targets` maps a target name to a module path override (None: the default path).
        `detach=True` for the teacher: its features never need a graph."""
        self._records: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
        self._recording = False
        self._detach = detach
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._modules: list[tuple[str, nn.Module]] = []
        self.hooked: list[HookedModule] = []
        for target, override in targets.items():  # resolve everything first: a bad path hooks nothing
            for path, module in self._modules_for(model, target, override):
                self._modules.append((target, module))
                self.hooked.append(HookedModule(target, path))
        self.open()

    @staticmethod
    def _modules_for(model: nn.Module, target: str, override: str | None) -> Sequence[tuple[str, nn.Module]]:
        if override is None and target not in DEFAULT_TARGET_PATHS:
            raise FeatureModuleNotFound(f"target {target!r} has no default module path; set `module:` for it")
        path, module = resolve_module(model, override or DEFAULT_TARGET_PATHS[target], target)
        if override is None and target in EXPAND_CHILDREN:
            children = [(f"{path}.{name}", child) for name, child in module.named_children()]
            if not children:
                raise FeatureModuleNotFound(
                    f"visual_kd target {target!r}: {path!r} has no sub-modules to hook"
                )
            return children
        return [(path, module)]

    def _hook(self, target: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            if not self._recording:
                return
            feature = _extract(target, output)
            self._records[target].append(feature.detach() if self._detach else feature)

        return hook

    def open(self) -> None:
        """(Re-)register the hooks; idempotent."""
        if self._handles:
            return
        try:
            for target, module in self._modules:
                self._handles.append(module.register_forward_hook(self._hook(target)))
        except Exception:
            self.close()
            raise

    @contextmanager
    def recording(self) -> Iterator[dict[str, list[torch.Tensor]]]:
        """Record during the block; the records are cleared on entry and on exit, so read
        them (`features()`) and build the loss inside the block. A closed recorder is hooked
        for the block only."""
        temporary = not self._handles
        if temporary:
            self.open()
        self.clear()
        self._recording = True
        try:
            yield self._records
        finally:
            self._recording = False
            self.clear()
            if temporary:
                self._remove_hooks()

    def features(self) -> dict[str, list[torch.Tensor]]:
        return {name: list(tensors) for name, tensors in self._records.items()}

    def clear(self) -> None:
        for tensors in self._records.values():
            tensors.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def close(self) -> None:
        """Remove every hook and drop every record (idempotent; `open()` hooks again)."""
        self._remove_hooks()
        self.clear()
        self._recording = False

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
