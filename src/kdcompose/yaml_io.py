"""Loading YAML configs safely and strictly.

`yaml.safe_load` never builds arbitrary Python objects from tags. On top of it we reject
duplicate keys (PyYAML silently keeps the last one, which would silently drop a user's
setting) and turn syntax errors into a `ConfigError` that carries the line number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kdcompose.errors import ConfigError, ConfigIssue


class _StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys."""


def _construct_mapping_no_duplicates(loader: _StrictSafeLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r} (first defined on line {seen[key] + 1}); keep only one",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictSafeLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_no_duplicates
)


def parse_yaml(text: str, source: str | None = None) -> Any:
    """Parse YAML text; syntax errors become a ConfigError naming the line."""
    try:
        return yaml.load(text, Loader=_StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = exc.problem or "invalid YAML"
        raise ConfigError([ConfigIssue("", f"YAML syntax error at {where}: {problem}")], source=source) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue("", f"YAML error: {exc}")], source=source) from exc


def load_yaml_file(path: str | Path) -> Any:
    """Read and parse a YAML file, with a clear error when it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError.single("", f"config file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError.single("", f"cannot read config file {path}: {exc}") from exc
    return parse_yaml(text, source=str(path))
