//! Usage counters and reservations: locked, bumped and released in key order.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use postgres::Row as PgRow;

use super::connect::PgResult;
use super::db::Tx;
use crate::budget;
use crate::clock::{Calendar, Micros};
use crate::money::Nanos;
use crate::store::rollups::{self, Dialect};
use crate::store::{decode_keys, usage_keys, CounterKey};

/// A change to one counter: recorded usage and in-flight reservations (negative to release).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Delta {
    pub(super) used: budget::Usage,
    pub(super) reserved: budget::Usage,
}

/// Changes to apply, in key order (the order rows are locked in).
pub(super) type Deltas = BTreeMap<CounterKey, Delta>;

pub(super) fn usage_at(r: &PgRow, first: usize) -> PgResult<budget::Usage> {
    Ok(budget::Usage { cost: Nanos(r.try_get(first)?), tokens: r.try_get(first + 1)?, executions: r.try_get(first + 2)? })
}

pub(super) fn key_arrays<'a>(keys: impl Iterator<Item = &'a CounterKey>) -> (Vec<&'a str>, Vec<&'a str>) {
    keys.map(|(s, p)| (s.as_str(), p.as_str())).unzip()
}

/// Locks the counters (creating missing ones) in key order; returns each one's recorded usage
/// and reservations, which no other transaction can change until this one ends.
pub(super) fn lock_counters(db: &mut Tx<'_>, keys: &BTreeSet<CounterKey>) -> PgResult<HashMap<CounterKey, (budget::Usage, budget::Usage)>> {
    const LOCK: &str = "SELECT c.scope, c.period, c.cost, c.tokens, c.executions,
             c.reserved_cost, c.reserved_tokens, c.reserved_executions
         FROM usage_counters c JOIN unnest($1::text[], $2::text[]) AS k(scope, period) ON c.scope = k.scope AND c.period = k.period
         ORDER BY c.scope, c.period FOR UPDATE OF c";
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let (scopes, periods) = key_arrays(keys.iter());
    let mut rows = db.query(LOCK, &[&scopes, &periods])?;
    if rows.len() < keys.len() {
        // First use of a counter (a new day or month, a new tenant): create it, then lock.
        db.execute(
            "INSERT INTO usage_counters (scope, period)
             SELECT scope, period FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(scope, period, n) ORDER BY n
             ON CONFLICT (scope, period) DO NOTHING",
            &[&scopes, &periods],
        )?;
        rows = db.query(LOCK, &[&scopes, &periods])?;
    }
    rows.iter().map(|r| Ok(((r.try_get(0)?, r.try_get(1)?), (usage_at(r, 2)?, usage_at(r, 5)?)))).collect()
}

/// Applies changes to counters (creating missing ones) in key order, in one statement;
/// returns each changed counter's recorded usage afterwards.
pub(super) fn bump(db: &mut Tx<'_>, deltas: &Deltas) -> PgResult<HashMap<CounterKey, budget::Usage>> {
    if deltas.is_empty() {
        return Ok(HashMap::new());
    }
    let (scopes, periods) = key_arrays(deltas.keys());
    let column = |f: fn(&Delta) -> i64| deltas.values().map(f).collect::<Vec<i64>>();
    let rows = db.query(
        "INSERT INTO usage_counters AS c (scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions)
         SELECT scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions
         FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[])
             WITH ORDINALITY AS d(scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions, n)
         ORDER BY n
         ON CONFLICT (scope, period) DO UPDATE SET cost = c.cost + EXCLUDED.cost, tokens = c.tokens + EXCLUDED.tokens,
             executions = c.executions + EXCLUDED.executions, reserved_cost = c.reserved_cost + EXCLUDED.reserved_cost,
             reserved_tokens = c.reserved_tokens + EXCLUDED.reserved_tokens,
             reserved_executions = c.reserved_executions + EXCLUDED.reserved_executions
         RETURNING scope, period, cost, tokens, executions",
        &[
            &scopes,
            &periods,
            &column(|d| d.used.cost.0),
            &column(|d| d.used.tokens),
            &column(|d| d.used.executions),
            &column(|d| d.reserved.cost.0),
            &column(|d| d.reserved.tokens),
            &column(|d| d.reserved.executions),
        ],
    )?;
    rows.iter().map(|r| Ok(((r.try_get(0)?, r.try_get(1)?), usage_at(r, 2)?))).collect()
}

/// A reservation removed from the table: its counters and its estimate.
pub(super) fn reservation_at(r: &PgRow, first: usize) -> PgResult<(Vec<CounterKey>, budget::Usage)> {
    let keys: String = r.try_get(first)?;
    Ok((decode_keys(&keys), usage_at(r, first + 1)?))
}

/// Releases reservations whose lease ran out (their process died) and closes their
/// executions as abandoned, counting them as the executions they were. The counter changes
/// go into `deltas`, to be applied with the caller's own in key order. Migration 29's
/// `tenantllm_admit` does the same on the server (`server_side`): a change here goes there too.
pub(super) fn expire_reservations(db: &mut Tx<'_>, cal: &Calendar, now: Micros, deltas: &mut Deltas) -> PgResult<()> {
    let expired = db.query("DELETE FROM reservations WHERE expires_at <= $1 RETURNING execution_id, counters, cost, tokens, executions", &[&now])?;
    if expired.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(expired.len());
    for r in &expired {
        ids.push(r.try_get::<_, String>(0)?);
        let (keys, est) = reservation_at(r, 1)?;
        for key in keys {
            let d = deltas.entry(key).or_default();
            d.reserved = d.reserved.plus(&est.negated());
        }
    }
    let abandoned = db.query(
        "UPDATE executions SET status = 'error', error_class = 'Abandoned',
             error_message = 'the process running this call stopped before it finished', completed_at = $2
         WHERE id = ANY($1) AND status = 'running'
         RETURNING tenant_id, agent, started_at, id, model_id",
        &[&ids, &now],
    )?;
    let mut calls = Vec::with_capacity(abandoned.len());
    for r in &abandoned {
        let tenant: Option<String> = r.try_get(0)?;
        let agent: String = r.try_get(1)?;
        for key in usage_keys(cal, tenant.as_deref(), &agent, r.try_get(2)?) {
            let d = deltas.entry(key).or_default();
            d.used = d.used.plus(&budget::estimate(Nanos::ZERO, 0));
        }
        calls.push(Abandoned { id: r.try_get(3)?, periods: rollups::periods(cal, r.try_get(2)?), tenant: tenant.unwrap_or_default(), agent, model: r.try_get(4)? });
    }
    roll_abandoned(db, &mut calls)
}

/// A call closed as abandoned, with what its rollup rows are keyed by (its status: 'error').
struct Abandoned {
    id: String,
    periods: [String; 2],
    tenant: String,
    agent: String,
    model: String,
}

impl Abandoned {
    /// Its row's key in the rollup table of `periods[period]`, with or without the tenant.
    fn key(&self, period: usize, tenant: bool) -> (&str, &str, &str, &str) {
        (&self.periods[period], if tenant { &self.tenant } else { "" }, &self.agent, &self.model)
    }
}

/// Adds the abandoned calls to their rollups (as executions.rs `roll` adds one) a table at a
/// time, in the one order every write locks rollup rows in, so none waits for another in a
/// cycle: the daily rollups, the monthly ones, then the daily totals, each table's rows in key
/// order.
fn roll_abandoned(db: &mut Tx<'_>, calls: &mut [Abandoned]) -> PgResult<()> {
    let [daily, monthly] = rollups::record_sql(Dialect::Postgres);
    let tables = [(daily.as_str(), 0, true), (monthly.as_str(), 1, true), (rollups::totals_record_sql_in(Dialect::Postgres), 0, false)];
    for (sql, period, tenant) in tables {
        calls.sort_by(|a, b| a.key(period, tenant).cmp(&b.key(period, tenant)));
        for c in calls.iter() {
            db.execute(sql, &[&c.periods[period], &1i64, &c.id])?;
        }
    }
    Ok(())
}
