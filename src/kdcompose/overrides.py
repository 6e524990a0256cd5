"""`--set DOTTED.KEY=VALUE`: change a config's YAML for one run without editing the file.

Why: a smoke test (`--set training.max_steps=2`), an ablation (`--set
rlhf.loss_terms.ce.weight=0`) or a sweep should not need a copy of the config. An override
edits the *parsed YAML document* before validation, so it is checked exactly like the same
line written in the file: a misspelt key is reported at its dotted path ("unknown top-level
section", "unknown key ... did you mean"), a bad value by the same rule that rejects it in
the file. The value is parsed as YAML (`2` is a number, `[a, b]` a list, `true` a boolean,
`"2"` a string, an empty value is null), with the same strict loader as the file.

Path rules: segments are separated by `.`; a segment holding a `.` (a term named `a.b`) is
written in double quotes, as kdcompose prints such paths; a missing mapping along the way is
created (`--set rlhf.loss_terms.ce.weight=0` works in a config without `loss_terms`); a
whole number indexes a list (`--set data.dataset.0=x.jsonl`). A path through a value that is
neither a mapping nor a list, or past the end of a list, is an error naming the path.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kdcompose.errors import ConfigError, ConfigIssue
from kdcompose.schema.validation import join_path
from kdcompose.yaml_io import parse_yaml

OPTION = "--set"


@dataclass(frozen=True)
class Override:
    """One `--set PATH=VALUE`: the path's segments and the value parsed as YAML."""

    text: str
    segments: tuple[str, ...]
    value: Any

    @property
    def path(self) -> str:
        return join_path(*self.segments)


def split_path(path: str) -> list[str]:
    """`a.b."c.d".e` -> `['a', 'b', 'c.d', 'e']`; ValueError for an empty segment or an
    unclosed quote."""
    segments: list[str] = []
    rest = path
    while True:
        if rest.startswith('"'):
            try:
                segment, end = json.JSONDecoder().raw_decode(rest)
            except ValueError:
                raise ValueError(f"unclosed or invalid quoted segment in {path!r}") from None
            if not isinstance(segment, str):
                raise ValueError(f"invalid quoted segment in {path!r}")
            rest = rest[end:]
            if rest and not rest.startswith("."):
                raise ValueError(f"expected `.` after the quoted segment {segment!r} in {path!r}")
        else:
            segment, _, tail = rest.partition(".")
            rest = "." + tail if _ else ""
        if not segment:
            raise ValueError(f"empty segment in {path!r} (two dots, or a leading or trailing dot)")
        segments.append(segment)
        if not rest:
            return segments
        rest = rest[1:]


def parse_override(text: str) -> Override:
    """Parse one `PATH=VALUE`; ConfigError (naming the path, or `--set` when there is none)."""
    path, sep, raw = text.partition("=")
    path = path.strip()
    if not sep or not path:
        raise ConfigError.single(OPTION, f"{text!r} is not PATH=VALUE (e.g. `{OPTION} training.max_steps=2`)")
    try:
        segments = tuple(split_path(path))
    except ValueError as exc:
        raise ConfigError.single(OPTION, f"{text!r}: {exc}") from None
    try:
        value = parse_yaml(raw, source=None)
    except ConfigError as exc:
        message = "; ".join(issue.message for issue in exc.issues)
        raise ConfigError.single(
            join_path(*segments), f"{OPTION} {text!r}: the value is not valid YAML: {message}"
        ) from None
    return Override(text, segments, value)


def parse_overrides(texts: Iterable[str]) -> list[Override]:
    """Every override, or one ConfigError listing every malformed one."""
    parsed: list[Override] = []
    issues: list[ConfigIssue] = []
    for text in texts:
        try:
            parsed.append(parse_override(text))
        except ConfigError as exc:
            issues += exc.issues
    if issues:
        raise ConfigError(issues, source=f"{OPTION} options")
    return parsed


def apply_overrides(data: Any, overrides: Iterable[Override], source: str | None = None) -> Any:
    """A copy of the parsed YAML `data` with every override applied in order (later wins)."""
    overrides = list(overrides)
    if not overrides:
        return data
    result: Any = {} if data is None else copy.deepcopy(data)
    issues: list[ConfigIssue] = []
    for override in overrides:
        problem = _set(result, override)
        if problem is not None:
            issues.append(ConfigIssue(override.path, f"{OPTION} {override.text!r}: {problem}"))
    if issues:
        raise ConfigError(issues, source=source)
    return result


def _set(root: Any, override: Override) -> str | None:
    """Set the value in place; a message when the path cannot hold it."""
    if not isinstance(root, dict):
        return "the config is not a mapping of sections"
    node: Any = root
    segments = override.segments
    for depth, segment in enumerate(segments):
        last = depth == len(segments) - 1
        where = join_path(*segments[:depth]) or "the config"
        if isinstance(node, dict):
            if last:
                node[segment] = override.value
                return None
            child = node.get(segment)
            if child is None:
                child = node[segment] = {}
            node = child
        elif isinstance(node, list):
            if not _is_index(segment):
                return f"{where} is a list; index it with a whole number, not {segment!r}"
            index = int(segment)
            if not -len(node) <= index < len(node):
                return f"{where} has {len(node)} item(s); index {index} is out of range"
            if last:
                node[index] = override.value
                return None
            if node[index] is None:
                node[index] = {}
            node = node[index]
        else:
            return f"{where} is {node!r}, not a mapping or a list, so it has no key {segment!r}"
    return None


def _related(issue_path: str, override_path: str) -> bool:
    """The issue is at the overridden key, inside it, or at a key on the way to it (an unknown
    section the override created)."""
    if not issue_path:
        return False
    return (
        issue_path == override_path
        or issue_path.startswith(override_path + ".")
        or override_path.startswith(issue_path + ".")
    )


def _is_index(segment: str) -> bool:
    return segment.lstrip("-").isdigit()


def overridden_paths(overrides: Iterable[Override]) -> Mapping[str, str]:
    """Dotted path -> the `--set` text that set it (for pointing messages at the option)."""
    return {override.path: override.text for override in overrides}


def note_overrides(error: ConfigError, overrides: Iterable[Override]) -> ConfigError:
    """`error` with "(from --set ...)" added to each issue at, or under, an overridden path,
    so a user sees that the bad value came from the command line, not the file."""
    by_path = overridden_paths(overrides)
    if not by_path:
        return error
    issues = []
    for issue in error.issues:
        text = next((t for p, t in by_path.items() if _related(issue.path, p)), None)
        if text is not None and OPTION not in issue.message:
            issue = ConfigIssue(issue.path, f"{issue.message} (from {OPTION} {text})")
        issues.append(issue)
    return ConfigError(issues, source=error.source)
