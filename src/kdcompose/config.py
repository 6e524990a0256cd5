"""Load a kdcompose YAML config: sections -> flat ms-swift arguments + the composition.

Layout (DESIGN.md "Contract"): sections `model`, `template`, `data`, `tuner`, `training`,
`rlhf`, `custom` hold ms-swift argument names; the sections are for readability, so an
argument may sit in any of them, but the same key in two sections is an error. kdcompose's
own keys are `rlhf.loss_terms`, `rlhf.llm_kd_weight`, `rlhf.teacher_cache`, `rlhf.teachers`,
`rlhf.teacher_template` and `custom.visual_kd`, plus a
top-level `plugins:` list of modules (or .py files) that register custom terms — the only
way besides the `kdcompose.terms` entry-point group that a config can bring in code.
Checking argument names against ms-swift happens in the launcher (it needs ms-swift);
everything here works without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from kdcompose.composer import LossComposer
from kdcompose.composition import Composition
from kdcompose.errors import ConfigError, ConfigIssue
from kdcompose.resolve import (
    GkdKnobs,
    parse_gkd_knobs,
    resolve_composition,
)
from kdcompose.schema.validation import join_path, path_segment
from kdcompose.teachers.sources import TeacherSource, parse_sources, source_issues
from kdcompose.yaml_io import load_yaml_file, parse_yaml

SECTIONS: tuple[str, ...] = ("model", "template", "data", "tuner", "training", "rlhf", "custom")
PLUGINS_KEY = "plugins"
OWN_KEYS: dict[str, str] = {
    "loss_terms": "rlhf",
    "llm_kd_weight": "rlhf",
    "visual_kd": "custom",
    "teacher_cache": "rlhf",
    "teachers": "rlhf",
    "teacher_template": "rlhf",
}
"""kdcompose's own keys and the section each must live in."""


@dataclass(frozen=True)
class KDConfig:
    """A validated config: what to hand to ms-swift and what to compose."""

    composition: Composition
    swift_args: Mapping[str, Any]
    """Flattened ms-swift arguments (kdcompose's own keys removed)."""
    arg_paths: Mapping[str, str]
    """Dotted path of each ms-swift argument, for error messages."""
    knobs: GkdKnobs = field(default_factory=GkdKnobs)
    source: str | None = None
    teachers: Mapping[str, TeacherSource] = field(default_factory=dict)
    """Teachers that are caches or servers, by name (`""`: the default teacher)."""
    teacher_template: str | None = None
    """`rlhf.teacher_template`: the ms-swift template the local teacher encodes samples with when
    its tokenizer differs from the student's (like ms-swift's `reward_template`); None: the
    teacher model type's own (docs/cross_tokenizer.md)."""

    @cached_property
    def composer(self) -> LossComposer:
        """The composition's terms, built once for the run (every later stage reads this one)."""
        composer = LossComposer.from_composition(self.composition)
        composer.remote_teachers = frozenset(self.teachers)
        return composer

    @property
    def llm_kd_weight(self) -> float:
        """The runtime LM-head KD weight (the `lm_jsd` term's weight; 0 if disabled)."""
        from kdcompose.resolve import legacy_llm_kd_weight

        return legacy_llm_kd_weight(self.composition.terms)

    @property
    def needs_teacher(self) -> bool:
        return self.composer.needs.teacher


def _import_plugin(entry: str, base_dir: Path | None) -> None:
    if entry.endswith(".py"):
        path = Path(entry).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        path = path.resolve()
        if not path.is_file():
            raise FileNotFoundError(f"plugin file not found: {path}")
        name = f"kdcompose_plugin_{path.stem}_{abs(hash(str(path.resolve())))}"
        if name in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    else:
        importlib.import_module(entry)


def load_plugins(raw: Any, base_dir: Path | None, issues: list[ConfigIssue]) -> None:
    """Import the modules listed under `plugins:` (they register terms on import)."""
    if raw is None:
        return
    if not isinstance(raw, list):
        issues.append(
            ConfigIssue(PLUGINS_KEY, "must be a list of module names or .py files that register terms")
        )
        return
    for index, entry in enumerate(raw):
        path = f"{PLUGINS_KEY}.{index}"
        if not isinstance(entry, str) or not entry:
            issues.append(ConfigIssue(path, f"must be a module name or a .py file path, got {entry!r}"))
            continue
        try:
            _import_plugin(entry, base_dir)
        except Exception as exc:  # report which plugin failed and why, never a bare traceback
            issues.append(ConfigIssue(path, f"cannot import plugin {entry!r}: {type(exc).__name__}: {exc}"))


def parse_config(data: Any, source: str | None = None) -> KDConfig:
    """Validate a parsed YAML document; raise ConfigError listing every problem.

    `source` is the config's file path (for messages, and to resolve relative plugin paths).
    """
    issues: list[ConfigIssue] = []
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError.single(
            "", f"the config must be a mapping of sections, got {type(data).__name__}", source
        )

    base_dir = Path(source).resolve().parent if source else None
    load_plugins(data.get(PLUGINS_KEY), base_dir, issues)
    sections: dict[str, Mapping[str, Any]] = {}
    for name, body in data.items():
        if name == PLUGINS_KEY:
            continue
        if name not in SECTIONS:
            hint = f"; did you mean to put it under a section? sections are: {', '.join(SECTIONS)}"
            if name in OWN_KEYS:
                hint = f"; it belongs under `{OWN_KEYS[name]}:`"
            issues.append(ConfigIssue(path_segment(name), f"unknown top-level section{hint}"))
            continue
        if body is None:
            body = {}
        if not isinstance(body, Mapping):
            issues.append(
                ConfigIssue(name, f"a section must be a mapping of arguments, got {type(body).__name__}")
            )
            continue
        sections[name] = body

    swift_args: dict[str, Any] = {}
    arg_paths: dict[str, str] = {}
    own: dict[str, Any] = {}
    for section, body in sections.items():
        for key, value in body.items():
            path = join_path(section, key)
            if not isinstance(key, str):
                issues.append(ConfigIssue(path, "argument names must be strings"))
                continue
            if key in OWN_KEYS:
                if OWN_KEYS[key] != section:
                    issues.append(
                        ConfigIssue(path, f"`{key}` belongs under `{OWN_KEYS[key]}:`, not `{section}:`")
                    )
                else:
                    own[key] = value
                continue
            if key in arg_paths:
                issues.append(
                    ConfigIssue(
                        path, f"`{key}` is also set at {arg_paths[key]}; an argument may appear only once"
                    )
                )
                continue
            swift_args[key] = value
            arg_paths[key] = path

    rlhf_type = swift_args.get("rlhf_type")
    if rlhf_type is not None and rlhf_type != "gkd":
        issues.append(
            ConfigIssue(
                arg_paths["rlhf_type"],
                f"kdcompose composes GKD losses: rlhf_type must be gkd, got {rlhf_type!r}",
            )
        )
    knobs = parse_gkd_knobs(swift_args, arg_paths, issues)
    composition = resolve_composition(
        own.get("loss_terms"), own.get("llm_kd_weight"), own.get("visual_kd"), knobs, issues
    )
    teachers = parse_sources(
        own.get("teacher_cache"), own.get("teachers"), swift_args, arg_paths, issues, base_dir
    )
    teacher_template = own.get("teacher_template")
    if teacher_template is not None and (not isinstance(teacher_template, str) or not teacher_template):
        issues.append(
            ConfigIssue(
                "rlhf.teacher_template",
                "must be an ms-swift template name (the one the teacher model was trained with, e.g. llama3)",
            )
        )
    if issues or composition is None:
        raise ConfigError(issues or [ConfigIssue("", "invalid config")], source=source)
    config = KDConfig(
        composition=composition,
        swift_args=swift_args,
        arg_paths=arg_paths,
        knobs=knobs,
        source=source,
        teachers=teachers,
        teacher_template=teacher_template,
    )
    issues += source_issues(teachers, config.composer, swift_args, arg_paths)
    if issues:
        raise ConfigError(issues, source=source)
    return config


def parse_config_text(text: str, source: str | None = None) -> KDConfig:
    return parse_config(parse_yaml(text, source=source), source=source)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> KDConfig:
    """Read, parse and validate a YAML config file (never loads a model). `overrides` are
    `DOTTED.KEY=VALUE` strings (`kdcompose train/validate --set`), applied to the parsed YAML
    before validation, so they are checked exactly like the file (kdcompose.overrides)."""
    from kdcompose.overrides import apply_overrides, note_overrides, parse_overrides

    parsed = parse_overrides(overrides)
    data = apply_overrides(load_yaml_file(path), parsed, source=str(path))
    try:
        return parse_config(data, source=str(path))
    except ConfigError as exc:
        raise note_overrides(exc, parsed) from None
