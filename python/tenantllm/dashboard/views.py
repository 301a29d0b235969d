"""The dashboard's pages: a Starlette app rendering Jinja2 templates (autoescaped) with inline
CSS and server-side SVG charts. Read-only: nothing on these pages changes state."""

from __future__ import annotations

import csv
import inspect
import io
from collections.abc import Callable, Collection, Iterator, Mapping
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tenantllm._core import Engine
from tenantllm.dashboard import charts, data
from tenantllm.dashboard.auth import Auth, Viewer

TEMPLATES = Path(__file__).parent / "templates"

# Pages are self-contained: inline CSS and inline SVG only. The policy makes the browser refuse
# anything else (scripts, external styles, fonts, images), so nothing can be fetched from outside.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'self'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


class _SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    headers.setdefault(k, v)
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ------------------------------------------------------------------ formatting (template filters)


def usd(value: Decimal | int | None) -> str:
    """Dollars: cents from $1 up, two significant digits below ($0.26, $0.0015, $0.0000045)."""
    if value is None:
        return "-"
    d = Decimal(value)
    if d == 0:
        return "$0.00"
    places = 2 if abs(d) >= 1 else min(max(2, 1 - d.adjusted()), 9)
    return f"${d.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP):,}"


def exact(value: Decimal | int | None) -> str:
    """The exact amount, in plain notation (9E-7 -> 0.0000009)."""
    return "-" if value is None else f"{Decimal(value):f}"


def number(value: Decimal | int | None) -> str:
    if value is None:
        return "-"
    d = Decimal(value)
    return f"{d:,.0f}" if d == d.to_integral_value() else f"{d:,.2f}"


def duration(ms: int | None) -> str:
    if ms is None:
        return "-"
    return f"{ms} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.0f}%"


def _query(params: Mapping[str, Any], **changes: Any) -> str:
    merged = {**params, **changes}
    # doseq: a list (the tenants list's filters) is the parameter repeated, not its repr.
    return urlencode({k: v for k, v in merged.items() if v not in (None, "", [])}, doseq=True)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(usd=usd, exact=exact, number=number, duration=duration, percent=percent)
    env.globals.update(query=_query, meter=charts.meter, statuses=data.STATUSES, periods=data.PERIODS)
    return env


# ------------------------------------------------------------------ request helpers


def _param(request: Request, name: str) -> str | None:
    value = request.query_params.get(name, "").strip()
    return value or None


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    try:
        value = int(request.query_params.get(name, default))
    except ValueError:
        return default
    return min(max(value, lo), hi)


def _period(request: Request, default: str, choices: Collection[str] = data.PERIODS) -> str:
    value = _param(request, "period")
    return value if value is not None and value in choices else default


def _execution_filters(request: Request, viewer: Viewer) -> data.Filters:
    status = _param(request, "status")
    return data.Filters(
        # A tenant-scoped viewer's own tenant replaces whatever the URL asks for.
        tenant_id=viewer.scope if viewer.scope is not None else _param(request, "tenant_id"),
        agent=_param(request, "agent"),
        model=_param(request, "model"),
        status=status if status in (*data.STATUSES, "failed") else None,
        period=_period(request, "all"),
    )


def _tenant_query(request: Request) -> data.TenantQuery:
    """The tenants list's URL parameters; unknown values fall back to the defaults."""
    sort = _param(request, "sort") or "spend_today"
    if sort not in data.TENANT_SORTS:
        sort = "spend_today"
    order = _param(request, "order")
    filters = [f for f in dict.fromkeys(request.query_params.getlist("filter")) if f in data.TENANT_FILTERS]
    return data.TenantQuery(
        search=(_param(request, "q") or "")[: data.MAX_SEARCH] or None,
        filters=filters,
        sort=sort,
        # Names read A to Z; amounts largest first, unless the URL says otherwise.
        descending=order == "desc" if order in ("asc", "desc") else sort != "name",
        page=_int_param(request, "page", 1, 1, 1_000_000),
        per_page=_int_param(request, "per_page", data.TENANTS_PER_PAGE, 1, data.MAX_PER_PAGE),
    )


# Cells a spreadsheet would read as a formula get a leading quote (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_line(values: list[Any]) -> str:
    out = io.StringIO()
    cells = []
    for v in values:
        text = "" if v is None else exact(v) if isinstance(v, Decimal) else str(v)
        cells.append("'" + text if text.startswith(_FORMULA_START) else text)
    csv.writer(out).writerow(cells)
    return out.getvalue()


# Lines sent at a time. Starlette takes each item of a plain iterator in its thread pool, so a
# line per item cost a thread hop per row (most of a 50,000-tenant export's time).
CSV_LINES_PER_SEND = 1000


def _batched(lines: Iterator[str]) -> Iterator[str]:
    batch: list[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) == CSV_LINES_PER_SEND:
            yield "".join(batch)
            batch.clear()
    if batch:
        yield "".join(batch)


def _csv_response(lines: Iterator[str], filename: str) -> Response:
    """Streamed: rows are read from the database a chunk at a time as the client takes them."""
    return StreamingResponse(
        _batched(lines),
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="{filename}"'},
    )


class Dashboard:
    """Routes and rendering; `engine` is read on every request so a dashboard mounted in an
    application follows that application's `tenantllm.configure(...)`."""

    def __init__(self, engine: Callable[[], Engine], auth: Auth, title: str) -> None:
        self.engine = engine
        self.auth = auth
        self.title = title
        self.templates = Jinja2Templates(env=_environment())

    def routes(self) -> list[Route]:
        return [
            Route("/", self.overview, name="overview"),
            Route("/tenants", self.tenants, name="tenants"),
            Route("/tenants.csv", self.tenants_csv, name="tenants_csv"),
            Route("/tenants/{tenant_id:path}", self.tenant, name="tenant"),
            Route("/executions", self.executions, name="executions"),
            Route("/executions.csv", self.executions_csv, name="executions_csv"),
            Route("/executions/{execution_id}", self.execution, name="execution"),
            Route("/breakers", self.breakers, name="breakers"),
        ]

    # ---- access

    async def viewer(self, request: Request) -> Viewer:
        # A sync auth callable may block (a session or ORM lookup): run it off the event loop.
        result: Any
        if inspect.iscoroutinefunction(self.auth):
            result = self.auth(request)
        else:

            def call_auth() -> Any:
                return self.auth(request)

            result = await run_in_threadpool(call_auth)
        if inspect.isawaitable(result):
            result = await result
        if result is None:
            raise HTTPException(403, "You are not allowed to see this dashboard.")
        if not isinstance(result, Viewer):
            raise TypeError(f"dashboard auth must return a Viewer or None, got {type(result).__name__}")
        return result

    # ---- rendering

    def render(
        self,
        request: Request,
        template: str,
        viewer: Viewer | None,
        page: str,
        status_code: int = 200,
        timezone: str = "UTC",
        **ctx: Any,
    ) -> Response:
        engine_tz = ZoneInfo(timezone)

        def when(t: datetime | None) -> str:
            return "-" if t is None else t.astimezone(engine_tz).strftime("%Y-%m-%d %H:%M:%S")

        context = {
            "title": self.title,
            "base": request.scope.get("root_path", "").rstrip("/"),
            "viewer": viewer,
            "page": page,
            "timezone": engine_tz.key,
            "when": when,
            **ctx,
        }
        return self.templates.TemplateResponse(request, template, context, status_code=status_code)

    async def error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        headings = {401: "Authentication required", 403: "Forbidden", 404: "Not found"}
        response = self.render(
            request,
            "error.html",
            None,
            "",
            status_code=exc.status_code,
            heading=headings.get(exc.status_code, "Error"),
            detail=exc.detail if exc.status_code in (401, 403) else "There is nothing here.",
        )
        for k, v in (exc.headers or {}).items():  # e.g. WWW-Authenticate from the auth callable
            response.headers[k] = v
        return response

    # ---- pages

    async def overview(self, request: Request) -> Response:
        viewer = await self.viewer(request)
        period = _period(request, "today", data.OVERVIEW_PERIODS)
        engine = self.engine()
        o = await run_in_threadpool(data.overview, engine, period, viewer.scope)
        return self.render(
            request,
            "overview.html",
            viewer,
            "overview",
            timezone=engine.timezone,
            o=o,
            period=period,
            overview_periods=data.OVERVIEW_PERIODS,
            cost_chart=charts.column_chart(
                o.daily, fmt=usd, label=f"Cost per day, {len(o.daily)} days", tick=lambda day: day[5:]
            ),
            tenant_chart=charts.bar_list(o.by_tenant, fmt=usd, label="Spend by tenant"),
            agent_chart=charts.bar_list(o.by_agent, fmt=usd, label="Spend by agent"),
        )

    async def tenants(self, request: Request) -> Response:
        viewer = await self.viewer(request)
        engine = self.engine()
        q = _tenant_query(request)
        result = await run_in_threadpool(data.tenants, engine, viewer.scope, q)
        return self.render(
            request,
            "tenants.html",
            viewer,
            "tenants",
            timezone=engine.timezone,
            result=result,
            q=q,
            params=q.params(),
            sorts=data.TENANT_SORTS,
            tenant_filters=data.TENANT_FILTERS,
        )

    async def tenants_csv(self, request: Request) -> Response:
        viewer = await self.viewer(request)
        engine, q = self.engine(), _tenant_query(request)
        header = ["tenant_id", "name", "enforcement", "has_budget", "share_of_nearest_limit", "errors_today",
                  "blocked_today", "breakers_open", "projected_month_cost", "monthly_budget_runs_out"]
        meters = [label for label, *_ in data.METERS]

        def lines() -> Iterator[str]:
            yield _csv_line([*header, *(f"{m} used" for m in meters), *(f"{m} limit" for m in meters)])
            for t in data.tenants_export(engine, viewer.scope, q):
                by_label = {m.label: m for m in t.meters}
                used = [by_label[m].used if m in by_label else "" for m in meters]
                limits = [by_label[m].limit if m in by_label else "" for m in meters]
                yield _csv_line([t.tenant_id, t.name, t.enforcement, t.has_budget, t.share, t.errors_today,
                                 t.blocked_today, t.breakers_open, t.projected_month, t.runs_out, *used, *limits])

        return _csv_response(lines(), "tenants.csv")

    async def tenant(self, request: Request) -> Response:
        viewer = await self.viewer(request)
        engine = self.engine()
        detail = await run_in_threadpool(data.tenant_detail, engine, request.path_params["tenant_id"], viewer.scope)
        if detail is None:
            raise HTTPException(404)
        days = [(d, u["cost"]) for d, u in detail.daily]
        return self.render(
            request,
            "tenant.html",
            viewer,
            "tenants",
            timezone=engine.timezone,
            d=detail,
            t=detail.row,
            days=data.DETAIL_DAYS,
            cost_chart=charts.column_chart(
                days, fmt=usd, label=f"Cost per day, last {len(days)} days", tick=lambda day: day[5:]
            ),
        )

    async def executions_csv(self, request: Request) -> Response:
        viewer = await self.viewer(request)
        engine, filters = self.engine(), _execution_filters(request, viewer)
        columns = ["id", "started_at", "tenant_id", "agent", "model_id", "chosen_model_id", "provider", "status",
                   "duration_ms", "input_tokens", "output_tokens", "total_tokens", "total_cost", "attempts_count",
                   "error_class", "error_message"]

        def lines() -> Iterator[str]:
            yield _csv_line(columns)
            for r in data.executions_export(engine, filters):
                yield _csv_line([r.get(c) for c in columns])

        return _csv_response(lines(), "executions.csv")

    async def executions(self, request: Request) -> Response:
        viewer = await self.viewer(request)
        filters = _execution_filters(request, viewer)
        page_no = _int_param(request, "page", 1, 1, 1_000_000)
        per_page = _int_param(request, "per_page", 25, 1, data.MAX_PER_PAGE)
        engine = self.engine()

        result = await run_in_threadpool(data.executions, engine, filters, page_no, per_page)
        params = filters.params()
        if viewer.scope is not None:
            params.pop("tenant_id", None)  # implied
        if per_page != 25:
            params["per_page"] = str(per_page)
        return self.render(
            request,
            "executions.html",
            viewer,
            "executions",
            timezone=engine.timezone,
            result=result,
            filters=filters,
            params=params,
        )

    async def execution(self, request: Request) -> Response:
        viewer = await self.viewer(request)
        engine = self.engine()
        row = await run_in_threadpool(data.execution, engine, request.path_params["execution_id"], viewer.scope)
        if row is None:
            raise HTTPException(404)
        return self.render(request, "execution.html", viewer, "executions", timezone=engine.timezone, e=row)

    async def breakers(self, request: Request) -> Response:
        viewer = await self.viewer(request)
        engine = self.engine()
        page_no = _int_param(request, "page", 1, 1, 1_000_000)
        per_page = _int_param(request, "per_page", data.BREAKERS_PER_PAGE, 1, data.MAX_PER_PAGE)
        result = await run_in_threadpool(data.breakers_page, engine, viewer.scope, page_no, per_page)
        params = {"per_page": str(per_page)} if per_page != data.BREAKERS_PER_PAGE else {}
        return self.render(
            request, "breakers.html", viewer, "breakers", timezone=engine.timezone, result=result, params=params
        )


def build(engine: Callable[[], Engine], auth: Auth, title: str) -> Starlette:
    from starlette.middleware import Middleware

    d = Dashboard(engine, auth, title)
    return Starlette(
        routes=d.routes(),
        middleware=[Middleware(_SecurityHeaders)],
        exception_handlers={HTTPException: d.error},
    )
