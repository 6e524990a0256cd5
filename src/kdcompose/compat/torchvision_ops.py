"""Public API for the torchvision compatibility step (see :mod:`kdcompose.compat._startup` for why).

Two ways to apply it:

* In-process: call :func:`ensure_torchvision_importable` before anything imports torchvision
  (before ``from swift import ...`` or loading a VL processor). kdcompose's own entry points do.
* In child processes started by the ``swift`` CLI (``swift rlhf`` re-executes python / torchrun):
  a ``.pth`` file in site-packages installs a lazy ``sys.meta_path`` finder at interpreter
  start-up that runs the step right before the first ``import torchvision``. The wheel ships that
  file; :func:`install_startup_hook` / :func:`remove_startup_hook` (``kdcompose setup-torchvision``)
  manage it explicitly for environments where the package was installed some other way.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from kdcompose.compat._startup import (
    DISABLE_ENV,
    PTH_LINE,
    PTH_NAME,
    Status,
    TorchvisionImportHook,
    ensure_torchvision_importable,
    install,
    uninstall,
)

__all__ = [
    "DISABLE_ENV",
    "PTH_LINE",
    "PTH_NAME",
    "Status",
    "TorchvisionImportHook",
    "ensure_torchvision_importable",
    "install_import_hook",
    "install_startup_hook",
    "remove_import_hook",
    "remove_startup_hook",
    "startup_hook_installed",
    "startup_hook_path",
]

install_import_hook = install
remove_import_hook = uninstall


def _site_dir(site_dir: str | os.PathLike[str] | None) -> Path:
    return Path(site_dir) if site_dir is not None else Path(sysconfig.get_paths()["purelib"])


def startup_hook_path(site_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the ``.pth`` hook lives: ``<purelib>/kdcompose_torchvision.pth`` by default."""
    return _site_dir(site_dir) / PTH_NAME


def startup_hook_installed(site_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether the ``.pth`` hook exists in ``site_dir`` (default: this interpreter's purelib)."""
    return startup_hook_path(site_dir).is_file()


def install_startup_hook(site_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the ``.pth`` hook into site-packages so every new interpreter gets the lazy fix.

    Needed only when the package was installed without its wheel's ``.pth`` (e.g. a plain path
    on ``PYTHONPATH``); ``pip install`` / ``pip install -e`` of kdcompose place it already. Safe
    to call repeatedly (same content). The hook is inert on machines with a working torchvision,
    and does not import torch at start-up. Returns the path written.
    """
    path = startup_hook_path(site_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(PTH_LINE, encoding="utf-8")
    os.replace(tmp, path)
    return path


def remove_startup_hook(site_dir: str | os.PathLike[str] | None = None) -> bool:
    """Delete the ``.pth`` hook; returns whether a file was removed."""
    path = startup_hook_path(site_dir)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
