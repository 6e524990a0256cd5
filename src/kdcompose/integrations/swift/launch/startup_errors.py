"""ms-swift start-up failures reported as config errors naming the YAML key, not tracebacks.

Why: the preflight (`kdcompose validate`) reads the models' files and catches the usual
mistakes before anything loads, but some only show once ms-swift builds its arguments, loads
a model or builds the template: a checkpoint whose config.json lies about its family, a
processor file ms-swift cannot read, a dataset that is not there. ms-swift then raises deep
in its loaders (`AttributeError: 'Qwen2VLVisionConfig' object has no attribute
'fullatt_block_indexes'`), 30-70 lines of traceback that never say which line of the YAML
caused it. This module recognises those start-up phases from the traceback's frames (which
ms-swift function was running, and for a model, whether it was the teacher or the student)
and turns the failure into a `ConfigIssue` at the key that feeds that phase, keeping
ms-swift's own message.

What is *not* converted, so a genuine bug still shows its traceback: a failure raised in
kdcompose's own code, anything outside those phases (training itself), out-of-memory, and
Ctrl-C. `KDCOMPOSE_DEBUG=1` turns the conversion off entirely.
"""

from __future__ import annotations

import functools
import inspect
import os
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import CodeType, FrameType, TracebackType
from typing import Any

from kdcompose.errors import ConfigError, ConfigIssue

DEBUG_ENV = "KDCOMPOSE_DEBUG"
_MAX_MESSAGE = 600


@dataclass(frozen=True)
class Phase:
    """A start-up step of ms-swift and the arguments that feed it (first: the one to blame
    unless the message points at another)."""

    what: str
    keys: tuple[str, ...]


_TEACHER = Phase("load the teacher model", ("teacher_model", "teacher_model_type"))
_STUDENT = Phase("load the student model", ("model", "model_type"))
_TEMPLATE = Phase("build the template", ("template", "model_type"))
_DATASET = Phase("load the dataset", ("dataset", "val_dataset"))
_ARGUMENTS = Phase("build its arguments", ())


@functools.cache
def _phase_code() -> dict[CodeType, Phase]:
    """ms-swift 4.6's start-up functions (their code objects) and the phase each belongs to.
    Looked up on ms-swift itself, so a renamed or moved function fails here loudly instead of
    silently no longer matching."""
    from swift.arguments import BaseArguments
    from swift.dataset.loader import load_dataset
    from swift.model.model_meta import get_model_info_meta
    from swift.model.register import get_model_processor
    from swift.pipelines.train.rlhf import SwiftRLHF
    from swift.pipelines.train.sft import SwiftSft
    from swift.template.register import get_template, get_template_meta

    phases = {
        SwiftRLHF._prepare_template: _TEMPLATE,
        SwiftSft._prepare_template: _TEMPLATE,
        BaseArguments.get_template: _TEMPLATE,
        get_template: _TEMPLATE,
        get_template_meta: _TEMPLATE,
        SwiftSft._prepare_dataset: _DATASET,
        BaseArguments.load_dataset: _DATASET,
        load_dataset: _DATASET,
        SwiftRLHF._prepare_model_tokenizer: _STUDENT,
        SwiftSft._prepare_model_tokenizer: _STUDENT,
        get_model_info_meta: _STUDENT,
        get_model_processor: _STUDENT,
        BaseArguments.get_model_processor: _STUDENT,
        SwiftRLHF._prepare_single_model: _TEACHER,
    }
    return {inspect.unwrap(function).__code__: phase for function, phase in phases.items()}


def _swift_frame(frame: FrameType) -> bool:
    return str(frame.f_globals.get("__name__", "")).split(".")[0] == "swift"


def _kdcompose_frame(frame: FrameType) -> bool:
    return str(frame.f_globals.get("__name__", "")).split(".")[0] == "kdcompose"


def startup_phase(tb: TracebackType | None) -> Phase | None:
    """The ms-swift start-up phase a traceback went through (innermost one wins), or None."""
    phase: Phase | None = None
    known = _phase_code()
    for frame, _ in traceback.walk_tb(tb):
        if not _swift_frame(frame):
            continue
        found = known.get(frame.f_code)
        module = str(frame.f_globals.get("__name__", ""))
        if found is _TEACHER:
            if frame.f_locals.get("key") == "teacher":
                phase = _TEACHER
        elif found is _STUDENT:
            # the teacher is loaded inside the student's preparation too; `_prepare_single_model`
            # of the teacher overrides, and a model loader inside argument building is the student's
            if phase in (None, _ARGUMENTS):
                phase = _STUDENT
        elif found is not None:
            phase = found
        elif module.startswith("swift.arguments") and phase is None:
            phase = _ARGUMENTS
    return phase


def _innermost_frame(tb: TracebackType | None) -> FrameType | None:
    frames = [frame for frame, _ in traceback.walk_tb(tb)]
    return frames[-1] if frames else None


def _is_resource_failure(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(exc).lower()


def _blamed_key(phase: Phase, exc: BaseException, values: Mapping[str, Any]) -> str | None:
    """The argument to name: the one whose name or value the message mentions, else the
    phase's first key that the config sets, else its first key."""
    message = str(exc)
    keys = phase.keys or tuple(values)
    for key in keys:
        if f"`{key}`" in message or f"{key}:" in message or f"--{key}" in message:
            return key
    if phase in (_STUDENT, _TEACHER) and "model_type" in message:
        return phase.keys[1]
    for key in keys:
        value = values.get(key)
        if isinstance(value, str) and value and value in message:
            return key
    present = [key for key in phase.keys if values.get(key) is not None]
    if present:
        return present[0]
    return phase.keys[0] if phase.keys else None


def startup_issue(
    exc: BaseException, values: Mapping[str, Any], paths: Mapping[str, str]
) -> ConfigIssue | None:
    """The config issue an ms-swift start-up failure stands for, or None (leave it alone)."""
    if not isinstance(exc, Exception) or isinstance(exc, ConfigError) or _is_resource_failure(exc):
        return None
    phase = startup_phase(exc.__traceback__)
    innermost = _innermost_frame(exc.__traceback__)
    if phase is None or innermost is None or _kdcompose_frame(innermost):
        return None
    key = _blamed_key(phase, exc, values)
    path = paths.get(key, key) if key else ""
    setting = f" ({key}: {values[key]!r})" if key and values.get(key) is not None else ""
    original = f"{type(exc).__name__}: {exc}"
    if len(original) > _MAX_MESSAGE:
        original = original[:_MAX_MESSAGE] + " ..."
    advice = {
        _TEACHER: "check that teacher_model is the checkpoint you mean and teacher_model_type names its "
        "family (its config.json `model_type` / `architectures`)",
        _STUDENT: "check that model is the checkpoint you mean and model_type names its family "
        "(its config.json `model_type` / `architectures`)",
        _TEMPLATE: "set `template` to one of ms-swift's templates for this model type",
        _DATASET: "check the dataset paths (relative paths are read from the working directory) or ids",
    }.get(phase, "check this setting")
    return ConfigIssue(
        path,
        f"ms-swift could not {phase.what}{setting}: {original}. Fix: {advice}; `kdcompose validate` "
        f"checks most of this without loading anything (set {DEBUG_ENV}=1 for the full traceback)",
    )


@contextmanager
def startup_errors_as_config_errors(
    values: Mapping[str, Any], paths: Mapping[str, str], source: str | None = None
) -> Iterator[None]:
    """Inside the block, an ms-swift start-up failure becomes a ConfigError naming the key
    (chained to the original exception); everything else passes through untouched."""
    try:
        yield
    except Exception as exc:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        issue = startup_issue(exc, values, paths)
        if issue is None:
            raise
        raise ConfigError([issue], source=source) from exc
