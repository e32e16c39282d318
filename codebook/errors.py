"""The one error type for bad user input: it says what is wrong, where, and what to do."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad configuration or input, raised before any expensive work starts.

    The message names the offending field (dotted path), the value, and the fix.
    """

    def __init__(self, field: str, problem: str, fix: str):
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}. Fix: {fix}")
