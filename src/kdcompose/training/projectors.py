"""Feature projectors: trainable maps from the student's feature width to the teacher's.

Feature KD compares student and teacher features element by element, so a target whose
widths differ (e.g. the `aligner` of a 64-wide student and a 96-wide teacher: the aligner
outputs the language model's hidden size) cannot be compared as is. Setting
`projector: linear` on the target asks for a learned linear map `student -> teacher width`
(FitNets' "regressor"), applied to the student's features before the distance.

Why the design is what it is:

* **Widths are checked before training.** They are read from the model configs (the vision
  config for `vit`, the language model's hidden size for `aligner` / `deepstack`), so a
  mismatch without a projector fails at trainer construction, naming the target, both widths
  and the option, instead of one step into the run. Only a `module:` override whose width
  cannot be read is left to the first step (the term raises the same message there).
* **A projector is part of the student while training**: registered as the submodule
  `kdcompose_projectors` (a `ModuleDict` keyed `<term>__<target>`) of the unwrapped student,
  so the trainer's optimizer, `model.train()`/`.to()`, DDP and DeepSpeed all include it with
  no special casing.
* **...but not part of the student you export.** It is a training-time helper, so it is
  listed in the model's `_keys_to_ignore_on_save` (the saved student stays a plain
  checkpoint of its family, loadable without warnings) and is saved instead next to the
  student, as `kdcompose_projectors.safetensors` in every checkpoint — for full fine-tuning
  and LoRA alike (a PEFT save keeps only the adapters). Resuming reads it back.
* **Initialised to the (rectangular) identity** with a zero bias: with equal widths the term
  starts exactly as without a projector, with different widths it starts by copying the first
  `min(in, out)` channels; no random numbers are drawn, so adding a projector does not shift
  the run's random stream.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kdcompose.errors import ConfigError, ConfigIssue
from kdcompose.primitives import unwrap_model as _unwrap
from kdcompose.terms.base import FeaturePair, Tap
from kdcompose.terms.features import FeatureWidthError as FeatureWidthError

logger = logging.getLogger(__name__)

PROJECTOR_ATTR = "kdcompose_projectors"
"""Name of the `ModuleDict` of projectors on the unwrapped student."""
PROJECTOR_FILE = "kdcompose_projectors.safetensors"
"""File holding the projectors' weights in each checkpoint directory."""
PROJECTOR_KINDS: tuple[str, ...] = ("linear",)
OPTION = "projector"
"""The YAML key of a feature pair (or visual_kd target) that asks for a projector."""


def projector_key(term: str, pair: str) -> str:
    """Key of the projector of feature pair `pair` of term `term` (a term name is an identifier,
    a pair name has no `__`, so the key is unambiguous and never an attribute of `ModuleDict`)."""
    return f"{term}__{pair}"


def width_mismatch_message(pair: FeaturePair, student: int, teacher: int) -> str:
    return (
        f"{pair.student.describe()} is {student} wide but {pair.teacher.describe()} is {teacher} wide, so "
        f"they cannot be compared element by element. Set `{pair.origin}.{OPTION}: linear` to learn a "
        f"{student}->{teacher} map (trained with the student, saved in its checkpoints), or pick modules "
        "whose widths agree"
    )


class LinearProjector(nn.Linear):
    """`y = W x + b` from the student's width to the teacher's, identity-initialised."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias=True, device=device, dtype=torch.float32)

    def reset_parameters(self) -> None:  # called by nn.Linear.__init__: no random draw
        with torch.no_grad():
            self.weight.copy_(torch.eye(self.out_features, self.in_features))
            self.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Features may be bf16 while the projector is fp32 (or bf16 under DeepSpeed): compute in its dtype.
        return F.linear(features.to(self.weight.dtype), self.weight, self.bias)


def build_projector(
    kind: str, in_width: int, out_width: int, device: torch.device | str | None = None
) -> nn.Module:
    if kind != "linear":
        raise ValueError(f"unknown projector {kind!r}; choose one of {', '.join(PROJECTOR_KINDS)}")
    return LinearProjector(in_width, out_width, device=device)


# ---------------------------------------------------------------------- widths, read without running a model


def _last_weighted_leaf(module: nn.Module) -> nn.Module | None:
    leaves = [
        m for m in module.modules() if not list(m.children()) and getattr(m, "weight", None) is not None
    ]
    return leaves[-1] if leaves else None


def module_width(module: nn.Module, io: str = "output") -> int | None:
    """The last-dimension width of what `module` outputs (or takes as input), read from its
    structure without running it; None when it cannot be known up front.

    A Linear: `out_features` (`in_features` for its input). A transformers model (a vision
    tower): its config's `embed_dim`, else `hidden_size` -- the width of `last_hidden_state`.
    A module with a `hidden_size` attribute and no config (a decoder layer) for its input.
    Otherwise its output is the output of its last weighted leaf in registration order
    (a decoder layer ends in its post-attention norm, a merger in its last Linear).
    """
    if isinstance(module, nn.Linear):
        return int(module.in_features if io == "input" else module.out_features)
    config = getattr(module, "config", None)
    if config is not None and io == "output":
        width = getattr(config, "embed_dim", None) or getattr(config, "hidden_size", None)
        return int(width) if isinstance(width, int) and width > 0 else None
    if io == "input":
        width = getattr(module, "hidden_size", None)
        return int(width) if isinstance(width, int) and width > 0 else None
    leaf = _last_weighted_leaf(module)
    if isinstance(leaf, nn.Linear):
        return int(leaf.out_features)
    if isinstance(leaf, nn.Embedding):
        return int(leaf.embedding_dim)
    weight = getattr(leaf, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:  # a norm layer
        shape = getattr(weight, "ds_shape", None) or weight.shape  # ZeRO-3 partitions the tensor itself
        return int(shape[0]) if shape[0] else None
    return None


def tap_width(model: nn.Module, tap: Tap) -> int | None:
    """Width of `tap`'s tensors in `model` (children taps: the first child's), or None."""
    from kdcompose.training.taps import TapNotFound, resolve_path

    try:
        _, module = resolve_path(_unwrap(model), tap.path)
    except TapNotFound:
        return None
    if tap.children:
        children = list(module.children())
        if not children:
            return None
        module = children[0]
    return module_width(module, tap.io)


# ---------------------------------------------------------------------- planning and attaching


@dataclass(frozen=True)
class ProjectorPlan:
    """One projector to build: which feature pair (its key and YAML path), what kind, from
    which width to which."""

    key: str
    origin: str
    kind: str
    in_width: int
    out_width: int


def plan_projectors(
    pairs: Iterable[FeaturePair], student: nn.Module, teacher: nn.Module
) -> list[ProjectorPlan]:
    """The projectors the declared feature `pairs` need, with widths read from the models;
    ConfigError (every problem at once, each naming the pair's YAML path) for a width mismatch
    without a projector, or a projector whose widths cannot be read before training."""
    plans: list[ProjectorPlan] = []
    issues: list[ConfigIssue] = []
    for pair in sorted(set(pairs), key=lambda p: p.key):
        s_width = tap_width(student, pair.student)
        t_width = tap_width(teacher, pair.teacher)
        if pair.projector is None:
            if s_width is not None and t_width is not None and s_width != t_width:
                issues.append(ConfigIssue(pair.origin, width_mismatch_message(pair, s_width, t_width)))
            continue
        if s_width is None or t_width is None:
            issues.append(
                ConfigIssue(
                    f"{pair.origin}.{OPTION}",
                    "a projector needs both feature widths before training starts, but kdcompose cannot "
                    f"read them from the models ({pair.student.describe()}: {s_width}, "
                    f"{pair.teacher.describe()}: {t_width}). Tap a Linear layer, a decoder layer or a "
                    "model, or drop the projector",
                )
            )
            continue
        plans.append(ProjectorPlan(pair.key, pair.origin, pair.projector, s_width, t_width))
    if issues:
        raise ConfigError(issues, source="kdcompose feature widths")
    return plans


def attach_projectors(model: nn.Module, plans: Iterable[ProjectorPlan]) -> dict[str, nn.Module]:
    """Install exactly the planned projectors as `model.kdcompose_projectors` (removing it when
    there are none) and return them by key. A projector that already exists with the same
    shape is kept, so re-attaching does not reset trained weights or detach the optimizer."""
    model = _unwrap(model)
    plans = list(plans)
    existing = getattr(model, PROJECTOR_ATTR, None)
    old: dict[str, nn.Module] = dict(existing.items()) if isinstance(existing, nn.ModuleDict) else {}
    _forget_ignored_keys(model, old)
    if not plans:
        if existing is not None:
            delattr(model, PROJECTOR_ATTR)
        return {}
    device = next((p.device for p in model.parameters()), None)
    modules = nn.ModuleDict()
    for plan in plans:
        current = old.get(plan.key)
        if _same_shape(current, plan):
            modules[plan.key] = current
        else:
            modules[plan.key] = build_projector(plan.kind, plan.in_width, plan.out_width, device=device)
    setattr(model, PROJECTOR_ATTR, modules)
    _ignore_on_save(model, modules)
    return dict(modules.items())


def _same_shape(module: nn.Module | None, plan: ProjectorPlan) -> bool:
    return (
        isinstance(module, LinearProjector)
        and module.in_features == plan.in_width
        and module.out_features == plan.out_width
    )


def _projector_state_keys(modules: Mapping[str, nn.Module]) -> list[str]:
    return [f"{PROJECTOR_ATTR}.{key}.{name}" for key, m in modules.items() for name in m.state_dict()]


def _ignore_on_save(model: nn.Module, modules: Mapping[str, nn.Module]) -> None:
    """Keep the projectors out of the student's own weights file (transformers drops the keys
    listed in `_keys_to_ignore_on_save`, and does not warn when a resume finds them missing)."""
    if not hasattr(model, "_keys_to_ignore_on_save"):
        return  # not a transformers model: its saver is not ours to steer
    keys = list(model._keys_to_ignore_on_save or [])
    model._keys_to_ignore_on_save = keys + [k for k in _projector_state_keys(modules) if k not in keys]


def _forget_ignored_keys(model: nn.Module, modules: Mapping[str, nn.Module]) -> None:
    ignored = getattr(model, "_keys_to_ignore_on_save", None)
    if not ignored or not modules:
        return
    ours = set(_projector_state_keys(modules))
    kept = [k for k in ignored if k not in ours]
    model._keys_to_ignore_on_save = kept or None


# ---------------------------------------------------------------------- checkpoints


def projector_state(
    projectors: Mapping[str, nn.Module], state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The projectors' weights keyed `<term>__<target>.<param>`. From `state_dict` (the
    trainer's, already gathered under DeepSpeed ZeRO-3 / FSDP) when it holds them, else from
    the modules themselves."""
    marker = PROJECTOR_ATTR + "."
    if state_dict is not None:
        found = {key.split(marker, 1)[1]: value for key, value in state_dict.items() if marker in key}
        if found:
            return found
    return {f"{key}.{name}": t for key, m in projectors.items() for name, t in m.state_dict().items()}


def save_projectors(
    projectors: Mapping[str, nn.Module],
    output_dir: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path | None:
    """Write the projectors next to the student's weights; None (nothing written) without any."""
    if not projectors:
        return None
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in projector_state(projectors, state_dict).items()}
    path = Path(output_dir) / PROJECTOR_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt", "kdcompose": "feature projectors"})
    return path


def load_projectors(projectors: Mapping[str, nn.Module], checkpoint_dir: str | os.PathLike[str]) -> bool:
    """Restore the projectors from a checkpoint; False (with a warning) when it holds none, so a
    run that adds a projector can still resume from a checkpoint made without one."""
    if not projectors:
        return False
    path = Path(checkpoint_dir) / PROJECTOR_FILE
    if not path.is_file():
        logger.warning(f"kdcompose: {path} not found; the feature projectors start from their initial values")
        return False
    from safetensors.torch import load_file

    state = load_file(str(path))
    for key, module in projectors.items():
        own = {name[len(key) + 1 :]: t for name, t in state.items() if name.startswith(key + ".")}
        if not own:
            logger.warning(f"kdcompose: {path} has no weights for projector {key!r}; it starts fresh")
            continue
        try:
            module.load_state_dict(own)
        except RuntimeError as exc:  # a different width: the config changed since the checkpoint
            raise ValueError(f"projector {key!r} in {path} does not fit the current models: {exc}") from exc
    return True
