"""kdcompose's logger: one named logger for every message the library prints while training.

The framework-neutral core runs inside ms-swift, TRL, Accelerate or a plain loop, so it cannot
borrow one framework's logger. `logger` is the standard-library logger `kdcompose`, with its own
stderr handler (so INFO messages show without the user configuring logging) that a user may
replace or silence like any other logger (`logging.getLogger("kdcompose").setLevel(...)`).
"""

from __future__ import annotations

import logging

NAME = "kdcompose"


def _configure() -> logging.Logger:
    log = logging.getLogger(NAME)
    if not any(getattr(h, "_kdcompose", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(levelname)s:kdcompose] %(message)s"))
        handler._kdcompose = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    return log


logger = _configure()

__all__ = ["NAME", "logger"]
