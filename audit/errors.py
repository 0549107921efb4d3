"""Errors the command line turns into one clear line on stderr and exit code 2.

Messages are module constants so tests can assert the exact text (a habit from fairlearn).
"""
from __future__ import annotations

__all__ = ["InputError", "UnsupportedError"]


class InputError(ValueError):
    """Bad user input: a file, line or field at fault. The CLI exits with code 2."""

    def __init__(self, message: str, *, where: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class UnsupportedError(InputError):
    """The model or endpoint cannot do what was asked (e.g. no attention patterns)."""
