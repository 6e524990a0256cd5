"""Launching ms-swift runs with a kdcompose composition: `kdcompose train`, the
`--external_plugins` plugin, argument checks and the preflight. The trainer glue is the
sibling `kdcompose.integrations.swift.trainer`."""

from kdcompose.integrations.swift.launch.command import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_OK,
    build_arguments,
    run,
    swift_kwargs,
    train,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_INVALID",
    "EXIT_OK",
    "build_arguments",
    "run",
    "swift_kwargs",
    "train",
]
