//! Admission and settlement: each one transaction that locks the rows its decision reads,
//! for every case the server-side functions leave to it (`server_side`).

use std::collections::{BTreeSet, HashMap};

use super::connect::PgResult;
use super::breakers::{breaker_admit_tx, breaker_record};
use super::budgets::stamped_budget;
use super::counters::{bump, expire_reservations, lock_counters, reservation_at, Deltas};
use super::db::{OnCommitLoss, Tx};
use super::executions::{complete_execution, insert_execution};
use super::rates::{lock_rate_scopes, rate_state, window_events};
use super::rebuild::stored_timezone;
use super::server_side;
use super::PostgresStore;
use crate::budget;
use crate::clock::Micros;
use crate::execution::Completion;
use crate::error::Result;
use crate::ratelimit;
use crate::store::{
    blocked, encode_keys, first_admitted, keyed_like, rate_limited, short_circuited, usage_keys, AdmitRequest, Admitted, Alert, Choice, CounterKey,
    FinishRequest,
};

/// Every outcome of an admission writes the execution row, so its presence tells whether a
/// commit that lost its connection went through.
pub(super) fn row_written(db: &mut Tx<'_>, id: &str) -> PgResult<bool> {
    Ok(db.query_opt("SELECT 1 FROM executions WHERE id = $1", &[&id])?.is_some())
}

/// The row closed with this completion's time means a settlement went through. The lock
/// waits out a transaction the server may still be finishing for the lost connection.
pub(super) fn row_closed(db: &mut Tx<'_>, id: &str, c: &Completion) -> PgResult<bool> {
    let row = db.query_opt("SELECT status, completed_at FROM executions WHERE id = $1 FOR UPDATE", &[&id])?;
    Ok(match row {
        Some(r) => r.try_get::<_, String>(0)? == c.status.as_str() && r.try_get::<_, Option<i64>>(1)? == Some(c.completed_at),
        None => false,
    })
}

pub(super) fn admit(store: &PostgresStore, req: &AdmitRequest<'_>) -> Result<Admitted> {
    if let Some(admitted) = server_side::admit(store, req)? {
        return Ok(admitted);
    }
    transaction(store, req)
}

/// The admission that decides every case, in one transaction.
pub(super) fn transaction(store: &PostgresStore, req: &AdmitRequest<'_>) -> Result<Admitted> {
    let e = req.execution;
    let check = |db: &mut Tx<'_>, _: &Admitted| row_written(db, &e.id);
    store.write(OnCommitLoss::Check(&check), |db| {
        keyed_like(stored_timezone(db)?, req.calendar)?;
        if let (true, Some(tid)) = (req.remember_tenant, req.plan.tenant_id) {
            db.execute(
                "INSERT INTO tenants (tenant_id, name, first_used_at, last_used_at) VALUES ($1, $2, $3, $3)
                 ON CONFLICT (tenant_id) DO UPDATE SET name = COALESCE(EXCLUDED.name, tenants.name),
                     first_used_at = LEAST(tenants.first_used_at, EXCLUDED.first_used_at),
                     last_used_at = GREATEST(tenants.last_used_at, EXCLUDED.last_used_at)",
                &[&tid, &req.tenant_name, &req.now],
            )?;
        }
        let stored = match (req.plan.tenant_id, req.plan.tenant_override) {
            (Some(tid), None) => {
                let (stored, stamp) = stamped_budget(db, tid)?;
                // Read in this transaction's snapshot: a pair that stays true (see `server_side`).
                store.budgets.remember(tid, (stored.clone(), stamp));
                stored
            }
            _ => None,
        };
        // Rate-limited scopes are locked first (before any row lock), so admissions of a
        // scope take turns and deadlock with nothing.
        let rate_checks = ratelimit::checks(&req.plan, stored.as_ref());
        lock_rate_scopes(db, &rate_checks)?;
        let mut deltas = Deltas::new();
        expire_reservations(db, req.calendar, req.now, &mut deltas)?;
        let checks = budget::checks(&req.plan, stored.as_ref(), req.calendar, req.now);
        let checked: BTreeSet<CounterKey> = checks.iter().map(|c| (c.scope.clone(), c.period_key.clone())).collect();
        let mut usage = lock_counters(db, &checked.iter().chain(deltas.keys()).cloned().collect())?;
        // What the expired reservations give back counts for this call already.
        for (key, d) in &deltas {
            if let Some((recorded, reserved)) = usage.get_mut(key) {
                *recorded = recorded.plus(&d.used);
                *reserved = reserved.plus(&d.reserved);
            }
        }
        let usage_of = |c: &budget::Check| usage.get(&(c.scope.clone(), c.period_key.clone())).copied().unwrap_or_default();
        let (hard, warnings) = budget::evaluate(&checks, usage_of, &req.estimate);
        if let Some(b) = hard {
            bump(db, &deltas)?;
            insert_execution(db, e)?;
            complete_execution(db, e, &blocked(&b, req.now), false, req.calendar)?;
            return Ok(Admitted::Blocked(b));
        }
        let rates = rate_state(db, &rate_checks, req.now, req.rate_window)?;
        let since = req.now - req.rate_window;
        let breach = ratelimit::evaluate(&rate_checks, |s| rates.get(s).copied().unwrap_or_default(), req.estimate.tokens, req.now, req.rate_window, |s| {
            window_events(db, s, since)
        })?;
        if let Some(b) = breach {
            bump(db, &deltas)?;
            if req.record_rate_limited {
                insert_execution(db, e)?;
                complete_execution(db, e, &rate_limited(&b, req.now), false, req.calendar)?;
            }
            return Ok(Admitted::RateLimited(b));
        }
        let (model_index, probe) = match first_admitted(req.breaker_keys, |key| breaker_admit_tx(db, key, req.probe_lease, req.now))? {
            Choice::Model { index, probe } => (index, probe),
            Choice::AllOpen { retry_at } => {
                bump(db, &deltas)?;
                insert_execution(db, e)?;
                complete_execution(db, e, &short_circuited(&e.agent, retry_at, req.now), false, req.calendar)?;
                return Ok(Admitted::ShortCircuited { retry_at });
            }
        };
        for key in &checked {
            let d = deltas.entry(key.clone()).or_default();
            d.reserved = d.reserved.plus(&req.estimate);
        }
        bump(db, &deltas)?;
        // Every call in flight has a reservation, holding nothing when it has no counters or
        // slot: its lease is what closes its row once its process dies.
        let concurrency = ratelimit::concurrency_scope(&rate_checks);
        let est = &req.estimate;
        db.execute(
            "INSERT INTO reservations (execution_id, counters, cost, tokens, executions, expires_at, concurrency_scope)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[&e.id, &encode_keys(checked.iter()), &est.cost.0, &est.tokens, &est.executions, &req.reservation_expires_at, &concurrency],
        )?;
        let rate_scopes = ratelimit::window_scopes(&rate_checks);
        if !rate_scopes.is_empty() {
            // Counted in the totals unless this call's clock is behind their horizon.
            db.execute(
                "WITH logged AS (
                     INSERT INTO rate_events (scope, at, execution_id, tokens) SELECT s, $2, $3, $4 FROM unnest($1::text[]) AS s
                 )
                 UPDATE rate_totals SET requests = requests + 1, tokens = tokens + $4 WHERE scope = ANY($1) AND horizon < $2",
                &[&rate_scopes, &e.started_at, &e.id, &req.estimate.tokens],
            )?;
        }
        insert_execution(db, e)?;
        Ok(Admitted::Go { model_index, probe, checks, warnings, rate_scopes, reserved: true })
    })
}

pub(super) fn finish(store: &PostgresStore, req: &FinishRequest<'_>) -> Result<Vec<Alert>> {
    if let Some(alerts) = server_side::finish(store, req)? {
        return Ok(alerts);
    }
    settlement(store, req)
}

/// The settlement that decides every case, in one transaction.
pub(super) fn settlement(store: &PostgresStore, req: &FinishRequest<'_>) -> Result<Vec<Alert>> {
    let e = req.execution;
    let c = req.completion;
    let check = |db: &mut Tx<'_>, _: &Vec<Alert>| row_closed(db, &e.id, c);
    store.write(OnCommitLoss::Check(&check), |db| {
        keyed_like(stored_timezone(db)?, req.calendar)?;
        // The reservation (if this process's lease was not taken over) is released in the
        // same statement that adds the real usage.
        let released = if req.reserved {
            match db.query_opt("DELETE FROM reservations WHERE execution_id = $1 RETURNING counters, cost, tokens, executions", &[&e.id])? {
                Some(r) => Some(reservation_at(&r, 0)?),
                None => None,
            }
        } else {
            None
        };
        let taken_over = req.reserved && released.is_none();
        let (reserved_keys, estimate) = released.unwrap_or_default();
        complete_execution(db, e, c, req.store_details, req.calendar)?;
        let used = budget::settled(c, taken_over);
        let mut deltas = Deltas::new();
        for key in usage_keys(req.calendar, e.tenant_id.as_deref(), &e.agent, e.started_at) {
            deltas.entry(key).or_default().used = used;
        }
        for key in reserved_keys {
            deltas.entry(key).or_default().reserved = estimate.negated();
        }
        let recorded = bump(db, &deltas)?;
        // The logged estimate becomes the real usage, in the totals too if they count it:
        // totals first, scope by scope in the order admissions lock them (see `rate_state`).
        let tokens = budget::recorded(c).tokens;
        let mut scopes: Vec<&String> = req.rate_scopes.iter().collect();
        scopes.sort();
        for scope in scopes {
            db.execute(
                "UPDATE rate_totals SET tokens = tokens + $4
                     - COALESCE((SELECT tokens FROM rate_events WHERE scope = $1 AND at = $2 AND execution_id = $3), $4)
                 WHERE scope = $1 AND horizon < $2",
                &[scope, &e.started_at, &e.id, &tokens],
            )?;
            db.execute(
                "UPDATE rate_events SET tokens = $4 WHERE scope = $1 AND at = $2 AND execution_id = $3",
                &[scope, &e.started_at, &e.id, &tokens],
            )?;
        }
        let mut alerts = if c.status.counts_as_usage() { budget_alerts(db, req.checks, &recorded)? } else { Vec::new() };
        for o in req.breakers {
            alerts.extend(breaker_record(db, o, c.completed_at)?);
        }
        Ok(alerts)
    })
}

/// The alerts of the thresholds `checks` reached with the counters' totals after a call
/// (`recorded`) that no process has sent yet; each is marked sent.
fn budget_alerts(db: &mut Tx<'_>, checks: &[budget::Check], recorded: &HashMap<CounterKey, budget::Usage>) -> PgResult<Vec<Alert>> {
    let mut alerts = Vec::new();
    for check in checks {
        let Some(now_used) = recorded.get(&(check.scope.clone(), check.period_key.clone())).copied() else { continue };
        for t in budget::thresholds_reached(check, &now_used) {
            let fresh = db.execute(
                "INSERT INTO alerts_sent (scope, period, name, threshold) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&check.scope, &check.period_key, &check.name, &t],
            )?;
            if fresh == 1 {
                alerts.push(Alert::Budget { check: check.clone(), threshold: t, current: now_used });
            }
        }
    }
    Ok(alerts)
}

pub(super) fn renew_leases(store: &PostgresStore, execution_ids: &[String], expires_at: Micros) -> Result<usize> {
    let ids = execution_ids.to_vec();
    let n = store.write(OnCommitLoss::Rerun, |db| {
        db.execute("UPDATE reservations SET expires_at = $1 WHERE execution_id = ANY($2)", &[&expires_at, &ids])
    })?;
    Ok(n as usize)
}
