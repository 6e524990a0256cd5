"""Loading YAML configs safely and strictly.

`yaml.safe_load` never builds arbitrary Python objects from tags. On top of it we reject
duplicate keys (PyYAML silently keeps the last one, which would silently drop a user's
setting), refuse files and documents too large or too deep to be a real config (a
"billion laughs" alias bomb expands to millions of nodes when validated), and turn syntax
errors into a `ConfigError` that carries the line number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kdcompose.errors import ConfigError, ConfigIssue

MAX_CONFIG_BYTES = 1 << 20
"""1 MiB: real configs are a few KiB; anything larger is a mistake (a dataset passed as config)."""
MAX_NODES = 100_000
"""Nodes after alias expansion; bounds the work of validating an alias-bomb document."""
MAX_DEPTH = 64
"""Nesting depth; real configs nest 4-5 levels."""


_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's parser where PyYAML was built with it (the wheels are): the same documents and marks,
without the pure-Python scanner's quadratic time on deeply nested flow collections."""


class _StrictSafeLoader(_SafeLoader):  # type: ignore[misc, valid-type]
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


def _check_size(data: Any, source: str | None) -> None:
    """Count nodes with aliases expanded (shared objects counted every time they appear)."""
    count = 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ConfigError.single(
                "", f"config expands to more than {MAX_NODES} values (YAML aliases?); refusing it", source
            )
        if depth > MAX_DEPTH:
            raise ConfigError.single("", f"config nests deeper than {MAX_DEPTH} levels; refusing it", source)
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def parse_yaml(text: str, source: str | None = None) -> Any:
    """Parse YAML text; syntax errors become a ConfigError naming the line."""
    if len(text.encode("utf-8", errors="replace")) > MAX_CONFIG_BYTES:
        raise ConfigError.single("", f"config is larger than {MAX_CONFIG_BYTES} bytes; refusing it", source)
    try:
        data = yaml.load(text, Loader=_StrictSafeLoader)
    except RecursionError as exc:
        raise ConfigError.single(
            "", f"config nests deeper than {MAX_DEPTH} levels; refusing it", source
        ) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = exc.problem or "invalid YAML"
        raise ConfigError(
            [ConfigIssue("", f"YAML syntax error at {where}: {problem}")], source=source
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue("", f"YAML error: {exc}")], source=source) from exc
    _check_size(data, source)
    return data


def load_yaml_file(path: str | Path) -> Any:
    """Read and parse a YAML file, with a clear error when it cannot be read."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError.single(
                "", f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes; refusing it"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError.single("", f"config file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError.single("", f"cannot read config file {path}: {exc}") from exc
    return parse_yaml(text, source=str(path))
