"""What every command-line tool shares: an argument parser whose errors are one line, and one
plain-text table formatter. Imports nothing from the project, so any module may use it."""
from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: ...`), like every other error here, instead of a
    usage block."""

    def error(self, message):
        raise SystemExit(f"error: {message}")


def format_table(rows, right=()) -> str:
    """Rows of strings as aligned columns; columns whose index is in `right` are right-aligned.
    The first row is the header."""
    rows = [tuple(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows)
