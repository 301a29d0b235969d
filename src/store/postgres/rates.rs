//! Rate limits: the per-scope locks, window totals and event log an admission counts.

use std::collections::{BTreeSet, HashMap};

use super::connect::PgResult;
use super::db::{Db, Tx};
use crate::clock::Micros;
use crate::ratelimit::{self, RateCheck, RateUsage};

/// Takes the transaction-scoped advisory lock of each rate-limited scope, in scope order:
/// the window's admissions and the calls in flight are then this admission's to count.
pub(super) fn lock_rate_scopes(db: &mut Tx<'_>, checks: &[RateCheck]) -> PgResult<()> {
    let scopes: BTreeSet<&str> = checks.iter().map(|c| c.scope.as_str()).collect();
    for scope in scopes {
        db.execute("SELECT pg_advisory_xact_lock(hashtextextended('tenantllm rate ' || $1, 0))", &[&scope])?;
    }
    Ok(())
}

/// The use of the scopes `checks` name (see sqlite.rs `rate_state`). A scope's totals row
/// is locked before its log is read, so a settlement correcting them either went first and
/// is seen, or waits and finds the horizon moved past its call.
pub(super) fn rate_state(db: &mut Tx<'_>, checks: &[RateCheck], now: Micros, window: Micros) -> PgResult<HashMap<String, RateUsage>> {
    let mut out: HashMap<String, RateUsage> = HashMap::new();
    for scope in ratelimit::window_scopes(checks) {
        let start = now - window;
        // A new scope starts with empty totals whose horizon is this window's start.
        let r = db.query_one(
            "INSERT INTO rate_totals (scope, requests, tokens, horizon) VALUES ($1, 0, 0, $2)
             ON CONFLICT (scope) DO UPDATE SET scope = EXCLUDED.scope RETURNING requests, tokens, horizon",
            &[&scope, &start],
        )?;
        let (requests, tokens, horizon): (i64, i64, Micros) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        let use_ = match ratelimit::step(now, window, Some(horizon)) {
            ratelimit::Step::Advance { to, forget } => {
                let r = db.query_one(
                    "WITH crossed AS (
                         SELECT COUNT(*) AS n, COALESCE(SUM(tokens), 0)::bigint AS t FROM rate_events WHERE scope = $1 AND at > $2 AND at <= $3
                     ), forgotten AS (DELETE FROM rate_events WHERE scope = $1 AND at <= $4)
                     UPDATE rate_totals SET requests = requests - crossed.n, tokens = tokens - crossed.t, horizon = $3
                     FROM crossed WHERE scope = $1 RETURNING requests, tokens",
                    &[&scope, &horizon, &to, &forget],
                )?;
                RateUsage { requests: r.try_get(0)?, tokens: r.try_get(1)?, in_flight: 0 }
            }
            ratelimit::Step::Behind { since } => {
                let r = db.query_one(
                    "SELECT COUNT(*), COALESCE(SUM(tokens), 0)::bigint FROM rate_events WHERE scope = $1 AND at > $2 AND at <= $3",
                    &[&scope, &since, &horizon],
                )?;
                let (n, t): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
                RateUsage { requests: requests + n, tokens: tokens.saturating_add(t), in_flight: 0 }
            }
        };
        out.insert(scope, use_);
    }
    if let Some(scope) = ratelimit::concurrency_scope(checks) {
        out.entry(scope.clone()).or_default().in_flight = in_flight(db, &scope)?;
    }
    Ok(out)
}

/// Admissions of a scope stamped after `since` (later stamps included), and their tokens:
/// the dashboard's and CLI's view, read at any time rather than at an admission.
pub(super) fn window_use(db: &mut Db<'_, impl Sized>, scope: &str, since: Micros) -> PgResult<RateUsage> {
    let r = db.query_one("SELECT COUNT(*), COALESCE(SUM(tokens), 0)::bigint FROM rate_events WHERE scope = $1 AND at > $2", &[&scope, &since])?;
    Ok(RateUsage { requests: r.try_get(0)?, tokens: r.try_get(1)?, in_flight: 0 })
}

pub(super) fn in_flight(db: &mut Db<'_, impl Sized>, scope: &str) -> PgResult<i64> {
    Ok(db.query_one("SELECT COUNT(*) FROM reservations WHERE concurrency_scope = $1", &[&scope])?.try_get(0)?)
}

/// A scope's admissions stamped after `since`, oldest first.
pub(super) fn window_events(db: &mut Tx<'_>, scope: &str, since: Micros) -> PgResult<Vec<(Micros, i64)>> {
    let rows = db.query("SELECT at, tokens FROM rate_events WHERE scope = $1 AND at > $2 ORDER BY at", &[&scope, &since])?;
    rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
}
