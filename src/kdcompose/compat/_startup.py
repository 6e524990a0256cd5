"""Start-up hook that makes a CUDA-only torchvision wheel importable next to a CPU torch.

Why this exists
---------------
ms-swift's Qwen-VL loader imports ``qwen_vl_utils``, which imports ``torchvision`` at the top, and
transformers' VL video processors need it as well. On CPU-only machines the package index usually
offers only CUDA builds of torchvision. Installed next to a CPU torch, torchvision's compiled
extension ``_C`` cannot load; every operator registration in torchvision is guarded by
``extension._has_ops()`` *except* two fake (meta) registrations for ``torchvision::nms`` and
``torchvision::qnms``, so ``import torchvision`` dies with ``operator torchvision::nms does not
exist``. Declaring those two operator *schemas* (without kernels) before torchvision is imported
lets the import succeed; image transforms work (they are pure torch), and ``torchvision.ops.nms``
still raises torchvision's own "Couldn't load custom C++ ops" error because it checks
``_has_ops()`` first.

Why this module is stdlib-only at import time
---------------------------------------------
It is loaded from a ``.pth`` file at interpreter start-up (see :data:`PTH_LINE`), *by file path*,
without executing ``kdcompose/__init__.py``: start-up must stay cheap (no torch import unless
torchvision is actually imported) and must not depend on what the package ``__init__`` imports
(it might import transformers, which imports torchvision, before the fix is in place). For the same
reason nothing here imports other ``kdcompose`` modules. The public API lives in
:mod:`kdcompose.compat.torchvision_ops`, which re-exports from here.

All state that matters lives in torch's operator registry, not in module globals, so several copies
of this module (one loaded by the ``.pth`` under a private name, one imported normally) cooperate:
whichever runs second sees the schemas already declared and does nothing.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import threading
from typing import Any, Literal

Status = Literal["native", "patched", "absent"]

#: Operator schemas torchvision 0.28 registers fake kernels for unconditionally at import time.
#: Copied from torchvision's C++ sources (``csrc/ops/nms.cpp``, ``csrc/ops/quantized/cpu/qnms_kernel.cpp``).
_SCHEMAS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

#: Set this environment variable to ``1`` to turn the start-up hook off entirely (e.g. to debug an
#: import problem with a pristine interpreter).
DISABLE_ENV = "KDCOMPOSE_DISABLE_TORCHVISION_HOOK"

#: Name under which the ``.pth`` line registers this module in ``sys.modules``.
ALIAS = "_kdcompose_torchvision_startup"

#: The single line of the ``.pth`` file. ``site`` executes lines that start with ``import``. It
#: locates ``kdcompose`` with ``find_spec`` (which does not execute the package), loads this file by
#: path and installs the lazy finder. Every failure is swallowed: a broken or half-uninstalled
#: kdcompose must never break interpreter start-up.
PTH_LINE = (
    'import sys; exec("try:\\n import importlib.util as u, os\\n'
    " if '" + ALIAS + "' not in sys.modules and not os.environ.get('" + DISABLE_ENV + "'):\\n"
    "  s = u.find_spec('kdcompose')\\n"
    "  p = s and s.submodule_search_locations and os.path.join(list(s.submodule_search_locations)[0],"
    " 'compat', '_startup.py')\\n"
    "  if p and os.path.isfile(p):\\n"
    "   m = u.module_from_spec(u.spec_from_file_location('" + ALIAS + "', p))\\n"
    "   sys.modules['" + ALIAS + "'] = m\\n"
    "   m.__spec__.loader.exec_module(m)\\n"
    "   m.install()\\n"
    'except Exception:\\n pass\\n")\n'
)

#: File name of the hook in site-packages. It must sort after hatchling's editable ``_kdcompose.pth``
#: (``_`` < ``k``) so that ``kdcompose`` is already findable when our line runs.
PTH_NAME = "kdcompose_torchvision.pth"

_lock = threading.RLock()
# Keeps the Library alive: torch removes a Library's registrations when the object is collected.
_library: Any = None


def _torchvision_extension_path() -> str | None:
    """Path of torchvision's ``_C`` extension, found without importing torchvision.

    Mirrors ``torchvision._internally_replaced_utils._get_extension_path``. Returns ``None`` when
    torchvision is not installed or ships no ``_C`` extension.
    """
    try:
        spec = importlib.util.find_spec("torchvision")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    loader_details = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    for directory in spec.submodule_search_locations:
        ext_spec = importlib.machinery.FileFinder(directory, loader_details).find_spec("_C")
        if ext_spec is not None and ext_spec.origin:
            return ext_spec.origin
    return None


def _has_schema(torch: Any, name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def _has_cpu_kernel(torch: Any, name: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"torchvision::{name}", "CPU"))
    except RuntimeError:
        return False


def ensure_torchvision_importable() -> Status:
    """Make ``import torchvision`` work even when its compiled ops cannot load; say what was done.

    Returns
    -------
    ``"absent"``
        torchvision is not installed (or has no ``_C`` extension); nothing to do.
    ``"native"``
        torchvision's own compiled ops are (or can be) loaded; nothing was changed. This is the
        result on every machine with a matching torchvision build, CPU or GPU.
    ``"patched"``
        the ops could not load, so the schemas of ``torchvision::nms`` and ``torchvision::qnms``
        were declared without kernels (now or by an earlier call). ``import torchvision`` works,
        and ``torchvision.ops.nms`` raises torchvision's own "Couldn't load custom C++ ops" error.

    Idempotent and cheap after the first call (a couple of dictionary look-ups in torch's
    dispatcher). It never imports torchvision itself; it loads torchvision's ``_C`` with
    ``torch.ops.load_library`` (exactly what ``torchvision.extension`` does first thing on import),
    so on a healthy install the work is merely done a moment earlier.
    """
    global _library
    with _lock:
        ext_path = _torchvision_extension_path()
        if ext_path is None:
            return "absent"

        import torch

        names = list(_SCHEMAS)
        if all(_has_schema(torch, n) for n in names):
            # Either torchvision's _C is loaded (kernels present) or someone declared the schemas.
            return "native" if _has_cpu_kernel(torch, "nms") else "patched"

        try:
            torch.ops.load_library(ext_path)
        except (OSError, ImportError, RuntimeError):
            pass
        else:
            if all(_has_schema(torch, n) for n in names):
                return "native"

        library = torch.library.Library("torchvision", "FRAGMENT")
        for name, schema in _SCHEMAS.items():
            if not _has_schema(torch, name):
                library.define(schema)
        _library = library
        return "patched"


class TorchvisionImportHook(importlib.abc.MetaPathFinder):
    """``sys.meta_path`` finder that runs :func:`ensure_torchvision_importable` right before the
    first ``import torchvision`` and then gets out of the way.

    It never finds anything itself (``find_spec`` returns ``None`` so the regular finders import
    torchvision); it only uses the moment. It removes itself first so the nested ``find_spec``
    calls and torch's import do not re-enter it. Failures are swallowed: in the worst case
    torchvision fails to import exactly as it would without the hook.
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname != "torchvision":
            return None
        uninstall()
        with contextlib.suppress(Exception):  # must never break the import it precedes
            ensure_torchvision_importable()
        return None


def install() -> bool:
    """Put the lazy finder at the front of ``sys.meta_path`` (once). Returns whether it is there.

    Does nothing when torchvision is already imported or :data:`DISABLE_ENV` is set.
    """
    if os.environ.get(DISABLE_ENV) or "torchvision" in sys.modules:
        return False
    with _lock:
        if not any(isinstance(f, TorchvisionImportHook) for f in sys.meta_path):
            sys.meta_path.insert(0, TorchvisionImportHook())
    return True


def uninstall() -> None:
    """Remove every copy of the finder (also ones installed by another copy of this module)."""
    with _lock:
        sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != TorchvisionImportHook.__name__]
