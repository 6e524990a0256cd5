"""Build the fully prepared trainer of a config without training it.

ms-swift prepares models, template, datasets and the trainer inside its RLHF pipeline and
then calls `trainer.train()`. Stopping just before that gives a trainer exactly as a run
would use it, for inspecting a config (what gets hooked, what one batch costs), for
notebooks, and for tests that compare against ms-swift's own `compute_loss` on identical
models and batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcompose.config import KDConfig, load_config
from kdcompose.integrations.swift.launch.command import (
    build_arguments,
    run_composition,
    swift_kwargs,
    trainer_selected,
)
from kdcompose.integrations.swift.runtime import prepare_swift_import


def build_trainer(config: KDConfig | str | Path, **overrides: Any) -> Any:
    """The `KDComposeGKDTrainer` a `kdcompose train` run of `config` would train (not trained).

    `overrides` replace ms-swift arguments after validation (e.g. `output_dir=...`).
    """
    prepare_swift_import()
    from swift.pipelines.train.rlhf import SwiftRLHF

    class _PreparedOnly(SwiftRLHF):
        def train(self, trainer: Any) -> Any:
            return trainer

    if not isinstance(config, KDConfig):
        config = load_config(config)
    arguments = build_arguments(config, {**swift_kwargs(config), **overrides})
    with trainer_selected(run_composition(config)):
        return _PreparedOnly(arguments).main()
