"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad config, missing prerequisite, stack not running)."""


class ConfigError(UserError):
    """One or more configuration problems, each with file, key path and reason."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        first = problems[0]
        more = f" (and {len(problems) - 1} more problems; run `cdcflow validate`)" if len(problems) > 1 else ""
        super().__init__(f"{first}{more}")


class ConfigProblem:
    __slots__ = ("file", "path", "reason")

    def __init__(self, file: str, path: str, reason: str):
        self.file, self.path, self.reason = file, path, reason

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        return f"{where}: {self.reason}"

    def __repr__(self) -> str:
        return f"ConfigProblem({self})"
