"""`plugins:` entry for a `kdcompose train` child process: registers the test-only `nan_probe`
term (tests/nan_probe.py) on import, the way a user's plugin file registers its terms."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nan_probe import TYPE, NanProbeTerm

from kdcompose.registry import register_term

register_term(TYPE)(NanProbeTerm)
