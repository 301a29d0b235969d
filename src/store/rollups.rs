//! Daily and monthly rollups: per period (day or month, in the database's timezone), tenant,
//! agent, model and status, how many calls and the totals of their numeric fields. Written in
//! the transaction that gives an execution row its outcome (`record_sql`), so they always
//! agree with the rows; purging rows leaves them as they are (DESIGN §1b: totals for past
//! days and months survive purges). Grouped and total queries over these keys and whole days
//! read them (`plan`) instead of scanning executions: whole calendar months from the monthly
//! table, the days around them from the daily one (added, or taken away from a whole month
//! when that reads fewer rows, `months_and_days`). A range whose ends are inside days reads
//! the whole days so, and the parts of days at its ends from the executions (`Plan::edges`).
//! Calls still running are not rolled up; their reservations find them (every call in flight
//! has one, on both stores).
//!
//! At tens of thousands of tenants nearly every call is a daily rollup row of its own, so a
//! question over all tenants would read about as many rows as there are calls. Both stores
//! also keep `daily_totals`, the daily rollups without the tenant (written beside them and
//! rebuilt from them), which such questions read instead: a few rows per day.

use std::collections::HashMap;
use std::sync::LazyLock;

use chrono::{Datelike, Days, Months, NaiveDate};

use super::retention::Horizon;
use crate::clock::{Calendar, Micros, Period};
use crate::execution::{Aggregate, Completion, Field, Filter, GroupKey, Query, Value};

/// The migration (1-based, in both schemas) that creates the rollup tables; the store
/// backfills them from the executions when it applies it.
pub const MIGRATION: usize = 9;

/// The numeric execution fields rolled up, besides the count of calls.
pub const ROLLED: &[&str] = &[
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "total_tokens",
    "input_cost",
    "output_cost",
    "total_cost",
    "attempts_count",
    "cache_write_tokens",
    "cache_read_cost",
    "cache_write_cost",
    "duration_ms",
    "time_to_first_token_ms",
];

/// The key columns of both tables; `tenant_id` is '' for calls without a tenant (tenant ids
/// are never empty), so the primary key has no NULL.
const KEY: &str = "period, tenant_id, agent, model_id, status";
const DAILY: &str = "daily_rollups";
const MONTHLY: &str = "monthly_rollups";
/// The daily rollups without the tenant (SQLite's migration 13, PostgreSQL's 16;
/// `totals_record_sql`).
const TOTALS: &str = "daily_totals";
const TOTALS_KEY: &str = "period, agent, model_id, status";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    pub(crate) fn param(self, i: usize) -> String {
        match self {
            Dialect::Sqlite => format!("?{i}"),
            Dialect::Postgres => format!("${i}"),
        }
    }
    /// A SUM that stays a 64-bit integer (PostgreSQL's SUM of BIGINT is NUMERIC).
    pub(crate) fn sum(self, expr: &str) -> String {
        match self {
            Dialect::Sqlite => format!("COALESCE(SUM({expr}), 0)"),
            Dialect::Postgres => format!("COALESCE(SUM({expr}), 0)::BIGINT"),
        }
    }
}

/// The day and month keys ("2026-11-28", "2026-11") of the periods a call started at `at`
/// is rolled up in.
pub fn periods(cal: &Calendar, at: Micros) -> [String; 2] {
    [cal.period_key(Period::Daily, at), cal.period_key(Period::Monthly, at)]
}

fn rolled_columns() -> String {
    ROLLED.join(", ")
}

/// Per table (daily, monthly): SQL that adds execution ?3's numbers, times ?2 (1 or -1), to
/// its rollup for period ?1. A running row adds nothing. Settlement runs it with -1 before
/// it rewrites a row (a call whose lease was taken over had an outcome already) and with 1
/// after.
pub fn record_sql(d: Dialect) -> &'static [String; 2] {
    static SQLITE: LazyLock<[String; 2]> = LazyLock::new(|| record(Dialect::Sqlite));
    static POSTGRES: LazyLock<[String; 2]> = LazyLock::new(|| record(Dialect::Postgres));
    match d {
        Dialect::Sqlite => &SQLITE,
        Dialect::Postgres => &POSTGRES,
    }
}

fn record(d: Dialect) -> [String; 2] {
    [DAILY, MONTHLY].map(|table| record_into(d, table, KEY, "COALESCE(tenant_id, ''), agent, model_id, status"))
}

/// SQLite's SQL that adds execution ?3's numbers, times ?2, to its daily total for day ?1
/// (`record_sql`'s daily rollup without the tenant); `totals_record_sql_in` for PostgreSQL's.
pub fn totals_record_sql() -> &'static str {
    totals_record_sql_in(Dialect::Sqlite)
}

pub fn totals_record_sql_in(d: Dialect) -> &'static str {
    static SQLITE: LazyLock<String> = LazyLock::new(|| totals_record(Dialect::Sqlite));
    static POSTGRES: LazyLock<String> = LazyLock::new(|| totals_record(Dialect::Postgres));
    match d {
        Dialect::Sqlite => &SQLITE,
        Dialect::Postgres => &POSTGRES,
    }
}

fn totals_record(d: Dialect) -> String {
    record_into(d, TOTALS, TOTALS_KEY, "agent, model_id, status")
}

/// `record_sql`'s statement for `table`, whose key is `key`: the period, then `selected` (the
/// rest of the key, from the execution row).
fn record_into(d: Dialect, table: &str, key: &str, selected: &str) -> String {
    let (period, sign, id) = match d {
        Dialect::Sqlite => ("?1".to_string(), "?2".to_string(), "?3".to_string()),
        Dialect::Postgres => ("$1::TEXT".to_string(), "$2::BIGINT".to_string(), "$3::TEXT".to_string()),
    };
    let values: Vec<String> = ROLLED.iter().map(|c| format!("{sign} * COALESCE({c}, 0)")).collect();
    format!(
        "INSERT INTO {table} ({key}, calls, {cols})
         SELECT {period}, {selected}, {sign}, {values}
         FROM executions WHERE id = {id} AND status <> 'running'
         {adding}",
        cols = rolled_columns(),
        values = values.join(", "),
        adding = adding(table, key),
    )
}

/// The conflict clause of an upsert into rollup `table` (key `key`): the totals add up.
fn adding(table: &str, key: &str) -> String {
    let set: Vec<String> = std::iter::once("calls").chain(ROLLED.iter().copied()).map(|c| format!("{c} = {table}.{c} + excluded.{c}")).collect();
    format!("ON CONFLICT ({key}) DO UPDATE SET {}", set.join(", "))
}

/// SQLite only: the daily rollup's, the monthly rollup's and the daily total's statements that
/// add one call just settled, from bound values: ?1 the period, ?2 to ?5 the rest of the key
/// (tenant, '' for none; agent; model; status), then `settled_values` from ?6 (the daily total
/// leaves ?2 unused). Settlement runs them instead of `record_sql` and `totals_record_sql`,
/// which read back the row it has just written: that read was ~5K of the ~36K instructions an
/// upsert costs on Debian's SQLite, three times a call.
pub fn add_settled_sql() -> &'static [String; 3] {
    static SQL: LazyLock<[String; 3]> = LazyLock::new(|| {
        let values: Vec<String> = (0..ROLLED.len()).map(|i| format!("?{}", i + 6)).collect();
        let add = |table: &str, key: &str, key_values: &str| {
            format!("INSERT INTO {table} ({key}, calls, {}) VALUES ({key_values}, 1, {}) {}", rolled_columns(), values.join(", "), adding(table, key))
        };
        [add(DAILY, KEY, "?1, ?2, ?3, ?4, ?5"), add(MONTHLY, KEY, "?1, ?2, ?3, ?4, ?5"), add(TOTALS, TOTALS_KEY, "?1, ?3, ?4, ?5")]
    });
    &SQL
}

/// A call's numbers, in `ROLLED`'s order.
pub type Rolled = [i64; ROLLED.len()];

/// A settled call's numbers as closing its row writes them (an unknown time to first token is
/// 0 here, NULL in the row).
pub fn settled_values(c: &Completion) -> Rolled {
    [
        c.usage.input,
        c.usage.output,
        c.usage.cached,
        c.usage.input + c.usage.output,
        c.cost.input.0,
        c.cost.output.0,
        c.cost.total().0,
        c.attempts.len() as i64,
        c.usage.cache_writes(),
        c.cost.cache_read.0,
        c.cost.cache_write.0,
        c.duration_ms,
        c.time_to_first_token_ms.unwrap_or(0),
    ]
}

// ---------------------------------------------------------------- rebuilding

/// Rebuilding (the store's `rebuild_counters`, a timezone change, the migration's backfill),
/// step 1: the start of the oldest settled call, for `rebuild_plan`. The daily rollups of the
/// days before its day (in the calendar they are keyed in) and before a purge's horizon stay as
/// they are: those days' rows were purged, and the rollups are all that is left of them (after
/// a timezone change they keep the old zone's days).
pub const OLDEST_SQL: &str = "SELECT MIN(started_at) FROM executions WHERE status <> 'running'";

/// Step 2: every settled call started at ?1 ($1, `Rebuild::rows_from`) or later, for
/// `Totals::add_row`.
pub fn source_sql(d: Dialect) -> String {
    let values: Vec<String> = ROLLED.iter().map(|c| format!("COALESCE({c}, 0)")).collect();
    format!(
        "SELECT started_at, COALESCE(tenant_id, ''), agent, model_id, status, {} FROM executions WHERE status <> 'running' AND started_at >= {}",
        values.join(", "),
        d.param(1)
    )
}

/// Step 3 deletes the daily rollups from `Rebuild::rollups`' day on; step 4 adds
/// `Totals::rows` to daily_rollups with these columns (a kept day of the old zone may have
/// the key of a day of the new one).
pub fn insert_columns() -> String {
    format!("{KEY}, calls, {}", rolled_columns())
}

/// Step 4's conflict clause: totals add up.
pub fn add_on_conflict() -> String {
    adding(DAILY, KEY)
}

/// Step 4 on PostgreSQL: every row in one statement, from one array per column.
pub fn pg_insert_sql() -> String {
    let arrays: Vec<String> = (1..=5).map(|i| format!("${i}::TEXT[]")).chain((6..=ROLLED.len() + 6).map(|i| format!("${i}::BIGINT[]"))).collect();
    format!("INSERT INTO {DAILY} ({}) SELECT * FROM unnest({}) {}", insert_columns(), arrays.join(", "), add_on_conflict())
}

/// Step 5: every monthly rollup again, summed from the daily ones (after deleting them all).
pub fn derive_monthly_sql(d: Dialect) -> String {
    format!(
        "INSERT INTO {MONTHLY} ({}) SELECT substr(period, 1, 7), tenant_id, agent, model_id, status, {} FROM {DAILY}
         GROUP BY substr(period, 1, 7), tenant_id, agent, model_id, status",
        insert_columns(),
        sums(d),
    )
}

/// Step 6: every daily total again, summed from the daily rollups (after deleting them all).
/// On PostgreSQL the INSERT casts the NUMERIC sums back to BIGINT.
pub fn derive_totals_sql() -> String {
    format!(
        "INSERT INTO {TOTALS} ({TOTALS_KEY}, calls, {}) SELECT {TOTALS_KEY}, {} FROM {DAILY} GROUP BY {TOTALS_KEY}",
        rolled_columns(),
        sums(Dialect::Sqlite),
    )
}

/// The sums of the calls and `ROLLED`, for a GROUP BY over rollups.
fn sums(d: Dialect) -> String {
    std::iter::once("calls").chain(ROLLED.iter().copied()).map(|c| d.sum(c)).collect::<Vec<_>>().join(", ")
}

/// What a rebuild (`rebuild_counters`, a timezone change, the migration's backfill) keeps and
/// what it recomputes from the rows. After a purge (`Horizon`) every settled call that started
/// from its horizon on is rolled up on its day or a later one, and the days before hold only
/// calls that started before it, so each call is counted once: from its row or from the kept
/// rollups. (A call that ran through both a purge and a timezone change may be rolled up on the
/// wrong side of the horizon's day; no call runs that long.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuild {
    /// The daily rollups from this day on (a key in the calendar they are keyed in until now)
    /// are recomputed from the settled calls started from `rows_from` on (None: no row is
    /// left, the rollups stay as they are). The days before keep their rollups: their rows
    /// were purged, or deleted by hand before the oldest row left.
    pub rollups: Option<String>,
    /// The counters are the usage in the daily rollups of the days before the horizon's
    /// (nothing else knows those days' calls any more), plus that of the counted calls started
    /// from `rows_from` on. Without a purge, counters are the rows' alone.
    pub usage_before: Option<String>,
    pub rows_from: Micros,
}

impl Rebuild {
    /// The totals of the rows to roll up: on their days in `cal`, but none before the horizon's
    /// day (a zone behind the purge's puts its first hours on the day before).
    pub fn totals(&self) -> Totals {
        Totals { days_from: self.usage_before.clone(), ..Totals::default() }
    }
}

/// The plan of a rebuild after purges up to `horizon` (if any), when the oldest settled call
/// started at `oldest` (if any); `keyed_in` is the calendar the stored rollups are keyed in.
pub fn rebuild_plan(horizon: Option<Horizon>, oldest: Option<Micros>, keyed_in: &Calendar) -> Rebuild {
    let rollups = oldest.map(|oldest| day_key(keyed_in.local_date(oldest).max(horizon.map_or(NaiveDate::MIN, |h| h.day))));
    Rebuild { rollups, usage_before: horizon.map(|h| day_key(h.day)), rows_from: horizon.map_or(Micros::MIN, |h| h.before) }
}

/// (day, tenant ('' for none), agent, model, status)
pub type RollupKey = [String; 5];
/// calls, then `ROLLED` in order.
pub type RollupValues = Vec<i64>;

/// Daily totals accumulated from execution rows (`source_sql`), on no day before `days_from`.
#[derive(Default)]
pub struct Totals {
    days: HashMap<RollupKey, RollupValues>,
    days_from: Option<String>,
}

impl Totals {
    pub fn add_row(&mut self, cal: &Calendar, started_at: Micros, key: [String; 4], values: &[i64]) {
        let [tenant, agent, model, status] = key;
        let day = match (cal.period_key(Period::Daily, started_at), &self.days_from) {
            (day, Some(from)) if day < *from => from.clone(),
            (day, _) => day,
        };
        let t = self.days.entry([day, tenant, agent, model, status]).or_insert_with(|| vec![0; ROLLED.len() + 1]);
        t[0] += 1;
        for (t, v) in t[1..].iter_mut().zip(values) {
            *t = t.saturating_add(*v);
        }
    }
    pub fn rows(self) -> impl Iterator<Item = (RollupKey, RollupValues)> {
        self.days.into_iter()
    }
}

// ---------------------------------------------------------------- reading

/// How a query reads rollups: one statement per part of its time range (whole months from
/// the monthly table, other days from the daily one), each giving key columns then a total
/// and the calls per group (both negated for a part taken away); the parts of a day at
/// either end of the range (`between` two times), whose settled calls are read from the
/// executions table (a range of its time-ordered key); and whether calls still running must
/// be added from the executions table.
#[derive(Debug)]
pub struct Plan {
    pub statements: Vec<(String, Vec<String>)>,
    pub edges: Vec<Query>,
    pub running: bool,
}

/// The filter fields rollups can answer, each a key column of the tables.
const KEY_FIELDS: [&str; 4] = ["tenant_id", "agent", "model_id", "status"];

fn key_field(f: &Field) -> bool {
    KEY_FIELDS.contains(&f.0)
}

fn text(v: &Value) -> String {
    match v {
        Value::Text(s) => s.clone(),
        Value::Int(i) => i.to_string(),
    }
}

/// `Some(day)` when `t` is the start of a day in `cal`'s timezone.
fn day_start(cal: &Calendar, t: Micros) -> Option<NaiveDate> {
    let d = cal.local_date(t);
    (cal.start_of(d) == t).then_some(d)
}

fn day_key(d: NaiveDate) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day())
}

fn month_key(d: NaiveDate) -> String {
    format!("{:04}-{:02}", d.year(), d.month())
}

/// The plan for a total (`by` empty) or grouped query, or None when rollups cannot answer it
/// exactly (a filter on another field, a sum of a field not rolled up, or a tenant id of "",
/// which the tables use for "no tenant") or would save nothing (a range without a whole day).
pub fn plan(q: &Query, by: &[GroupKey], agg: &Aggregate, cal: &Calendar, d: Dialect) -> Option<Plan> {
    plan_on(q, by, agg, cal, d, cal.local_date(crate::clock::now_micros()))
}

/// `plan` as of `today` (which only decides how fast, never what it answers).
fn plan_on(q: &Query, by: &[GroupKey], agg: &Aggregate, cal: &Calendar, d: Dialect, today: NaiveDate) -> Option<Plan> {
    let value = match agg {
        Aggregate::Count => "calls",
        Aggregate::Sum(f) => ROLLED.iter().find(|c| **c == f.0)?,
    };
    let mut keys = Vec::with_capacity(by.len());
    // Whether the tenant is grouped by or filtered on: else the daily totals answer.
    let mut by_tenant = false;
    for k in by {
        keys.push(match k {
            GroupKey::Day => "period",
            GroupKey::Field(f) if f.0 == "tenant_id" => {
                by_tenant = true;
                "NULLIF(tenant_id, '')"
            }
            GroupKey::Field(f) if key_field(f) => f.0,
            GroupKey::Field(_) => return None,
        });
    }
    // The time range's bounds, and the filters other than it (which the edges' scans keep).
    let (mut from, mut until): (Option<Micros>, Option<Micros>) = (None, None);
    let mut others = Vec::with_capacity(q.filters.len());
    let mut conditions: Vec<(String, Vec<String>)> = Vec::new();
    let mut running = true;
    for f in &q.filters {
        by_tenant |= matches!(f, Filter::Eq(Field("tenant_id", _), _) | Filter::In(Field("tenant_id", _), _) | Filter::IsNull(Field("tenant_id", _)) | Filter::NotNull(Field("tenant_id", _)));
        if !matches!(f, Filter::Range(..)) {
            others.push(f.clone());
        }
        match f {
            Filter::Range(Field("started_at", _), a, b) => {
                from = from.max(*a);
                until = match (until, b) {
                    (Some(u), Some(b)) => Some(u.min(*b)),
                    (u, b) => u.or(*b),
                };
            }
            Filter::Eq(field, v) if key_field(field) => {
                let v = text(v);
                if field.0 == "tenant_id" && v.is_empty() {
                    return None;
                }
                running &= field.0 != "status" || v == "running";
                conditions.push((format!("{} = {{}}", field.0), vec![v]));
            }
            Filter::In(field, vs) if key_field(field) => {
                let vs: Vec<String> = vs.iter().map(text).collect();
                if field.0 == "tenant_id" && vs.iter().any(String::is_empty) {
                    return None;
                }
                running &= field.0 != "status" || vs.iter().any(|v| v == "running");
                let list = if vs.is_empty() { "NULL".to_string() } else { vec!["{}"; vs.len()].join(", ") };
                conditions.push((format!("{} IN ({list})", field.0), vs));
            }
            Filter::IsNull(field) if key_field(field) => {
                running &= field.0 != "status";
                conditions.push((if field.0 == "tenant_id" { "tenant_id = ''".into() } else { format!("{} IS NULL", field.0) }, vec![]));
            }
            Filter::NotNull(field) if key_field(field) => {
                if field.0 == "tenant_id" {
                    conditions.push(("tenant_id <> ''".into(), vec![]));
                }
            }
            _ => return None,
        }
    }
    let (lo, hi, edges) = whole_days(cal, from, until, &others)?;
    // One statement over `table` between two period keys, each row the group's keys, its total
    // and its calls; `minus`: both negated, for a part read to be taken away.
    let statement = |table: &str, (from, until): (Option<String>, Option<String>), minus: bool| {
        // A rollup whose calls all moved to another outcome (see `record_sql`) stays, empty.
        let mut parts = vec!["calls > 0".to_string()];
        let mut args = Vec::new();
        for (bound, op) in [(from, ">="), (until, "<")] {
            if let Some(b) = bound {
                args.push(b);
                parts.push(format!("period {op} {}", d.param(args.len())));
            }
        }
        for (sql, vs) in &conditions {
            let mut sql = sql.clone();
            for v in vs {
                args.push(v.clone());
                sql = sql.replacen("{}", &d.param(args.len()), 1);
            }
            parts.push(sql);
        }
        let w = format!(" WHERE {}", parts.join(" AND "));
        let group = if keys.is_empty() { String::new() } else { format!(" GROUP BY {}", keys.join(", ")) };
        let sign = if minus { "-" } else { "" };
        let totals = [value, "calls"].map(|c| format!("{sign}({})", d.sum(c)));
        let select: Vec<String> = keys.iter().map(|k| k.to_string()).chain(totals).collect();
        (format!("SELECT {} FROM {table}{w}{group}", select.join(", ")), args)
    };
    if !by_tenant {
        return Some(Plan { statements: vec![statement(TOTALS, (lo.map(day_key), hi.map(day_key)), false)], edges, running });
    }
    let days = |from: Option<NaiveDate>, until: Option<NaiveDate>| (from.map(day_key), until.map(day_key));
    let statements = match months_and_days(lo, hi, today) {
        Some(parts) if !by.contains(&GroupKey::Day) => parts
            .into_iter()
            .map(|Part { monthly, from, until, minus }| {
                if monthly {
                    statement(MONTHLY, (from.map(month_key), until.map(month_key)), minus)
                } else {
                    statement(DAILY, days(from, until), minus)
                }
            })
            .collect(),
        _ => vec![statement(DAILY, days(lo, hi), false)],
    };
    Some(Plan { statements, edges, running })
}

/// The whole days [lo, hi) of the time range [from, until) (None: unbounded), and a query per
/// part of a day at either end (`Plan::edges`: `others` and that part); None when the range
/// holds no whole day, so rollups would save nothing over reading its rows.
fn whole_days(cal: &Calendar, from: Option<Micros>, until: Option<Micros>, others: &[Filter]) -> Option<(Option<NaiveDate>, Option<NaiveDate>, Vec<Query>)> {
    let started_at = Field::parse("started_at").ok()?;
    let edge = |a: Micros, b: Micros| {
        let mut filters = others.to_vec();
        filters.push(Filter::Range(started_at, Some(a), Some(b)));
        Query { filters, ..Default::default() }
    };
    // The first whole day from `from` on, and the day after the last whole day before `until`.
    let lo = from.map(|a| day_start(cal, a).unwrap_or_else(|| cal.local_date(a) + Days::new(1)));
    let hi = until.map(|b| day_start(cal, b).unwrap_or_else(|| cal.local_date(b)));
    let lo_edge = from.zip(lo).filter(|(a, l)| cal.start_of(*l) != *a).map(|(a, l)| edge(a, cal.start_of(l)));
    let hi_edge = until.zip(hi).filter(|(b, h)| cal.start_of(*h) != *b).map(|(b, h)| edge(cal.start_of(h), b));
    let edges: Vec<Query> = lo_edge.into_iter().chain(hi_edge).collect();
    if !edges.is_empty() && lo.zip(hi).is_some_and(|(l, h)| l >= h) {
        return None;
    }
    Some((lo, hi, edges))
}

/// What reading a month of monthly rollups costs, in days of daily ones: a month has a row per
/// key seen in it, a day per key seen that day, so a month is never more rows than its days,
/// and as few as one day's when the same tenants, agents and models call every day (1,000
/// rows a month and 1,033 a day in the 1M bench).
const MONTH_COST: u64 = 1;

/// A part of a time range read from one rollup table: [from, until) (None: unbounded), whole
/// months (`monthly`) or days, added or taken away (`minus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Part {
    monthly: bool,
    from: Option<NaiveDate>,
    until: Option<NaiveDate>,
    minus: bool,
}

/// The days [lo, hi) as months and days to add or take away, reading as few rollups as it can;
/// None when reading the days alone costs no more. A bound inside a month either adds the days
/// from it to the month's end (or from the month's start to it) or reads the whole month and
/// takes away the days before it (or from it on): `last_n_days(30)` on the 4th reads last
/// month less its first 3 days and this month less the days after today (which hold no calls),
/// not 30 days of daily rollups (31K rows at 1M calls a month, 13-30 ms). Monthly rollups are the
/// sums of the daily ones, so the answer is the same. The cost counted is days of daily rollups
/// up to `today` (later ones hold only calls dated in the future) and `MONTH_COST` a month.
fn months_and_days(lo: Option<NaiveDate>, hi: Option<NaiveDate>, today: NaiveDate) -> Option<Vec<Part>> {
    let month = |d: NaiveDate| d.with_day(1).unwrap_or(d);
    let next_month = |d: NaiveDate| month(d) + Months::new(1);
    let tomorrow = today + Days::new(1);
    let span = |a: NaiveDate, b: NaiveDate| (b.min(tomorrow) - a.min(tomorrow)).num_days().unsigned_abs();
    let months = |a: NaiveDate, b: NaiveDate| {
        let n = |d: NaiveDate| i64::from(d.year()) * 12 + i64::from(d.month0());
        (n(b) - n(a)).unsigned_abs() * MONTH_COST
    };
    let day_part = |from, until, minus| Part { monthly: false, from: Some(from), until: Some(until), minus };
    // Each way in from a bound: (where the months start or end, the days part if any).
    let from_lo: Vec<(Option<NaiveDate>, Option<Part>)> = match lo {
        None => vec![(None, None)],
        Some(l) if l == month(l) => vec![(Some(l), None)],
        Some(l) => vec![(Some(next_month(l)), Some(day_part(l, next_month(l), false))), (Some(month(l)), Some(day_part(month(l), l, true)))],
    };
    let to_hi: Vec<(Option<NaiveDate>, Option<Part>)> = match hi {
        None => vec![(None, None)],
        Some(h) if h == month(h) => vec![(Some(h), None)],
        Some(h) => vec![(Some(month(h)), Some(day_part(month(h), h, false))), (Some(next_month(h)), Some(day_part(h, next_month(h), true)))],
    };
    let mut best: Option<(u64, Vec<Part>)> = None;
    for (start, lo_days) in &from_lo {
        for (end, hi_days) in &to_hi {
            // [lo, hi) = [lo, start) + [start, end) + [end, hi). (Both bounds' days inside one
            // month, added, would need that month taken away: never cheaper than the days.)
            if matches!((start, end), (Some(a), Some(b)) if a > b) {
                continue;
            }
            let mut parts: Vec<Part> = lo_days.iter().chain(hi_days).copied().collect();
            let mut cost: u64 = parts.iter().map(|p| p.from.zip(p.until).map_or(0, |(a, b)| span(a, b))).sum();
            if start.zip(*end).is_none_or(|(a, b)| a < b) {
                parts.insert(0, Part { monthly: true, from: *start, until: *end, minus: false });
                cost += start.zip(*end).map_or(0, |(a, b)| months(a, b));
            }
            if best.as_ref().is_none_or(|(c, _)| cost < *c) {
                best = Some((cost, parts));
            }
        }
    }
    let (cost, parts) = best?;
    match lo.zip(hi) {
        Some((l, h)) if l >= h || span(l, h) <= cost => None,
        _ => Some(parts),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::budget::{self, GlobalBudgets, Limits};
    use crate::execution::{Cell, Completion, NewExecution, Status};
    use crate::money::Nanos;
    use crate::pricing::{Cost, Usage};
    use crate::store::tests::{admit_request, finish_request};
    use crate::store::{Admitted, Store};

    fn at(s: &str) -> Micros {
        chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp_micros()
    }

    fn range(lo: Option<&str>, hi: Option<&str>) -> Query {
        Query { filters: vec![Filter::Range(Field::parse("started_at").unwrap(), lo.map(at), hi.map(at))], ..Default::default() }
    }

    fn tables_and_bounds(p: &Plan) -> Vec<(String, Vec<String>)> {
        p.statements.iter().map(|(sql, args)| (sql.split(" FROM ").nth(1).unwrap().split(' ').next().unwrap().to_string(), args.clone())).collect()
    }

    /// A day well after every range below: what is planned then is what was planned before
    /// the days after today counted as empty.
    fn later() -> NaiveDate {
        NaiveDate::from_ymd_opt(2030, 1, 1).unwrap()
    }

    #[test]
    fn whole_months_read_the_monthly_table_and_the_days_around_them_the_daily_one() {
        // By tenant (the daily totals answer the others).
        let cal = Calendar::new("Europe/Berlin").unwrap();
        let s = |x: &str| x.to_string();
        let tenant = [GroupKey::Field(Field::parse("tenant_id").unwrap())];
        let plan = |q: &Query, by: &[GroupKey]| plan_on(q, by, &Aggregate::Count, &cal, Dialect::Postgres, later()).unwrap();
        // Berlin midnights: Oct 15 and Jan 3 (CET, UTC+1; Oct 15 is CEST, UTC+2).
        let p = plan(&range(Some("2026-10-14T22:00:00Z"), Some("2027-01-02T23:00:00Z")), &tenant);
        assert_eq!(
            tables_and_bounds(&p),
            vec![
                (s("monthly_rollups"), vec![s("2026-10"), s("2027-01")]),
                (s("daily_rollups"), vec![s("2026-10-01"), s("2026-10-15")]),
                (s("daily_rollups"), vec![s("2027-01-01"), s("2027-01-03")]),
            ]
        );
        assert!(p.running);
        // Inside one month, or by day: days only.
        let p = plan(&range(Some("2026-11-01T23:00:00Z"), Some("2026-11-09T23:00:00Z")), &tenant);
        assert_eq!(tables_and_bounds(&p), vec![(s("daily_rollups"), vec![s("2026-11-02"), s("2026-11-10")])]);
        let p = plan(&Query::default(), &[GroupKey::Day, tenant[0]]);
        assert_eq!(tables_and_bounds(&p), vec![(s("daily_rollups"), vec![])]);
        // Open-ended: months before the bound's month, then its days.
        let p = plan(&range(None, Some("2026-11-04T23:00:00Z")), &tenant);
        assert_eq!(
            tables_and_bounds(&p),
            vec![(s("monthly_rollups"), vec![s("2026-11")]), (s("daily_rollups"), vec![s("2026-11-01"), s("2026-11-05")])]
        );
    }

    /// The last 30 days read whole months and take away the days outside the range when that
    /// reads fewer daily rollups, counting the days after today as empty: on Dec 3, November
    /// and December less November's first 3 days and December's days from the 4th (none yet):
    /// 3 days and 2 months read, not 30 days; on Dec 15, November's last 15 days and December
    /// less its days from the 16th.
    #[test]
    fn the_last_30_days_read_whole_months_less_the_days_outside() {
        let cal = Calendar::new("UTC").unwrap();
        let s = |x: &str| x.to_string();
        let tenant = [GroupKey::Field(Field::parse("tenant_id").unwrap())];
        let last_30 = |today: &str| {
            let day = NaiveDate::parse_from_str(today, "%Y-%m-%d").unwrap();
            let (lo, hi) = cal.last_n_days(cal.start_of(day), 30);
            let q = Query { filters: vec![Filter::Range(Field::parse("started_at").unwrap(), Some(lo), Some(hi))], ..Default::default() };
            let p = plan_on(&q, &tenant, &Aggregate::Sum(Field::parse("total_cost").unwrap()), &cal, Dialect::Sqlite, day).unwrap();
            p.statements.iter().map(|(sql, args)| (sql.starts_with("SELECT NULLIF(tenant_id, ''), -"), tables_and_bounds(&Plan { statements: vec![(sql.clone(), args.clone())], edges: vec![], running: false }).remove(0))).collect::<Vec<_>>()
        };
        assert_eq!(
            last_30("2026-12-03"),
            vec![
                (false, (s("monthly_rollups"), vec![s("2026-11"), s("2027-01")])),
                (true, (s("daily_rollups"), vec![s("2026-11-01"), s("2026-11-04")])),
                (true, (s("daily_rollups"), vec![s("2026-12-04"), s("2027-01-01")])),
            ]
        );
        assert_eq!(
            last_30("2026-12-15"),
            vec![
                (false, (s("monthly_rollups"), vec![s("2026-12"), s("2027-01")])),
                (false, (s("daily_rollups"), vec![s("2026-11-16"), s("2026-12-01")])),
                (true, (s("daily_rollups"), vec![s("2026-12-16"), s("2027-01-01")])),
            ]
        );
        // Taken away: the total and the calls, so a group left with none is left out.
        let p = plan_on(&range(Some("2026-11-04T00:00:00Z"), Some("2026-12-04T00:00:00Z")), &tenant, &Aggregate::Count, &cal, Dialect::Postgres, later()).unwrap();
        assert!(p.statements[1].0.starts_with("SELECT NULLIF(tenant_id, ''), -(COALESCE(SUM(calls), 0)::BIGINT), -(COALESCE(SUM(calls), 0)::BIGINT) FROM daily_rollups"), "{:?}", p.statements);
    }

    /// A bound inside a day: the whole days read rollups, and the part of the day at that end
    /// is read from the rows (the settled ones; the running ones come with the others).
    #[test]
    fn the_parts_of_days_at_the_ends_of_a_range_are_read_from_the_rows() {
        let cal = Calendar::new("Europe/Berlin").unwrap();
        let s = |x: &str| x.to_string();
        let tenant = Field::parse("tenant_id").unwrap();
        let mut q = range(Some("2026-10-14T08:30:00Z"), Some("2027-01-02T10:00:00Z"));
        q.filters.insert(0, Filter::Eq(tenant, Value::Text("acme".into())));
        let p = plan_on(&q, &[GroupKey::Field(tenant)], &Aggregate::Count, &cal, Dialect::Sqlite, later()).unwrap();
        // Berlin's Oct 15 began at 22:00 UTC on the 14th, Jan 2 at 23:00 UTC on Jan 1.
        assert_eq!(
            tables_and_bounds(&p),
            vec![
                (s("monthly_rollups"), vec![s("2026-10"), s("2027-01"), s("acme")]),
                (s("daily_rollups"), vec![s("2026-10-01"), s("2026-10-15"), s("acme")]),
                (s("daily_rollups"), vec![s("2027-01-01"), s("2027-01-02"), s("acme")]),
            ]
        );
        let edge = |a: &str, b: &str| Query { filters: vec![q.filters[0].clone(), range(Some(a), Some(b)).filters.remove(0)], ..Default::default() };
        assert_eq!(p.edges, vec![edge("2026-10-14T08:30:00Z", "2026-10-14T22:00:00Z"), edge("2027-01-01T23:00:00Z", "2027-01-02T10:00:00Z")]);
        assert!(p.running);
        // Open at one end; bounds at the start of a day have no edge.
        let p = plan_on(&range(None, Some("2026-11-04T12:00:00Z")), &[], &Aggregate::Count, &cal, Dialect::Sqlite, later()).unwrap();
        assert_eq!(tables_and_bounds(&p), vec![(s("daily_totals"), vec![s("2026-11-04")])]);
        assert_eq!(p.edges, vec![range(Some("2026-11-03T23:00:00Z"), Some("2026-11-04T12:00:00Z"))]);
        assert!(plan_on(&range(Some("2026-11-03T23:00:00Z"), None), &[], &Aggregate::Count, &cal, Dialect::Sqlite, later()).unwrap().edges.is_empty());
    }

    #[test]
    fn the_daily_totals_answer_unless_the_tenant_is_grouped_by_or_filtered_on() {
        let cal = Calendar::new("UTC").unwrap();
        let s = |x: &str| x.to_string();
        let f = |n: &str| Field::parse(n).unwrap();
        let month = range(Some("2026-10-01T00:00:00Z"), Some("2026-12-03T00:00:00Z"));
        let agent = [GroupKey::Field(f("agent"))];
        let tenant = [GroupKey::Field(f("tenant_id"))];
        for d in [Dialect::Sqlite, Dialect::Postgres] {
            let p = plan(&month, &agent, &Aggregate::Count, &cal, d).unwrap();
            assert_eq!(tables_and_bounds(&p), vec![(s("daily_totals"), vec![s("2026-10-01"), s("2026-12-03")])]);
            assert!(plan(&Query::default(), &[], &Aggregate::Count, &cal, d).unwrap().statements[0].0.contains("FROM daily_totals"));
            assert_eq!(tables_and_bounds(&plan(&month, &tenant, &Aggregate::Count, &cal, d).unwrap())[0].0, "monthly_rollups");
            for filter in [Filter::Eq(f("tenant_id"), Value::Text("acme".into())), Filter::IsNull(f("tenant_id")), Filter::NotNull(f("tenant_id"))] {
                let mut q = month.clone();
                q.filters.push(filter);
                assert_eq!(tables_and_bounds(&plan(&q, &agent, &Aggregate::Count, &cal, d).unwrap())[0].0, "monthly_rollups", "{q:?}");
            }
        }
    }

    #[test]
    fn only_exact_answers_are_planned() {
        let cal = Calendar::new("UTC").unwrap();
        let f = |n: &str| Field::parse(n).unwrap();
        let count = Aggregate::Count;
        // A range without a whole day, another field, a sum not rolled up, the empty tenant id.
        assert!(plan(&range(Some("2026-11-01T00:00:01Z"), Some("2026-11-02T05:00:00Z")), &[], &count, &cal, Dialect::Sqlite).is_none());
        assert!(plan(&range(Some("2026-11-01T00:00:01Z"), Some("2026-11-02T00:00:00Z")), &[], &count, &cal, Dialect::Sqlite).is_none());
        let q = |filter: Filter| Query { filters: vec![filter], ..Default::default() };
        assert!(plan(&q(Filter::Eq(f("provider"), Value::Text("x".into()))), &[], &count, &cal, Dialect::Sqlite).is_none());
        assert!(plan(&Query::default(), &[GroupKey::Field(f("provider"))], &count, &cal, Dialect::Sqlite).is_none());
        assert!(plan(&Query::default(), &[], &Aggregate::Sum(f("cached_tokens")), &cal, Dialect::Sqlite).is_some());
        assert!(plan(&q(Filter::Eq(f("tenant_id"), Value::Text("".into()))), &[], &count, &cal, Dialect::Sqlite).is_none());
        // Statuses that leave out running calls need no look at the executions table.
        let p = plan(&q(Filter::In(f("status"), vec![Value::Text("error".into()), Value::Text("timeout".into())])), &[], &count, &cal, Dialect::Postgres).unwrap();
        assert!(!p.running);
        assert!(p.statements[0].0.contains("status IN ($1, $2)"), "{:?}", p.statements);
        assert!(plan(&q(Filter::Eq(f("status"), Value::Text("running".into()))), &[], &count, &cal, Dialect::Sqlite).unwrap().running);
    }

    #[test]
    fn the_migration_number_names_the_rollup_migration() {
        for migrations in [super::super::schema::MIGRATIONS, super::super::pg_schema::MIGRATIONS] {
            assert!(migrations[MIGRATION - 1].contains("CREATE TABLE daily_rollups"));
            for c in ROLLED {
                assert!(migrations[MIGRATION - 1].contains(c), "{c}");
            }
        }
    }

    const DAY: Micros = 86_400_000_000;

    /// Shared by both stores' tests: on random calls over ten weeks in New York time (every
    /// outcome, calls still running, calls abandoned and then settled after all), every total
    /// and grouped total that rollups answer equals the same query over the rows; after the
    /// rows of the first weeks are deleted (`sql` runs a statement on the database), and after
    /// the counters are rebuilt, the answers stay as they were. `open_again` reopens the
    /// database after `sql` made it look like one from before the rollups' migration.
    pub(crate) fn rollups_answer_like_rows(store: &dyn Store, sql: &dyn Fn(&str), open_again: &dyn Fn() -> Box<dyn Store>) {
        let cal = Calendar::new("America/New_York").unwrap();
        store.set_timezone(&cal).unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        let t0 = chrono::DateTime::parse_from_rfc3339("2026-09-20T12:00:00Z").unwrap().timestamp_micros();
        let v7 = |t: Micros| uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, (t / 1_000_000) as u64, (t % 1_000_000 * 1000) as u32)).to_string();
        let tenants = [None, Some("acme"), Some("beta"), Some("Gamma"), Some("é")];
        let (agents, models) = (["A", "B"], ["mock/x", "mock/y"]);
        let open = GlobalBudgets { limits: Limits { daily_cost: Some(Nanos(i64::MAX / 4)), ..Default::default() }, ..Default::default() };
        let closed = GlobalBudgets { limits: Limits { daily_executions: Some(0), ..Default::default() }, ..Default::default() };
        let mut t = t0;
        let mut unsettled: Vec<NewExecution> = Vec::new();
        let n = 400;
        for i in 0..n {
            // About six hours apart (ten weeks in all); the last calls close together, so a few stay running.
            t += if i < n - 5 { rng.i64(1..12 * 3_600_000_000) } else { 1_000_000 };
            let e = NewExecution {
                id: v7(t),
                agent: agents[rng.usize(..2)].into(),
                model_id: models[rng.usize(..2)].into(),
                provider: "mock".into(),
                tenant_id: tenants[rng.usize(..tenants.len())].map(str::to_string),
                started_at: t,
                metadata: "{}".into(),
                ..Default::default()
            };
            if !admit(store, &e, &cal, if rng.u8(..10) == 0 { &closed } else { &open }) {
                continue;
            }
            // One call in ten is left unsettled for now: the next admission after its lease
            // closes it as abandoned, and some are settled later anyway (taken over).
            if i >= n - 5 || rng.u8(..10) == 0 {
                unsettled.push(e);
                continue;
            }
            settle(store, &e, &cal, &mut rng);
            if rng.bool() && i < n - 5 {
                if let Some(old) = unsettled.pop() {
                    settle(store, &old, &cal, &mut rng);
                }
            }
        }
        let running = Query { filters: vec![Filter::Eq(Field::parse("status").unwrap(), Value::Text("running".into()))], ..Default::default() };
        assert!(store.query_aggregate(&running, &Aggregate::Count).unwrap() != Cell::Int(0), "some calls are still running");

        let queries = random_queries(&cal, t0, &mut rng);
        let before = answers(store, &queries);
        for (q, by, agg, answer) in &before {
            // The same query kept off the rollups by a filter every row passes.
            let mut rows = q.clone();
            rows.filters.push(Filter::NotNull(Field::parse("id").unwrap()));
            if by.is_empty() {
                assert_eq!(store.query_aggregate(q, agg).unwrap(), store.query_aggregate(&rows, agg).unwrap(), "{q:?} {agg:?}");
            } else {
                assert_eq!(answer, &store.query_grouped(&rows, by, agg).unwrap(), "{q:?} {by:?} {agg:?}");
            }
        }
        // Purge the first three weeks' rows (whole days): the totals stay.
        let cut = cal.start_of(cal.local_date(t0 + 21 * DAY));
        sql(&format!("DELETE FROM executions WHERE started_at < {cut}"));
        assert_eq!(answers(store, &queries), before);
        store.rebuild_counters().unwrap();
        assert_eq!(answers(store, &queries), before);
        // Another timezone moves calls between days, never in or out of all-time totals; the
        // purged days keep their old zone's keys.
        store.set_timezone(&Calendar::new("Asia/Kolkata").unwrap()).unwrap();
        for (q, by, agg, answer) in &before {
            if q.filters.iter().all(|f| !matches!(f, Filter::Range(..))) && !by.contains(&GroupKey::Day) {
                assert_eq!(&store.query_grouped(q, by, agg).unwrap(), answer, "{q:?} {by:?} {agg:?}");
            }
        }
        // A database from before rollups: the migration fills them from the rows that are left.
        // IF EXISTS: SQLite's migration 18 and PostgreSQL's 20 dropped the index (calls in flight
        // are found from their reservations).
        sql("DROP TABLE daily_rollups; DROP TABLE monthly_rollups; DROP INDEX IF EXISTS executions_running;
             DROP TABLE response_cache; ALTER TABLE executions DROP COLUMN cached");
        sql(&format!("UPDATE schema_version SET version = {}", MIGRATION - 1));
        let reopened = open_again();
        for (q, by, agg, _) in &before {
            let mut rows = q.clone();
            rows.filters.push(Filter::NotNull(Field::parse("id").unwrap()));
            assert_eq!(reopened.query_aggregate(q, agg).unwrap(), reopened.query_aggregate(&rows, agg).unwrap(), "{q:?} {agg:?}");
            if !by.is_empty() {
                assert_eq!(reopened.query_grouped(q, by, agg).unwrap(), reopened.query_grouped(&rows, by, agg).unwrap(), "{q:?} {by:?} {agg:?}");
            }
        }
    }

    /// Admits `e` under `global` at its start (a lease of an hour); whether it may go.
    fn admit(store: &dyn Store, e: &NewExecution, cal: &Calendar, global: &GlobalBudgets) -> bool {
        let plan = budget::Plan { global, agent: &e.agent, tenant_id: e.tenant_id.as_deref(), tenant_override: None };
        let admitted = store.admit(&admit_request(e, plan, budget::estimate(Nanos(1000), 10), cal, e.started_at + 3_600_000_000)).unwrap();
        matches!(admitted, Admitted::Go { .. })
    }

    /// Shared by both stores' tests (issue 19): a purge whose cutoff falls inside a day deletes
    /// the whole days before it, and `rebuild_counters` afterwards leaves every whole-day total,
    /// daily total and counter (this month's too) as it was, also for a call that ran through
    /// the purge and was settled after it; after zone changes each call is still counted once.
    pub(crate) fn rebuild_after_a_purge_keeps_totals_and_counters(store: &dyn Store) {
        let cal = Calendar::new("America/New_York").unwrap();
        store.set_timezone(&cal).unwrap();
        let mut rng = fastrand::Rng::with_seed(19);
        let v7 = |t: Micros| uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, (t / 1_000_000) as u64, (t % 1_000_000 * 1000) as u32)).to_string();
        let day = |d: u32| cal.start_of(NaiveDate::from_ymd_opt(2026, 11, d).unwrap());
        let hour = 3_600_000_000;
        let open = GlobalBudgets { limits: Limits { daily_cost: Some(Nanos(i64::MAX / 4)), ..Default::default() }, ..Default::default() };
        let closed = GlobalBudgets { limits: Limits { daily_executions: Some(0), ..Default::default() }, ..Default::default() };
        let execution = |t: Micros, i: usize| NewExecution {
            id: v7(t),
            agent: ["A", "B"][i % 2].into(),
            model_id: "mock/x".into(),
            provider: "mock".into(),
            tenant_id: [None, Some("acme"), Some("beta")][i % 3].map(str::to_string),
            started_at: t,
            metadata: "{}".into(),
            ..Default::default()
        };
        // Every hour from Nov 8 to Nov 11 (New York), one call in eight refused.
        for i in 0..96 {
            let e = execution(day(8) + (i as i64) * hour + hour / 2, i);
            if admit(store, &e, &cal, if i % 8 == 0 { &closed } else { &open }) {
                settle(store, &e, &cal, &mut rng);
            }
        }
        // Started on Nov 9, still running when the purge comes.
        let late = execution(day(9) + 5 * hour, 1);
        assert!(admit(store, &late, &cal, &open));

        let f = |n: &str| Field::parse(n).unwrap();
        let whole_days = Filter::Range(f("started_at"), Some(day(8)), Some(day(12)));
        let queries: Vec<(Query, Vec<GroupKey>, Aggregate)> = vec![
            (Query { filters: vec![whole_days.clone()], ..Default::default() }, vec![GroupKey::Field(f("tenant_id"))], Aggregate::Count),
            (Query { filters: vec![whole_days.clone()], ..Default::default() }, vec![GroupKey::Day, GroupKey::Field(f("status"))], Aggregate::Sum(f("total_cost"))),
            (Query { filters: vec![whole_days], ..Default::default() }, vec![GroupKey::Field(f("agent"))], Aggregate::Sum(f("total_tokens"))),
            (Query::default(), vec![GroupKey::Day], Aggregate::Count),
        ];
        let scopes = ["global", "agent:A", "agent:B", "tenant:acme", "tenant:beta"];
        let counters = || -> Vec<(String, String, budget::Usage)> {
            let mut out = Vec::new();
            for scope in scopes {
                out.push((scope.to_string(), "2026-11".to_string(), store.usage(scope, "2026-11").unwrap()));
                out.extend(store.usage_daily(scope, "2026-11-01").unwrap().into_iter().map(|(d, u)| (scope.to_string(), d, u)));
            }
            out
        };
        let (answers_before, counters_before) = (answers(store, &queries), counters());
        assert!(counters_before.iter().any(|(s, p, u)| s == "tenant:acme" && p == "2026-11-08" && u.executions > 0));

        // Executions older than Nov 10, 13:00: the whole days before Nov 10 go, Nov 10 stays.
        let rows = |from: Micros| {
            let q = Query { filters: vec![Filter::Range(f("started_at"), Some(from), None)], ..Default::default() };
            store.query_rows(&q).unwrap().len()
        };
        let (all, kept) = (rows(day(1)), rows(day(10)));
        let done = store.purge_batch(None, Some(day(10) + 13 * hour), 500).unwrap();
        assert_eq!(done.executions as usize, all - kept - 1);
        assert_eq!(rows(day(10)), kept);
        assert_eq!(rows(day(1)), kept + 1, "only the running call is left of the purged days");
        assert_eq!((answers(store, &queries), counters()), (answers_before, counters_before));

        settle(store, &late, &cal, &mut rng);
        let (answers_before, counters_before) = (answers(store, &queries), counters());
        store.rebuild_counters().unwrap();
        assert_eq!(answers(store, &queries), answers_before);
        assert_eq!(counters(), counters_before);
        store.rebuild_counters().unwrap();
        assert_eq!(counters(), counters_before);

        // Other zones move calls between days and keep the purged days' keys; a month's counter
        // still counts each call once, whichever way the zone moves.
        let month = |scope: &str| store.usage(scope, "2026-11").unwrap();
        let months: Vec<budget::Usage> = scopes.iter().map(|s| month(s)).collect();
        for zone in ["America/Los_Angeles", "Asia/Kolkata", "America/New_York"] {
            store.set_timezone(&Calendar::new(zone).unwrap()).unwrap();
            assert_eq!(scopes.iter().map(|s| month(s)).collect::<Vec<_>>(), months, "{zone}");
            store.rebuild_counters().unwrap();
            assert_eq!(scopes.iter().map(|s| month(s)).collect::<Vec<_>>(), months, "{zone}");
        }
    }

    type Answer = (Query, Vec<GroupKey>, Aggregate, Vec<(crate::store::GroupValues, Cell)>);

    fn answers(store: &dyn Store, queries: &[(Query, Vec<GroupKey>, Aggregate)]) -> Vec<Answer> {
        queries.iter().map(|(q, by, agg)| (q.clone(), by.clone(), agg.clone(), store.query_grouped(q, by, agg).unwrap())).collect()
    }

    fn settle(store: &dyn Store, e: &NewExecution, cal: &Calendar, rng: &mut fastrand::Rng) {
        let status = [Status::Success, Status::Success, Status::Error, Status::Timeout, Status::Cancelled][rng.usize(..5)];
        let cost = rng.i64(0..5_000_000);
        let done = Completion {
            status,
            error_class: (status != Status::Success).then(|| "ProviderError".into()),
            error_message: None,
            chosen_model_id: Some(e.model_id.clone()),
            provider: None,
            completed_at: e.started_at + 1000,
            duration_ms: rng.i64(1..9000),
            usage: Usage::new(rng.i64(0..900), rng.i64(0..900), 0),
            cost: Cost { input: Nanos(cost / 3), output: Nanos(cost - cost / 3), ..Cost::default() },
            attempts: vec![],
            finish_reason: None,
            response: None,
            time_to_first_token_ms: rng.bool().then(|| rng.i64(1..500)),
            cached: false,
        };
        store.finish(&finish_request(e, &done, cal, true)).unwrap();
    }

    fn random_queries(cal: &Calendar, t0: Micros, rng: &mut fastrand::Rng) -> Vec<(Query, Vec<GroupKey>, Aggregate)> {
        let f = |n: &str| Field::parse(n).unwrap();
        let text = |s: &str| Value::Text(s.into());
        let day = |n: i64| cal.start_of(cal.local_date(t0 + n * DAY));
        let mut out = Vec::new();
        for i in 0..120 {
            let mut filters = Vec::new();
            match rng.u8(..6) {
                0 => filters.push(Filter::Eq(f("tenant_id"), text(["acme", "beta", "é"][rng.usize(..3)]))),
                1 => filters.push(Filter::IsNull(f("tenant_id"))),
                2 => filters.push(Filter::NotNull(f("tenant_id"))),
                3 => filters.push(Filter::In(f("tenant_id"), vec![text("acme"), text("Gamma")])),
                _ => {}
            }
            match rng.u8(..5) {
                0 => filters.push(Filter::In(f("status"), vec![text("error"), text("timeout")])),
                1 => filters.push(Filter::Eq(f("status"), text(["success", "running", "blocked", "error"][rng.usize(..4)]))),
                2 => filters.push(Filter::Eq(f("agent"), text("B"))),
                _ => {}
            }
            // Whole days from within the purged weeks' end on, or none: a month, some days, open ends.
            let (lo, hi) = (rng.i64(21..60), rng.i64(22..80));
            match i % 5 {
                0 => filters.push(Filter::Range(f("started_at"), Some(day(lo)), Some(day(hi)))),
                1 => filters.push(Filter::Range(f("started_at"), Some(day(lo)), None)),
                2 => {
                    let (a, b) = cal.this_month(t0 + 45 * DAY);
                    filters.push(Filter::Range(f("started_at"), Some(a), Some(b)));
                }
                3 => filters.push(Filter::Range(f("started_at"), Some(day(lo)), Some(day(hi + 10)))),
                // Bounds inside days (one end or both) at least a whole day apart.
                _ if i % 10 == 4 => {
                    let inside = |d: i64, rng: &mut fastrand::Rng| day(d) + rng.i64(1..20 * 3_600_000_000);
                    let a = (rng.u8(..3) > 0).then(|| inside(lo, rng));
                    let b = if a.is_none() || rng.bool() { inside(lo + 2 + rng.i64(0..20), rng) } else { day(lo + 2) };
                    filters.push(Filter::Range(f("started_at"), a, Some(b)));
                }
                _ => {}
            }
            let keys = [GroupKey::Field(f("tenant_id")), GroupKey::Field(f("agent")), GroupKey::Field(f("model_id")), GroupKey::Field(f("status")), GroupKey::Day];
            let by: Vec<GroupKey> = keys.iter().filter(|_| rng.u8(..3) == 0).copied().collect();
            let agg = match rng.u8(..4) {
                0 => Aggregate::Count,
                1 => Aggregate::Sum(f("total_cost")),
                2 => Aggregate::Sum(f("total_tokens")),
                _ => Aggregate::Sum(f("time_to_first_token_ms")),
            };
            let q = Query { filters, ..Default::default() };
            assert!(plan(&q, &by, &agg, cal, Dialect::Sqlite).is_some(), "{q:?}");
            out.push((q, by, agg));
        }
        // Some read a whole month and take days away.
        let takes_away = |(q, by, agg): &(Query, Vec<GroupKey>, Aggregate)| {
            plan(q, by, agg, cal, Dialect::Postgres).is_some_and(|p| p.statements.iter().any(|(sql, _)| sql.contains("-(COALESCE")))
        };
        assert!(out.iter().filter(|q| takes_away(q)).count() >= 5);
        // Some read the parts of days at their ends from the rows.
        assert!(out.iter().filter(|(q, by, agg)| plan(q, by, agg, cal, Dialect::Sqlite).is_some_and(|p| !p.edges.is_empty())).count() >= 10);
        out
    }
}
