"""One section of the report: a title, at most one figure, a line of text, a table."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from matplotlib.figure import Figure


@dataclass(slots=True)
class Section:
    id: str
    title: str
    figure: Figure | None = None
    alt: str = ""  # the figure's description (its <img> alt text)
    note: str = ""  # plain text under the title (escaped on the page)
    html: str = ""  # markup built by the report itself (tables with escaped cells)


def table(header: list[str], rows: list[list[object]]) -> str:
    """An HTML table with every cell escaped."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
