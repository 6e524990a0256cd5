"""The names ms-swift's `RLHFArguments` accepts (and which take lists), without importing
ms-swift every time.

Why: `kdcompose validate` checks every ms-swift argument name in a config (so a config that
validates is a config that starts), and the only source of those names is the
`RLHFArguments` dataclass; importing it pulls in ms-swift, transformers and torch, about
13 s on a 2-core machine, for a command that otherwise answers in about a second; `kdcompose
train` on several processes would pay it once more in the launcher, before torchrun starts the
ranks. Which arguments are lists is kept beside the names (a YAML scalar for one is wrapped in a
list, as ms-swift's command line does). Both change only when ms-swift's argument modules
change, so they are kept in a small JSON file under the kdcompose cache folder
(`$KDCOMPOSE_CACHE`, else `~/.cache/kdcompose`), keyed by a fingerprint of the installed
ms-swift: its version and the size and modification time of every file of its `swift/arguments`
package. An upgrade, a downgrade or an edit of an editable install changes the fingerprint, and
the names are read from ms-swift again.

Reading the cache never trusts a file it cannot parse (it is rebuilt); a cache folder that
cannot be written costs the import on every call, nothing else.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kdcompose.integrations.swift.runtime import installed_swift_version
from kdcompose.testing._cache import cache_root

FOLDER = "swift_arguments"
"""One JSON file per fingerprint: `{"names": [...], "lists": [...]}`."""


def swift_fingerprint() -> str | None:
    """The fingerprint of the installed ms-swift (None: not installed). `find_spec` of a
    top-level package locates it without running its `__init__`."""
    version = installed_swift_version()
    spec = importlib.util.find_spec("swift") if version else None
    if version is None or spec is None or not spec.submodule_search_locations:
        return None
    return fingerprint(version, [Path(location) for location in spec.submodule_search_locations])


def fingerprint(version: str, package_folders: Sequence[Path]) -> str:
    """A short hash of a version and the size and modification time of every `.py` file
    under each folder's `arguments` package."""
    digest = hashlib.sha256(version.encode())
    for package in package_folders:
        folder = package / "arguments"
        for path in sorted(folder.rglob("*.py")):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class SwiftArguments:
    """`RLHFArguments`' init field names, and those whose type is a list."""

    names: frozenset[str]
    lists: frozenset[str]

    def to_json(self) -> dict[str, list[str]]:
        return {"names": sorted(self.names), "lists": sorted(self.lists)}


def read_from_swift() -> SwiftArguments:
    """The arguments, read off ms-swift's `RLHFArguments` (imports ms-swift)."""
    from kdcompose.integrations.swift.launch.args import is_list_type, swift_argument_fields

    fields = swift_argument_fields()
    return SwiftArguments(
        frozenset(fields), frozenset(name for name, f in fields.items() if is_list_type(f.type))
    )


@functools.lru_cache(maxsize=1)
def swift_arguments() -> SwiftArguments:
    """`RLHFArguments`' arguments: from the cache when its fingerprint matches the installed
    ms-swift, else from ms-swift (and then cached). Once per process."""
    fingerprint = swift_fingerprint()
    if fingerprint is None:
        return read_from_swift()
    path = cache_root() / FOLDER / f"{fingerprint}.json"
    cached = _read(path)
    if cached is not None:
        return cached
    arguments = read_from_swift()
    _write(path, arguments)
    return arguments


def swift_argument_names() -> frozenset[str]:
    """`RLHFArguments`' init field names (see `swift_arguments`)."""
    return swift_arguments().names


def swift_list_arguments() -> frozenset[str]:
    """The `RLHFArguments` arguments whose type is a list (see `swift_arguments`)."""
    return swift_arguments().lists


def _read(path: Path) -> SwiftArguments | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or set(data) != {"names", "lists"}:
        return None
    names, lists = data["names"], data["lists"]
    valid = all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in (names, lists))
    if not valid or not names or not set(lists) <= set(names):
        return None
    return SwiftArguments(frozenset(names), frozenset(lists))


def _write(path: Path, arguments: SwiftArguments) -> None:
    """Atomic (write a temporary file beside it, then rename), so a reader never sees half a
    file; failures are harmless (the next call reads ms-swift again)."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(arguments.to_json(), out)
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


__all__ = [
    "SwiftArguments",
    "fingerprint",
    "swift_argument_names",
    "swift_arguments",
    "swift_fingerprint",
    "swift_list_arguments",
]
