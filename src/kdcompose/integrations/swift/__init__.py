"""kdcompose on ms-swift: the GKD trainer subclass, the `kdcompose train` launcher and the
`--external_plugins` plugin.

Nothing here imports ms-swift at import time: `trainer` does (it subclasses ms-swift's
GKDTrainer), and it is only imported when a run starts. The entry points:

* `kdcompose train CONFIG.yaml` -> `launch.train`
* `swift rlhf ... --external_plugins $(kdcompose plugin-path)` -> `plugin.py`
* Python: `from kdcompose.integrations.swift.trainer import KDComposeGKDTrainer`
"""

from __future__ import annotations

from pathlib import Path

TRAINER_PATH = "kdcompose.integrations.swift.trainer.KDComposeGKDTrainer"
"""Dotted path ms-swift's TrainerFactory imports for `rlhf_type: gkd` once we take over."""


def plugin_path() -> Path:
    """Absolute path of the file to pass to ms-swift's `--external_plugins`."""
    return Path(__file__).resolve().parent / "launch" / "plugin.py"


__all__ = ["TRAINER_PATH", "plugin_path"]
