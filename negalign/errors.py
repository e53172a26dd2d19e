"""Errors the CLI turns into one-line messages and exit codes (SPEC §5: 1 failure, 2 bad usage/input)."""

from __future__ import annotations


class NegalignError(Exception):
    """A failure while running (exit 1)."""

    exit_code = 1


class UsageError(NegalignError):
    """Bad usage: wrong option, missing stage input, config mismatch (exit 2)."""

    exit_code = 2


class BadInput(UsageError):
    """Bad input data; the message names file, row and column (exit 2)."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 column: str | None = None):
        self.file, self.row, self.column = file, row, column
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column '{column}'")
        super().__init__(f"{': '.join([', '.join(where)] if where else [])}{': ' if where else ''}{message}")
