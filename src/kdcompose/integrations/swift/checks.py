"""What the ms-swift trainer refuses before training, naming the key and the fix.

The checks that depend only on the models' structure live in the framework-neutral
`kdcompose.training.attachments`; these depend on how ms-swift / accelerate set the run up:
settings that bypass the composition (`use_liger_kernel`), FSDP1's flat parameters (fused terms
read LM-head weights directly), a teacher that is needed but not loaded (ms-swift would silently
fall back to self-distillation), OPSD datasets (a separate teacher encoding, which kdcompose
cannot compare position by position), and several processes without distributed data parallel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.distributed as dist
from swift.rlhf_trainers.gkd_trainer import GKDTrainer

from kdcompose.errors import ConfigError, ConfigIssue
from kdcompose.integrations.swift.launch.args import unsupported_setting_issues
from kdcompose.terms.base import TermNeeds
from kdcompose.training.metrics import is_distributed

SOURCE = "kdcompose ms-swift trainer"
OPSD_COLUMNS = ("teacher_prompt", "teacher_images")
"""Dataset columns that make ms-swift run on-policy self-distillation (OPSD)."""


def reject_unsupported(kwargs: Mapping[str, Any]) -> None:
    """ms-swift settings of the trainer's keyword arguments that would bypass the composition."""
    training_args = kwargs.get("args")
    values = {"use_liger_kernel": getattr(training_args, "use_liger_kernel", False)}
    issues = unsupported_setting_issues(values)
    if issues:
        raise ConfigError(issues, source="ms-swift arguments")


def check_trainer(trainer: GKDTrainer, needs: TermNeeds, terms: Sequence[Any]) -> None:
    """Everything about the trainer's set-up that rules the composition out (ConfigError)."""
    hidden_terms = [t for t in terms if t.needs.student_hidden or t.needs.teacher_hidden]
    if hidden_terms and trainer.is_fsdp_enabled:  # ZeRO-3 is handled (kdcompose.sharding); FSDP1 is not
        message = (
            "needs hidden states and reads the LM-head weights directly, which accelerate's FSDP shards "
            "into flat parameters of the enclosing unit; use DeepSpeed ZeRO-0/1/2/3 or DDP (for lm_jsd: "
            "`fused: false`)"
        )
        raise ConfigError([ConfigIssue(t.origin, message) for t in hidden_terms], source=SOURCE)
    if needs.teacher and trainer.teacher_model is None and not trainer._teacher_use_disable_adapter:
        names = ", ".join(t.name for t in terms if t.needs.teacher)
        raise ConfigError.single(
            "teacher_model",
            f"the active term(s) {names} need a teacher, but none is loaded (ms-swift would fall back to "
            "self-distillation with the student as its own teacher, which kdcompose does not support). "
            "Set `teacher_model` (the same path as `model` with LoRA uses the base model as a fixed teacher)",
            source="ms-swift arguments",
        )
    if needs.teacher:
        _check_no_opsd_columns(trainer)
    if is_distributed() and getattr(trainer.args.parallel_mode, "value", None) != "distributed":
        raise ConfigError.single(
            "training.use_cpu",
            f"{dist.get_world_size()} processes were launched but transformers did not set up distributed "
            "data parallel (on a machine without GPUs `ddp_backend: gloo` alone is not enough): every rank "
            "would train its own copy of the model and log its own loss. Set `use_cpu: true` (with "
            "`ddp_backend: gloo`), or launch on GPUs",
            source=SOURCE,
        )


def _check_no_opsd_columns(trainer: GKDTrainer) -> None:
    for name in ("train_dataset", "eval_dataset"):
        columns = _column_names(getattr(trainer, name, None))
        found = [c for c in OPSD_COLUMNS if c in columns]
        if found:
            raise ConfigError.single(
                "dataset",
                f"the {name.replace('_', ' ')} has column(s) {found}, which make ms-swift run on-policy "
                "self-distillation (OPSD) with a different teacher prompt; kdcompose compares student and "
                "teacher position by position and does not support OPSD. Remove the column(s) or use "
                "ms-swift's stock GKD trainer",
                source="ms-swift dataset",
            )


def reject_opsd_batch(model_inputs: Mapping[str, Any], teacher_inputs: Mapping[str, Any]) -> None:
    """Without OPSD ms-swift hands the teacher the student's encoding (a copy of the same dict)."""
    if teacher_inputs.get("input_ids") is not model_inputs.get("input_ids"):
        raise ConfigError.single(
            "dataset",
            "this batch carries a separate teacher encoding (OPSD: a `teacher_prompt` / `teacher_images` "
            "column); kdcompose compares student and teacher position by position and does not support OPSD",
            source="ms-swift batch",
        )


def zero3_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


def _column_names(dataset: Any) -> list[str]:
    for candidate in (dataset, getattr(dataset, "dataset", None)):
        names = getattr(candidate, "column_names", None)
        if isinstance(names, (list, tuple)):
            return list(names)
    return []


__all__ = ["check_trainer", "reject_opsd_batch", "reject_unsupported", "zero3_enabled"]
