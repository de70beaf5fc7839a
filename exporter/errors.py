"""Errors that reach the user as one line and a non-zero exit code."""
from __future__ import annotations

from pathlib import Path


class CpmMobileError(Exception):
    """Base for every error the CLI turns into one line and an exit code."""

    exit_code = 2


class InputError(CpmMobileError):
    """Bad input (a checkpoint, bundle or recipe): names the file and the problem. Exit 2."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class Refused(CpmMobileError):
    """Everything a recipe is refused for, found before any work: one line each. Exit 2."""

    def __init__(self, path: str | Path, reasons: list[str]):
        self.path = Path(path)
        self.lines = [f"{path}: {reason}" for reason in reasons]
        super().__init__("; ".join(self.lines))
