"""ModuleTaps: forward hooks on the module paths that active terms declare (`Tap`).

Generalises the feature recorder of visual KD to any module of either model -- decoder
layers, a vision tower, an aligner, a user's own module -- so a new term that reads any
module needs no framework edit. The rules that make the recordings trustworthy:

* **Record only inside the loss forward.** Hooks are registered for the whole run but append
  only inside `recording()`, so on-policy generation, evaluation generation and the
  recomputation that gradient checkpointing runs during backward are ignored.
* **Cleared on entry and exit**, so no tensor outlives its step; `close()` removes every hook
  (also when training fails), and a closed recorder hooks only for one `recording()` block.
* **Resolved before training.** Every path is looked up (through DDP / PEFT / compile
  prefixes) when the recorder is built, and a path that names no module fails naming the
  YAML key that declared it and the closest module names that do exist.
* **Calls are counted.** A module that runs several times per forward (shared blocks,
  mergers) records one tensor per call; `Tap.call` picks one.
* **Projectors run inside the forward, reachable from its outputs.** A feature pair's trainable
  projector is applied to the student's tensor in the hook, and an exact zero computed from its
  output is added to the model's logits. DDP (with `find_unused_parameters`, as ms-swift sets it
  for multimodal models) decides which parameters were used by walking the graph back from the
  forward's outputs; a projector seen only by the loss would be marked unused there and then get
  a gradient in backward ("marked ready twice"). The added zero changes no value.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from kdcompose.errors import ConfigError, ConfigIssue
from kdcompose.primitives import connected_zero
from kdcompose.terms.base import Tap

WRAPPER_PREFIXES: tuple[str, ...] = (
    "",
    "module.",  # DistributedDataParallel / DeepSpeed engine
    "base_model.model.",  # PEFT (LoRA)
    "module.base_model.model.",
    "_orig_mod.",  # torch.compile
)
"""Prefixes that wrappers add in front of a model's own module names."""


def _strip_wrappers(name: str) -> str:
    for prefix in sorted(WRAPPER_PREFIXES, key=len, reverse=True):
        if prefix and name.startswith(prefix):
            return name[len(prefix) :]
    return name


def close_module_names(model: nn.Module, path: str, limit: int = 5) -> list[str]:
    """Module names of `model` that look like `path` (without wrapper prefixes)."""
    names = sorted({_strip_wrappers(n) for n, _ in model.named_modules() if n})
    close = difflib.get_close_matches(path, names, n=limit, cutoff=0.6)
    if not close:  # same last component, e.g. `layers.1` under another parent
        tail = path.rsplit(".", 2)[-2:]
        close = [n for n in names if n.endswith(".".join(tail))][:limit]
    return close


class TapNotFound(LookupError):
    """A tap's path names no module of the model."""


def resolve_path(model: nn.Module, path: str) -> tuple[str, nn.Module]:
    """`(full name, module)` of `path` in `model`, looking through wrapper prefixes."""
    for prefix in WRAPPER_PREFIXES:
        try:
            return prefix + path, model.get_submodule(prefix + path)
        except AttributeError:
            continue
    close = close_module_names(model, path)
    hint = f"; close names that exist: {', '.join(close)}" if close else ""
    raise TapNotFound(f"no module {path!r} in {type(model).__name__}{hint}")


def tap_issue(tap: Tap, model: nn.Module, error: Exception) -> ConfigIssue:
    return ConfigIssue(
        tap.origin or tap.path,
        f"{error}. Use a dotted module path of the {tap.side} model (as in `model.named_modules()`, "
        "without the DDP / PEFT prefixes)",
    )


def extract_tensor(value: object, what: str) -> torch.Tensor:
    """The tensor in a module's output or input: the tensor itself, a model output's
    `last_hidden_state` (else its first tensor field), or a tuple's / list's first item."""
    if isinstance(value, torch.Tensor):
        return value
    hidden = getattr(value, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"{what}: cannot find a tensor in a {type(value).__name__}")


@dataclass(frozen=True)
class HookedModule:
    tap: Tap
    name: str


class ModuleTaps:
    """Records the declared taps of one model (one side) during `recording()`."""

    def __init__(
        self,
        model: nn.Module,
        taps: Iterable[Tap],
        *,
        detach: bool = False,
        projections: Mapping[Tap, Sequence[str]] | None = None,
        projector: Callable[[str], nn.Module | None] | None = None,
    ) -> None:
        """Resolve every tap first (a bad path hooks nothing and raises ConfigError naming
        each bad tap's YAML key); `detach=True` for the teacher, whose tensors need no graph.
        `projections`: for a tap, the feature-pair keys whose projector (`projector(key)`, looked
        up when the hook runs) maps its tensor, recorded under the key (`projected()`)."""
        self.taps = tuple(sorted(set(taps), key=lambda t: (t.path, t.io, str(t.call), t.children)))
        self._detach = detach
        self._recording = False
        self._records: dict[Tap, list[torch.Tensor]] = {t: [] for t in self.taps}
        self._projections = {tap: tuple(keys) for tap, keys in (projections or {}).items()}
        self._projector = projector
        self._projected: dict[str, list[torch.Tensor]] = {
            k: [] for keys in self._projections.values() for k in keys
        }
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._modules: list[tuple[Tap, nn.Module]] = []
        self.hooked: list[HookedModule] = []
        issues: list[ConfigIssue] = []
        for tap in self.taps:
            try:
                name, module = resolve_path(model, tap.path)
            except TapNotFound as error:
                issues.append(tap_issue(tap, model, error))
                continue
            targets = list(module.named_children()) if tap.children else [("", module)]
            if not targets:
                issues.append(ConfigIssue(tap.origin or tap.path, f"{tap.path!r} has no sub-modules to hook"))
            for child, target in targets:
                self._modules.append((tap, target))
                self.hooked.append(HookedModule(tap, f"{name}.{child}" if child else name))
        if issues:
            raise ConfigError(issues, source="kdcompose module taps")
        self._root = model
        self.open()

    def _hook(self, tap: Tap):
        def record(value: object) -> None:
            if self._recording:
                tensor = extract_tensor(value, f"tap {tap.describe()}")
                self._records[tap].append(tensor.detach() if self._detach else tensor)
                for key in self._projections.get(tap, ()):
                    module = self._projector(key) if self._projector is not None else None
                    if module is not None:
                        # The projector trains even where the tapped module runs under no_grad
                        # (ms-swift encodes a frozen vision tower without a graph).
                        with torch.enable_grad():
                            self._projected[key].append(module(tensor))

        if tap.io == "input":

            def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                first = args[0] if args else next(iter(kwargs.values()), None)
                record(first)

            return pre_hook

        def hook(module: nn.Module, args: object, output: object) -> None:
            record(output)

        return hook

    def open(self) -> None:
        """(Re-)register the hooks; idempotent."""
        if self._handles:
            return
        try:
            for tap, module in self._modules:
                if tap.io == "input":
                    handle = module.register_forward_pre_hook(self._hook(tap), with_kwargs=True)
                else:
                    handle = module.register_forward_hook(self._hook(tap))
                self._handles.append(handle)
            if self._projections:
                self._handles.append(self._root.register_forward_hook(self._anchor_projections))
        except Exception:
            self.close()
            raise

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record during the block; read `recorded()` inside it (records are cleared on exit)."""
        temporary = not self._handles
        if temporary:
            self.open()
        self.clear()
        self._recording = True
        try:
            yield
        finally:
            self._recording = False
            self.clear()
            if temporary:
                self._remove_hooks()

    def recorded(self) -> dict[Tap, list[torch.Tensor]]:
        """What each tap recorded so far in this block, with `Tap.call` applied."""
        out: dict[Tap, list[torch.Tensor]] = {}
        for tap, tensors in self._records.items():
            if tap.call is None:
                out[tap] = list(tensors)
            else:
                index = tap.call
                out[tap] = [tensors[index]] if -len(tensors) <= index < len(tensors) else []
        return out

    def _anchor_projections(self, module: nn.Module, args: object, output: object) -> object:
        """Add an exact zero computed from this forward's projected tensors to its logits, so the
        projectors are part of the graph the forward returns (see the module docstring)."""
        if not self._recording:
            return None
        tensors = [t for ts in self._projected.values() for t in ts if t.requires_grad]
        logits = getattr(output, "logits", None)
        if not tensors or not isinstance(logits, torch.Tensor):
            return None
        zero = torch.stack([connected_zero(t) for t in tensors]).sum()
        output.logits = logits + zero.to(logits.dtype)
        return output

    def projected(self) -> dict[str, list[torch.Tensor]]:
        """Projected student tensors by feature-pair key (one per recorded call, every call)."""
        return {key: list(tensors) for key, tensors in self._projected.items() if tensors}

    def clear(self) -> None:
        for tensors in (*self._records.values(), *self._projected.values()):
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


@contextmanager
def capture(
    recorder: ModuleTaps | None, projected: dict[str, list[torch.Tensor]] | None = None
) -> Iterator[dict[Tap, list[torch.Tensor]]]:
    """What `recorder` records during the block; the dict stays readable after it. Projected
    tensors go into `projected` when given."""
    captured: dict[Tap, list[torch.Tensor]] = {}
    if recorder is None:
        yield captured
        return
    with recorder.recording():
        yield captured
        captured.update(recorder.recorded())
        if projected is not None:
            projected.update(recorder.projected())


def merge_recordings(*recordings: Mapping[Tap, list[torch.Tensor]]) -> dict[Tap, list[torch.Tensor]]:
    out: dict[Tap, list[torch.Tensor]] = {}
    for recording in recordings:
        out.update(recording)
    return out
