//! The dashboard's list of tenants: one page of tenants, filtered, searched and sorted, from
//! the register of tenants seen, the budgets, this day's and month's counters of every tenant,
//! the breakers not closed and today's failed or refused calls (`Store::problems_today`),
//! never a scan of all executions; each with its month-end projection (`budget::projection`).
//!
//! The stores read each of those in one pass of its table or of one period's range of
//! counters, and the list is joined, filtered and sorted here: at 50,000 tenants a query that
//! joins them in the database looks every tenant up in each table (300,000 lookups, most of
//! the 250 to 700 ms a page took), and its filters and order are computed, not indexed, so
//! the database would read every tenant anyway. Of every tenant only what the query's search,
//! filters and order use is read (`Needs`): the ids that make the list (register, budgets,
//! this month's counters) always, names, whole budgets and today's counters only when used;
//! the page's rows get the rest by key (a few lookups each). The reads come back in id order
//! and are merged, not hashed; the sort moves small keys, not rows; and only the page's rows
//! are built (sorting and dropping 50,000 whole rows was most of the time a page took).

use std::cmp::Ordering;

use chrono::NaiveDate;

use super::rollups::Dialect;
use super::Store;
use crate::budget::projection::{self, Projection};
use crate::budget::{Limits, TenantBudget, Usage};
use crate::clock::Micros;
use crate::error::{config_err, Result};
use crate::money::Nanos;
use crate::tenancy::SeenTenant;

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

/// Whose ids `Store::tenant_ids` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holders {
    /// The register of tenants seen.
    Register,
    /// The tenants with a budget of their own.
    Budgets,
}

/// `Store::tenant_ids`' query (both stores): ids alone are read from the primary key's index
/// (SQLite: a covering scan, no table rows).
pub(crate) fn ids_sql(of: Holders, names: bool) -> &'static str {
    match (of, names) {
        (Holders::Register, false) => "SELECT tenant_id FROM tenants ORDER BY tenant_id",
        (Holders::Register, true) => "SELECT tenant_id, name FROM tenants ORDER BY tenant_id",
        (Holders::Budgets, false) => "SELECT tenant_id FROM tenant_budgets ORDER BY tenant_id",
        (Holders::Budgets, true) => "SELECT tenant_id, name FROM tenant_budgets ORDER BY tenant_id",
    }
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

/// What the list knows of one tenant before the query's filters and order: what `Needs` read
/// (a page's rows are then completed, `complete`).
#[derive(Default)]
struct Entry {
    id: String,
    seen_name: Option<String>,
    last_used_at: Option<Micros>,
    /// Whether it has a budget; `budget` is read whole only when the query needs its limits.
    has_budget: bool,
    budget: Option<TenantBudget>,
    /// The budget's name, when its name but not the whole budget was read.
    budget_name: Option<String>,
    today: Usage,
    month: Usage,
    errors: i64,
    blocked: i64,
    breakers: i64,
}

/// What a query reads of every tenant, besides the ids that make the list, this month's
/// counters (they name tenants too) and today's problems and breakers (both small reads).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Needs {
    /// The register's and budgets' names: a search or the name order.
    names: bool,
    /// Every budget whole (its limits): the share and run-out orders and filters.
    budgets: bool,
    /// Today's counters: the spend-today order and the share order and filter.
    today: bool,
    /// The register whole (names and last use): every tenant's row is built (an export, or
    /// a scoped list of one).
    register: bool,
}

impl Needs {
    fn of(q: &TenantListQuery, every_row: bool) -> Needs {
        let has = |f: TenantFilter| q.filters.contains(&f);
        let share = q.sort == TenantSort::Share || has(TenantFilter::NearLimit);
        let names = every_row || q.sort == TenantSort::Name || search_needle(q).is_some();
        Needs {
            names,
            budgets: every_row || share || q.sort == TenantSort::RunsOut || has(TenantFilter::RunsOut),
            today: every_row || share || q.sort == TenantSort::SpendToday,
            register: every_row,
        }
    }
}

/// A tenant's use of its effective limits: what the filters and sorts need besides the reads.
#[derive(Clone, Copy)]
struct Standing {
    /// Largest share of an effective limit used (a limit of 0 counts as 1.0); None without limits.
    share: Option<f64>,
    projection: Projection,
}

/// A tenant the search and filters kept: its entry's index (entries are in id order, so the
/// index breaks ties by id) and what its order needs, small enough to sort 50,000 of.
struct Kept {
    at: usize,
    standing: Standing,
    /// The lower-cased name, for the name order only.
    name: Option<String>,
}

/// One page of the list (the query's filters, search and order over every tenant seen, with a
/// budget or with usage this month; a scoped query: that tenant alone, even if never seen).
/// Only the page's rows are built, completed by key with what the query did not read.
pub fn list(store: &dyn Store, q: &TenantListQuery) -> Result<TenantList> {
    q.validate()?;
    let needs = Needs::of(q, q.tenant_id.is_some());
    let mut entries = entries(store, q, needs)?;
    let mut kept = kept(&entries, q);
    let total = kept.len() as i64;
    let page = window(&mut kept, q.offset as usize, q.limit as usize, |a, b| order(q, &entries, a, b).then(a.at.cmp(&b.at)));
    let rows = page
        .iter()
        .map(|k| {
            let mut e = std::mem::take(&mut entries[k.at]);
            complete(store, q, needs, &mut e)?;
            let s = standing(&e, q);
            Ok(row(e, s))
        })
        .collect::<Result<_>>()?;
    Ok(TenantList { total, rows })
}

/// Every row the query's search and filters keep, in its order (its page ignored): an
/// export's one pass, every tenant read whole.
pub fn all(store: &dyn Store, q: &TenantListQuery) -> Result<Vec<TenantListRow>> {
    q.validate_search()?;
    let mut entries = entries(store, q, Needs::of(q, true))?;
    let mut kept = kept(&entries, q);
    kept.sort_unstable_by(|a, b| order(q, &entries, a, b).then(a.at.cmp(&b.at)));
    Ok(kept.into_iter().map(|k| row(std::mem::take(&mut entries[k.at]), k.standing)).collect())
}

/// The rows `offset` to `offset + limit` of `kept` in the order `cmp` (a total order), sorted:
/// two selections and the window's sort, not a sort of every tenant kept (50,000 keys sorted
/// for a page of 50 were a third of a page's instructions).
fn window<F: Fn(&Kept, &Kept) -> Ordering>(kept: &mut [Kept], offset: usize, limit: usize, cmp: F) -> &mut [Kept] {
    let start = offset.min(kept.len());
    let end = offset.saturating_add(limit).min(kept.len());
    if start > 0 && start < kept.len() {
        kept.select_nth_unstable_by(start, &cmp); // those before `start` are ahead of the rest
    }
    let rest = &mut kept[start..];
    if end - start < rest.len() {
        rest.select_nth_unstable_by(end - start, &cmp); // the window's rows, in any order
    }
    let page = &mut rest[..end - start];
    page.sort_unstable_by(&cmp);
    page
}

/// Reads by key what `entries` left out of a page's row for `needs`.
fn complete(store: &dyn Store, q: &TenantListQuery, needs: Needs, e: &mut Entry) -> Result<()> {
    if !needs.register {
        if let Some(seen) = store.tenant(&e.id)? {
            e.seen_name = seen.name;
            e.last_used_at = Some(seen.last_used_at);
        }
    }
    if !needs.budgets && e.has_budget {
        // Read apart from the ids: a budget deleted since is shown as none.
        e.budget = store.budget_get(&e.id)?;
        e.has_budget = e.budget.is_some();
        e.budget_name = None;
    }
    if !needs.today {
        e.today = store.usage(&format!("tenant:{}", e.id), &q.day)?;
    }
    Ok(())
}

/// A row of a read that the merge joins by tenant id (the register's, the budgets').
trait Keyed {
    fn key(&self) -> &String;
}

impl Keyed for SeenTenant {
    fn key(&self) -> &String {
        &self.id
    }
}

impl Keyed for TenantBudget {
    fn key(&self) -> &String {
        &self.tenant_id
    }
}

/// The register's or the budgets' part of the merge, sorted by id: rows read whole, or ids
/// with names or not (`Store::tenant_ids`).
enum Part<W> {
    Whole(std::iter::Peekable<std::vec::IntoIter<W>>),
    Ids(std::iter::Peekable<std::vec::IntoIter<(String, Option<String>)>>),
}

/// What a part held for one tenant.
enum Got<W> {
    Whole(W),
    Name(Option<String>),
}

impl<W: Keyed> Part<W> {
    // A store's order may follow a collation: sorted by id here (one pass if it is).
    fn whole(mut rows: Vec<W>) -> Self {
        rows.sort_by(|a, b| a.key().cmp(b.key()));
        Part::Whole(rows.into_iter().peekable())
    }

    fn ids(mut ids: Vec<(String, Option<String>)>) -> Self {
        ids.sort_by(|a, b| a.0.cmp(&b.0));
        Part::Ids(ids.into_iter().peekable())
    }

    fn next_id(&mut self) -> Option<&String> {
        match self {
            Part::Whole(it) => it.peek().map(Keyed::key),
            Part::Ids(it) => it.peek().map(|s| &s.0),
        }
    }

    /// Its row for tenant `id`, if it is the next.
    fn take(&mut self, id: &str) -> Option<Got<W>> {
        match self {
            Part::Whole(it) => it.next_if(|w| w.key() == id).map(Got::Whole),
            Part::Ids(it) => it.next_if(|s| s.0 == id).map(|(_, name)| Got::Name(name)),
        }
    }
}

/// Every tenant the query may list, by id, with what `needs` says of it: a scoped query reads
/// its tenant's rows alone (whole); otherwise the whole reads, each sorted by id, are merged
/// in one pass (no hashing, no lookups, each entry built and moved once).
fn entries(store: &dyn Store, q: &TenantListQuery, needs: Needs) -> Result<Vec<Entry>> {
    let mut entries = match &q.tenant_id {
        Some(t) => {
            let scope = format!("tenant:{t}");
            let seen = store.tenant(t)?;
            let budget = store.budget_get(t)?;
            vec![Entry {
                id: t.clone(),
                seen_name: seen.as_ref().and_then(|s| s.name.clone()),
                last_used_at: seen.map(|s| s.last_used_at),
                has_budget: budget.is_some(),
                budget,
                today: store.usage(&scope, &q.day)?,
                month: store.usage(&scope, &q.month)?,
                ..Entry::default()
            }]
        }
        None => {
            let mut seen =
                if needs.register { Part::whole(store.tenants()?) } else { Part::ids(store.tenant_ids(Holders::Register, needs.names)?) };
            let mut budgets =
                if needs.budgets { Part::whole(store.budget_all()?) } else { Part::ids(store.tenant_ids(Holders::Budgets, needs.names)?) };
            let mut month = store.usage_by_scope("tenant:", &q.month)?;
            let mut today = if needs.today { store.usage_by_scope("tenant:", &q.day)? } else { Vec::new() };
            month.sort_by(|a, b| a.0.cmp(&b.0));
            today.sort_by(|a, b| a.0.cmp(&b.0));
            let mut month = month.into_iter().peekable();
            let mut today = today.into_iter().peekable();
            let mut entries = Vec::with_capacity(month.len());
            // Each entry is built once, for the smallest id left in the register, the budgets
            // and the month's counters, from each that has it.
            while let Some(id) = [seen.next_id(), budgets.next_id(), month.peek().map(|m| &m.0)].into_iter().flatten().min().cloned() {
                let mut e = Entry { id, ..Entry::default() };
                match seen.take(&e.id) {
                    Some(Got::Whole(s)) => {
                        e.seen_name = s.name;
                        e.last_used_at = Some(s.last_used_at);
                    }
                    Some(Got::Name(name)) => e.seen_name = name,
                    None => {}
                }
                match budgets.take(&e.id) {
                    Some(Got::Whole(b)) => {
                        e.budget = Some(b);
                        e.has_budget = true;
                    }
                    Some(Got::Name(name)) => {
                        e.budget_name = name;
                        e.has_budget = true;
                    }
                    None => {}
                }
                if let Some((_, u)) = month.next_if(|m| m.0 == e.id) {
                    e.month = u;
                }
                // Today's usage is part of the month's: a tenant with some has an entry.
                while today.next_if(|d| d.0 < e.id).is_some() {}
                if let Some((_, u)) = today.next_if(|d| d.0 == e.id) {
                    e.today = u;
                }
                entries.push(e);
            }
            entries
        }
    };
    let find = |entries: &mut [Entry], t: &str| entries.binary_search_by(|e| e.id.as_str().cmp(t)).ok();
    for p in store.problems_today(&q.day)? {
        if let Some(i) = find(&mut entries, &p.tenant_id) {
            entries[i].errors = p.failed;
            entries[i].blocked = p.refused;
        }
    }
    for b in store.breakers_not_closed()? {
        if let Some(i) = b.key.tenant_id.as_deref().and_then(|t| find(&mut entries, t)) {
            entries[i].breakers += 1;
        }
    }
    Ok(entries)
}

/// The search's lower-cased needle, None without one (empty or blank searches none).
fn search_needle(q: &TenantListQuery) -> Option<String> {
    q.search.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_lowercase)
}

/// The entries the query's search and filters keep, in id order (`order` sorts them).
fn kept(entries: &[Entry], q: &TenantListQuery) -> Vec<Kept> {
    let needle = search_needle(q);
    entries
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            needle.as_deref().is_none_or(|n| {
                let has = |s: Option<&str>| s.is_some_and(|s| contains_folded(s, n));
                has(Some(&e.id)) || has(e.seen_name.as_deref()) || has(budget_name(e))
            })
        })
        .map(|(at, e)| Kept { at, standing: standing(e, q), name: (q.sort == TenantSort::Name).then(|| name(e).unwrap_or(&e.id).to_lowercase()) })
        .filter(|k| q.filters.iter().all(|f| keeps(*f, &entries[k.at], &k.standing)))
        .collect()
}

/// Whether `hay` contains `needle` (lower-cased, not empty) in any case; without allocating
/// when both are ASCII (50,000 tenants' ids and names on every search).
fn contains_folded(hay: &str, needle: &str) -> bool {
    if needle.is_empty() {
        return true;
    }
    if hay.is_ascii() && needle.is_ascii() {
        hay.as_bytes().windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
    } else {
        hay.to_lowercase().contains(needle)
    }
}

/// The name the app gave (the register's), else its budget's.
fn name(e: &Entry) -> Option<&str> {
    e.seen_name.as_deref().or_else(|| budget_name(e))
}

/// Its budget's name, from the whole budget or the names read with the ids.
fn budget_name(e: &Entry) -> Option<&str> {
    e.budget.as_ref().and_then(|b| b.name.as_deref()).or(e.budget_name.as_deref())
}

/// A tenant's usage against its effective limits (its own, else the global ones).
fn standing(e: &Entry, q: &TenantListQuery) -> Standing {
    let own = e.budget.as_ref().map(|b| &b.limits);
    let g = &q.global;
    let pick = |f: fn(&Limits) -> Option<i64>| own.and_then(f).or_else(|| f(g));
    let monthly_cost = pick(|l| l.monthly_cost.map(|n| n.0));
    let limits = [
        (pick(|l| l.daily_cost.map(|n| n.0)), e.today.cost.0),
        (monthly_cost, e.month.cost.0),
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
    Standing { share, projection: projection::project(e.month.cost, monthly_cost.map(Nanos), q.today) }
}

/// A tenant's row.
fn row(e: Entry, s: Standing) -> TenantListRow {
    TenantListRow {
        name: name(&e).map(str::to_owned),
        projection: s.projection,
        tenant_id: e.id,
        last_used_at: e.last_used_at,
        budget: e.budget,
        today: e.today,
        month: e.month,
        errors_today: e.errors,
        blocked_today: e.blocked,
        breakers_open: e.breakers,
        share: s.share,
    }
}

fn keeps(f: TenantFilter, e: &Entry, s: &Standing) -> bool {
    match f {
        TenantFilter::NearLimit => s.share.is_some_and(|s| s >= 0.8),
        TenantFilter::BlockedToday => e.blocked > 0,
        TenantFilter::BreakerOpen => e.breakers > 0,
        TenantFilter::NoBudget => !e.has_budget,
        TenantFilter::RunsOut => s.projection.runs_out.is_some(),
    }
}

/// The query's order before the tie-break by tenant id.
fn order(q: &TenantListQuery, entries: &[Entry], a: &Kept, b: &Kept) -> Ordering {
    let dir = |o: Ordering| if q.descending { o.reverse() } else { o };
    let (x, y) = (&entries[a.at], &entries[b.at]);
    match q.sort {
        TenantSort::SpendToday => dir(x.today.cost.cmp(&y.today.cost)),
        TenantSort::SpendMonth => dir(x.month.cost.cmp(&y.month.cost)),
        TenantSort::Errors => dir(x.errors.cmp(&y.errors)),
        TenantSort::Name => dir(a.name.cmp(&b.name)),
        // Tenants without limits come last whichever the direction.
        TenantSort::Share => {
            let (sa, sb) = (a.standing.share, b.standing.share);
            sa.is_none().cmp(&sb.is_none()).then_with(|| match (sa, sb) {
                (Some(x), Some(y)) => dir(x.total_cmp(&y)),
                _ => Ordering::Equal,
            })
        }
        // Soonest first (ascending); tenants it does not run out for this month last.
        TenantSort::RunsOut => {
            let (ra, rb) = (a.standing.projection.runs_out, b.standing.projection.runs_out);
            ra.is_none().cmp(&rb.is_none()).then_with(|| dir(ra.cmp(&rb)))
        }
    }
}

/// `Store::problems_today`'s query (one placeholder: the day's key): today's failed and refused
/// calls per tenant, from the day's rollups, a range of their primary key. Every call is in its
/// start day's rollup once it has an outcome, and running ones are neither failed nor refused.
/// Not from the rows: an index on `status` made every settlement's UPDATE write it (on
/// PostgreSQL a new row version in all the table's indexes instead of a heap-only one,
/// migration 20; SQLite's migration 20 drops it too), and a bad day's refused calls are
/// millions of rows but a few rollups.
pub(crate) fn problems_sql(d: Dialect) -> String {
    format!(
        "SELECT tenant_id, {}, {} FROM daily_rollups \
         WHERE period = {} AND status IN ('error', 'timeout', 'blocked', 'rate_limited') AND tenant_id <> '' \
         GROUP BY tenant_id",
        d.sum("CASE WHEN status IN ('error', 'timeout') THEN calls ELSE 0 END"),
        d.sum("CASE WHEN status IN ('blocked', 'rate_limited') THEN calls ELSE 0 END"),
        d.param(1)
    )
}

/// `Store::top_tenants`' query: one period's range of the tenant counters (two placeholders:
/// the period key, the limit), one row per tenant, so nothing is summed.
pub(crate) fn top_tenants_sql(d: Dialect) -> String {
    format!(
        "SELECT substr(scope, 8), cost, tokens, executions FROM usage_counters \
         WHERE period = {} AND scope >= 'tenant:' AND scope < 'tenant;' ORDER BY cost DESC, scope LIMIT {}",
        d.param(1),
        d.param(2)
    )
}

#[cfg(test)]
mod tests {
    use super::contains_folded;

    #[test]
    fn search_ignores_case_ascii_or_not() {
        assert!(contains_folded("Acme Corp", "corp") && contains_folded("ACME", "acme") && contains_folded("x", ""));
        assert!(!contains_folded("acme", "acmex") && !contains_folded("ac", "acme"));
        assert!(contains_folded("École Ltd", "éc") && contains_folded("Straße", "straße") && !contains_folded("École", "x"));
    }
}
