//! Reads for queries, the dashboard and the CLI: executions (from rows or rollups), counters,
//! rate use and tenants.

use postgres::fallible_iterator::FallibleIterator;
use postgres::Row as PgRow;

use super::connect::PgResult;
use super::counters::usage_at;
use super::db::{typed, Autocommit, Db, Param};
use super::rates::{in_flight, window_use};
use super::rebuild::stored_timezone;
use super::PostgresStore;
use crate::budget;
use crate::clock::{Calendar, Micros};
use crate::error::Result;
use crate::execution::{Aggregate, Cell, Details, Field, Filter, GroupKey, Kind, Query, Row, Value, FIELDS};
use crate::money::Nanos;
use crate::ratelimit::RateUsage;
use crate::store::query::{self, GroupValues, Groups, Rows};
use crate::store::rollups::{self, Dialect};
use crate::store::{all_columns, calendar_of, SEEN_COLUMNS};
use crate::tenancy::SeenTenant;

pub(super) type SqlArgs = Vec<Box<dyn Param + Send>>;

/// A filter value as the column's type: numbers given for text fields compare as their text,
/// text given for numeric fields as the number it spells (or matches nothing).
pub(super) fn sql_value(kind: Kind, v: &Value) -> Box<dyn Param + Send> {
    match (kind, v) {
        (Kind::Text | Kind::Json, Value::Text(s)) => Box::new(s.clone()),
        (Kind::Text | Kind::Json, Value::Int(i)) => Box::new(i.to_string()),
        (_, Value::Int(i)) => Box::new(*i),
        (_, Value::Text(s)) => Box::new(s.trim().parse::<i64>().ok()),
    }
}

/// " WHERE ..." for a query's filters; field names come from the fixed `FIELDS` list.
pub(super) fn where_clause(q: &Query) -> (String, SqlArgs) {
    let mut parts = Vec::new();
    let mut args: SqlArgs = Vec::new();
    for f in &q.filters {
        match f {
            Filter::Eq(Field(n, k), v) => {
                args.push(sql_value(*k, v));
                parts.push(format!("{n} = ${}", args.len()));
            }
            Filter::In(Field(n, k), vs) => {
                let mut ph = Vec::new();
                for v in vs {
                    args.push(sql_value(*k, v));
                    ph.push(format!("${}", args.len()));
                }
                parts.push(if ph.is_empty() { "FALSE".into() } else { format!("{n} IN ({})", ph.join(", ")) });
            }
            Filter::IsNull(Field(n, _)) => parts.push(format!("{n} IS NULL")),
            Filter::NotNull(Field(n, _)) => parts.push(format!("{n} IS NOT NULL")),
            Filter::Before(t, id) => {
                args.push(Box::new(*t));
                args.push(Box::new(id.clone()));
                parts.push(format!("(started_at, id) < (${}, ${})", args.len() - 1, args.len()));
            }
            Filter::Range(Field(n, _), lo, hi) => {
                if let Some(lo) = lo {
                    args.push(Box::new(*lo));
                    parts.push(format!("{n} >= ${}", args.len()));
                }
                if let Some(hi) = hi {
                    args.push(Box::new(*hi));
                    parts.push(format!("{n} < ${}", args.len()));
                }
            }
        }
    }
    let w = if parts.is_empty() { String::new() } else { format!(" WHERE {}", parts.join(" AND ")) };
    (w, args)
}

pub(super) fn params(args: &SqlArgs) -> Vec<&dyn Param> {
    args.iter().map(|a| a.as_ref() as &dyn Param).collect()
}

pub(super) fn cell(r: &PgRow, i: usize, kind: Kind) -> PgResult<Cell> {
    Ok(match kind {
        Kind::Text => r.try_get::<_, Option<String>>(i)?.map_or(Cell::Null, Cell::Text),
        Kind::Json => r.try_get::<_, Option<String>>(i)?.map_or(Cell::Null, Cell::Json),
        Kind::Int => r.try_get::<_, Option<i64>>(i)?.map_or(Cell::Null, Cell::Int),
        Kind::Money => r.try_get::<_, Option<i64>>(i)?.map_or(Cell::Null, |n| Cell::Money(Nanos(n))),
        Kind::Time => r.try_get::<_, Option<i64>>(i)?.map_or(Cell::Null, Cell::Time),
    })
}

pub(super) fn read_row(r: &PgRow) -> PgResult<Row> {
    FIELDS.iter().enumerate().map(|(i, (n, k))| Ok((*n, cell(r, i, *k)?))).collect()
}

pub(super) fn aggregate_sql(agg: &Aggregate) -> (String, Kind) {
    match agg {
        Aggregate::Count => ("COUNT(*)".into(), Kind::Int),
        // SUM of BIGINT is NUMERIC in PostgreSQL; the total must fit 64 bits, as in SQLite.
        Aggregate::Sum(Field(n, k)) => (format!("COALESCE(SUM({n}), 0)::BIGINT"), *k),
    }
}

/// The smallest string above every string that starts with `prefix` (None: there is none).
pub(super) fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (last as u32 + 1..=char::MAX as u32).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// A grouped query answered by rollups, plus the matching calls still running.
pub(super) fn from_rollups(db: &mut Db<'_, Autocommit>, q: &Query, by: &[GroupKey], agg: &Aggregate, cal: &Calendar, plan: &rollups::Plan) -> PgResult<Vec<(GroupValues, Cell)>> {
    let mut groups = Groups::new(agg);
    for (sql, args) in &plan.statements {
        let args: Vec<&dyn Param> = args.iter().map(|a| a as &dyn Param).collect();
        for r in db.query(sql, &args)? {
            groups.begin();
            for i in 0..by.len() {
                groups.part(r.try_get::<_, Option<&str>>(i)?.map(str::as_bytes));
            }
            groups.add_calls(r.try_get(by.len())?, r.try_get(by.len() + 1)?);
        }
    }
    for edge in &plan.edges {
        scan(db, edge, by, agg, cal, Rows::Settled, &mut groups)?;
    }
    if plan.running {
        scan(db, q, by, agg, cal, Rows::Running, &mut groups)?;
    }
    Ok(groups.finish()?)
}

/// Adds the matching rows' totals to `groups`: grouped by the server, or streamed when the
/// day (in the database's timezone, computed here) is a key. `rows`: all, or just the calls
/// still running or the settled ones.
pub(super) fn scan(db: &mut Db<'_, Autocommit>, q: &Query, by: &[GroupKey], agg: &Aggregate, cal: &Calendar, rows: Rows, groups: &mut Groups) -> PgResult<()> {
    let (w, args) = where_clause(q);
    let w = rows.narrow(w);
    let cols = query::key_columns(by);
    let day = by.contains(&GroupKey::Day).then(|| cols.len() - 1);
    let sql = if day.is_some() {
        let select: Vec<String> = cols.iter().map(|c| c.to_string()).chain([query::row_value(agg)]).collect();
        format!("SELECT {} FROM executions{w}", select.join(", "))
    } else {
        let select: Vec<String> = cols.iter().map(|c| c.to_string()).chain([aggregate_sql(agg).0]).collect();
        let group = if cols.is_empty() { String::new() } else { format!(" GROUP BY {}", cols.join(", ")) };
        format!("SELECT {} FROM executions{w}{group}", select.join(", "))
    };
    let mut rows = db.c.query_typed_raw(&sql, typed(&params(&args)))?;
    while let Some(r) = rows.next()? {
        let started_at = match day {
            Some(i) => r.try_get(i)?,
            None => 0,
        };
        query::row_key(groups, by, cal, started_at, |g, i| -> PgResult<()> {
            g.part(r.try_get::<_, Option<&str>>(i)?.map(str::as_bytes));
            Ok(())
        })?;
        groups.add(r.try_get(cols.len())?);
    }
    Ok(())
}

pub(super) fn usage(store: &PostgresStore, scope: &str, period_key: &str) -> Result<budget::Usage> {
    store.read(|db| {
        let r = db.query_opt("SELECT cost, tokens, executions FROM usage_counters WHERE scope = $1 AND period = $2", &[&scope, &period_key])?;
        r.map(|r| usage_at(&r, 0)).transpose().map(Option::unwrap_or_default)
    })
}

pub(super) fn rate_usage(store: &PostgresStore, scope: &str, since: Micros) -> Result<RateUsage> {
    store.read(|db| Ok(RateUsage { in_flight: in_flight(db, scope)?, ..window_use(db, scope, since)? }))
}

pub(super) fn tenants(store: &PostgresStore) -> Result<Vec<SeenTenant>> {
    store.read(|db| db.query(&format!("SELECT {SEEN_COLUMNS} FROM tenants ORDER BY tenant_id"), &[])?.iter().map(seen_from_row).collect())
}

pub(super) fn tenant(store: &PostgresStore, tenant_id: &str) -> Result<Option<SeenTenant>> {
    store.read(|db| db.query(&format!("SELECT {SEEN_COLUMNS} FROM tenants WHERE tenant_id = $1"), &[&tenant_id])?.first().map(seen_from_row).transpose())
}

fn seen_from_row(r: &PgRow) -> PgResult<SeenTenant> {
    Ok(SeenTenant { id: r.try_get(0)?, name: r.try_get(1)?, first_used_at: r.try_get(2)?, last_used_at: r.try_get(3)? })
}

pub(super) fn usage_by_scope(store: &PostgresStore, prefix: &str, period_key: &str) -> Result<Vec<(String, budget::Usage)>> {
    // A range on the primary key: scope >= prefix AND scope < (first string past the prefix).
    let end = prefix_end(prefix);
    store.read(|db| {
        let rows = db.query(
            "SELECT scope, cost, tokens, executions FROM usage_counters
             WHERE scope >= $1 AND ($2::text IS NULL OR scope < $2) AND period = $3 ORDER BY scope",
            &[&prefix, &end, &period_key],
        )?;
        rows.iter()
            .map(|r| {
                let scope: &str = r.try_get(0)?;
                Ok((scope[prefix.len()..].to_owned(), usage_at(r, 1)?))
            })
            .collect()
    })
}

pub(super) fn usage_daily(store: &PostgresStore, scope: &str, first_day: &str) -> Result<Vec<(String, budget::Usage)>> {
    store.read(|db| {
        // Daily period keys are the 10-character ones ("2026-11-28"; months are "2026-11").
        let rows = db.query(
            "SELECT period, cost, tokens, executions FROM usage_counters
             WHERE scope = $1 AND period >= $2 AND length(period) = 10 ORDER BY period",
            &[&scope, &first_day],
        )?;
        rows.iter().map(|r| Ok((r.try_get(0)?, usage_at(r, 1)?))).collect()
    })
}

pub(super) fn query_rows(store: &PostgresStore, q: &Query) -> Result<Vec<Row>> {
    let (w, mut args) = where_clause(q);
    let mut sql = format!("SELECT {} FROM executions{w}", all_columns());
    if !q.order.is_empty() {
        // NULLs sort as in SQLite: first ascending, last descending.
        let order: Vec<String> =
            q.order.iter().map(|(Field(n, _), desc)| format!("{n} {}", if *desc { "DESC NULLS LAST" } else { "ASC NULLS FIRST" })).collect();
        sql.push_str(&format!(" ORDER BY {}", order.join(", ")));
    }
    if q.limit.is_some() || q.offset.is_some() {
        args.push(Box::new(q.limit));
        args.push(Box::new(q.offset.unwrap_or(0)));
        sql.push_str(&format!(" LIMIT ${} OFFSET ${}", args.len() - 1, args.len()));
    }
    store.read(|db| db.query(&sql, &params(&args))?.iter().map(read_row).collect())
}

pub(super) fn query_aggregate(store: &PostgresStore, q: &Query, agg: &Aggregate) -> Result<Cell> {
    let (w, args) = where_clause(q);
    let (expr, kind) = aggregate_sql(agg);
    let sql = format!("SELECT {expr} FROM executions{w}");
    store.read(|db| {
        let cal = calendar_of(stored_timezone(db)?)?;
        if let Some(plan) = rollups::plan(q, &[], agg, &cal, Dialect::Postgres) {
            return Ok(from_rollups(db, q, &[], agg, &cal, &plan)?.pop().map_or_else(|| query::zero(agg), |(_, v)| v));
        }
        cell(&db.query_one(&sql, &params(&args))?, 0, kind)
    })
}

pub(super) fn query_grouped(store: &PostgresStore, q: &Query, by: &[GroupKey], agg: &Aggregate) -> Result<Vec<(GroupValues, Cell)>> {
    store.read(|db| {
        let cal = calendar_of(stored_timezone(db)?)?;
        if let Some(plan) = rollups::plan(q, by, agg, &cal, Dialect::Postgres) {
            return from_rollups(db, q, by, agg, &cal, &plan);
        }
        let mut groups = Groups::new(agg);
        scan(db, q, by, agg, &cal, Rows::All, &mut groups)?;
        Ok(groups.finish()?)
    })
}

pub(super) fn execution(store: &PostgresStore, id: &str) -> Result<Option<(Row, Option<Details>)>> {
    let sql = format!("SELECT {} FROM executions WHERE id = $1", all_columns());
    store.read(|db| {
        let Some(row) = db.query_opt(&sql, &[&id])? else { return Ok(None) };
        let details = db
            .query_opt("SELECT system_prompt, user_prompt, response, tool_calls FROM execution_details WHERE execution_id = $1", &[&id])?
            .map(|r| -> PgResult<Details> { Ok(Details { system_prompt: r.try_get(0)?, user_prompt: r.try_get(1)?, response: r.try_get(2)?, tool_calls: r.try_get(3)? }) })
            .transpose()?;
        Ok(Some((read_row(&row)?, details)))
    })
}
