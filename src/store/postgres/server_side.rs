//! Admission and settlement in one round trip each: the common case runs in the server-side
//! functions of migrations 12, 14 to 23 and 25 to 30 (`tenantllm_admit`, `tenantllm_admit_full`,
//! `tenantllm_settle`, `tenantllm_settle_rates`, `tenantllm_settle_breakers`), one statement
//! that commits on its own, so the rows it locks stay locked only while the server works, and
//! PL/pgSQL's cached plans spare the parsing and planning of a dozen statements. The
//! counters, which every call of a tenant waits for, each function locks last but for a rate
//! limit's totals and a breaker whose probe it claims or that it moves, which the
//! transactions lock after them too.
//!
//! They take the call that goes ahead, under rate limits or none, through whichever model's
//! breaker lets it (claiming the half-open probe), the call a hard budget, a rate limit or
//! every breaker refuses (in two round trips: the refusal, then its row), the call that finds
//! leases run out (in two: the server names them, then closes them with the call, as
//! `counters::expire_reservations` does) and the settlement of a running row, correcting its
//! rate limits' logs and moving its breakers. A tenant's stored budget this process has not
//! read yet is read in a round trip of its own first. Anything else (a budget changed
//! meanwhile, a row closed before) they leave to `admission`'s transactions, which decide
//! every case. The policy stays in Rust: this module works out the limits that apply
//! (`budget::checks`, `ratelimit::checks`), the warnings, a refusal's breach and the days
//! abandoned calls are counted in; the server only compares the counters and the windows
//! with the limits it is given (the rules of `budget::evaluate` and `ratelimit::evaluate`),
//! the breakers with `breaker::admit`'s and `breaker::record`'s rules and the numbers
//! `breaker::Policy::at` gives, and the counters with the amounts that reach the alerts'
//! thresholds (`budget::threshold_at`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use postgres::error::SqlState;

use super::admission::{row_closed, row_written};
use super::breakers::breaker_status;
use super::budgets::stamped_budget;
use super::connect::Failure;
use super::db::Param;
use super::executions::{new_row, Closing};
use super::record::Record;
use super::PostgresStore;
use crate::breaker::{self, Phase};
use crate::budget::{self, Enforcement, Metric, TenantBudget};
use crate::error::{Amount, Result};
use crate::process::unpoisoned;
use crate::ratelimit;
use crate::store::rollups;
use crate::clock::{Calendar, Micros, Period};
use crate::execution::Completion;
use crate::store::{
    self, blocked, encode_keys, usage_keys, AdmitRequest, Admitted, Alert, BreakerOutcome, CounterKey, FinishRequest,
};

/// A tenant's stored budget (None: it has none) and the `xmin` of its row, which changes
/// with every write to it (None: no row). `tenantllm_admit` compares the stamp, so a budget
/// changed by any process since sends the call to the transaction, which reads it anew.
type Stamped = (Option<TenantBudget>, Option<i64>);

/// The stored budgets this process has read, by tenant.
#[derive(Default)]
pub(super) struct StoredBudgets(Mutex<HashMap<String, Stamped>>);

/// More tenants than this and the map starts again: entries are only a shortcut.
const MAX_REMEMBERED: usize = 10_000;

impl StoredBudgets {
    fn get(&self, tenant_id: &str) -> Option<Stamped> {
        unpoisoned(self.0.lock()).get(tenant_id).cloned()
    }

    pub(super) fn remember(&self, tenant_id: &str, stamped: Stamped) {
        let mut map = unpoisoned(self.0.lock());
        if map.len() >= MAX_REMEMBERED && !map.contains_key(tenant_id) {
            map.clear();
        }
        map.insert(tenant_id.to_string(), stamped);
    }
}

fn metric_code(m: Metric) -> i32 {
    match m {
        Metric::Cost => 0,
        Metric::Tokens => 1,
        Metric::Executions => 2,
    }
}

fn amount(a: Amount) -> i64 {
    match a {
        Amount::Usd(n) => n.0,
        Amount::Count(n) => n,
    }
}

/// Admits the call in one round trip if it goes ahead, refuses it in two (one when a rate
/// limit's refusal writes no row); one more when leases ran out (the server names them, then
/// closes them with this call) or the tenant's stored budget is not read yet. None when the
/// transaction must decide.
pub(super) fn admit(store: &PostgresStore, req: &AdmitRequest<'_>) -> Result<Option<Admitted>> {
    let e = req.execution;
    let (budget_tenant, stored, stamp) = match (req.plan.tenant_id, req.plan.tenant_override) {
        (Some(tid), None) => {
            let (stored, stamp) = match store.budgets.get(tid) {
                Some(known) => known,
                // Read in one statement, so the pair is true; the function checks the stamp.
                None => {
                    let read = store.read(|db| stamped_budget(db, tid))?;
                    store.budgets.remember(tid, read.clone());
                    read
                }
            };
            (Some(tid), stored, stamp)
        }
        _ => (None, None, None),
    };
    let rate_checks = ratelimit::checks(&req.plan, stored.as_ref());
    let checks = budget::checks(&req.plan, stored.as_ref(), req.calendar, req.now);
    let checked: BTreeSet<CounterKey> = checks
        .iter()
        .map(|c| (c.scope.clone(), c.period_key.clone()))
        .collect();
    let hard: Vec<&budget::Check> = checks
        .iter()
        .filter(|c| c.enforcement == Enforcement::Hard)
        .collect();
    let est = &req.estimate;
    let counters = encode_keys(checked.iter());
    let remember = req.remember_tenant && req.plan.tenant_id.is_some();
    let calendar = req.calendar.name();
    // Migration 30's `tenantllm_admit` and `tenantllm_admit_full` take each hard limit by its
    // counter's place among the checked (from 1), its metric and the limit; NULL when none, as
    // the expired leases.
    let hard_limits_by_place: Option<Vec<i64>> = (!hard.is_empty()).then(|| {
        hard.iter()
            .flat_map(|c| {
                // Every check's counter is among the checked; 0 (no counter) would never refuse.
                let place = checked.iter().position(|(s, p)| *s == c.scope && *p == c.period_key).map_or(0, |i| i as i64 + 1);
                [place, i64::from(metric_code(c.metric)), amount(c.limit)]
            })
            .collect()
    });
    let narrow: [&dyn Param; 14] = [
        &store.lock_timeout,
        &calendar,
        &req.now,
        &remember,
        &req.plan.tenant_id,
        &req.tenant_name,
        &budget_tenant,
        &stamp,
        &counters,
        &hard_limits_by_place,
        &est.cost.0,
        &est.tokens,
        &est.executions,
        &req.reservation_expires_at,
    ];
    // The rate limits' arguments (`tenantllm_admit_full`): the scopes to lock, the windows to
    // count and the checks in the policy's order.
    let lock_scopes: Vec<&str> = rate_checks.iter().map(|c| c.scope.as_str()).collect::<BTreeSet<_>>().into_iter().collect();
    let window_scopes = ratelimit::window_scopes(&rate_checks);
    let check_scopes: Vec<&str> = rate_checks.iter().map(|c| c.scope.as_str()).collect();
    let check_kinds: Vec<i32> = rate_checks.iter().map(|c| kind_code(c.kind)).collect();
    let check_limits: Vec<i64> = rate_checks.iter().map(|c| c.limit).collect();
    let concurrency = ratelimit::concurrency_scope(&rate_checks);
    let breakers: Vec<String> = req.breaker_keys.iter().map(|k| k.id()).collect();
    let rated: [&dyn Param; 9] =
        [&req.rate_window, &lock_scopes, &window_scopes, &check_scopes, &check_kinds, &check_limits, &concurrency, &breakers, &req.probe_lease];
    let took_effect = |db: &mut super::db::Tx<'_>| row_written(db, &e.id);
    // Calls under rate limits go to the full function, the others to `tenantllm_admit`, which
    // hands them to the full one if their first model's breaker is not closed. `expired`: the
    // expired leases the call closes (their ids, and each call's day).
    let full_check = !rate_checks.is_empty();
    let run = |expired: &Expired| {
        // None keyed: NULL, which costs less to bind than an empty array.
        let (ids, days) = if expired.ids.is_empty() { (None, None) } else { (Some(&expired.ids), Some(&expired.days)) };
        let keyed: [&dyn Param; 2] = [&ids, &days];
        let params: Vec<&dyn Param> = if full_check {
            narrow.into_iter().chain(new_row(e)).chain(rated).chain(keyed).collect()
        } else {
            narrow.into_iter().chain(new_row(e)).chain([&breakers as &dyn Param, &req.probe_lease]).chain(keyed).collect()
        };
        store.call(&took_effect, |db| {
            let r = db.query_one(if full_check { ADMIT_FULL } else { ADMIT }, &params);
            // A counter's sum past 64 bits: nothing changed, and the transaction decides.
            let r = match r {
                Err(Failure::Pg(e)) if e.code() == Some(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE) => return Ok(None),
                r => r?,
            };
            Ok(Some(Answer::of(&r, full_check)?))
        })
    };
    let mut answer = run(&Expired::default())?;
    let expired = match &answer {
        Some(Some(a)) if a.outcome == "expired" => Some(Expired::keyed(a, req.calendar)),
        _ => None,
    };
    if let Some(expired) = expired {
        // Once: leases that run out meanwhile are the transaction's.
        answer = run(&expired)?;
    }
    let mut choice = (0, false);
    let through_breakers = !req.breaker_keys.is_empty();
    match &answer {
        Some(Some(a)) => match a.outcome.as_str() {
            "rate_limited" => return rate_limited(store, req, &rate_checks, a),
            "short_circuited" => {
                let retry_at = a.retry_at.unwrap_or(Micros::MAX);
                let c = store::short_circuited(&e.agent, retry_at, req.now);
                return write_refused(store, req, &c, Admitted::ShortCircuited { retry_at });
            }
            "go" => choice = (usize::try_from(a.model_index.unwrap_or(0)).unwrap_or(0), a.probe.unwrap_or(false)),
            _ => {}
        },
        // Admitted, but which model went with the connection: the breakers tell.
        None if through_breakers => choice = lost_choice(store, req)?,
        _ => {}
    }
    // What the counters held when the server went ahead or refused (migration 21).
    let (go, usage): (bool, HashMap<CounterKey, (budget::Usage, budget::Usage)>) = match answer {
        Some(Some(Answer { outcome, usage: Some(usage), .. })) if (outcome == "go" || outcome == "refused") && usage.len() == 6 * checked.len() => {
            let at = |n: &[i64], i: usize| budget::Usage {
                cost: crate::money::Nanos(n[i]),
                tokens: n[i + 1],
                executions: n[i + 2],
            };
            let usage = checked
                .iter()
                .cloned()
                .zip(usage.chunks(6))
                .map(|(k, n)| (k, (at(n, 0), at(n, 3))))
                .collect();
            (outcome == "go", usage)
        }
        Some(_) => return Ok(None),
        // Admitted (a refusal leaves no row), but what the counters held went with the
        // connection: no warnings.
        None => (true, HashMap::new()),
    };
    let usage_of = |c: &budget::Check| {
        usage
            .get(&(c.scope.clone(), c.period_key.clone()))
            .copied()
            .unwrap_or_default()
    };
    let (hard, warnings) = budget::evaluate(&checks, usage_of, est);
    if !go {
        // Refused: the breach is the policy's to name, from the same usage. Where it finds
        // none (the server's NUMERIC sums against its saturating ones at 64 bits) the
        // transaction decides.
        return match hard {
            Some(b) => write_refused(store, req, &blocked(&b, req.now), Admitted::Blocked(b)),
            None => Ok(None),
        };
    }
    // The server found no hard limit passed; the soft ones warn.
    Ok(Some(Admitted::Go {
        model_index: choice.0,
        probe: choice.1,
        checks,
        warnings,
        rate_scopes: window_scopes,
        // The function writes every call's reservation (migration 19).
        reserved: true,
    }))
}

// Migration 30's `tenantllm_admit` and `tenantllm_admit_full`: with the breakers and the expired
// leases keyed. Their answer is one record (`record`), its fields in the order of their OUT
// parameters.
const ADMIT: &str = "SELECT tenantllm_admit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
     $21, $22, $23, $24, $25, $26, $27)";

const ADMIT_FULL: &str = "SELECT tenantllm_admit_full($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
     $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31, $32, $33, $34)";

fn kind_code(k: ratelimit::Kind) -> i32 {
    match k {
        ratelimit::Kind::Requests => 0,
        ratelimit::Kind::Tokens => 1,
        ratelimit::Kind::Concurrent => 2,
    }
}

/// A server-side admission's answer: its outcome and what the counters held (migration
/// 21); the model that goes and whether it is the probe, or when every breaker is open the
/// earliest retry time; with 'expired' the expired leases' reservations and when each call
/// still running started; from the full function, what it counted in the windows (in
/// `window_scopes`' order) and in flight, and with a refusal the check it found breached
/// (from 1) and that scope's log.
struct Answer {
    outcome: String,
    usage: Option<Vec<i64>>,
    model_index: Option<i32>,
    probe: Option<bool>,
    retry_at: Option<Micros>,
    expired_ids: Vec<String>,
    expired_started: Vec<Option<Micros>>,
    requests: Vec<i64>,
    tokens: Vec<i64>,
    in_flight: i64,
    breached: Option<i32>,
    events: Vec<(Micros, i64)>,
}

impl Answer {
    /// From `ADMIT`'s record (outcome, usage, model_index, probe, retry_at, expired_ids,
    /// expired_started) or `ADMIT_FULL`'s (outcome, usage, requests, tokens, in_flight,
    /// breached, events_at, events_tokens, then the same five).
    fn of(r: &postgres::Row, full: bool) -> super::connect::PgResult<Answer> {
        let r: Record<'_> = r.try_get(0)?;
        let last = if full { 8 } else { 2 };
        let mut a = Answer {
            outcome: r.get(0)?,
            usage: r.get(1)?,
            model_index: r.get(last)?,
            probe: r.get(last + 1)?,
            retry_at: r.get(last + 2)?,
            expired_ids: r.get::<Option<Vec<String>>>(last + 3)?.unwrap_or_default(),
            expired_started: r.get::<Option<Vec<Option<Micros>>>>(last + 4)?.unwrap_or_default(),
            requests: vec![],
            tokens: vec![],
            in_flight: 0,
            breached: None,
            events: vec![],
        };
        if full {
            let at: Option<Vec<i64>> = r.get(6)?;
            let tokens: Option<Vec<i64>> = r.get(7)?;
            a.requests = r.get::<Option<Vec<i64>>>(2)?.unwrap_or_default();
            a.tokens = r.get::<Option<Vec<i64>>>(3)?.unwrap_or_default();
            a.in_flight = r.get::<Option<i64>>(4)?.unwrap_or_default();
            a.breached = r.get(5)?;
            a.events = at.unwrap_or_default().into_iter().zip(tokens.unwrap_or_default()).collect();
        }
        Ok(a)
    }
}

/// The expired leases an admission closes: the reservations' ids, and the day each call
/// still running started (in the calendar the call keys its counters in; '' for the others).
#[derive(Default)]
struct Expired {
    ids: Vec<String>,
    days: Vec<String>,
}

impl Expired {
    fn keyed(a: &Answer, calendar: &Calendar) -> Expired {
        let day = |at: &Option<Micros>| at.map(|at| calendar.period_key(Period::Daily, at)).unwrap_or_default();
        Expired { ids: a.expired_ids.clone(), days: a.expired_started.iter().map(day).collect() }
    }
}

/// The model an admission whose answer was lost with its connection went ahead with, from
/// the breakers as they are now: the first whose probe it claimed (its claim is the one that
/// ends at `now` plus the lease) or that is closed.
fn lost_choice(store: &PostgresStore, req: &AdmitRequest<'_>) -> Result<(usize, bool)> {
    for (index, key) in req.breaker_keys.iter().enumerate() {
        let s = breaker_status(store, key)?;
        match s.phase {
            Phase::Closed => return Ok((index, false)),
            Phase::HalfOpen if s.retry_at == req.now + req.probe_lease => return Ok((index, true)),
            _ => {}
        }
    }
    Ok((0, false))
}

/// A call a rate limit refused on the server: the policy names the breach from what the
/// server counted (as admission.rs's transaction does from what it reads), and its row is
/// written as a hard budget's refusal is. None when the policy finds another check breached
/// than the server, or the timezone changed since: the transaction decides.
fn rate_limited(store: &PostgresStore, req: &AdmitRequest<'_>, checks: &[ratelimit::RateCheck], rate: &Answer) -> Result<Option<Admitted>> {
    let Some(breached) = rate.breached.and_then(|i| checks.get(usize::try_from(i).ok()?.checked_sub(1)?)) else { return Ok(None) };
    let window_scopes = ratelimit::window_scopes(checks);
    let concurrency = ratelimit::concurrency_scope(checks);
    let state_of = |scope: &str| {
        let w = window_scopes.iter().position(|s| s == scope);
        ratelimit::RateUsage {
            requests: w.and_then(|i| rate.requests.get(i)).copied().unwrap_or_default(),
            tokens: w.and_then(|i| rate.tokens.get(i)).copied().unwrap_or_default(),
            in_flight: if concurrency.as_deref() == Some(scope) { rate.in_flight } else { 0 },
        }
    };
    let events_of = |scope: &str| if scope == breached.scope { Ok(rate.events.clone()) } else { Err(()) };
    let b = match ratelimit::evaluate(checks, state_of, req.estimate.tokens, req.now, req.rate_window, events_of) {
        Ok(Some(b)) if b.check == *breached => b,
        _ => return Ok(None),
    };
    if !req.record_rate_limited {
        return Ok(Some(Admitted::RateLimited(b)));
    }
    let c = store::rate_limited(&b, req.now);
    write_refused(store, req, &c, Admitted::RateLimited(b))
}

/// Writes the row of a call the server refused (closed with `c`: blocked or rate-limited),
/// with its rollups, in one round trip (`tenantllm_block`, migration 21): what admission.rs's
/// transaction writes for it; then the call is `refused`. None when the transaction must
/// (the timezone changed since the refusal).
fn write_refused(store: &PostgresStore, req: &AdmitRequest<'_>, c: &Completion, refused: Admitted) -> Result<Option<Admitted>> {
    let e = req.execution;
    let [day, month] = rollups::periods(req.calendar, e.started_at);
    let calendar = req.calendar.name();
    let closing = Closing::of(c);
    let head: [&dyn Param; 4] = [&store.lock_timeout, &calendar, &day, &month];
    let params: Vec<&dyn Param> = head.into_iter().chain(new_row(e)).chain(closing.params(c)).collect();
    let took_effect = |db: &mut super::db::Tx<'_>| row_written(db, &e.id);
    let outcome = store.call(&took_effect, |db| {
        // Its one OUT parameter is its value: no function scan to plan (see `record`).
        let r = db.query_one(
            "SELECT tenantllm_block($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
                 $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31, $32, $33, $34, $35)",
            &params,
        )?;
        Ok(r.try_get::<_, String>(0)?)
    })?;
    // None: the connection went after the row was written.
    Ok(match outcome {
        Some(o) if o != "done" => None,
        _ => Some(refused),
    })
}

/// Settles the call in one round trip, correcting its rate limits' logs and moving its
/// breakers in the same statement; None when the transaction must (the row is not running,
/// the reservation was taken over or is on other counters, the timezone changed). The budget
/// alerts it reaches are marked sent in the same statement; the breakers it opens or closes
/// are raised as the transaction raises them.
pub(super) fn finish(store: &PostgresStore, req: &FinishRequest<'_>) -> Result<Option<Vec<Alert>>> {
    let (e, c) = (req.execution, req.completion);
    // Sorted: the function locks the counters in the order it gets them.
    let keys: BTreeSet<CounterKey> = usage_keys(req.calendar, e.tenant_id.as_deref(), &e.agent, e.started_at).into_iter().collect();
    let counters = encode_keys(keys.iter());
    let used = budget::settled(c, false);
    // The month's rollup is keyed by the day's month (`rollups::periods`): the server derives it.
    let [day, _] = rollups::periods(req.calendar, e.started_at);
    let calendar = req.calendar.name();
    let closing = Closing::of(c);
    // Every alert this call could raise: the server marks sent those its counters reach.
    // Each with its counter's place among the call's (from 1); a check on a counter that is not
    // the call's is reached by nothing the call adds.
    let counter_of = |ch: &budget::Check| keys.iter().position(|(s, p)| *s == ch.scope && *p == ch.period_key).and_then(|i| i32::try_from(i + 1).ok());
    let candidates: Vec<(&budget::Check, i64, i64, i32)> = if c.status.counts_as_usage() {
        req.checks
            .iter()
            .filter_map(|ch| Some((ch, counter_of(ch)?)))
            .flat_map(|(ch, n)| budget::ALERT_THRESHOLDS.iter().filter_map(move |&t| budget::threshold_at(ch, t).map(|at| (ch, t, at, n))))
            .collect()
    } else {
        Vec::new()
    };
    // Each alert as four numbers (its counter's place, metric, the amount that reaches it and
    // its threshold) and its name; NULL when there is none (migration 30).
    let alerts: Option<Vec<i64>> = (!candidates.is_empty())
        .then(|| candidates.iter().flat_map(|&(ch, t, at, n)| [i64::from(n), i64::from(metric_code(ch.metric)), at, t]).collect());
    let alert_names: Option<Vec<&str>> = (!candidates.is_empty()).then(|| candidates.iter().map(|(ch, _, _, _)| ch.name.as_str()).collect());
    let head: [&dyn Param; 9] = [
        &store.lock_timeout,
        &calendar,
        &req.reserved,
        &counters,
        &used.cost.0,
        &used.tokens,
        &used.executions,
        &day,
        &e.id,
    ];
    let details: [&dyn Param; 5] = [&req.store_details, &e.system_prompt, &e.user_prompt, &c.response, &e.tool_calls];
    let alerts: [&dyn Param; 2] = [&alerts, &alert_names];
    // The rate limits' logs to correct, in scope order (the order admissions lock their
    // totals in).
    let mut rate_scopes: Vec<&str> = req.rate_scopes.iter().map(String::as_str).collect();
    rate_scopes.sort_unstable();
    let rate_tokens = budget::recorded(c).tokens;
    // The breaker outcomes that may move one: a success of a call that was not the probe
    // changes none, whatever its phase (`breaker::record`). The policy's numbers come from
    // here (`Policy::at`); the server applies `record`'s rule on the locked row.
    let moving: Vec<&BreakerOutcome> = req.breakers.iter().filter(|o| !o.success || o.probe).collect();
    let at: Vec<breaker::Thresholds> = moving.iter().map(|o| o.policy.at(c.completed_at)).collect();
    let breaker_keys: Vec<String> = moving.iter().map(|o| o.key.id()).collect();
    let agents: Vec<&str> = moving.iter().map(|o| o.key.agent.as_str()).collect();
    let models: Vec<&str> = moving.iter().map(|o| o.key.model.as_str()).collect();
    let tenants: Vec<Option<&str>> = moving.iter().map(|o| o.key.tenant_id.as_deref()).collect();
    let success: Vec<bool> = moving.iter().map(|o| o.success).collect();
    let probe: Vec<bool> = moving.iter().map(|o| o.probe).collect();
    let since: Vec<i64> = at.iter().map(|t| t.since).collect();
    let errors: Vec<i32> = at.iter().map(|t| i32::try_from(t.errors).unwrap_or(i32::MAX)).collect();
    let open_until: Vec<i64> = at.iter().map(|t| t.open_until).collect();
    let rated: [&dyn Param; 3] = [&e.started_at, &rate_scopes, &rate_tokens];
    let moves: [&dyn Param; 9] = [&breaker_keys, &agents, &models, &tenants, &success, &probe, &since, &errors, &open_until];
    let mut params: Vec<&dyn Param> = head.into_iter().chain(closing.params(c)).chain(details).chain(alerts).collect();
    let sql = match (rate_scopes.is_empty(), moving.is_empty()) {
        (true, true) => SETTLE,
        (false, true) => SETTLE_RATED,
        (true, false) => SETTLE_MOVING,
        (false, false) => SETTLE_RATED_MOVING,
    };
    if !rate_scopes.is_empty() {
        params.extend(rated);
    }
    if !moving.is_empty() {
        params.extend(moves);
    }
    let took_effect = |db: &mut super::db::Tx<'_>| row_closed(db, &e.id, c);
    let answer = store.call(&took_effect, |db| {
        let r = db.query(sql, &params);
        // The row vanished: nothing changed, and the transaction says so in its words.
        let r = match r {
            Err(Failure::Pg(e)) if e.code() == Some(&SqlState::NO_DATA_FOUND) => return Ok(None),
            r => r?.into_iter().next().ok_or_else(|| crate::error::Error::Store("tenantllm_settle returned no row".into()))?,
        };
        // The function's OUT parameters in order: outcome, scopes, periods, recorded_cost,
        // recorded_tokens, recorded_executions, alerted.
        let s: Record<'_> = r.try_get(0)?;
        let outcome: String = s.get(0)?;
        if outcome != "done" {
            return Ok(None);
        }
        let (scopes, periods): (Vec<String>, Vec<String>) = (s.get(1)?, s.get(2)?);
        let (cost, tokens, executions): (Vec<i64>, Vec<i64>, Vec<i64>) = (s.get(3)?, s.get(4)?, s.get(5)?);
        let recorded: HashMap<CounterKey, budget::Usage> = (0..scopes.len())
            .map(|i| {
                let usage = budget::Usage { cost: crate::money::Nanos(cost[i]), tokens: tokens[i], executions: executions[i] };
                ((scopes[i].clone(), periods[i].clone()), usage)
            })
            .collect();
        let alerted: Vec<i64> = s.get(6)?;
        let events: Vec<i32> = if moving.is_empty() { Vec::new() } else { r.try_get(1)? };
        Ok(Some((recorded, alerted, events)))
    })?;
    let (recorded, alerted, events) = match answer {
        Some(Some(answer)) => answer,
        Some(None) => return Ok(None),
        // Settled, but what it recorded went with the connection: an alert it marked sent
        // is not raised, nor a breaker it opened or closed.
        None => return Ok(Some(vec![])),
    };
    let budget_alerts = alerted.iter().filter_map(|&n| candidates.get(usize::try_from(n).ok()?.checked_sub(1)?)).map(|&(check, threshold, _, _)| {
        Alert::Budget {
            check: check.clone(),
            threshold,
            current: recorded.get(&(check.scope.clone(), check.period_key.clone())).copied().unwrap_or_default(),
        }
    });
    // As breakers.rs `breaker_record` raises them, after the budget's.
    let breaker_alerts = moving.iter().zip(&at).zip(&events).filter_map(|((o, t), event)| match event {
        1 => Some(Alert::BreakerOpened { key: o.key.clone(), retry_at: t.open_until }),
        2 => Some(Alert::BreakerClosed { key: o.key.clone() }),
        _ => None,
    });
    Ok(Some(budget_alerts.chain(breaker_alerts).collect()))
}

/// A settlement's statement: `tenantllm_settle`'s answer as one record (`record`: no function
/// scan to plan, materialize and describe) and, computed on it, `$then` if given (the rate
/// limits' logs corrected, the breakers moved): one statement. The function is volatile, so
/// the subquery is not pulled up into its caller: it runs once, `(q.s).outcome` reads its answer.
macro_rules! settle_sql {
    (@call) => {
        "tenantllm_settle($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22,
         $23, $24, $25, $26, $27, $28, $29, $30, $31, $32, $33, $34, $35, $36, $37, $38)"
    };
    () => {
        concat!("SELECT ", settle_sql!(@call))
    };
    ($then:literal) => {
        concat!("SELECT q.s, ", $then, " FROM (SELECT ", settle_sql!(@call), " AS s) AS q")
    };
}

const SETTLE: &str = settle_sql!();

/// `SETTLE` and, on its answer, the rate limits' logs corrected (`tenantllm_settle_rates`,
/// migration 25).
const SETTLE_RATED: &str = settle_sql!("tenantllm_settle_rates((q.s).outcome, $9, $39, $40, $41)");

/// `SETTLE` and then the breakers moved (`tenantllm_settle_breakers`, migration 27), for a
/// call with no rate limit's log to correct: a call of `tenantllm_settle_rates` with none costs
/// the server about 30k instructions.
const SETTLE_MOVING: &str = settle_sql!("tenantllm_settle_breakers((q.s).outcome, $15, $39, $40, $41, $42, $43, $44, $45, $46, $47)");

/// `SETTLE_RATED` and then the breakers moved, the rate limits first as the transaction takes
/// them.
const SETTLE_RATED_MOVING: &str =
    settle_sql!("tenantllm_settle_breakers(tenantllm_settle_rates((q.s).outcome, $9, $39, $40, $41), $15, $42, $43, $44, $45, $46, $47, $48, $49, $50)");
