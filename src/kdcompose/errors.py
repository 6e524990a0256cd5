"""Errors that kdcompose raises on bad user input.

A config error must tell the user *where* (the dotted YAML path) and *how to fix it*,
and must report every problem at once so a user does not fix them one run at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config: the dotted path of the offending key and what to do."""

    path: str
    message: str

    def __str__(self) -> str:
        where = self.path or "<config>"
        return f"{where}: {self.message}"


class ConfigError(ValueError):
    """The config cannot be used. Carries every issue found, each with its dotted path."""

    def __init__(self, issues: Iterable[ConfigIssue], source: str | None = None) -> None:
        self.issues: tuple[ConfigIssue, ...] = tuple(issues)
        self.source = source
        if not self.issues:
            raise ValueError("ConfigError needs at least one issue")
        super().__init__(self.render())

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(issue.path for issue in self.issues)

    def render(self) -> str:
        head = f"invalid kdcompose config{f' {self.source}' if self.source else ''}"
        count = len(self.issues)
        lines = [f"{head} ({count} problem{'s' if count > 1 else ''}):"]
        lines += [f"  - {issue}" for issue in self.issues]
        return "\n".join(lines)

    @classmethod
    def single(cls, path: str, message: str, source: str | None = None) -> ConfigError:
        return cls([ConfigIssue(path, message)], source=source)


class UnknownTermError(KeyError):
    """A loss term type that no registered term (built-in, decorated or entry point) provides."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])
