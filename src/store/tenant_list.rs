//! The dashboard's list of tenants: one page of tenants, filtered, searched and sorted by the
//! database, from the register of tenants seen, the counters, the budgets, the breakers and
//! today's failed or refused calls (a partial index, migration 11), never a scan of all
//! executions; each with its month-end projection (`budget::projection`). The same SQL serves SQLite
//! and PostgreSQL; `Dialect` holds their few differences.

use chrono::NaiveDate;

use crate::budget::projection::{self, Projection};
use crate::budget::{Limits, TenantBudget, Usage};
use crate::clock::Micros;
use crate::error::{config_err, Result};

/// What the list is sorted by; ties are broken by tenant id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantSort {
    SpendToday,
    SpendMonth,
    /// The largest share of any effective limit used (tenants without limits last).
    Share,
    /// Failed calls (error, timeout) today.
    Errors,
    /// The name (the register's, else the budget's), else the tenant id.
    Name,
    /// When the monthly limit runs out at this month's rate (`budget::projection`): those
    /// already out first, then the soonest (ascending); tenants it does not run out for this
    /// month come last whichever the direction.
    RunsOut,
}

impl TenantSort {
    pub const NAMES: &'static [&'static str] = &["spend_today", "spend_month", "share", "errors", "name", "runs_out"];

    pub fn parse(s: &str) -> Result<TenantSort> {
        Ok(match s {
            "spend_today" => TenantSort::SpendToday,
            "spend_month" => TenantSort::SpendMonth,
            "share" => TenantSort::Share,
            "errors" => TenantSort::Errors,
            "name" => TenantSort::Name,
            "runs_out" => TenantSort::RunsOut,
            other => return config_err(format!("sort must be one of {}, got {other:?}", Self::NAMES.join(", "))),
        })
    }
}

/// Which tenants the list keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantFilter {
    /// 80 % or more of any effective limit used.
    NearLimit,
    /// At least one call refused by a budget today.
    BlockedToday,
    /// At least one of its breakers is open or half-open.
    BreakerOpen,
    /// No budget of its own (it runs on the global limits).
    NoBudget,
    /// Its monthly limit runs out this month at this month's rate (or already has).
    RunsOut,
}

impl TenantFilter {
    pub const NAMES: &'static [&'static str] = &["near_limit", "blocked_today", "breaker_open", "no_budget", "runs_out"];

    pub fn parse(s: &str) -> Result<TenantFilter> {
        Ok(match s {
            "near_limit" => TenantFilter::NearLimit,
            "blocked_today" => TenantFilter::BlockedToday,
            "breaker_open" => TenantFilter::BreakerOpen,
            "no_budget" => TenantFilter::NoBudget,
            "runs_out" => TenantFilter::RunsOut,
            other => return config_err(format!("filter must be one of {}, got {other:?}", Self::NAMES.join(", "))),
        })
    }
}

/// One page of the list. Periods are the database calendar's current ones.
#[derive(Debug, Clone)]
pub struct TenantListQuery {
    /// Only this tenant (a viewer scoped to one tenant), listed even when never seen.
    pub tenant_id: Option<String>,
    /// Case-insensitive substring of the tenant id, its registered name or its budget's name.
    pub search: Option<String>,
    pub filters: Vec<TenantFilter>,
    pub sort: TenantSort,
    pub descending: bool,
    pub offset: i64,
    pub limit: i64,
    /// The global limits (`budgets=`) that apply where a tenant's own are unset.
    pub global: Limits,
    /// Today in the database calendar; `day` and `month` are its period keys.
    pub today: NaiveDate,
    pub day: String,
    pub month: String,
    pub day_start: Micros,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TenantListRow {
    pub tenant_id: String,
    /// The name the app gave (the register's), else its budget's.
    pub name: Option<String>,
    /// Its last call as the register has it (refreshed every `tenancy::SEEN_REFRESH`); None
    /// for a tenant never seen (a budget only).
    pub last_used_at: Option<Micros>,
    /// The tenant's own budget, if it has one.
    pub budget: Option<TenantBudget>,
    pub today: Usage,
    pub month: Usage,
    pub errors_today: i64,
    pub blocked_today: i64,
    pub breakers_open: i64,
    /// Largest share of an effective limit used (a limit of 0 counts as 1.0); None without limits.
    pub share: Option<f64>,
    /// This month's spend projected to its end, against the effective monthly limit.
    pub projection: Projection,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct TenantList {
    /// Tenants matching the search and filters, over all pages.
    pub total: i64,
    pub rows: Vec<TenantListRow>,
}

/// Longest search accepted (an id or a name fragment).
pub const MAX_SEARCH: usize = 200;
/// Largest page.
pub const MAX_LIMIT: i64 = 10_000;

impl TenantListQuery {
    pub fn validate(&self) -> Result<()> {
        if self.offset < 0 {
            return config_err(format!("offset must be 0 or more, got {}", self.offset));
        }
        if !(1..=MAX_LIMIT).contains(&self.limit) {
            return config_err(format!("limit must be 1 to {MAX_LIMIT}, got {}", self.limit));
        }
        if self.search.as_ref().is_some_and(|s| s.chars().count() > MAX_SEARCH) {
            return config_err(format!("search must be at most {MAX_SEARCH} characters"));
        }
        Ok(())
    }
}

/// The SQL differences between the stores.
pub(crate) struct Dialect {
    /// Placeholder for argument `n` (1-based): "?1" or "$1".
    pub placeholder: fn(usize) -> String,
    /// Largest of its arguments: SQLite's scalar `max`, PostgreSQL's `GREATEST`.
    pub greatest: &'static str,
    /// A floating-point type for `CAST`.
    pub float: &'static str,
    /// How to read today's failed or refused calls: SQLite is told the partial index (its
    /// planner preferred scanning `executions_tenant` for the GROUP BY: 10M rows).
    pub problems_from: &'static str,
    /// A type for `CAST` wide enough for a spend times 31 (SQLite's integers turn to REAL
    /// on overflow; PostgreSQL's BIGINT would raise).
    pub wide: &'static str,
}

/// An argument of the list query.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Arg {
    Text(String),
    Int(Option<i64>),
}

/// Failed or refused calls, as literals: a partial index's WHERE must appear verbatim in the
/// query for SQLite to use it (a bound parameter would not do).
const PROBLEM_STATUSES: &str = "'error', 'timeout', 'blocked'";

/// The list query and its arguments. Columns: tenant_id, the budget's tenant_id and name,
/// its 6 limits (`BUDGET_COLUMNS` order) and enforcement (NULL without a budget), today's
/// cost, tokens, executions, the month's, errors_today, blocked_today, breakers_open, share,
/// total, the shown name, last_used_at, the effective monthly limit, the budget's rate limits.
pub(crate) fn sql(q: &TenantListQuery, d: &Dialect) -> (String, Vec<Arg>) {
    let mut args: Vec<Arg> = Vec::new();
    let mut arg = |a: Arg| {
        args.push(a);
        (d.placeholder)(args.len())
    };
    let day = arg(Arg::Text(q.day.clone()));
    let month = arg(Arg::Text(q.month.clone()));
    let day_start = arg(Arg::Int(Some(q.day_start)));
    let ids = match &q.tenant_id {
        Some(t) => format!("SELECT CAST({} AS TEXT) AS tenant_id", arg(Arg::Text(t.clone()))),
        // Tenants seen (the register), with a budget, or with usage this month (counters
        // keyed by period first; usage recorded before the register existed).
        None => format!(
            "SELECT tenant_id FROM tenants UNION SELECT tenant_id FROM tenant_budgets \
             UNION SELECT substr(scope, 8) FROM usage_counters \
             WHERE period = {month} AND scope >= 'tenant:' AND scope < 'tenant;'"
        ),
    };
    let g = &q.global;
    let limits = [
        ("daily_limit", "dc.cost", g.daily_cost.map(|n| n.0)),
        ("monthly_limit", "mc.cost", g.monthly_cost.map(|n| n.0)),
        ("daily_token_limit", "dc.tokens", g.daily_tokens),
        ("monthly_token_limit", "mc.tokens", g.monthly_tokens),
        ("daily_execution_limit", "dc.executions", g.daily_executions),
        ("monthly_execution_limit", "mc.executions", g.monthly_executions),
    ];
    // -1 stands for "no such limit" (the largest of the shares ignores it; none at all: NULL).
    let shares: Vec<String> = limits
        .iter()
        .map(|(col, used, global)| {
            let limit = format!("COALESCE(b.{col}, {})", arg(Arg::Int(*global)));
            format!(
                "CASE WHEN {limit} IS NULL THEN -1 WHEN {limit} <= 0 THEN 1.0 \
                 ELSE CAST(COALESCE({used}, 0) AS {f}) / {limit} END",
                f = d.float
            )
        })
        .collect();
    let share = format!("NULLIF({}({}), -1)", d.greatest, shares.join(", "));
    let monthly_limit = format!("COALESCE(b.monthly_limit, {})", arg(Arg::Int(g.monthly_cost.map(|n| n.0))));
    // `budget::projection::project`'s rule in SQL: out already, or the day the spend at this
    // month's daily average reaches the limit, limit × elapsed / spent rounded up, is in the month.
    let elapsed = arg(Arg::Int(Some(i64::from(chrono::Datelike::day(&q.today)))));
    let days = arg(Arg::Int(Some(i64::from(projection::days_in_month(q.today)))));
    let w = d.wide;
    let runs_out = format!(
        "(monthly_limit IS NOT NULL AND (month_cost >= monthly_limit OR (month_cost > 0 \
         AND CAST(monthly_limit AS {w}) * {elapsed} <= CAST(month_cost AS {w}) * {days})))"
    );
    let mut filters: Vec<String> = Vec::new();
    if let Some(s) = q.search.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        let escaped = s.to_lowercase().replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
        let p = arg(Arg::Text(format!("%{escaped}%")));
        filters.push(format!(
            "(lower(tenant_id) LIKE {p} ESCAPE '\\' OR lower(name) LIKE {p} ESCAPE '\\' OR lower(b_name) LIKE {p} ESCAPE '\\')"
        ));
    }
    for f in &q.filters {
        filters.push(
            match f {
                TenantFilter::NearLimit => "share >= 0.8".to_string(),
                TenantFilter::BlockedToday => "blocked_today > 0".to_string(),
                TenantFilter::BreakerOpen => "breakers_open > 0".to_string(),
                TenantFilter::NoBudget => "b_tenant_id IS NULL".to_string(),
                TenantFilter::RunsOut => runs_out.clone(),
            },
        );
    }
    let dir = if q.descending { "DESC" } else { "ASC" };
    let order = match q.sort {
        TenantSort::SpendToday => format!("today_cost {dir}"),
        TenantSort::SpendMonth => format!("month_cost {dir}"),
        // Tenants without limits come last whichever the direction.
        TenantSort::Share => format!("CASE WHEN share IS NULL THEN 1 ELSE 0 END, share {dir}"),
        TenantSort::Errors => format!("errors_today {dir}"),
        TenantSort::Name => format!("lower(COALESCE(name, tenant_id)) {dir}"),
        // The day it runs out orders as limit / spent does (out already: at most 1).
        TenantSort::RunsOut => format!(
            "CASE WHEN {runs_out} THEN 0 ELSE 1 END, \
             CASE WHEN month_cost > 0 THEN CAST(monthly_limit AS {f}) / month_cost ELSE 0 END {dir}",
            f = d.float
        ),
    };
    let limit = arg(Arg::Int(Some(q.limit)));
    let offset = arg(Arg::Int(Some(q.offset)));
    let where_ = if filters.is_empty() { String::new() } else { format!("WHERE {}", filters.join(" AND ")) };
    let problems_from = d.problems_from;
    // One tenant per row of `ids` (a CTE with a tenant_id column), with every column shown.
    let listed = |ids: &str| {
        format!(
            "SELECT i.tenant_id, b.tenant_id AS b_tenant_id, b.name AS b_name,
                    COALESCE(s.name, b.name) AS name, s.last_used_at, {monthly_limit} AS monthly_limit,
                    b.daily_limit, b.monthly_limit AS b_monthly_limit,
                    b.daily_token_limit, b.monthly_token_limit, b.daily_execution_limit,
                    b.monthly_execution_limit, b.enforcement, b.rpm_limit, b.tpm_limit, b.max_concurrent,
                    COALESCE(dc.cost, 0) AS today_cost, COALESCE(dc.tokens, 0) AS today_tokens,
                    COALESCE(dc.executions, 0) AS today_executions,
                    COALESCE(mc.cost, 0) AS month_cost, COALESCE(mc.tokens, 0) AS month_tokens,
                    COALESCE(mc.executions, 0) AS month_executions,
                    COALESCE(p.errors, 0) AS errors_today, COALESCE(p.blocked, 0) AS blocked_today,
                    COALESCE(o.n, 0) AS breakers_open,
                    {share} AS share
             FROM {ids} i
             LEFT JOIN tenant_budgets b ON b.tenant_id = i.tenant_id
             LEFT JOIN tenants s ON s.tenant_id = i.tenant_id
             LEFT JOIN usage_counters dc ON dc.scope = 'tenant:' || i.tenant_id AND dc.period = {day}
             LEFT JOIN usage_counters mc ON mc.scope = 'tenant:' || i.tenant_id AND mc.period = {month}
             LEFT JOIN problems p ON p.tenant_id = i.tenant_id
             LEFT JOIN open_breakers o ON o.tenant_id = i.tenant_id"
        )
    };
    // The page's tenants are chosen by a query that keeps only their ids (the database then
    // reads only the columns the filters and the order need, and sorts narrow rows); its
    // rows alone get every column.
    let sql = format!(
        "WITH ids AS ({ids}),
         problems AS (
             SELECT tenant_id,
                    COUNT(CASE WHEN status <> 'blocked' THEN 1 END) AS errors,
                    COUNT(CASE WHEN status = 'blocked' THEN 1 END) AS blocked
             FROM {problems_from}
             WHERE status IN ({PROBLEM_STATUSES}) AND started_at >= {day_start} AND tenant_id IS NOT NULL
             GROUP BY tenant_id),
         open_breakers AS (
             SELECT tenant_id, COUNT(*) AS n FROM breakers
             WHERE phase <> 'closed' AND tenant_id IS NOT NULL GROUP BY tenant_id),
         page AS (
             SELECT tenant_id, COUNT(*) OVER () AS total FROM ({all}) listed {where_}
             ORDER BY {order}, tenant_id
             LIMIT {limit} OFFSET {offset}),
         shown AS ({shown})
         SELECT tenant_id, b_tenant_id, b_name, daily_limit, b_monthly_limit, daily_token_limit,
                monthly_token_limit, daily_execution_limit, monthly_execution_limit, enforcement,
                today_cost, today_tokens, today_executions, month_cost, month_tokens, month_executions,
                errors_today, blocked_today, breakers_open, share, total,
                name, last_used_at, monthly_limit, rpm_limit, tpm_limit, max_concurrent
         FROM shown JOIN page USING (tenant_id)
         ORDER BY {order}, tenant_id",
        all = listed("ids"),
        shown = listed("page"),
    );
    (sql, args)
}

/// `Store::top_tenants`' query, with `periods` placeholders (none: every month, listed by
/// the global counters, which every call adds to) and the limit's.
pub(crate) fn top_tenants_sql(periods: Option<&[String]>, d: &Dialect, sum: fn(&str) -> String) -> String {
    let chosen = match periods {
        Some(ps) => (1..=ps.len()).map(d.placeholder).collect::<Vec<_>>().join(", "),
        None => "SELECT period FROM usage_counters WHERE scope = 'global' AND length(period) = 7".to_string(),
    };
    let limit = (d.placeholder)(periods.map_or(0, <[String]>::len) + 1);
    format!(
        "SELECT substr(scope, 8), {}, {}, {} FROM usage_counters \
         WHERE period IN ({chosen}) AND scope >= 'tenant:' AND scope < 'tenant;' \
         GROUP BY scope ORDER BY SUM(cost) DESC, scope LIMIT {limit}",
        sum("cost"),
        sum("tokens"),
        sum("executions")
    )
}

/// A row of the list query as the stores read it (see `sql` for the column order).
pub(crate) struct RawRow {
    pub tenant_id: String,
    pub budget_tenant_id: Option<String>,
    pub name: Option<String>,
    /// daily_limit .. monthly_execution_limit, in `BUDGET_COLUMNS` order.
    pub limits: [Option<i64>; 6],
    pub enforcement: Option<String>,
    /// Today's cost, tokens, executions, then the month's.
    pub usage: [i64; 6],
    pub errors_today: i64,
    pub blocked_today: i64,
    pub breakers_open: i64,
    pub share: Option<f64>,
    pub total: i64,
    /// The register's name, else the budget's.
    pub shown_name: Option<String>,
    pub last_used_at: Option<Micros>,
    /// The tenant's own monthly limit, else the global one.
    pub monthly_limit: Option<i64>,
    /// rpm_limit, tpm_limit, max_concurrent.
    pub rates: [Option<i64>; 3],
}

impl RawRow {
    /// Reads a row through `int`, `text` and `float` getters of column indexes.
    pub(crate) fn read<E>(
        int: impl Fn(usize) -> std::result::Result<Option<i64>, E>,
        text: impl Fn(usize) -> std::result::Result<Option<String>, E>,
        float: impl Fn(usize) -> std::result::Result<Option<f64>, E>,
    ) -> std::result::Result<RawRow, E> {
        let n = |i| int(i).map(Option::unwrap_or_default);
        Ok(RawRow {
            tenant_id: text(0)?.unwrap_or_default(),
            budget_tenant_id: text(1)?,
            name: text(2)?,
            limits: [int(3)?, int(4)?, int(5)?, int(6)?, int(7)?, int(8)?],
            enforcement: text(9)?,
            usage: [n(10)?, n(11)?, n(12)?, n(13)?, n(14)?, n(15)?],
            errors_today: n(16)?,
            blocked_today: n(17)?,
            breakers_open: n(18)?,
            share: float(19)?,
            total: n(20)?,
            shown_name: text(21)?,
            last_used_at: int(22)?,
            monthly_limit: int(23)?,
            rates: [int(24)?, int(25)?, int(26)?],
        })
    }
}

/// The list from the rows of one page (the total repeats on every row; none: no match).
pub(crate) fn assemble(rows: Vec<RawRow>, today: NaiveDate) -> TenantList {
    use crate::budget::Enforcement;
    use crate::money::Nanos;
    let total = rows.first().map_or(0, |r| r.total);
    let rows = rows
        .into_iter()
        .map(|r| {
            let [dc, dt, de, mc, mt, me] = r.usage;
            let [daily_cost, monthly_cost, daily_tokens, monthly_tokens, daily_executions, monthly_executions] = r.limits;
            let budget = r.budget_tenant_id.map(|tenant_id| TenantBudget {
                tenant_id,
                name: r.name,
                limits: Limits {
                    daily_cost: daily_cost.map(Nanos),
                    monthly_cost: monthly_cost.map(Nanos),
                    daily_tokens,
                    monthly_tokens,
                    daily_executions,
                    monthly_executions,
                    rpm: r.rates[0],
                    tpm: r.rates[1],
                    max_concurrent: r.rates[2],
                },
                // The CHECK constraint keeps this to hard/soft.
                enforcement: if r.enforcement.as_deref() == Some("soft") { Enforcement::Soft } else { Enforcement::Hard },
            });
            TenantListRow {
                tenant_id: r.tenant_id,
                name: r.shown_name,
                last_used_at: r.last_used_at,
                projection: projection::project(Nanos(mc), r.monthly_limit.map(Nanos), today),
                budget,
                today: Usage { cost: Nanos(dc), tokens: dt, executions: de },
                month: Usage { cost: Nanos(mc), tokens: mt, executions: me },
                errors_today: r.errors_today,
                blocked_today: r.blocked_today,
                breakers_open: r.breakers_open,
                share: r.share,
            }
        })
        .collect();
    TenantList { total, rows }
}
