"""Compatibility shims for the environments kdcompose runs in.

Kept import-light (standard library only) so that importing it never drags in torch.
"""

from kdcompose.compat.torchvision_ops import (
    ensure_torchvision_importable,
    install_import_hook,
    install_startup_hook,
    remove_startup_hook,
    startup_hook_installed,
)

__all__ = [
    "ensure_torchvision_importable",
    "install_import_hook",
    "install_startup_hook",
    "remove_startup_hook",
    "startup_hook_installed",
]
