"""Find ms-swift's argument parse in progress, from inside the `--external_plugins` import.

Upstream behaviour worked around (ms-swift 4.6, transformers 5.19): ms-swift has no hook for a
plugin to declare its own command-line flags. `swift rlhf ...` parses with transformers'
`HfArgumentParser.parse_args_into_dataclasses(argv, return_remaining_strings=True)`, which first
splits argv into known values and `remaining_args`, then constructs `RLHFArguments`, whose
`__post_init__` imports the plugin files; when it returns, any remaining string is a
`ValueError: remaining_argv`. So while the plugin runs, kdcompose's flags sit in the parser's
local `remaining_args` and the half-built `RLHFArguments` is the `self` of the `__post_init__`
frames above. `find_parse_in_progress` walks the call stack (`sys._getframe`) to find both; the
plugin then takes its flags out of that list in place.

Remove when: ms-swift lets a plugin register arguments (`tests/swift/test_compat.py` checks that
`parse_args_into_dataclasses` still has the locals `args` and `remaining_args`, and fails when it
no longer does, so this stops silently).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import FrameType
from typing import Any


@dataclass
class ParseInProgress:
    """The pieces of ms-swift's running argument parse the plugin works with."""

    argv: list[str]
    remaining: list[str]
    arguments: Any


def find_parse_in_progress(frame: FrameType | None = None) -> ParseInProgress | None:
    """ms-swift's running argument parse on the call stack, or None (see module doc)."""
    frame = frame if frame is not None else sys._getframe(1)
    arguments = None
    while frame is not None:
        code = frame.f_code
        if arguments is None and code.co_name == "__post_init__":
            candidate = frame.f_locals.get("self")
            if type(candidate).__module__.startswith("swift.") and hasattr(candidate, "external_plugins"):
                arguments = candidate
        elif code.co_name == "parse_args_into_dataclasses" and arguments is not None:
            local = frame.f_locals
            remaining, argv = local.get("remaining_args"), local.get("args")
            if isinstance(remaining, list) and isinstance(argv, list):
                return ParseInProgress(argv=argv, remaining=remaining, arguments=arguments)
            return None
        frame = frame.f_back
    return None


__all__ = ["ParseInProgress", "find_parse_in_progress"]
