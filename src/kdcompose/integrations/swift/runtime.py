"""Is ms-swift there, is it a version we tested, and is it safe to import?

kdcompose relies on ms-swift internals (the trainer mapping, the layout of `compute_loss`
inputs, the metric containers, how arguments and plugins are parsed). A version we have not
tested must fail with a message that says so at start-up, not with an AttributeError deep
inside a training step. Everything here reads package metadata only; `prepare_swift_import`
is the single place that readies the process before the first `import swift`.
"""

from __future__ import annotations

import os
import re
import warnings
from importlib import metadata

SWIFT_DIST = "ms-swift"
TESTED_MIN = (4, 6, 0)
TESTED_BELOW = (4, 7, 0)
TESTED_RANGE = ">=4.6.0,<4.7"
ALLOW_UNTESTED_ENV = "KDCOMPOSE_ALLOW_UNTESTED_SWIFT"
"""Set to 1 to turn the untested-version error into a warning (at your own risk)."""
INSTALL_HINT = (
    'install kdcompose[swift] (pip install "kdcompose[swift]"), which brings ms-swift ' + TESTED_RANGE
)


class SwiftUnavailableError(RuntimeError):
    """ms-swift is missing or its version is outside the tested range."""


def installed_swift_version() -> str | None:
    try:
        return metadata.version(SWIFT_DIST)
    except metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, micro) of a version string; pre-release tags are ignored (4.6.0rc1 -> 4.6.0)."""
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version.strip())
    if match is None:
        return (0, 0, 0)
    return tuple(int(part) if part else 0 for part in match.groups())


def is_tested_version(version: str) -> bool:
    return TESTED_MIN <= _release(version) < TESTED_BELOW


def check_swift_version(version: str | None = None) -> str:
    """Return the installed ms-swift version; raise `SwiftUnavailableError` if it is missing,
    or untested (unless `KDCOMPOSE_ALLOW_UNTESTED_SWIFT=1`, which warns instead)."""
    version = version if version is not None else installed_swift_version()
    if version is None:
        raise SwiftUnavailableError(f"ms-swift is not installed: {INSTALL_HINT}")
    if not is_tested_version(version):
        message = (
            f"ms-swift {version} is installed, but kdcompose is tested with ms-swift {TESTED_RANGE} and "
            "relies on its internals (GKDTrainer.compute_loss inputs, TrainerFactory.TRAINER_MAPPING, "
            f"argument and plugin parsing). Install a tested version (pip install 'ms-swift{TESTED_RANGE}'), "
            f"or set {ALLOW_UNTESTED_ENV}=1 to try anyway."
        )
        if os.environ.get(ALLOW_UNTESTED_ENV, "").strip().lower() in {"1", "true", "yes"}:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        else:
            raise SwiftUnavailableError(message)
    return version


def prepare_swift_import() -> str:
    """Check ms-swift, make its VL code importable, and import it; returns its version. Call it
    before anything else imports ms-swift.

    torchvision (imported by transformers' VL processors and ms-swift's Qwen-VL loader) may
    be a CUDA build next to a CPU torch; `ensure_torchvision_importable` fixes that in this
    process and does nothing where torchvision works. ms-swift's top-level package loads its
    submodules lazily, so importing it here costs little.
    """
    version = check_swift_version()
    from kdcompose.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import swift  # noqa: F401  (readied above; every caller goes on to use it)

    return version
