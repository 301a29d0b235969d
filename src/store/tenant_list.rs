//! The dashboard's list of tenants: one page of tenants, filtered, searched and sorted, from
//! the register of tenants seen, the budgets, this day's and month's counters of every tenant,
//! the breakers not closed and today's failed or refused calls (a partial index), never a scan
//! of all executions; each with its month-end projection (`budget::projection`).
//!
//! The stores read each of those in full, in one pass of its table or of one period's range of
//! counters, and the list is joined, filtered and sorted here: at 50,000 tenants a query that
//! joins them in the database looks every tenant up in each table (300,000 lookups, most of
//! the 250 to 700 ms a page took), and its filters and order are computed, not indexed, so
//! the database would read every tenant anyway.

use std::cmp::Ordering;
use std::collections::HashMap;

use chrono::NaiveDate;

use super::Store;
use crate::budget::projection::{self, Projection};
use crate::budget::{Limits, TenantBudget, Usage};
use crate::clock::Micros;
use crate::error::{config_err, Result};
use crate::money::Nanos;

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
    /// At least one call refused today, by a budget or a rate limit.
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
    /// Checks the page (`offset`, `limit`) and the search.
    pub fn validate(&self) -> Result<()> {
        if self.offset < 0 {
            return config_err(format!("offset must be 0 or more, got {}", self.offset));
        }
        if !(1..=MAX_LIMIT).contains(&self.limit) {
            return config_err(format!("limit must be 1 to {MAX_LIMIT}, got {}", self.limit));
        }
        self.validate_search()
    }

    fn validate_search(&self) -> Result<()> {
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
    /// How to read today's failed or refused calls: SQLite is told the partial index (its
    /// planner preferred scanning `executions_tenant` for the GROUP BY: 10M rows).
    pub problems_from: &'static str,
}

/// The failed and refused calls: the WHERE of SQLite's partial index `executions_problems`
/// (migration 15), which a query must repeat verbatim for SQLite to use the index. ORs, not
/// IN (...): see the migration. (PostgreSQL's index says IN; its planner proves either from
/// the other.)
const PROBLEM_STATUSES: &str = "(status = 'error' OR status = 'timeout' OR status = 'blocked' OR status = 'rate_limited')";

/// Today's failed and refused calls per tenant since the placeholder's start of the day:
/// columns tenant_id, failed (error, timeout), refused (blocked, rate_limited).
pub(crate) fn problems_sql(d: &Dialect) -> String {
    format!(
        "SELECT tenant_id, COUNT(CASE WHEN status IN ('error', 'timeout') THEN 1 END),
                COUNT(CASE WHEN status IN ('blocked', 'rate_limited') THEN 1 END)
         FROM {}
         WHERE {PROBLEM_STATUSES} AND started_at >= {} AND tenant_id IS NOT NULL
         GROUP BY tenant_id",
        d.problems_from,
        (d.placeholder)(1)
    )
}

/// Today's failed and refused calls of one tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problems {
    pub tenant_id: String,
    /// Calls that ended in error or timeout.
    pub failed: i64,
    /// Calls refused by a budget (blocked) or a rate limit (rate_limited).
    pub refused: i64,
}

/// What the list knows of one tenant before the query's filters and order.
#[derive(Default)]
struct Entry {
    seen_name: Option<String>,
    last_used_at: Option<Micros>,
    budget: Option<TenantBudget>,
    today: Usage,
    month: Usage,
    errors: i64,
    blocked: i64,
    breakers: i64,
}

/// One page of the list (the query's filters, search and order over every tenant seen, with a
/// budget or with usage this month; a scoped query: that tenant alone, even if never seen).
pub fn list(store: &dyn Store, q: &TenantListQuery) -> Result<TenantList> {
    q.validate()?;
    let rows = all(store, q)?;
    let total = rows.len() as i64;
    let rows = rows.into_iter().skip(q.offset as usize).take(q.limit as usize).collect();
    Ok(TenantList { total, rows })
}

/// Every row the query's search and filters keep, in its order (its page ignored): an
/// export's one pass.
pub fn all(store: &dyn Store, q: &TenantListQuery) -> Result<Vec<TenantListRow>> {
    q.validate_search()?;
    let mut tenants: HashMap<String, Entry> = HashMap::new();
    match &q.tenant_id {
        Some(t) => {
            let scope = format!("tenant:{t}");
            let seen = store.tenants()?.into_iter().find(|s| &s.id == t);
            tenants.insert(
                t.clone(),
                Entry {
                    seen_name: seen.as_ref().and_then(|s| s.name.clone()),
                    last_used_at: seen.map(|s| s.last_used_at),
                    budget: store.budget_get(t)?,
                    today: store.usage(&scope, &q.day)?,
                    month: store.usage(&scope, &q.month)?,
                    ..Entry::default()
                },
            );
        }
        None => {
            for s in store.tenants()? {
                tenants.insert(s.id, Entry { seen_name: s.name, last_used_at: Some(s.last_used_at), ..Entry::default() });
            }
            for b in store.budget_all()? {
                let id = b.tenant_id.clone();
                tenants.entry(id).or_default().budget = Some(b);
            }
            for (t, u) in store.usage_by_scope("tenant:", &q.month)? {
                tenants.entry(t).or_default().month = u;
            }
            for (t, u) in store.usage_by_scope("tenant:", &q.day)? {
                if let Some(e) = tenants.get_mut(&t) {
                    e.today = u;
                }
            }
        }
    }
    for p in store.problems_since(q.day_start)? {
        if let Some(e) = tenants.get_mut(&p.tenant_id) {
            e.errors = p.failed;
            e.blocked = p.refused;
        }
    }
    for b in store.breakers_not_closed()? {
        if let Some(e) = b.key.tenant_id.as_ref().and_then(|t| tenants.get_mut(t)) {
            e.breakers += 1;
        }
    }
    let needle = q.search.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_lowercase);
    let mut rows: Vec<TenantListRow> = tenants
        .into_iter()
        .filter(|(id, e)| {
            needle.as_deref().is_none_or(|n| {
                let has = |s: Option<&str>| s.is_some_and(|s| s.to_lowercase().contains(n));
                has(Some(id)) || has(e.seen_name.as_deref()) || has(e.budget.as_ref().and_then(|b| b.name.as_deref()))
            })
        })
        .map(|(id, e)| row(id, e, q))
        .filter(|r| q.filters.iter().all(|f| keeps(*f, r)))
        .collect();
    rows.sort_by(|a, b| order(q, a, b).then_with(|| a.tenant_id.cmp(&b.tenant_id)));
    Ok(rows)
}

/// A tenant's row: its usage against its effective limits (its own, else the global ones).
fn row(tenant_id: String, e: Entry, q: &TenantListQuery) -> TenantListRow {
    let own = e.budget.as_ref().map(|b| &b.limits);
    let g = &q.global;
    let pick = |f: fn(&Limits) -> Option<i64>| own.and_then(f).or_else(|| f(g));
    let limits = [
        (pick(|l| l.daily_cost.map(|n| n.0)), e.today.cost.0),
        (pick(|l| l.monthly_cost.map(|n| n.0)), e.month.cost.0),
        (pick(|l| l.daily_tokens), e.today.tokens),
        (pick(|l| l.monthly_tokens), e.month.tokens),
        (pick(|l| l.daily_executions), e.today.executions),
        (pick(|l| l.monthly_executions), e.month.executions),
    ];
    // A limit of 0 allows nothing: used up whatever the use.
    let share = limits
        .iter()
        .filter_map(|(limit, used)| limit.map(|l| if l <= 0 { 1.0 } else { *used as f64 / l as f64 }))
        .reduce(f64::max);
    TenantListRow {
        name: e.seen_name.or_else(|| e.budget.as_ref().and_then(|b| b.name.clone())),
        projection: projection::project(e.month.cost, limits[1].0.map(Nanos), q.today),
        tenant_id,
        last_used_at: e.last_used_at,
        budget: e.budget,
        today: e.today,
        month: e.month,
        errors_today: e.errors,
        blocked_today: e.blocked,
        breakers_open: e.breakers,
        share,
    }
}

fn keeps(f: TenantFilter, r: &TenantListRow) -> bool {
    match f {
        TenantFilter::NearLimit => r.share.is_some_and(|s| s >= 0.8),
        TenantFilter::BlockedToday => r.blocked_today > 0,
        TenantFilter::BreakerOpen => r.breakers_open > 0,
        TenantFilter::NoBudget => r.budget.is_none(),
        TenantFilter::RunsOut => r.projection.runs_out.is_some(),
    }
}

/// The query's order before the tie-break by tenant id.
fn order(q: &TenantListQuery, a: &TenantListRow, b: &TenantListRow) -> Ordering {
    let dir = |o: Ordering| if q.descending { o.reverse() } else { o };
    match q.sort {
        TenantSort::SpendToday => dir(a.today.cost.cmp(&b.today.cost)),
        TenantSort::SpendMonth => dir(a.month.cost.cmp(&b.month.cost)),
        TenantSort::Errors => dir(a.errors_today.cmp(&b.errors_today)),
        TenantSort::Name => {
            let name = |r: &TenantListRow| r.name.as_deref().unwrap_or(&r.tenant_id).to_lowercase();
            dir(name(a).cmp(&name(b)))
        }
        // Tenants without limits come last whichever the direction.
        TenantSort::Share => a.share.is_none().cmp(&b.share.is_none()).then_with(|| match (a.share, b.share) {
            (Some(x), Some(y)) => dir(x.total_cmp(&y)),
            _ => Ordering::Equal,
        }),
        // Soonest first (ascending); tenants it does not run out for this month last.
        TenantSort::RunsOut => {
            let (x, y) = (a.projection.runs_out, b.projection.runs_out);
            x.is_none().cmp(&y.is_none()).then_with(|| dir(x.cmp(&y)))
        }
    }
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

