"""The error a user's configuration raises: one message naming every bad field and value."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake in the run configuration, found before any worker starts."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")
