"""Check ms-swift arguments before anything heavy happens.

Every check here runs on names and plain values, before a model is loaded: an unknown
argument (with the closest real name), a missing teacher, and the ms-swift GKD features the
composer cannot honour. `RLHFArguments(foo=1)` would raise a bare TypeError and
`swift rlhf --foo 1` a `ValueError: remaining_argv`, neither naming where `foo` came from;
these messages name the dotted YAML path (or the flag) and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from kdcompose.errors import ConfigIssue

UNSUPPORTED_SETTINGS: dict[str, str] = {
    "use_liger_kernel": (
        "with it ms-swift computes its own fused JSD from hidden states and bypasses the loss composition; "
        "set `use_liger_kernel: false` (`loss_terms.lm_jsd.fused: true` gives the same memory saving: no "
        "full logits of either model)"
    ),
}
"""ms-swift GKD settings that would make ms-swift train something other than the composition,
with the reason and the alternative."""


@functools.lru_cache(maxsize=1)
def swift_argument_fields() -> dict[str, dataclasses.Field]:
    """`RLHFArguments`' init fields by name (imports ms-swift's argument classes, no model)."""
    from kdcompose.integrations.swift.runtime import prepare_swift_import

    prepare_swift_import()
    from swift.arguments import RLHFArguments

    return {f.name: f for f in dataclasses.fields(RLHFArguments) if f.init}


def suggest(name: str, candidates: Iterable[str]) -> str:
    """`; did you mean `x`?` for the closest candidate, or ''."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean `{match[0]}`?" if match else ""


def unknown_argument_issues(
    names: Iterable[str], known: Iterable[str], path_of: Mapping[str, str] | None = None
) -> list[ConfigIssue]:
    """One issue per name ms-swift does not know, with the closest known name."""
    known_set = set(known)
    issues = []
    for name in names:
        if name in known_set:
            continue
        path = (path_of or {}).get(name, name)
        issues.append(
            ConfigIssue(path, f"`{name}` is not an ms-swift RLHFArguments argument{suggest(name, known_set)}")
        )
    return issues


def _is_set(key: str, value: Any) -> bool:
    if key == "use_liger_kernel":
        return bool(value) and str(value).strip().lower() not in {"false", "0", "no"}
    return value is not None


def unsupported_setting_issues(
    values: Mapping[str, Any], path_of: Mapping[str, str] | None = None
) -> list[ConfigIssue]:
    """One issue per ms-swift GKD setting the composer path cannot honour."""
    issues = []
    for key, why in UNSUPPORTED_SETTINGS.items():
        if key in values and _is_set(key, values[key]):
            path = (path_of or {}).get(key, key)
            issues.append(ConfigIssue(path, f"`{key}` is not supported with kdcompose: {why}"))
    return issues


def missing_teacher_issue(
    values: Mapping[str, Any], teacher_terms: Iterable[str], path: str = "rlhf.teacher_model"
) -> ConfigIssue | None:
    """An issue when active terms need a local teacher and `teacher_model` is not set."""
    terms = sorted(teacher_terms)
    if not terms or values.get("teacher_model") not in (None, ""):
        return None
    return ConfigIssue(
        path,
        f"the active term(s) {', '.join(terms)} need a teacher, but no `teacher_model` is set: add "
        "`teacher_model: <model id or path>` (with `teacher_model_type` if needed; the same path as `model` "
        "with LoRA makes the base model the teacher), or give those terms weight 0 (e.g. "
        "rlhf.llm_kd_weight: 0 turns LM-head KD off; visual_kd needs a teacher as well)",
    )


def is_list_type(annotation: Any) -> bool:
    """Whether a dataclass field's annotation is a list (or tuple), optional or not."""
    if isinstance(annotation, str):
        return annotation.replace(" ", "").startswith(("List[", "list[", "Optional[List[", "Optional[list["))
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return True
    if origin is typing.Union or origin is types.UnionType:
        return any(is_list_type(arg) for arg in typing.get_args(annotation))
    return False


def coerce_to_lists(values: Mapping[str, Any], list_arguments: Collection[str]) -> dict[str, Any]:
    """YAML scalars for list-typed arguments wrapped in a list (`dataset: a.jsonl` -> `['a.jsonl']`),
    as ms-swift's command-line parser would do; everything else as written."""
    return {
        key: [value]
        if key in list_arguments and value is not None and not isinstance(value, (list, tuple))
        else value
        for key, value in values.items()
    }


def teacher_terms(composer: Any, remote: frozenset[str] = frozenset()) -> list[str]:
    """Names of the active terms that need a local teacher model (`remote`: the teachers that
    are caches or servers, whose top-K needs no model)."""
    return [t.name for t in composer.active_terms if t.needs.served(remote).teacher]


def is_swift_teacher_server(source: Any) -> bool:
    """Whether a run's teacher source is ms-swift's own `teacher_model_server` route: a default
    teacher (`""`) that is a server can only come from that key, and ms-swift then asks the
    server itself (kdcompose reads the answer from its batch)."""
    return source is not None and source.name == "" and source.kind == "server"
