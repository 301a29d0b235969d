"""Charts as inline SVG, rendered on the server: no JavaScript, nothing fetched from anywhere.

Every function returns `markupsafe.Markup` (safe to drop into a template); every piece of
text that comes from data (tenant ids, agent names) is escaped here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from decimal import Decimal

from markupsafe import Markup, escape

Number = Decimal | int
Formatter = Callable[[Number], str]

# Palette shared with the inline CSS (templates/base.html).
ACCENT = "#3b6fd8"
GRID = "#e3e6ec"
MUTED = "#6b7280"
LEVEL_COLORS = {"ok": "#2f9e6b", "warn": "#d99a1e", "over": "#d2453a", "none": "#9aa3b2"}


def _num(v: Number) -> float:
    """Only for pixel geometry; values shown to people are formatted from the exact number."""
    return float(v)


def _nice_max(v: Number) -> Decimal:
    """A round number >= v for the top of an axis (1, 2, 2.5 or 5 times a power of ten)."""
    d = Decimal(v)
    if d <= 0:
        return Decimal(1)
    exp = Decimal(1).scaleb(d.adjusted())  # the power of ten at or just below d
    for m in ("1", "2", "2.5", "5", "10"):
        if Decimal(m) * exp >= d:
            return (Decimal(m) * exp).normalize()
    return (10 * exp).normalize()


def _text(x: float, y: float, s: str, *, anchor: str = "start", size: int = 11, color: str = MUTED,
          weight: str = "normal") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" fill="{color}"'
        f' font-weight="{weight}">{escape(s)}</text>'
    )


def column_chart(
    points: Sequence[tuple[str, Number]],
    *,
    fmt: Formatter,
    label: str,
    width: int = 720,
    height: int = 220,
    color: str = ACCENT,
    tick: Callable[[str], str] = str,
) -> Markup:
    """Vertical bars, one per point (e.g. cost per day), with a y axis and at most ~8 x labels
    (`tick` shortens a point's name for its label). Each bar carries a <title> tooltip with its
    name and exact value."""
    left, right, top, bottom = 64, 12, 12, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    top_value = _nice_max(max((v for _, v in points), default=0))
    parts = [
        f'<svg class="chart" role="img" aria-label="{escape(label)}" viewBox="0 0 {width} {height}"'
        f' width="100%" preserveAspectRatio="xMidYMid meet">',
        f"<title>{escape(label)}</title>",
    ]
    for i in range(5):  # grid lines and y labels at 0, 1/4, ..., max
        frac = i / 4
        y = top + plot_h - frac * plot_h
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>')
        y_value = top_value * i / 4
        parts.append(_text(left - 6, y + 4, fmt(y_value), anchor="end", size=10))
    n = len(points)
    if n:
        slot = plot_w / n
        bar_w = max(slot * 0.7, 1.0)
        every = max(1, -(-n // 8))  # at most ~8 x labels
        for i, (name, value) in enumerate(points):
            h = _num(value) / _num(top_value) * plot_h
            x = left + i * slot + (slot - bar_w) / 2
            y = top + plot_h - h
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{max(h, 0.0):.1f}"'
                f' fill="{color}" rx="2"><title>{escape(name)}: {escape(fmt(value))}</title></rect>'
            )
            # Labels every `every` bars, counted back from the last one so that one always shows.
            if (n - 1 - i) % every == 0:
                parts.append(_text(left + i * slot + slot / 2, height - 8, tick(name), anchor="middle", size=10))
    else:
        parts.append(_text(left + plot_w / 2, top + plot_h / 2, "no data", anchor="middle"))
    parts.append("</svg>")
    return Markup("".join(parts))


def bar_list(
    items: Sequence[tuple[str, Number]],
    *,
    fmt: Formatter,
    label: str,
    width: int = 520,
    row: int = 26,
    color: str = ACCENT,
    limit: int = 12,
) -> Markup:
    """Horizontal bars, largest first (e.g. spend by tenant); items beyond `limit` are summed
    into one "other" row."""
    ranked = sorted(items, key=lambda kv: (-_num(kv[1]), kv[0]))
    if len(ranked) > limit:
        rest = ranked[limit - 1 :]
        other: Number = sum((v for _, v in rest), Decimal(0) if isinstance(rest[0][1], Decimal) else 0)
        ranked = [*ranked[: limit - 1], (f"{len(rest)} others", other)]
    label_w, value_w = 150, 96
    bar_space = width - label_w - value_w - 12
    height = max(len(ranked), 1) * row + 4
    peak = max((_num(v) for _, v in ranked), default=0.0)
    parts = [
        f'<svg class="chart" role="img" aria-label="{escape(label)}" viewBox="0 0 {width} {height}"'
        f' width="100%" preserveAspectRatio="xMinYMin meet">',
        f"<title>{escape(label)}</title>",
    ]
    if not ranked:
        parts.append(_text(width / 2, row * 0.7, "no data", anchor="middle"))
    for i, (name, value) in enumerate(ranked):
        y = i * row + 2
        w = (_num(value) / peak) * bar_space if peak > 0 else 0.0
        shown = name if len(name) <= 22 else name[:21] + "\u2026"
        parts.append(_text(0, y + row * 0.62, shown, color="#1f2937", size=12))
        parts.append(
            f'<rect class="bar" x="{label_w}" y="{y + 5}" width="{max(w, 1.0):.1f}" height="{row - 10}"'
            f' fill="{color}" rx="2"><title>{escape(name)}: {escape(fmt(value))}</title></rect>'
        )
        parts.append(_text(width, y + row * 0.62, fmt(value), anchor="end", color="#1f2937", size=12))
    parts.append("</svg>")
    return Markup("".join(parts))


def meter(fraction: float | None, level: str, *, width: int = 160, height: int = 10) -> Markup:
    """A utilisation bar: filled to `fraction` (capped at 100%), coloured by level
    ("ok", "warn", "over"); an empty grey track when there is no limit."""
    fill = LEVEL_COLORS.get(level, LEVEL_COLORS["none"])
    frac = 0.0 if fraction is None else min(max(fraction, 0.0), 1.0)
    pct = "no limit" if fraction is None else f"{fraction * 100:.0f}% used"
    return Markup(
        f'<svg class="meter" role="img" aria-label="{escape(pct)}" viewBox="0 0 {width} {height}"'
        f' width="{width}" height="{height}"><title>{escape(pct)}</title>'
        f'<rect width="{width}" height="{height}" rx="{height / 2}" fill="{GRID}"/>'
        f'<rect class="fill level-{escape(level)}" width="{frac * width:.1f}" height="{height}" rx="{height / 2}"'
        f' fill="{fill}"/></svg>'
    )
