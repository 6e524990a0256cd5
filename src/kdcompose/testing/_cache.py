"""Content-keyed, atomic, multi-process-safe build cache for the tiny models and datasets.

Why: tests, benchmarks and ``kdcompose demo`` all need the same tiny artefacts; building them takes
seconds, so they are built once per content key and reused. Parallel pytest workers (or two demos)
may race to build the same key: each builds into its own temporary directory beside the target
and publishes it with one ``rename``; the loser discards its copy and uses the winner's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: Environment variable that overrides the cache root (default ``~/.cache/kdcompose``).
CACHE_ENV = "KDCOMPOSE_CACHE"
#: File written last into every finished artefact directory; its presence means "complete".
MANIFEST = "kdcompose_build.json"


def cache_root() -> Path:
    """``$KDCOMPOSE_CACHE`` if set, else ``$XDG_CACHE_HOME/kdcompose`` or ``~/.cache/kdcompose``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kdcompose"


def content_key(payload: Mapping[str, Any]) -> str:
    """Stable short hash of a JSON-serialisable description of what is built."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(directory: Path, key: str) -> bool:
    manifest = read_manifest(directory)
    return manifest is not None and manifest.get("key") == key


def atomic_build(
    final: Path,
    key: str,
    build: Callable[[Path, Path], None],
    description: Mapping[str, Any],
) -> Path:
    """Return ``final`` holding the artefact for ``key``, building it if needed.

    ``build(tmp_dir, final_dir)`` writes the artefact into ``tmp_dir``; ``final_dir`` is given so that
    files can refer to their eventual absolute location (image paths in a JSONL file).

    An existing ``final`` that holds a *different* kdcompose build is replaced; a non-empty directory
    without a kdcompose manifest is never touched (``FileExistsError``).
    """
    final = Path(final).absolute()
    if is_complete(final, key):
        return final
    if final.exists() and any(final.iterdir()) and read_manifest(final) is None:
        raise FileExistsError(f"{final} exists and was not built by kdcompose; refusing to overwrite it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a shared cache should follow the umask
    try:
        build(tmp, final)
        manifest = {"key": key, **description}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        _publish(tmp, final, key)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _umask() -> int:
    """The process umask, read without the racy ``os.umask`` set-and-restore where possible."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _publish(tmp: Path, final: Path, key: str) -> None:
    try:
        os.rename(tmp, final)
        return
    except OSError:
        pass
    if is_complete(final, key):  # a concurrent builder won the race; use its copy
        return
    # ``final`` holds an older kdcompose build (other key) or is empty: move it aside, then publish.
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    with contextlib.suppress(FileNotFoundError):
        os.replace(final, old / "x")
    try:
        os.rename(tmp, final)
    except OSError:
        if not is_complete(final, key):
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
