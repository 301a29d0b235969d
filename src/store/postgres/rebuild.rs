//! The stored timezone, and rebuilding counters and rollups when it changes.

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::Type;

use super::connect::PgResult;
use super::counters::{bump, reservation_at, Deltas};
use super::db::{Db, OnCommitLoss, Param, Tx};
use super::PostgresStore;
use crate::budget;
use crate::clock::{Calendar, DEFAULT_TIMEZONE};
use crate::error::Result;
use crate::money::Nanos;
use crate::store::rollups::{self, Dialect, ROLLED};
use crate::store::{calendar_of, counted_executions_sql, day_usage_keys, encode_keys, kept_usage_sql, rekey, usage_keys, TIMEZONE_SQL};

/// The stored timezone. In a write it must be the first statement: `set_timezone` holds the
/// settings table exclusively while it rebuilds, so a write that read the old zone finishes
/// before the rebuild starts, and one that starts during it waits and reads the new zone.
pub(super) fn stored_timezone(db: &mut Db<'_, impl Sized>) -> PgResult<Option<String>> {
    Ok(db.query_opt(TIMEZONE_SQL, &[])?.map(|r| r.try_get(0)).transpose()?)
}

/// Recomputes every counter and the rollups from the executions in `cal`'s periods (see
/// `Store::rebuild_counters`); `keyed_in` is the calendar they were keyed in until now.
pub(super) fn rebuild(db: &mut Tx<'_>, keyed_in: &Calendar, cal: &Calendar) -> PgResult<usize> {
    // No call is admitted or settled meanwhile (plain reads go on). Same table order as
    // `admit` and `finish` take them in.
    db.c.batch_execute("LOCK TABLE reservations, usage_counters IN EXCLUSIVE MODE")?;
    let plan = rebuild_plan(db, keyed_in)?;
    rebuild_rollups(db, &plan, cal)?;
    let mut deltas = Deltas::new();
    if let Some(before) = &plan.usage_before {
        for r in db.query(&kept_usage_sql(Dialect::Postgres), &[before])? {
            let (day, tenant, agent): (String, Option<String>, String) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            let u = budget::Usage { executions: r.try_get(3)?, cost: Nanos(r.try_get(4)?), tokens: r.try_get(5)? };
            for key in day_usage_keys(tenant.as_deref(), &agent, &day) {
                let d = deltas.entry(key).or_default();
                d.used = d.used.plus(&u);
            }
        }
    }
    {
        let mut rows = db.c.query_typed_raw(&counted_executions_sql(Dialect::Postgres), [(plan.rows_from, Type::INT8)])?;
        while let Some(r) = rows.next()? {
            let started_at: i64 = r.try_get(2)?;
            let tenant: Option<String> = r.try_get(0)?;
            let agent: String = r.try_get(1)?;
            let u = budget::estimate(Nanos(r.try_get(3)?), r.try_get(4)?);
            for key in usage_keys(cal, tenant.as_deref(), &agent, started_at) {
                let d = deltas.entry(key).or_default();
                d.used = d.used.plus(&u);
            }
        }
    }
    let written = deltas.len();
    db.execute("DELETE FROM usage_counters", &[])?;
    // Calls in flight keep their reservations, on the periods of `cal`.
    let held = db.query(
        "SELECT r.counters, r.cost, r.tokens, r.executions, r.execution_id, e.started_at
         FROM reservations r LEFT JOIN executions e ON e.id = r.execution_id",
        &[],
    )?;
    for r in held {
        let (mut keys, est) = reservation_at(&r, 0)?;
        if let Some(started_at) = r.try_get::<_, Option<i64>>(5)? {
            let moved = rekey(&keys, cal, started_at);
            if moved != keys {
                let id: String = r.try_get(4)?;
                db.execute("UPDATE reservations SET counters = $2 WHERE execution_id = $1", &[&id, &encode_keys(moved.iter())])?;
                keys = moved;
            }
        }
        for key in keys {
            let d = deltas.entry(key).or_default();
            d.reserved = d.reserved.plus(&est);
        }
    }
    bump(db, &deltas)?;
    Ok(written)
}

/// What a rebuild of rollups keyed in `keyed_in` keeps (`rollups::rebuild_plan`).
pub(super) fn rebuild_plan(db: &mut Tx<'_>, keyed_in: &Calendar) -> PgResult<rollups::Rebuild> {
    use crate::store::retention::{postgres::CURSOR_GET, Horizon, HORIZON};
    let horizon: Option<String> = db.query_opt(CURSOR_GET, &[&HORIZON])?.map(|r| r.try_get(0)).transpose()?;
    let oldest: Option<i64> = db.query_one(rollups::OLDEST_SQL, &[])?.try_get(0)?;
    Ok(rollups::rebuild_plan(horizon.as_deref().and_then(Horizon::decode), oldest, keyed_in))
}

/// Recomputes the daily rollups `plan` says, in `cal`'s periods, and every monthly one and
/// daily total (see `rollups::OLDEST_SQL`).
pub(super) fn rebuild_rollups(db: &mut Tx<'_>, plan: &rollups::Rebuild, cal: &Calendar) -> PgResult<()> {
    let Some(first_day) = &plan.rollups else { return Ok(()) };
    let mut totals = plan.totals();
    {
        let mut rows = db.c.query_typed_raw(&rollups::source_sql(Dialect::Postgres), [(plan.rows_from, Type::INT8)])?;
        while let Some(r) = rows.next()? {
            let started_at: i64 = r.try_get(0)?;
            let values = (0..ROLLED.len()).map(|i| r.try_get(5 + i)).collect::<std::result::Result<Vec<i64>, _>>()?;
            totals.add_row(cal, started_at, [r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?], &values);
        }
    }
    db.execute("DELETE FROM daily_rollups WHERE period >= $1", &[first_day])?;
    let rows: Vec<_> = totals.rows().collect();
    for chunk in rows.chunks(10_000) {
        let texts: Vec<Vec<&str>> = (0..5).map(|i| chunk.iter().map(|(k, _)| k[i].as_str()).collect()).collect();
        let numbers: Vec<Vec<i64>> = (0..=ROLLED.len()).map(|i| chunk.iter().map(|(_, v)| v[i]).collect()).collect();
        let mut params: Vec<&dyn Param> = texts.iter().map(|t| t as &dyn Param).collect();
        params.extend(numbers.iter().map(|n| n as &dyn Param));
        db.execute(&rollups::pg_insert_sql(), &params)?;
    }
    db.execute("DELETE FROM monthly_rollups", &[])?;
    db.execute(&rollups::derive_monthly_sql(Dialect::Postgres), &[])?;
    db.execute("DELETE FROM daily_totals", &[])?;
    db.execute(&rollups::derive_totals_sql(), &[])?;
    Ok(())
}

pub(super) fn rebuild_counters(store: &PostgresStore) -> Result<usize> {
    store.write(OnCommitLoss::Rerun, |db| {
        let cal = calendar_of(stored_timezone(db)?)?;
        rebuild(db, &cal, &cal)
    })
}

pub(super) fn timezone(store: &PostgresStore) -> Result<String> {
    Ok(store.read(stored_timezone)?.unwrap_or_else(|| DEFAULT_TIMEZONE.into()))
}

pub(super) fn set_timezone(store: &PostgresStore, cal: &Calendar) -> Result<usize> {
    store.write(OnCommitLoss::Rerun, |db| {
        // Waits for the writes that read the old zone; later ones wait for this (see
        // `stored_timezone`).
        db.c.batch_execute("LOCK TABLE settings IN ACCESS EXCLUSIVE MODE")?;
        let old = calendar_of(stored_timezone(db)?)?;
        db.execute(
            "INSERT INTO settings (name, value) VALUES ('timezone', $1) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            &[&cal.name()],
        )?;
        rebuild(db, &old, cal)
    })
}
