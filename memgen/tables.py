"""Plain-text tables (also valid Markdown) for evaluation summaries, demo reports and the CLI."""

from __future__ import annotations


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table (also valid Markdown)."""

    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    line = lambda cells: "| " + " | ".join(x.ljust(w) for x, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(b) for b in body])
