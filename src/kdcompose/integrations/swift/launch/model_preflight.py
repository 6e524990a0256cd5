"""The models of a run checked from their files, as ms-swift will read them, before any loads.

Part of the one preflight (`preflight.config_issues`): `kdcompose validate` and `kdcompose
train` both run it, so the mistakes that used to surface 8-34 s (or, with 7B models, minutes)
into `train` as ms-swift tracebacks now end `validate` in seconds with exit 2, the dotted key
and the fix:

* `model` / `teacher_model`: a local folder that does not exist; a hub id that is not in the
  local cache while offline mode is on (with it off, validate notes that ms-swift will
  download it, and checks what it can without its files); a folder without config.json,
  tokenizer or (for a vision-language model) image processor files;
* `model_type` / `teacher_model_type`: a name ms-swift does not know (with the closest real
  one), a type made for another architecture than the checkpoint's config.json states, or
  none given where ms-swift cannot infer one (the checkpoint's architecture fits several:
  the error lists them);
* `template`: unknown, or left out where the model type has several (the error lists them);
* every feature pair of the active terms: the widths of both tapped modules read from the
  configs (kdcompose.model_files.tap_width), so a pair whose widths differ without
  `projector: linear` is reported at the pair's key, with both widths -- the same message the
  trainer gives after loading both models (kdcompose.training.projectors) -- and a tap of a module the
  model cannot have (layer 5 of 3) is reported at the tap's key;
* teacher and student vocabularies, when an active term compares their LM-head logits
  (kdcompose.functional.vocab.check_vocab_compatible, as the trainer);
* teacher and student tokenizers (`tokenizer_preflight`): a term reading a teacher with another
  tokenizer without `cross_tokenizer`, and `rlhf.teacher_template`.

ms-swift's inference is mirrored from its 4.6 code (`get_matched_model_meta`,
`_get_model_info`, `get_template_meta`); its registry is read through the cached table in
`model_registry.py`. Nothing is reported that cannot be known from files: an unknown module
path or model family is left to the trainer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcompose.errors import ConfigIssue
from kdcompose.integrations.swift.launch.args import is_swift_teacher_server
from kdcompose.model_files import (
    PROCESSOR_FILES,
    TOKENIZER_FILES,
    ModelFileError,
    ModelLocation,
    ModelShape,
    env_flag,
    has_processor,
    has_tokenizer,
    locate_model,
    model_shape,
    modelscope_cache_root,
    read_args_json,
    read_config,
    tap_width,
    tokenizer_size,
)

_SECTION_OF = {"model": "model", "model_type": "model", "template": "template"}


@dataclass
class RunModel:
    """One model ms-swift will load for the run (the student, or the local teacher)."""

    role: str
    key: str
    type_key: str
    location: ModelLocation
    shape: ModelShape | None = None
    folder_args: Mapping[str, Any] = field(default_factory=dict)
    model_type: str | None = None
    """The ms-swift model type the run will use (given, or inferred as ms-swift infers it)."""
    name_template: str | None = None
    """The template ms-swift takes from the model group the name matched."""


@dataclass
class ModelReport:
    issues: list[ConfigIssue] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def model_issues(config: Any) -> list[ConfigIssue]:
    """Every problem the models' files show for `config` (a KDConfig)."""
    return inspect_models(config).issues


def model_notes(config: Any) -> list[str]:
    """What is worth saying but not wrong (a model ms-swift will download)."""
    return inspect_models(config).notes


def inspect_models(config: Any) -> ModelReport:
    """Issues and notes for the student and the local teacher of `config` (a KDConfig)."""
    values: Mapping[str, Any] = config.swift_args
    paths = _KeyPaths(config.arg_paths)
    report = ModelReport()
    hub = "huggingface" if bool(values.get("use_hf")) or env_flag("USE_HF") else "modelscope"
    plugins = bool(values.get("external_plugins"))

    student = _run_model("student", "model", "model_type", "model_revision", values, hub)
    teacher = None
    default_teacher = config.teachers.get("")
    # a provider other than ms-swift's teacher_model_server stands in for the teacher model
    if default_teacher is None or is_swift_teacher_server(default_teacher):
        teacher = _run_model(
            "teacher", "teacher_model", "teacher_model_type", "teacher_model_revision", values, hub
        )
    models = [m for m in (student, teacher) if m is not None]
    if not models:
        return report

    from kdcompose.integrations.swift.launch.model_registry import swift_registry

    registry = swift_registry()
    for model in models:
        _check_files(model, paths, report)
        _resolve_model_type(model, values, paths, registry, plugins, report)
    if student is not None:
        _check_template(student, values, paths, registry, plugins, report)

    from kdcompose.composer import build_composer

    composer = build_composer(config.composition)
    composer.remote_teachers = frozenset(config.teachers)
    needs = composer.needs
    student_shape = student.shape if student is not None else None
    # no local teacher model: ms-swift distils from the student itself (a cache or server teacher
    # has no features, which source_issues already refuses for feature pairs)
    teacher_shape = teacher.shape if teacher is not None else student_shape
    report.issues += _feature_pair_issues(needs.pairs, student, teacher, student_shape, teacher_shape)
    from kdcompose.integrations.swift.launch.tokenizer_preflight import tokenizer_issues

    found, cross = tokenizer_issues(config, composer, student, teacher, registry)  # other tokenizers
    report.issues += found
    if needs.teacher_logits and student is not None and teacher is not None and "" not in cross:
        report.issues += _vocab_issues(student, teacher, paths)
    return report


# ---------------------------------------------------------------------- models and their files


class _KeyPaths:
    """Dotted YAML paths of ms-swift arguments: where the config set them, else where they belong."""

    def __init__(self, arg_paths: Mapping[str, str]) -> None:
        self.arg_paths = arg_paths

    def __call__(self, key: str, near: str | None = None) -> str:
        if key in self.arg_paths:
            return self.arg_paths[key]
        if near is not None and near in self.arg_paths:
            return f"{self.arg_paths[near].rsplit('.', 1)[0]}.{key}"
        return f"{_SECTION_OF.get(key, 'rlhf')}.{key}"


def _run_model(
    role: str, key: str, type_key: str, revision_key: str, values: Mapping[str, Any], hub: str
) -> RunModel | None:
    name = values.get(key)
    if not isinstance(name, str) or not name:
        return None
    revision = values.get(revision_key)
    location = locate_model(name, hub=hub, revision=revision if isinstance(revision, str) else None)  # type: ignore[arg-type]
    return RunModel(role, key, type_key, location)


def _hub_cache(location: ModelLocation) -> str:
    if location.hub == "huggingface":
        from huggingface_hub import constants

        return f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    return f"the ModelScope cache ({modelscope_cache_root()})"


def _check_files(model: RunModel, paths: _KeyPaths, report: ModelReport) -> None:
    location, path = model.location, paths(model.key)
    if location.kind == "remote":
        hub = "Hugging Face" if location.hub == "huggingface" else "ModelScope"
        report.notes.append(
            f"{path}: {location.name} is not in {_hub_cache(location)} (nor a local folder: "
            f"{location.looked_at} does not exist): ms-swift will download it from {hub} when training "
            "starts (its files were not checked)"
        )
        return
    if location.kind == "missing":
        if location.looked_at.exists() or not _could_be_hub_id(location):
            report.issues.append(
                ConfigIssue(
                    path,
                    f"{location.looked_at} does not exist (a relative path is read from the working "
                    f"directory, {Path.cwd()}): point `{model.key}` at a model folder or a hub id",
                )
            )
        else:
            report.issues.append(
                ConfigIssue(
                    path,
                    f"{location.name!r} is neither a local folder ({location.looked_at} does not exist) "
                    f"nor in {_hub_cache(location)}, and offline mode is on (HF_HUB_OFFLINE / "
                    "TRANSFORMERS_OFFLINE / MODELSCOPE_OFFLINE), so ms-swift cannot download it: download it "
                    "first, or point "
                    f"`{model.key}` at a local copy",
                )
            )
        return
    folder = location.folder
    assert folder is not None
    if not folder.is_dir():
        report.issues.append(ConfigIssue(path, f"{folder} is a file; `{model.key}` must be a model folder"))
        return
    try:
        model.shape = model_shape(read_config(folder))
    except ModelFileError as exc:
        report.issues.append(ConfigIssue(path, f"{exc}; point `{model.key}` at the folder holding it"))
        return
    model.folder_args = read_args_json(folder)
    if not has_tokenizer(folder):
        report.issues.append(
            ConfigIssue(
                path,
                f"{folder} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}): copy them from the "
                "model the checkpoint was made from",
            )
        )
    if model.shape.is_vision_language and not has_processor(folder):
        report.issues.append(
            ConfigIssue(
                path,
                f"{folder} is a vision-language model but has no image processor file (one of "
                f"{', '.join(PROCESSOR_FILES)}): copy it from the model the checkpoint was made from",
            )
        )


def _could_be_hub_id(location: ModelLocation) -> bool:
    from kdcompose.model_files import looks_like_hub_id

    return looks_like_hub_id(location.name)


def swift_model_name(name: str) -> str:
    """The name ms-swift matches against its model groups (`get_model_name`): a hub cache
    folder's repository name, else the last path component (`___` read as `.`)."""
    text = name.rstrip("/")
    for pattern in (r"/models--(?:.+?--)?(.+?)/snapshots/", r"/models/(?:.+?--)?(.+?)/snapshots/"):
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return text.rsplit("/", 1)[-1].replace("___", ".")


def _resolve_model_type(
    model: RunModel,
    values: Mapping[str, Any],
    paths: _KeyPaths,
    registry: Any,
    plugins: bool,
    report: ModelReport,
) -> None:
    from kdcompose.integrations.swift.launch.model_registry import closest

    given = values.get(model.type_key)
    type_path = paths(model.type_key, near=model.key)
    matched = registry.match_name(swift_model_name(model.location.name))
    if matched is not None:
        model.name_template = matched[1]
    if given is not None:
        if not isinstance(given, str) or given not in registry.model_types:
            if plugins and isinstance(given, str):
                return  # may come from the run's external_plugins
            hint = closest(str(given), list(registry.model_types))
            did_you_mean = f"did you mean {' or '.join(repr(h) for h in hint)}? " if hint else ""
            report.issues.append(
                ConfigIssue(
                    type_path,
                    f"{given!r} is not an ms-swift model type; {did_you_mean}"
                    f"({len(registry.model_types)} types are registered; ms-swift's docs list them under "
                    "'Supported models')",
                )
            )
            return
        model.model_type = given
        if matched is not None and matched[0] != given:
            model.name_template = None  # ms-swift takes the given type's own meta then
    elif matched is not None:
        model.model_type = matched[0]
    elif isinstance(model.folder_args.get("model_type"), str):
        model.model_type = model.folder_args["model_type"]
    shape = model.shape
    if shape is None:
        return  # nothing more is known without the files
    architecture = shape.architecture
    fitting = registry.types_for_architecture(architecture)
    if model.model_type is None:
        if len(fitting) > 1:
            report.issues.append(
                ConfigIssue(
                    type_path,
                    f"ms-swift cannot tell which model type {model.location.folder} is: its config.json "
                    f"architecture {architecture} fits {', '.join(fitting)}; set `{model.type_key}` to one "
                    f"of them (for the model family's own checkpoints: {_own_type(shape, fitting)})",
                )
            )
        elif len(fitting) == 1:
            model.model_type = fitting[0]
        elif shape.is_vision_language:
            report.issues.append(
                ConfigIssue(
                    type_path,
                    f"no ms-swift model type is registered for {architecture} ({model.location.folder}); "
                    f"set `{model.type_key}` to the model type ms-swift should load it as",
                )
            )
        return
    info = registry.model_types.get(model.model_type)
    if info is None or not info.architectures or architecture is None or architecture in info.architectures:
        return
    where = type_path if given is not None else paths(model.key)
    fits = f"; ms-swift's model types for it: {', '.join(fitting)}" if fitting else ""
    report.issues.append(
        ConfigIssue(
            where,
            f"model type {model.model_type!r} is for {', '.join(info.architectures)} checkpoints, but "
            f"{model.location.folder}/config.json says {architecture} "
            f"(model_type {shape.model_type!r}){fits}: "
            f"set `{model.type_key}` to the checkpoint's family, or point `{model.key}` at a "
            f"{model.model_type} checkpoint",
        )
    )


def _own_type(shape: ModelShape, fitting: list[str]) -> str:
    """The candidate named like the checkpoint's own config.json model_type, when there is one."""
    own = shape.model_type
    return own if own in fitting else fitting[0]


def _check_template(
    student: RunModel,
    values: Mapping[str, Any],
    paths: _KeyPaths,
    registry: Any,
    plugins: bool,
    report: ModelReport,
) -> None:
    from kdcompose.integrations.swift.launch.model_registry import closest

    template = values.get("template")
    path = paths("template")
    if template is not None:
        if isinstance(template, str) and (template in registry.templates or plugins):
            return
        hint = closest(str(template), sorted(registry.templates))
        did_you_mean = f"; did you mean {' or '.join(repr(h) for h in hint)}?" if hint else ""
        report.issues.append(ConfigIssue(path, f"{template!r} is not an ms-swift template{did_you_mean}"))
        return
    if isinstance(student.folder_args.get("template"), str):
        return  # a checkpoint ms-swift trained names its template in args.json
    info = registry.model_types.get(student.model_type) if student.model_type else None
    if info is None:
        return
    chosen = student.name_template or info.template
    if chosen is not None:
        return
    candidates = list(info.candidate_templates)
    if len(candidates) == 1:
        return
    choices = f"it has {', '.join(candidates)}" if candidates else "it names none"
    own = student.model_type if student.model_type in candidates else None
    advice = f" (usually the type's own: `template: {own}`)" if own else ""
    report.issues.append(
        ConfigIssue(
            path,
            f"ms-swift cannot choose a template for model type {student.model_type!r}: {choices}; set "
            f"`template` to one of them{advice}",
        )
    )


# ---------------------------------------------------------------------- feature widths and vocabularies


def _feature_pair_issues(
    pairs: Any,
    student: RunModel | None,
    teacher: RunModel | None,
    student_shape: ModelShape | None,
    teacher_shape: ModelShape | None,
) -> list[ConfigIssue]:
    from kdcompose.training.projectors import OPTION, width_mismatch_message

    issues: list[ConfigIssue] = []
    student_name = student.location.name if student else "the student"
    names = {"student": student_name, "teacher": teacher.location.name if teacher else student_name}
    for pair in sorted(pairs, key=lambda p: p.key):
        widths: dict[str, int | None] = {}
        problem = False
        for tap, shape in ((pair.student, student_shape), (pair.teacher, teacher_shape)):
            if shape is None:
                widths[tap.side] = None
                continue
            found = tap_width(shape, tap.path, tap.io, tap.children)
            if found.problem is not None:
                problem = True
                issues.append(
                    ConfigIssue(
                        tap.origin or pair.origin,
                        f"{tap.describe()}: the {tap.side} model ({names[tap.side]}) {found.problem}",
                    )
                )
            widths[tap.side] = found.width
        s, t = widths.get("student"), widths.get("teacher")
        if problem or pair.projector is not None or s is None or t is None or s == t:
            continue
        message = width_mismatch_message(pair, s, t)
        issues.append(
            ConfigIssue(
                pair.origin,
                f"{message} (read from the models' config.json: student {names['student']}, teacher "
                f"{names['teacher']}; `{OPTION}` is set per target or pair)",
            )
        )
    return issues


def _vocab_issues(student: RunModel, teacher: RunModel, paths: _KeyPaths) -> list[ConfigIssue]:
    from kdcompose.functional.vocab import VocabMismatchError, check_vocab_compatible

    if student.shape is None or teacher.shape is None:
        return []
    sv, tv = student.shape.vocab_size, teacher.shape.vocab_size
    if sv is None or tv is None or sv == tv:
        return []
    folder = student.location.folder
    size = tokenizer_size(folder) if folder is not None else None
    try:
        check_vocab_compatible(sv, tv, vocab_size=size)
    except VocabMismatchError as exc:
        return [
            ConfigIssue(
                paths(teacher.key),
                f"the student ({student.location.name}) has {sv} LM-head rows and the teacher "
                f"({teacher.location.name}) {tv} (read from config.json): {exc}",
            )
        ]
    return []


__all__ = ["ModelReport", "inspect_models", "model_issues", "model_notes", "swift_model_name"]
