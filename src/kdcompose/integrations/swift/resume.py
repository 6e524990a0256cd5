"""Exact resume: a run resumed from a checkpoint continues as the uninterrupted run would have.

Stock ms-swift 4.6 / transformers 5.19 get three things wrong on resume; kdcompose's trainer
fixes them here (each one measured on the tiny models, `tests/test_exact_resume.py`):

* **Full fine-tuning: the student's trained weights are not restored.** transformers 5 writes
  a checkpoint in the model's *original* (hub) key layout: `save_pretrained` reverts the
  load-time key renamings (`revert_weight_conversion`, transformers/modeling_utils.py:3463), so
  a Qwen2-VL checkpoint holds `model.layers.*` / `visual.*`, while the loaded model's keys are
  `model.language_model.layers.*` / `model.visual.*`. `Trainer._load_from_checkpoint`
  (transformers/trainer.py:3654-3664, and `load_sharded_checkpoint` at :3693 for sharded
  checkpoints) loads that file with `model.load_state_dict(state_dict, strict=False)`: no key
  matches, nothing is loaded, and only a "missing keys" warning is logged. The resumed run then
  trains the *initial* weights with the restored optimizer state. `load_full_weights` maps each
  saved key back to the model's key (the same renaming, applied to the model's own keys) and
  loads strictly: a weight that still cannot be restored stops the run (`ResumeError`).
* **Data order in a later epoch.** ms-swift's GKD trainer samples with TRL's `RepeatSampler`
  (swift/rlhf_trainers/gkd_trainer.py:86), which draws each epoch's permutation from a private
  generator seeded once (trl/trainer/utils.py:790-797) and has no `set_epoch`, so a run resumed
  in epoch `e > 0` replays epoch 0's order. `EpochReplaySampler` adds `set_epoch`, which
  positions the generator after `e` draws: the same order as the uninterrupted run (and, for a
  run that is not resumed, the same order as stock). A resumed run's sampler also starts in the
  checkpoint's epoch, because on several ranks accelerate's skip wrapper does not forward
  `set_epoch` for the resumed epoch.
* **The GKD micro-batch counter.** `GKDTrainer._prepare_inputs` (gkd_trainer.py:354-361) picks
  `_buffered_inputs[_step % steps_per_generation]`; `_step` starts at 0 in a resumed run.
  It is restored to the micro-batches already trained, so a checkpoint inside a generation
  batch (`steps_per_generation` > `gradient_accumulation_steps`) continues with the right slice.

What a checkpoint cannot give back is said at train start (a warning naming the cause) instead
of diverging silently: a checkpoint saved with `save_only_model: true` has no `optimizer.pt`,
`scheduler.pt` or `rng_state.pth` (the resumed steps then drift at once — that is the ~5e-4
"LoRA drift"), `resume_only_model` / `ignore_data_skip`, a checkpoint inside a logging window,
and on-policy batches generated before the checkpoint inside a generation batch.

A checkpoint whose recorded composition (`kdcompose_composition.yaml`, `resume.py`) differs
from the configured one is refused (a `ConfigError` at `rlhf.loss_terms`) naming what differs,
unless `KDCOMPOSE_RESUME_ALLOW_CHANGES=1` is set (a deliberate change of recipe mid-run), which
turns the refusal into a warning.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdcompose.errors import ConfigError
from kdcompose.training import records as resume
from kdcompose.training.loop import resume_checkpoint

ALLOW_CHANGES_ENV = "KDCOMPOSE_RESUME_ALLOW_CHANGES"
"""Set to 1 to resume from a checkpoint whose recorded loss composition differs from the config."""

SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX = "pytorch_model.bin.index.json"
TRAINER_STATE = "trainer_state.json"
RESTORED_FILES = {
    "optimizer.pt": "optimizer state (AdamW moments start from zero)",
    "scheduler.pt": "LR scheduler state",
}


class ResumeError(RuntimeError):
    """A resume that cannot continue the run it resumes (refused before any step is trained)."""


@dataclass
class ResumePlan:
    """What `begin_train` found about the checkpoint a run resumes from (kept on the trainer)."""

    checkpoint: str
    global_step: int
    epoch: int = 0
    """The dataloader epoch the resumed run starts in (`checkpoint_epoch`)."""
    not_exact: list[str] = field(default_factory=list)
    """Why the resumed steps will not equal the uninterrupted run's (each logged as a warning)."""
    composition_changes: list[str] = field(default_factory=list)
    weights_loaded: int = 0
    """Student tensors `load_full_weights` restored (0: adapters, or stock loading)."""


# ---------------------------------------------------------------------------------------------- weights


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


# ---------------------------------------------------------------------------------------------- data order


class EpochReplaySampler:
    """Mixin for TRL's `RepeatSampler`: `set_epoch(e)` positions the generator after `e` epochs.

    The stock sampler draws one permutation per `__iter__` from a generator seeded at
    construction; the uninterrupted run's epoch `e` therefore uses the `(e+1)`-th draw. A resumed
    run starts a fresh sampler, so it would use the first draw in whatever epoch it resumes.
    transformers calls `set_epoch(epoch)` on the dataloader's sampler before each epoch
    (accelerate forwards it), so this reproduces the uninterrupted order at any epoch.
    """

    seed: int | None
    shuffle: bool
    num_samples: int
    generator: torch.Generator

    def set_epoch(self, epoch: int) -> None:
        if not getattr(self, "shuffle", True) or self.seed is None:
            return
        self.generator.manual_seed(self.seed)
        for _ in range(int(epoch)):
            torch.randperm(self.num_samples, generator=self.generator)


def make_epoch_replayable(sampler: Any) -> Any:
    """Give a `RepeatSampler` instance `set_epoch` (returns it; other samplers pass through)."""
    cls = type(sampler)
    needed = ("generator", "num_samples", "seed")
    if hasattr(sampler, "set_epoch") or not all(hasattr(sampler, a) for a in needed):
        return sampler
    sampler.__class__ = type(f"EpochReplay{cls.__name__}", (cls, EpochReplaySampler), {})
    return sampler


def _wrap_sampler_factory(trainer: Any) -> None:
    """Make the samplers `trainer._get_train_sampler` returns epoch-replayable (once per trainer)
    and, in a resumed run, start them in the epoch the run resumes in.

    Why the start: transformers calls `set_epoch` on the dataloader of the resumed epoch only
    after wrapping it in accelerate's `skip_first_batches`, and with several processes that
    wrapper (`SkipBatchSampler` around `BatchSamplerShard`) does not forward `set_epoch` to the
    sampler: measured on 2 ranks, the resumed steps of that epoch replayed epoch 0's batches.
    Later epochs use the unwrapped dataloader, which forwards it."""
    factory: Callable[..., Any] = trainer._get_train_sampler
    if getattr(factory, "_kd_epoch_replay", False):
        return

    def get_train_sampler(*args: Any, **kwargs: Any) -> Any:
        sampler = make_epoch_replayable(factory(*args, **kwargs))
        plan = getattr(trainer, "kd_resume_plan", None)
        if plan is not None and isinstance(sampler, EpochReplaySampler):
            sampler.set_epoch(plan.epoch)
        return sampler

    get_train_sampler._kd_epoch_replay = True  # type: ignore[attr-defined]
    trainer._get_train_sampler = get_train_sampler


# ---------------------------------------------------------------------------------------------- train start


def _trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    try:
        state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def checkpoint_global_step(checkpoint: str | Path) -> int:
    return int(_trainer_state(checkpoint).get("global_step", 0) or 0)


def checkpoint_epoch(checkpoint: str | Path) -> int:
    """The index of the dataloader epoch the run resumes in: the floor of the checkpoint's
    fractional `epoch` (`e + trained/steps_in_epoch`, exactly `e + 1` at an epoch's end)."""
    return math.floor(float(_trainer_state(checkpoint).get("epoch", 0) or 0) + 1e-6)


def composition_refusal(checkpoint: str | Path, composer: Any) -> list[str]:
    """What differs from the checkpoint's recorded composition (`resume.resume_changes`).

    Raises a `ConfigError` at `rlhf.loss_terms` naming every difference, unless
    `KDCOMPOSE_RESUME_ALLOW_CHANGES=1` allows it (the loop then logs the differences as a warning).
    """
    changes = resume.resume_changes(checkpoint, composer) or []
    allowed = os.environ.get(ALLOW_CHANGES_ENV, "").strip().lower() in ("1", "true", "yes")
    if changes and not allowed:
        raise ConfigError.single(
            "rlhf.loss_terms",
            f"differs from the composition the checkpoint's run recorded ({resume.COMPOSITION_FILE}): "
            f"{'; '.join(changes)}. Resume with the recorded composition, or set {ALLOW_CHANGES_ENV}=1 to "
            "continue with this one on purpose",
            source=f"(resume_from_checkpoint: {checkpoint})",
        )
    return changes


def not_exact_reasons(trainer: Any, checkpoint: str | Path, global_step: int) -> list[str]:
    """Why the resumed steps will not equal the uninterrupted run's (empty: exact)."""
    folder, args = Path(checkpoint), trainer.args
    reasons: list[str] = []
    missing = [f"{name} ({what})" for name, what in RESTORED_FILES.items() if not (folder / name).is_file()]
    if not trainer.is_deepspeed_enabled and missing and not getattr(args, "resume_only_model", False):
        reasons.append(
            f"the checkpoint has no {', '.join(missing)}: it was saved with save_only_model: true; "
            "set save_only_model: false to make checkpoints that resume exactly"
        )
    world = int(getattr(args, "world_size", 1) or 1)
    rng = folder / (f"rng_state_{args.process_index}.pth" if world > 1 else "rng_state.pth")
    if not rng.is_file() and not getattr(args, "resume_only_model", False):
        reasons.append(f"the checkpoint has no {rng.name}: random states (dropout, sampling) start fresh")
    if getattr(args, "resume_only_model", False):
        reasons.append("resume_only_model: true restores only the weights (no optimizer, scheduler, RNG)")
    if getattr(args, "ignore_data_skip", False):
        reasons.append("ignore_data_skip: true restarts the epoch's data instead of skipping trained batches")
    logging_steps = getattr(args, "logging_steps", 1)
    if isinstance(logging_steps, int) and logging_steps > 1 and global_step % logging_steps:
        reasons.append(
            f"the checkpoint (step {global_step}) falls inside a logging window of {logging_steps} steps: "
            "the first logged row after resuming averages fewer steps (make save_steps a multiple of "
            "logging_steps)"
        )
    per_generation = int(getattr(args, "steps_per_generation", 0) or 0)
    accumulation = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    lmbda = float(getattr(trainer, "lmbda", 0.0) or 0.0)
    if per_generation and (global_step * accumulation) % per_generation and lmbda > 0:
        reasons.append(
            f"the checkpoint falls inside a generation batch (steps_per_generation {per_generation}) of an "
            "on-policy run: the rest of that batch is generated again by the restored student"
        )
    return reasons


def begin_train(trainer: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> ResumePlan | None:
    """Called by the trainer's `train()` before the loop starts: refuse, warn, restore counters.

    Installs the epoch-replaying sampler for every run (fresh runs keep stock order). For a
    resume, refuses a changed composition (unless overridden), warns once for each reason the
    resume cannot be exact, and restores the GKD micro-batch counter `_step`. Returns the plan
    (also kept as `trainer.kd_resume_plan`), or None for a fresh run.
    """
    _wrap_sampler_factory(trainer)
    trainer.kd_resume_plan = None
    checkpoint = resume_checkpoint(trainer, args, kwargs)
    if not checkpoint:
        return None
    global_step = checkpoint_global_step(checkpoint)
    plan = ResumePlan(checkpoint=checkpoint, global_step=global_step, epoch=checkpoint_epoch(checkpoint))
    plan.composition_changes = composition_refusal(checkpoint, trainer.kd_composer)
    plan.not_exact = not_exact_reasons(trainer, checkpoint, global_step)
    if hasattr(trainer, "_step") and not trainer._step:
        trainer._step = global_step * int(trainer.args.gradient_accumulation_steps or 1)
        trainer._buffered_inputs = None
    if trainer.accelerator.is_main_process:
        from swift.utils import get_logger

        for reason in plan.not_exact:
            get_logger().warning(f"kdcompose: resuming from {checkpoint} will not be exact: {reason}")
    trainer.kd_resume_plan = plan
    return plan


def load_checkpoint_weights(trainer: Any, checkpoint: str, model: Any = None) -> bool:
    """The trainer's `_load_from_checkpoint`: True when the full student weights were restored here
    (the caller must then skip the stock loader), False when the stock loader should run."""
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        return False
    target = model if model is not None else trainer.model
    target = trainer.accelerator.unwrap_model(target) if hasattr(trainer, "accelerator") else target
    loaded = load_full_weights(target, checkpoint)
    if loaded is None:
        return False
    plan = getattr(trainer, "kd_resume_plan", None)
    if plan is not None:
        plan.weights_loaded = loaded
    return True


__all__ = [
    "ALLOW_CHANGES_ENV",
    "EpochReplaySampler",
    "ResumeError",
    "ResumePlan",
    "begin_train",
    "checkpoint_epoch",
    "checkpoint_global_step",
    "composition_refusal",
    "full_weight_files",
    "load_checkpoint_weights",
    "load_full_weights",
    "make_epoch_replayable",
    "not_exact_reasons",
    "resume_checkpoint",
    "saved_key_map",
]
