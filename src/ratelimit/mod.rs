//! Rate-limit policy: requests and tokens per minute (a sliding window over the admissions
//! of the last minute) and calls in flight, per tenant and globally. Pure functions; the
//! store keeps the admissions (PostgreSQL: `rate_events`, a row per scope; SQLite: the
//! executions rows, `rate_scopes` saying which scopes' logs each is in), their running
//! totals per scope (`rate_totals`) and the in-flight calls (`reservations`; on SQLite the
//! totals count only the settled admissions and the reservations the ones in flight) and
//! calls these inside the admission transaction, beside the budget checks.
//!
//! Why a sliding-window log and not GCRA: GCRA with a burst of `rpm` lets up to twice the
//! limit through in some 60-second window; the log admits a call only if fewer than `rpm`
//! calls were admitted in the window ending now, so no window ever holds more.
//!
//! Why it costs O(1) per admission: the store keeps, per scope, the totals of the logged
//! admissions stamped after a horizon that only moves forward, to the window's start of the
//! latest admission (`step`). An admission moves it, subtracting what crossed it (each
//! admission crosses once), and then reads its window's use from one row instead of counting
//! the window. An admission whose clock is behind the horizon (it read the clock, then waited
//! for the lock) adds the few admissions between its own window's start and the horizon,
//! which the log keeps a window longer for it. On a refusal only, the log is read to tell
//! when the call would fit. (SQLite moves the horizon lazily: while it trails the window's
//! start by less than a quarter window, totals a call fits fit its window too; see
//! store/sqlite.rs `rate_state`.)

use std::time::Duration;

use crate::budget::{Limits, Plan, TenantBudget};
use crate::clock::Micros;
use crate::error::{config_err, Result};

/// The window's length, seconds (1 to `MAX_WINDOW`); tests shorten it. Default: a minute.
pub const WINDOW_ENV: &str = "TENANTLLM_RATE_WINDOW_SECONDS";
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
/// The longest window. An admission reads the log up to two windows back (`Step::Behind`), so
/// on SQLite, whose log is the executions rows, retention (a day at the least) never deletes
/// an admission still read.
pub const MAX_WINDOW: Duration = Duration::from_secs(3600);
/// The largest `rpm_limit` / `global_rpm`.
pub const MAX_RPM: i64 = 1_000_000_000;
/// The largest `tpm_limit` / `global_tpm`.
pub const MAX_TPM: i64 = 1_000_000_000_000_000;
/// The largest `max_concurrent`.
pub const MAX_CONCURRENT: i64 = 100_000;
/// What a call refused by `max_concurrent` is told to wait: how long the calls in flight
/// will run is unknown.
pub const CONCURRENCY_RETRY_AFTER_S: f64 = 1.0;

/// What an admission at `now` does with a scope's running totals, which count the logged
/// admissions stamped after `horizon` (None: the scope has no totals yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The window starts after the horizon: move it to `to`, subtracting the admissions
    /// stamped in (horizon, to]; those stamped at or before `forget` may leave the log (a
    /// log of its own: SQLite's is the executions, which retention keeps for days).
    Advance { to: Micros, forget: Micros },
    /// The window starts at or before the horizon: its use is the totals plus the
    /// admissions stamped in (since, horizon].
    Behind { since: Micros },
}

pub fn step(now: Micros, window: Micros, horizon: Option<Micros>) -> Step {
    let start = now - window;
    match horizon {
        Some(h) if start <= h => Step::Behind { since: start },
        // Kept a window past the horizon: calls whose clock lags by up to a window still
        // find the admissions of theirs.
        _ => Step::Advance { to: start, forget: start - window },
    }
}

/// Reads `WINDOW_ENV`.
pub fn window_from_env() -> Result<Duration> {
    match std::env::var(WINDOW_ENV) {
        Err(_) => Ok(DEFAULT_WINDOW),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if (1.0..=MAX_WINDOW.as_secs_f64()).contains(&s) => Ok(Duration::from_secs_f64(s)),
            _ => config_err(format!("{WINDOW_ENV} must be a number of seconds from 1 to {} (got {v:?})", MAX_WINDOW.as_secs())),
        },
    }
}

/// Checks the ranges of a level's rate limits (`prefix` is "" for a tenant, "global_" for
/// `budgets=`). Zero is refused: a tenant that may make no call gets `daily_execution_limit=0`.
pub fn validate(l: &Limits, tenant: bool) -> Result<()> {
    let (rpm, tpm) = if tenant { ("rpm_limit", "tpm_limit") } else { ("budgets[\"global_rpm\"]", "budgets[\"global_tpm\"]") };
    for (name, v, max) in [(rpm, l.rpm, MAX_RPM), (tpm, l.tpm, MAX_TPM), ("max_concurrent", l.max_concurrent, MAX_CONCURRENT)] {
        if let Some(v) = v.filter(|v| !(1..=max).contains(v)) {
            return config_err(format!("{name} must be between 1 and {max} (got {v})"));
        }
    }
    if !tenant && l.max_concurrent.is_some() {
        return config_err("max_concurrent is a tenant limit (TenantBudget), not a global one");
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Requests,
    Tokens,
    Concurrent,
}

/// One rate limit that applies to a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateCheck {
    /// Public name: "tenant_rpm", "tenant_tpm", "tenant_concurrent", "global_rpm", "global_tpm"
    /// (static: every admission builds its checks, and formatting them was a measurable cost).
    pub name: &'static str,
    /// The scope whose admissions or calls in flight count: "global" or "tenant:<id>".
    pub scope: String,
    pub kind: Kind,
    pub limit: i64,
    pub tenant_budget: bool,
}

/// The rate limits of a call: global ones from `budgets=`, the tenant's from its override
/// (runtime dict, `tenant_config_resolver`) or else its stored budget.
pub fn checks(plan: &Plan<'_>, stored: Option<&TenantBudget>) -> Vec<RateCheck> {
    let mut out = Vec::new();
    let mut add = |names: [&'static str; 3], scope: String, l: &Limits, tenant: bool| {
        for (kind, name, limit) in [(Kind::Requests, names[0], l.rpm), (Kind::Tokens, names[1], l.tpm), (Kind::Concurrent, names[2], l.max_concurrent)] {
            if let Some(limit) = limit {
                out.push(RateCheck { name, scope: scope.clone(), kind, limit, tenant_budget: tenant });
            }
        }
    };
    add(["global_rpm", "global_tpm", "global_concurrent"], "global".into(), &plan.global.limits, false);
    if let (Some(tid), Some(tb)) = (plan.tenant_id, plan.tenant_override.or(stored)) {
        add(["tenant_rpm", "tenant_tpm", "tenant_concurrent"], crate::budget::tenant_scope(tid), &tb.limits, true);
    }
    out
}

/// The scopes whose admissions are logged (a window limit applies), each once.
pub fn window_scopes(checks: &[RateCheck]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in checks.iter().filter(|c| c.kind != Kind::Concurrent) {
        if !out.contains(&c.scope) {
            out.push(c.scope.clone());
        }
    }
    out
}

/// The scope whose calls in flight are counted, if a `max_concurrent` applies.
pub fn concurrency_scope(checks: &[RateCheck]) -> Option<String> {
    checks.iter().find(|c| c.kind == Kind::Concurrent).map(|c| c.scope.clone())
}

/// The scopes whose use an admission reads: the window scopes and the `max_concurrent` one,
/// each once.
pub fn counted_scopes(checks: &[RateCheck]) -> Vec<String> {
    let mut out = window_scopes(checks);
    out.extend(concurrency_scope(checks).filter(|s| !out.contains(s)));
    out
}

/// A rate limit this call would pass.
#[derive(Debug, Clone, PartialEq)]
pub struct RateBreach {
    pub check: RateCheck,
    /// Requests or tokens in the window, or calls in flight.
    pub current: i64,
    /// Seconds until the call would fit (as far as the calls already admitted go).
    pub retry_after: f64,
}

impl RateBreach {
    /// "tenant_rpm limit 60 reached (current 60); retry after 1.5 s": errors and rows.
    pub fn describe(&self) -> String {
        format!("{} limit {} reached (current {}); retry after {:.3} s", self.check.name, self.check.limit, self.current, self.retry_after)
    }
}

/// A scope's use of its rate limits now (dashboard, CLI, `TenantBudget`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateUsage {
    pub requests: i64,
    pub tokens: i64,
    pub in_flight: i64,
}

impl RateUsage {
    /// The admissions and tokens of both parts of a window (or of a window and more
    /// admissions), saturating; calls in flight are this one's, never summed.
    pub fn plus(&self, o: &RateUsage) -> RateUsage {
        RateUsage { requests: self.requests + o.requests, tokens: self.tokens.saturating_add(o.tokens), in_flight: self.in_flight }
    }

    /// The admissions and tokens left when `o`'s leave (`plus` undone).
    pub fn minus(&self, o: &RateUsage) -> RateUsage {
        RateUsage { requests: self.requests - o.requests, tokens: self.tokens.saturating_sub(o.tokens), in_flight: self.in_flight }
    }
}

/// The first rate limit that admitting a call estimated at `tokens` at `now` would pass,
/// given each scope's use (`state_of`: admissions and tokens stamped after `now - window`,
/// later stamps included, and calls in flight). Counting the admissions stamped later too
/// makes it exact: an admission stamped earlier but committed after a later one (it waited
/// for the lock) still sees it, so no window of that length ever holds more than the limit.
/// `events_of` lists a refused scope's admissions in the window, oldest first (only read
/// on a refusal, to tell when the call would fit).
pub fn evaluate<E>(
    checks: &[RateCheck],
    state_of: impl Fn(&str) -> RateUsage,
    tokens: i64,
    now: Micros,
    window: Micros,
    events_of: impl FnOnce(&str) -> std::result::Result<Vec<(Micros, i64)>, E>,
) -> std::result::Result<Option<RateBreach>, E> {
    let over = checks.iter().find_map(|c| {
        let s = state_of(&c.scope);
        let current = match c.kind {
            Kind::Requests => (s.requests >= c.limit).then_some(s.requests),
            Kind::Tokens => (s.tokens.saturating_add(tokens) > c.limit).then_some(s.tokens),
            Kind::Concurrent => (s.in_flight >= c.limit).then_some(s.in_flight),
        };
        current.map(|current| (c, current))
    });
    let Some((c, current)) = over else { return Ok(None) };
    let retry_after = match c.kind {
        Kind::Concurrent => CONCURRENCY_RETRY_AFTER_S,
        _ => retry_after(c, &events_of(&c.scope)?, tokens, now, window),
    };
    Ok(Some(RateBreach { check: c.clone(), current, retry_after }))
}

/// Seconds until a call refused by a window limit would fit, as far as the admissions in the
/// window (oldest first) go. A call larger than a token limit never fits: the whole window.
fn retry_after(c: &RateCheck, events: &[(Micros, i64)], tokens: i64, now: Micros, window: Micros) -> f64 {
    let seconds = |at: Micros| ((at + window - now).max(0) as f64) / 1e6;
    match c.kind {
        // The call fits once all but limit - 1 of them have left the window.
        Kind::Requests => {
            let n = events.len() as i64;
            if n >= c.limit {
                seconds(events[(n - c.limit) as usize].0)
            } else {
                0.0
            }
        }
        Kind::Tokens => {
            let mut left: i64 = events.iter().map(|e| e.1).fold(0, i64::saturating_add);
            if tokens <= c.limit {
                for (at, t) in events {
                    left -= t;
                    if left.saturating_add(tokens) <= c.limit {
                        return seconds(*at);
                    }
                }
            }
            window as f64 / 1e6
        }
        Kind::Concurrent => CONCURRENCY_RETRY_AFTER_S,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::GlobalBudgets;

    const S: Micros = 1_000_000;

    fn tenant(l: Limits) -> TenantBudget {
        TenantBudget { tenant_id: "t".into(), limits: l, ..Default::default() }
    }

    /// A scope's use with these admissions in the window, and a refusal's retry_after.
    fn check(cs: &[RateCheck], events: &[(Micros, i64)], in_flight: i64, tokens: i64, now: Micros) -> Option<RateBreach> {
        let use_ = RateUsage { requests: events.len() as i64, tokens: events.iter().map(|e| e.1).sum(), in_flight };
        evaluate(cs, |_| use_, tokens, now, 60 * S, |_| Ok::<_, ()>(events.to_vec())).unwrap()
    }

    fn tenant_checks(l: Limits) -> Vec<RateCheck> {
        checks(&Plan { global: &GlobalBudgets::default(), agent: "A", tenant_id: Some("t"), tenant_override: None }, Some(&tenant(l)))
    }

    #[test]
    fn the_override_wins_and_global_limits_apply_too() {
        let g = GlobalBudgets { limits: Limits { rpm: Some(100), ..Default::default() }, ..Default::default() };
        let over = tenant(Limits { tpm: Some(5), max_concurrent: Some(2), ..Default::default() });
        let stored = tenant(Limits { rpm: Some(1), ..Default::default() });
        let plan = Plan { global: &g, agent: "A", tenant_id: Some("t"), tenant_override: Some(&over) };
        let cs = checks(&plan, Some(&stored));
        let names: Vec<&str> = cs.iter().map(|c| c.name).collect();
        assert_eq!(names, ["global_rpm", "tenant_tpm", "tenant_concurrent"]);
        assert_eq!(window_scopes(&cs), ["global", "tenant:t"]);
        assert_eq!(concurrency_scope(&cs).as_deref(), Some("tenant:t"));
        assert_eq!(counted_scopes(&cs), ["global", "tenant:t"]);
    }

    #[test]
    fn requests_fit_until_the_window_is_full_and_wait_for_the_oldest_to_leave() {
        let cs = tenant_checks(Limits { rpm: Some(2), ..Default::default() });
        let now = 100 * S;
        assert!(check(&cs, &[(now - 50 * S, 1)], 0, 1, now).is_none());
        let b = check(&cs, &[(now - 50 * S, 1), (now - 10 * S, 1)], 0, 1, now).unwrap();
        assert_eq!((b.check.name, b.current), ("tenant_rpm", 2));
        assert!((b.retry_after - 10.0).abs() < 1e-9, "{}", b.retry_after);
    }

    #[test]
    fn tokens_wait_until_enough_have_left_and_a_call_too_large_is_told_the_window() {
        let cs = tenant_checks(Limits { tpm: Some(100), ..Default::default() });
        let now = 100 * S;
        let ev = [(now - 55 * S, 30), (now - 20 * S, 50)];
        assert!(check(&cs, &ev, 0, 20, now).is_none());
        let b = check(&cs, &ev, 0, 40, now).unwrap();
        assert_eq!(b.current, 80);
        assert!((b.retry_after - 5.0).abs() < 1e-9);
        assert!((check(&cs, &ev, 0, 60, now).unwrap().retry_after - 40.0).abs() < 1e-9);
        assert_eq!(check(&cs, &[], 0, 101, now).unwrap().retry_after, 60.0);
    }

    #[test]
    fn the_horizon_follows_the_latest_window_and_a_lagging_clock_looks_behind_it() {
        assert_eq!(step(100 * S, 60 * S, None), Step::Advance { to: 40 * S, forget: -20 * S });
        assert_eq!(step(100 * S, 60 * S, Some(30 * S)), Step::Advance { to: 40 * S, forget: -20 * S });
        assert_eq!(step(100 * S, 60 * S, Some(40 * S)), Step::Behind { since: 40 * S });
        assert_eq!(step(99 * S, 60 * S, Some(40 * S)), Step::Behind { since: 39 * S });
    }

    #[test]
    fn calls_in_flight_are_capped() {
        let cs = tenant_checks(Limits { max_concurrent: Some(4), ..Default::default() });
        assert!(check(&cs, &[], 3, 1, 0).is_none());
        assert_eq!(check(&cs, &[], 4, 1, 0).unwrap().check.name, "tenant_concurrent");
        assert!(window_scopes(&cs).is_empty());
        assert_eq!(counted_scopes(&cs), ["tenant:t"]);
    }

    #[test]
    fn zero_negative_and_huge_limits_are_refused_by_name() {
        for (l, name) in [
            (Limits { rpm: Some(0), ..Default::default() }, "rpm_limit"),
            (Limits { tpm: Some(-1), ..Default::default() }, "tpm_limit"),
            (Limits { max_concurrent: Some(MAX_CONCURRENT + 1), ..Default::default() }, "max_concurrent"),
        ] {
            assert!(validate(&l, true).unwrap_err().to_string().contains(name));
        }
        assert!(validate(&Limits { max_concurrent: Some(1), ..Default::default() }, false).is_err());
        assert!(validate(&Limits { rpm: Some(0), ..Default::default() }, false).unwrap_err().to_string().contains("global_rpm"));
    }
}
