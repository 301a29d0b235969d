"""Small HTML tables for notebooks (`_repr_html_` of queries, executions and budgets)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import datetime
from typing import Any


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> str:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, datetime):
            return html.escape(f"{v:%Y-%m-%d %H:%M:%S}")
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    caption = f"<caption>{html.escape(note)}</caption>" if note else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
