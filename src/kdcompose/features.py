"""FeatureRecorder: visual-KD target names over module taps (kept for scripts written against 0.1).

The recording itself -- hooks only inside the loss forward, records cleared on entry and exit,
every hook removed by `close()` even when training fails, a closed recorder hooking only for one
`recording()` block -- is `kdcompose.training.taps.ModuleTaps`; this class maps the visual-KD target names
(`vit`, `aligner`, `deepstack`, or a module path override) to taps and back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from kdcompose.errors import ConfigError
from kdcompose.terms.base import Tap
from kdcompose.terms.visual_kd import DEFAULT_TARGET_PATHS, EXPAND_CHILDREN
from kdcompose.training.taps import WRAPPER_PREFIXES, ModuleTaps, TapNotFound, resolve_path

__all__ = [
    "DEFAULT_TARGET_PATHS",
    "EXPAND_CHILDREN",
    "WRAPPER_PREFIXES",
    "FeatureModuleNotFound",
    "FeatureRecorder",
    "HookedModule",
    "resolve_module",
]


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
    try:
        return resolve_path(model, path)
    except TapNotFound:
        found = _vision_module_names(model)
        listing = "\n    ".join(found) if found else "(no module with 'visual'/'vision'/'merger' in its name)"
        raise FeatureModuleNotFound(
            f"visual_kd target {target!r}: module {path!r} not found in {type(model).__name__} "
            f"(also tried the DDP/PEFT prefixes). Set `module:` for this target to one of the vision "
            f"modules that exist:\n    {listing}"
        ) from None


@dataclass(frozen=True)
class HookedModule:
    target: str
    path: str


class FeatureRecorder:
    """Records the outputs of named visual-KD targets of one model during `recording()`."""

    def __init__(self, model: nn.Module, targets: Mapping[str, str | None], *, detach: bool = False) -> None:
        """`targets` maps a target name to a module path override (None: the default path).
        `detach=True` for the teacher: its features never need a graph."""
        self._taps: dict[str, Tap] = {}
        for target, override in targets.items():
            if override is None and target not in DEFAULT_TARGET_PATHS:
                raise FeatureModuleNotFound(
                    f"target {target!r} has no default module path; set `module:` for it"
                )
            path = override or DEFAULT_TARGET_PATHS[target]
            resolve_module(model, path, target)  # the visual-KD message for a bad path, before any hook
            self._taps[target] = Tap("student", path, children=override is None and target in EXPAND_CHILDREN)
        try:
            self._recorder = ModuleTaps(model, self._taps.values(), detach=detach)
        except ConfigError as error:  # e.g. a deepstack list without children
            raise FeatureModuleNotFound(str(error)) from None
        names = {tap: target for target, tap in self._taps.items()}
        self.hooked = [HookedModule(names[h.tap], h.name) for h in self._recorder.hooked]

    def open(self) -> None:
        """(Re-)register the hooks; idempotent."""
        self._recorder.open()

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record during the block; read `features()` inside it (records are cleared on exit)."""
        with self._recorder.recording():
            yield

    def features(self) -> dict[str, list[torch.Tensor]]:
        recorded = self._recorder.recorded()
        return {target: list(recorded.get(tap, ())) for target, tap in self._taps.items()}

    def clear(self) -> None:
        self._recorder.clear()

    @property
    def active(self) -> bool:
        return self._recorder.active

    def close(self) -> None:
        """Remove every hook and drop every record (idempotent; `open()` hooks again)."""
        self._recorder.close()

    def __enter__(self) -> FeatureRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
