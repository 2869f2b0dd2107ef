"""Plain-text tables for the command line: a left-aligned name column, right-aligned figures after it."""

from __future__ import annotations

from collections.abc import Sequence


def format_columns(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The header line and one line per row, columns two spaces apart and each as wide as its widest cell."""
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(cells, widths)))

    return [line(columns)] + [line(row) for row in rows]


__all__ = ["format_columns"]
