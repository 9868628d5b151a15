"""One self-contained HTML page shell (style, title, random-weights notice) and the pieces pages are made of.

Pages embed their figures as base64 PNG, so a report is one file that can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
.notice { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.6em 1em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; } figcaption { font-size: 0.85em; color: #555; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.5em 0; }
th, td { padding: 2px 8px; border-bottom: 1px solid #e4e4e4; text-align: right; } th { background: #f3f3f3; }
.small { font-size: 0.85em; color: #555; } td.left { text-align: left; }
.wide { overflow-x: auto; max-width: 100%; }
"""



def page(title: str, body: Iterable[str], *, notice: str | None = None, extra_css: str = "") -> str:
    """A whole HTML document: `title` as <title> and <h1>, an optional random-weights `notice`, then `body`."""
    head = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}{extra_css}</style></head><body><h1>{html.escape(title)}</h1>")
    warning = f"<p class='notice'><strong>Random weights.</strong> {html.escape(notice)}</p>" if notice else ""
    return "\n".join(part for part in (head, warning, *body, "</body></html>") if part)


def table_html(frame: pd.DataFrame, caption: str, empty: str = "No rows.") -> str:
    # A table wider than the page scrolls inside its own box instead of widening the page.
    body = ("<div class='wide'>" + frame.to_html(index=False, border=0, na_rep="-", float_format=lambda v: f"{v:.3g}")
            + "</div>") if len(frame) else f"<p>{html.escape(empty)}</p>"
    return f"<h3>{html.escape(caption)}</h3>\n{body}"


def _value_text(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def settings_html(settings: Mapping[str, Any]) -> str:
    """A two-column table of run settings for a report page."""
    rows = (f"<tr><th>{html.escape(str(k))}</th><td class='left'>{html.escape(_value_text(v))}</td></tr>"
            for k, v in settings.items())
    return "<table>" + "\n".join(rows) + "</table>"


def figure_html(png: bytes, alt: str, caption: str = "") -> str:
    """A PNG embedded in a self-contained page (base64), with an optional caption."""
    data = base64.b64encode(png).decode("ascii")
    caption = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">{caption}</figure>'




def png_bytes(figure: Any, dpi: int = 100) -> bytes:
    """A matplotlib Figure as PNG bytes (Agg, no pyplot state)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
