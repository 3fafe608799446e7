"""The report's HTML: one self-contained page (inline CSS, figures as data URIs, no scripts, no
network), with a meta refresh while a run is being watched."""

from __future__ import annotations

from html import escape

from esper.report.figure import data_uri
from esper.report.section import Section

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1060px; padding: 16px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin: 28px 0 6px; border-bottom: 1px solid #ddd; }
h3 { font-size: 14px; } nav a { margin-right: 12px; } .muted { color: #666; }
img.figure { width: 100%; height: auto; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
.summary td:first-child { font-weight: 600; } pre { font-size: 11px; background: #f7f7f7; padding: 8px; }
.watching { background: #fff6d5; padding: 4px 8px; display: inline-block; }
"""


def render_sections(sections: list[Section]) -> tuple[str, str]:
    """The navigation line and the body of ``sections`` (figures encoded: the costly part)."""
    nav = "".join(f'<a href="#{escape(s.id)}">{escape(s.title)}</a>' for s in sections)
    return nav, "".join(_section(s) for s in sections)


def render(title: str, subtitle: str, summary: list[tuple[str, str]], nav: str, body: str,
           refresh: float | None = None) -> str:
    """The page; ``refresh`` (seconds) makes the browser reload it while a run is watched."""
    head = f'<meta http-equiv="refresh" content="{max(1, round(refresh))}">' if refresh else ""
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in summary)
    watching = (f'<p class="watching">watching: this page reloads every {max(1, round(refresh))} s</p>'
                if refresh else "")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{head}'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
            f'<h1>{escape(title)}</h1><p class="muted">{escape(subtitle)}</p>{watching}'
            f'<table class="summary">{rows}</table><nav>{nav}</nav>{body}</body></html>\n')


def _section(s: Section) -> str:
    img = (f'<img class="figure" alt="{escape(s.alt)}" src="{data_uri(s.figure)}">'
           if s.figure is not None else "")
    note = f"<p>{escape(s.note)}</p>" if s.note else ""
    return f'<section id="{escape(s.id)}"><h2>{escape(s.title)}</h2>{note}{img}{s.html}</section>'
