"""One preflight: every check a run must pass before a model loads, shared by all routes.

`kdcompose validate` (when ms-swift is importable), `kdcompose train`, the `swift rlhf
--external_plugins` route and the trainer itself call these functions, so a config that
validates is a config that starts, and every route refuses the same things with the same
words: an argument name ms-swift does not know (with the closest real one), `rlhf_type`
other than gkd, the ms-swift GKD settings kdcompose cannot honour, and a composition that
needs a teacher none provides. Each message names the dotted YAML path (or the flag).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdcompose.errors import ConfigError, ConfigIssue

SETTINGS_READ: tuple[str, ...] = (
    "rlhf_type",
    "teacher_model",
    "teacher_model_server",
    "gkd_logits_topk",
    "use_liger_kernel",
)
"""The ms-swift arguments the setting checks look at (the plugin route reads them off the
half-built `RLHFArguments`)."""


def setting_issues(
    values: Mapping[str, Any],
    composer: Any,
    path_of: Mapping[str, str] | None = None,
    remote: frozenset[str] = frozenset(),
) -> list[ConfigIssue]:
    """rlhf_type, unsupported GKD settings and a missing teacher, for ms-swift argument `values`."""
    from kdcompose.integrations.swift.launch.args import (
        missing_teacher_issue,
        teacher_terms,
        unsupported_setting_issues,
    )

    paths = dict(path_of or {})
    issues: list[ConfigIssue] = []
    rlhf_type = values.get("rlhf_type", "gkd")
    if rlhf_type is not None and rlhf_type != "gkd":
        issues.append(
            ConfigIssue(
                paths.get("rlhf_type", "rlhf.rlhf_type"),
                f"kdcompose composes GKD losses: rlhf_type must be gkd, got {rlhf_type!r}",
            )
        )
    issues += unsupported_setting_issues(values, paths)
    if values.get("teacher_model_server") is not None:
        remote = remote | {""}
    missing = missing_teacher_issue(
        values, teacher_terms(composer, remote), path=paths.get("teacher_model", "rlhf.teacher_model")
    )
    if missing is not None:
        issues.append(missing)
    return issues


def config_issues(config: Any) -> list[ConfigIssue]:
    """Everything the preflight finds in a loaded `KDConfig` (imports ms-swift's argument
    classes, loads no model): unknown argument names first, then the settings, then what the
    models' own files show (model_preflight)."""
    from kdcompose.integrations.swift.launch.arg_names import swift_argument_names
    from kdcompose.integrations.swift.launch.args import unknown_argument_issues
    from kdcompose.integrations.swift.launch.model_preflight import model_issues
    from kdcompose.teachers.sources import cache_issues
    from kdcompose.training.engines import engine_issues, process_issues, skip_step_issues

    paths = dict(config.arg_paths)
    issues = unknown_argument_issues(config.swift_args, swift_argument_names(), paths)
    issues += setting_issues(config.swift_args, config.composer, paths, frozenset(config.teachers))
    issues += engine_issues(config.swift_args, paths)
    issues += process_issues(config.swift_args, paths)
    issues += skip_step_issues(config.swift_args, config.composer.active_terms, paths)
    issues += cache_issues(config.teachers, config.composer)
    issues += model_issues(config)
    return issues


def check_config(config: Any) -> None:
    """Raise ConfigError with every preflight problem of `config`."""
    issues = config_issues(config)
    if issues:
        raise ConfigError(issues, source=config.source)


def swift_importable() -> bool:
    """Whether ms-swift is installed (validate runs the preflight only then)."""
    from kdcompose.integrations.swift.runtime import installed_swift_version

    return installed_swift_version() is not None
