"""The README's set-up promise: two commands, and CI runs the test one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _readme_commands() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"<!-- command:(\w+) -->\s*```bash\n(.*?)\n```", text, flags=re.S)
    return {name: body.strip() for name, body in blocks}


def test_readme_has_exactly_a_main_and_a_test_command():
    commands = _readme_commands()
    assert set(commands) == {"main", "test"}
    for command in commands.values():
        assert "\n" not in command, "each set-up command is a single line a user can paste"
        assert command.startswith("pip install torch==2.13.0 && "), "torch must be pinned first"


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert _readme_commands()["test"] in ci_lines
