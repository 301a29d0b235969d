//! Persistent state behind one trait, so SQLite (embedded default) and a server database can
//! provide the same guarantees. Policy lives in `budget` and `breaker`; a store only reads and
//! writes, atomically, and calls those pure functions inside its transactions.

mod lock_waits;
mod pg_schema;
mod pg_tls;
mod postgres;
mod query;
mod retention;
mod rollups;
mod schema;
mod sqlite;
mod tenant_list;

pub use lock_waits::so_far as lock_waits;
pub use postgres::PostgresStore;
pub use query::GroupValues;
pub use tenant_list::{all as tenant_list_all, list as tenant_list, Problems, TenantFilter, TenantList, TenantListQuery, TenantListRow, TenantSort, MAX_LIMIT as MAX_TENANT_PAGE};
pub use sqlite::SqliteStore;

use crate::breaker;
use crate::cache;
use crate::budget::{self, Breach, Check, TenantBudget};
use crate::clock::{Calendar, Micros, Period, DEFAULT_TIMEZONE};
use crate::error::{config_err, Result};
use crate::secrets::Sealed;
use crate::execution::{Aggregate, Cell, Completion, Details, GroupKey, NewExecution, Query, Row, Status, FIELDS};
use rollups::Dialect;

/// Everything `admit` needs to decide whether a call may start.
pub struct AdmitRequest<'a> {
    /// The call, its id minted by `execution::new_id(started_at)` (SQLite's rate limits find
    /// their logs by id) and `started_at` its rate limits' stamp.
    pub execution: &'a NewExecution,
    pub plan: budget::Plan<'a>,
    pub estimate: budget::Usage,
    pub reservation_expires_at: Micros,
    /// Breaker key of each model in the chain; empty when the agent has no breaker.
    pub breaker_keys: &'a [BreakerKey],
    pub probe_lease: i64,
    pub calendar: &'a Calendar,
    pub now: Micros,
    /// The rate limits' window (`ratelimit::WINDOW_ENV`), microseconds.
    pub rate_window: Micros,
    /// Whether a refusal by a rate limit writes its `rate_limited` row; a call that will wait
    /// for a slot and try again writes none until it gives up.
    pub record_rate_limited: bool,
    /// Whether to write the call's tenant (`plan.tenant_id`) to the register of tenants seen,
    /// with `tenant_name` if given, whatever the outcome (`tenancy::SeenCache` decides when).
    pub remember_tenant: bool,
    pub tenant_name: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerKey {
    pub agent: String,
    pub model: String,
    pub tenant_id: Option<String>,
}

impl BreakerKey {
    pub fn id(&self) -> String {
        format!("{}|{}|{}", self.agent, self.model, self.tenant_id.as_deref().unwrap_or(""))
    }
}

#[derive(Debug)]
pub enum Admitted {
    /// Reservation and a `running` execution row are written; start with model `model_index`.
    /// `rate_scopes` are the scopes whose admission log has this call (its tokens are
    /// corrected at settlement); `reserved` tells whether settlement must release the
    /// call's reservation as one that may hold something (budget counters, a `max_concurrent`
    /// slot) and may have been taken over. Every call has a reservation; SQLite settles one
    /// that holds nothing by a plain delete, PostgreSQL settles every one alike (always true).
    Go { model_index: usize, probe: bool, checks: Vec<Check>, warnings: Vec<Breach>, rate_scopes: Vec<String>, reserved: bool },
    /// A hard limit would be passed; a `blocked` row is written.
    Blocked(Breach),
    /// A rate limit would be passed; a `rate_limited` row is written if the request asked.
    RateLimited(crate::ratelimit::RateBreach),
    /// Every model's breaker is open; a `short_circuited` row is written.
    ShortCircuited { retry_at: Micros },
}

pub struct BreakerOutcome {
    pub key: BreakerKey,
    pub policy: breaker::Policy,
    pub success: bool,
    pub probe: bool,
}

/// Everything `finish` writes in one transaction.
pub struct FinishRequest<'a> {
    pub execution: &'a NewExecution,
    pub completion: &'a Completion,
    pub reserved: bool,
    /// Limits checked at admission, to alert on thresholds crossed.
    pub checks: &'a [Check],
    /// Scopes whose admission log holds this call's estimated tokens, to correct to its usage.
    pub rate_scopes: &'a [String],
    /// The tokens the call was logged with in `rate_scopes`: its admission's estimate (kept by
    /// the caller, so settlement need not read it back).
    pub logged_tokens: i64,
    pub breakers: &'a [BreakerOutcome],
    pub calendar: &'a Calendar,
    pub store_details: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Alert {
    Budget { check: Check, threshold: i64, current: budget::Usage },
    BreakerOpened { key: BreakerKey, retry_at: Micros },
    BreakerClosed { key: BreakerKey },
}

#[derive(Debug, Clone, PartialEq)]
pub struct BreakerStatus {
    pub key: BreakerKey,
    pub state: breaker::State,
}

pub trait Store: Send + Sync {
    fn admit(&self, req: &AdmitRequest<'_>) -> Result<Admitted>;
    /// Breaker admission for a fallback model after the first one failed.
    fn breaker_admit(&self, key: &BreakerKey, lease: i64, now: Micros) -> Result<breaker::Admission>;
    /// Settles a call. If its reservation was taken over (its lease ran out and the row was
    /// closed as `Abandoned`, already counted as one execution), the row still gets the real
    /// outcome and the counters its cost and tokens, but not a second execution.
    fn finish(&self, req: &FinishRequest<'_>) -> Result<Vec<Alert>>;
    /// Extends the leases of these executions' reservations to `expires_at`, in one write;
    /// returns how many were still there.
    fn renew_leases(&self, execution_ids: &[String], expires_at: Micros) -> Result<usize>;

    fn budget_get(&self, tenant_id: &str) -> Result<Option<TenantBudget>>;
    /// Writes a budget in one statement and returns it as stored.
    fn budget_put(&self, b: &TenantBudget, write: BudgetWrite<'_>) -> Result<TenantBudget>;
    fn budget_delete(&self, tenant_id: &str) -> Result<bool>;
    fn budget_all(&self) -> Result<Vec<TenantBudget>>;
    /// Recorded usage of a scope in a period (counters; reservations excluded).
    fn usage(&self, scope: &str, period_key: &str) -> Result<budget::Usage>;
    /// A rate-limited scope's use now: admissions and their tokens stamped after `since`,
    /// and calls holding one of its `max_concurrent` slots (recorded only where such a
    /// limit applies).
    fn rate_usage(&self, scope: &str, since: Micros) -> Result<crate::ratelimit::RateUsage>;
    /// Every tenant seen (the register), by id.
    fn tenants(&self) -> Result<Vec<crate::tenancy::SeenTenant>>;
    /// One tenant of the register, if seen (a tenant-scoped page: one lookup, not the register).
    fn tenant(&self, tenant_id: &str) -> Result<Option<crate::tenancy::SeenTenant>>;
    /// Recorded usage of every scope with the given prefix in one period ("tenant:").
    fn usage_by_scope(&self, prefix: &str, period_key: &str) -> Result<Vec<(String, budget::Usage)>>;
    /// Recorded usage of one scope per day, for days from `first_day` ("2026-11-01") on.
    fn usage_daily(&self, scope: &str, first_day: &str) -> Result<Vec<(String, budget::Usage)>>;
    /// Recomputes every counter from the execution rows, in the database's timezone, and the
    /// rollups of the days from the oldest row's on (earlier days' rows were purged: their
    /// rollups stay); the days a purge deleted count in the counters with their rollups' usage
    /// (`rollups::rebuild_plan`). Returns how many counters it wrote.
    fn rebuild_counters(&self) -> Result<usize>;
    /// The timezone the database keeps its calendar periods in.
    fn timezone(&self) -> Result<String>;
    /// Changes the database's timezone and rebuilds every counter in it, in one transaction
    /// that no admission or settlement overlaps; returns how many counters it wrote.
    fn set_timezone(&self, calendar: &Calendar) -> Result<usize>;

    fn query_rows(&self, q: &Query) -> Result<Vec<Row>>;
    /// Totals and grouped totals over tenant, agent, model, status and whole days read the
    /// rollups (`rollups::plan`), plus the rows of the parts of days at a range's ends;
    /// others scan the rows. Both give the same answer while no row has been purged.
    fn query_aggregate(&self, q: &Query, agg: &Aggregate) -> Result<Cell>;
    /// One total per group, sorted by key.
    fn query_grouped(&self, q: &Query, by: &[GroupKey], agg: &Aggregate) -> Result<Vec<(GroupValues, Cell)>>;
    fn execution(&self, id: &str) -> Result<Option<(Row, Option<Details>)>>;

    /// Stores (or with `None` removes) a sealed API key for a scope ("global", "tenant:<id>").
    fn api_key_put(&self, scope: &str, provider: &str, sealed: Option<&Sealed>) -> Result<()>;
    fn api_key_get(&self, scope: &str, provider: &str) -> Result<Option<Sealed>>;
    /// Providers that have a stored key in a scope (never the keys).
    fn api_key_providers(&self, scope: &str) -> Result<Vec<String>>;

    fn breaker_status(&self, key: &BreakerKey) -> Result<breaker::State>;
    fn breaker_reset(&self, key: &BreakerKey) -> Result<()>;
    fn breakers_not_closed(&self) -> Result<Vec<BreakerStatus>>;

    /// One batch of retention (see `retention`), each kind in short transactions of its own:
    /// deletes up to `limit` settled executions that started before `executions_before`,
    /// then clears the details of up to `limit` executions that started before
    /// `details_before`. Returns how many of each; fewer than `limit` means that kind is done.
    fn purge_batch(&self, details_before: Option<Micros>, executions_before: Option<Micros>, limit: i64) -> Result<Purged>;
    /// How many executions a purge with these cutoffs would clear and delete now; changes nothing.
    fn purge_preview(&self, details_before: Option<Micros>, executions_before: Option<Micros>) -> Result<Purged>;
    /// The response cache's unexpired entry for `key` of this tenant, at `now`.
    fn cache_get(&self, tenant_id: Option<&str>, key: &str, now: Micros) -> Result<Option<cache::Entry>>;
    /// Stores an answer for `key` of this tenant unless an unexpired one is there (of
    /// several callers that missed at once, the first to write wins and the entry stays
    /// whole), and removes up to `cache::SWEEP` expired entries, in one transaction.
    fn cache_put(&self, tenant_id: Option<&str>, key: &str, entry: &cache::Entry) -> Result<()>;
    /// Today's failed and refused calls per tenant, from the rollups of the day keyed `day`
    /// (the dashboard's list of tenants, `tenant_list::list`; `tenant_list::problems_sql`).
    fn problems_today(&self, day: &str) -> Result<Vec<tenant_list::Problems>>;
    /// The ids of every tenant in the register (`Holders::Register`) or with a budget
    /// (`Holders::Budgets`), by id, each with its name when `names` (else None): the dashboard's
    /// list of tenants when its query needs nothing else of them (`tenant_list::ids_sql`).
    fn tenant_ids(&self, of: tenant_list::Holders, names: bool) -> Result<Vec<(String, Option<String>)>>;
    /// The `limit` tenants that spent most in one counter period ("2026-12", "2026-12-02"),
    /// with their usage, most first: the dashboard's spend by tenant.
    fn top_tenants(&self, period_key: &str, limit: i64) -> Result<Vec<(String, budget::Usage)>>;

    /// Whether this is a SQLite database file, which other SQLite users in the process (Python's
    /// `sqlite3`) may open too.
    fn is_sqlite_file(&self) -> bool {
        false
    }

    /// Whether every write takes one lock that calls wait for (SQLite's), so a long batch of
    /// work (retention) holds up calls; PostgreSQL locks only the rows a batch touches.
    fn writes_share_one_lock(&self) -> bool {
        false
    }
}

/// Executions whose details were (or would be) cleared, and executions deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub details: i64,
    pub executions: i64,
    /// The database is in use, so retention pauses longer after the batch: other writes came
    /// during or just before it (SQLite), calls were admitted since the batch before it
    /// (PostgreSQL).
    pub in_use: bool,
}

/// Which model of a chain a call starts with, decided by the models' breakers in order.
pub(crate) enum Choice {
    Model { index: usize, probe: bool },
    /// Every breaker is open; the earliest time one lets a probe through.
    AllOpen { retry_at: Micros },
}

/// Walks the chain's breakers in order (`admit` claims a half-open probe in the store's
/// transaction) and returns the first model let through. No breakers: the first model.
pub(crate) fn first_admitted<E>(
    keys: &[BreakerKey],
    mut admit: impl FnMut(&BreakerKey) -> std::result::Result<breaker::Admission, E>,
) -> std::result::Result<Choice, E> {
    if keys.is_empty() {
        return Ok(Choice::Model { index: 0, probe: false });
    }
    let mut retry_at = Micros::MAX;
    for (index, key) in keys.iter().enumerate() {
        match admit(key)? {
            breaker::Admission::Pass => return Ok(Choice::Model { index, probe: false }),
            breaker::Admission::Probe => return Ok(Choice::Model { index, probe: true }),
            breaker::Admission::Reject { retry_at: r } => retry_at = retry_at.min(r),
        }
    }
    Ok(Choice::AllOpen { retry_at })
}

/// The row of a call refused by a hard budget.
pub(crate) fn blocked(b: &Breach, now: Micros) -> Completion {
    Completion::refused(crate::execution::Status::Blocked, "BudgetExceededError", b.describe(), now)
}

/// The row of a call refused by a rate limit.
pub(crate) fn rate_limited(b: &crate::ratelimit::RateBreach, now: Micros) -> Completion {
    Completion::refused(crate::execution::Status::RateLimited, "RateLimitedError", b.describe(), now)
}

/// The row of a call refused because every model's breaker is open.
pub(crate) fn short_circuited(agent: &str, retry_at: Micros, now: Micros) -> Completion {
    let msg = format!("circuit open for every model of {agent}; retry at {retry_at} (unix micros)");
    Completion::refused(crate::execution::Status::ShortCircuited, "CircuitOpenError", msg, now)
}

/// Opens the store a `database` setting names: a path, ":memory:", "sqlite:///path" or a
/// SQLite "file:" URI for SQLite; a "postgresql://" or "postgres://" URL for PostgreSQL.
/// Scheme names are case-insensitive; any other scheme is an error (with the password
/// masked), never a file name. A database that has no timezone yet (new, or made by a
/// tenantllm before timezones were stored) gets `timezone`.
pub fn open(database: &str, timezone: &str) -> Result<Box<dyn Store>> {
    let Some((scheme, rest)) = database.split_once("://") else {
        return Ok(Box::new(SqliteStore::open(database, timezone)?));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "postgres" | "postgresql" => Ok(Box::new(PostgresStore::open(&format!("postgresql://{rest}"), timezone)?)),
        // SQLAlchemy style: sqlite:///relative.db, sqlite:////absolute.db
        "sqlite" => match rest.strip_prefix('/') {
            Some(path) => Ok(Box::new(SqliteStore::open(path, timezone)?)),
            None => config_err(format!("database {database:?}: write a SQLite URL as sqlite:///path (three slashes)")),
        },
        "file" => Ok(Box::new(SqliteStore::open(database, timezone)?)),
        _ => config_err(format!(
            "database {:?}: unsupported URL scheme {scheme:?}; use a file path, \":memory:\", \"sqlite:///path\" or \"postgresql://user:password@host/db\"",
            crate::config::mask_password(database)
        )),
    }
}

// ---------------------------------------------------------------- shared by both stores

/// The database's timezone; both stores read it first thing in every write that keys
/// counters by date, so a `set_timezone` in another process cannot slip in between.
const TIMEZONE_SQL: &str = "SELECT value FROM settings WHERE name = 'timezone'";

/// Ok if the counters a write keys by `calendar` are the database's (the stored zone, UTC
/// when none is stored); otherwise the engine must adopt the stored zone and run it again.
fn keyed_like(stored: Option<String>, calendar: &Calendar) -> Result<()> {
    match stored {
        Some(zone) if zone != calendar.name() => Err(crate::error::Error::TimezoneChanged(zone)),
        None if calendar.name() != DEFAULT_TIMEZONE => Err(crate::error::Error::TimezoneChanged(DEFAULT_TIMEZONE.into())),
        _ => Ok(()),
    }
}

/// The calendar of a stored zone (UTC when none is stored).
fn calendar_of(stored: Option<String>) -> Result<Calendar> {
    Calendar::new(stored.as_deref().unwrap_or(DEFAULT_TIMEZONE))
}

/// A reservation's counters moved to `cal`'s periods containing the call's start (daily keys
/// are "2026-11-28", monthly "2026-11"): after a timezone change, calls in flight hold their
/// estimates on the counters their usage will be added to.
fn rekey(keys: &[CounterKey], cal: &Calendar, started_at: Micros) -> Vec<CounterKey> {
    let mut out: Vec<CounterKey> = Vec::with_capacity(keys.len());
    for (scope, period) in keys {
        let p = if period.len() == "2026-11-28".len() { Period::Daily } else { Period::Monthly };
        let key = (scope.clone(), cal.period_key(p, started_at));
        if !out.contains(&key) {
            out.push(key);
        }
    }
    out
}

/// A counter row: (scope, period). Sorted like the "C" collation sorts them.
type CounterKey = (String, String);

/// The counters one settled call adds to: global, agent and tenant, for the day and month
/// it started in.
fn usage_keys(cal: &Calendar, tenant: Option<&str>, agent: &str, at: Micros) -> Vec<CounterKey> {
    day_usage_keys(tenant, agent, &cal.period_key(Period::Daily, at))
}

/// `usage_keys` of the day keyed `day` ("2026-11-28") and its month.
fn day_usage_keys(tenant: Option<&str>, agent: &str, day: &str) -> Vec<CounterKey> {
    let periods = [day.to_string(), day[..7].to_string()];
    budget::scopes_of(tenant, agent).into_iter().flat_map(|s| periods.iter().map(move |p| (s.clone(), p.clone()))).collect()
}

/// The counters a reservation holds, as stored in its `counters` column: "scope<TAB>period" lines.
fn encode_keys<'a>(keys: impl Iterator<Item = &'a CounterKey>) -> String {
    keys.map(|(s, p)| format!("{s}\t{p}")).collect::<Vec<_>>().join("\n")
}

fn decode_keys(s: &str) -> Vec<CounterKey> {
    s.lines().filter_map(|l| l.split_once('\t')).map(|(s, p)| (s.to_string(), p.to_string())).collect()
}

/// How `budget_put` writes a budget.
#[derive(Debug, Clone, Copy)]
pub enum BudgetWrite<'a> {
    /// Insert; an error if the tenant already has a budget.
    Create,
    /// Insert, or change only these fields of the stored budget (`TenantBudget.update`), so
    /// that changes made meanwhile to the other fields (by an operator, say) survive.
    Update(&'a [String]),
}

/// The `ON CONFLICT (tenant_id)` action of a budget upsert (the same SQL for both stores).
fn budget_on_conflict(write: BudgetWrite<'_>) -> Result<String> {
    let BudgetWrite::Update(fields) = write else { return Ok("DO NOTHING".into()) };
    let mut set = Vec::with_capacity(fields.len() + 1);
    for f in fields {
        // The field names are also the column names.
        match budget::BUDGET_FIELDS.iter().find(|c| **c == f.as_str()) {
            Some(c) => set.push(format!("{c} = excluded.{c}")),
            None => return config_err(format!("unknown budget field {f:?}; expected one of {}", budget::BUDGET_FIELDS.join(", "))),
        }
    }
    set.push("updated_at = excluded.updated_at".into());
    Ok(format!("DO UPDATE SET {}", set.join(", ")))
}

/// The register's columns in `SeenTenant`'s order (`tenants`, `tenant`).
const SEEN_COLUMNS: &str = "tenant_id, name, first_used_at, last_used_at";

const BUDGET_COLUMNS: &str = "tenant_id, name, daily_limit, monthly_limit, daily_token_limit, monthly_token_limit,
     daily_execution_limit, monthly_execution_limit, enforcement, rpm_limit, tpm_limit, max_concurrent";

/// The response cache's SQL, shared by both stores (PostgreSQL writes `$` for `?`): read an
/// entry; remove expired ones, a bounded batch; write one, replacing only an expired one.
const CACHE_GET_SQL: &str = "SELECT content, model, provider, finish_reason, execution_id, created_at, expires_at
     FROM response_cache WHERE tenant_id = ?1 AND key = ?2 AND expires_at > ?3";
const CACHE_SWEEP_SQL: &str = "DELETE FROM response_cache WHERE (tenant_id, key) IN
     (SELECT tenant_id, key FROM response_cache WHERE expires_at <= ?1 LIMIT ?2)";
const CACHE_PUT_SQL: &str = "INSERT INTO response_cache
         (tenant_id, key, content, model, provider, finish_reason, execution_id, created_at, expires_at)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
     ON CONFLICT (tenant_id, key) DO UPDATE SET content = excluded.content, model = excluded.model,
         provider = excluded.provider, finish_reason = excluded.finish_reason, execution_id = excluded.execution_id,
         created_at = excluded.created_at, expires_at = excluded.expires_at
     WHERE response_cache.expires_at <= excluded.created_at";

/// The execution columns, in `FIELDS` order.
fn all_columns() -> String {
    FIELDS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// The settled executions `rebuild_counters` sums, as (tenant_id, agent, started_at,
/// total_cost, total_tokens): those that count as usage, started at ?1 ($1) or later
/// (`rollups::Rebuild::rows_from`). Calls still running are left out; their reservations
/// stand for them.
fn counted_executions_sql(d: Dialect) -> String {
    format!(
        "SELECT tenant_id, agent, started_at, total_cost, total_tokens FROM executions WHERE status NOT IN ({}) AND started_at >= {}",
        not_counted(),
        d.param(1)
    )
}

/// What the daily rollups of the days before ?1 ($1) hold of the calls `counted_executions_sql`
/// would count, as (day, tenant_id, agent, calls, total_cost, total_tokens): the usage of
/// purged days (`rollups::Rebuild::usage_before`).
fn kept_usage_sql(d: Dialect) -> String {
    let (before, sum) = match d {
        Dialect::Sqlite => ("?1", ""),
        Dialect::Postgres => ("$1", "::BIGINT"),
    };
    format!(
        "SELECT period, NULLIF(tenant_id, ''), agent, SUM(calls){sum}, SUM(total_cost){sum}, SUM(total_tokens){sum}
         FROM daily_rollups WHERE period < {before} AND status NOT IN ({}) GROUP BY period, tenant_id, agent",
        not_counted()
    )
}

/// The statuses of calls that are not counted as usage, quoted for an IN list (running too).
fn not_counted() -> String {
    let left_out: Vec<String> = Status::ALL
        .iter()
        .filter(|s| !s.counts_as_usage() || **s == Status::Running)
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    left_out.join(", ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::budget::{GlobalBudgets, Limits, Plan};
    use crate::error::Error;
    use crate::execution::{Field, Filter, Value};
    use crate::money::Nanos;

    /// A call of agent "A" on "mock/x" started at `at`, as the stores' tests admit them.
    pub(crate) fn execution(id: &str, at: Micros) -> NewExecution {
        NewExecution { id: id.into(), agent: "A".into(), model_id: "mock/x".into(), provider: "mock".into(), started_at: at, metadata: "{}".into(), ..Default::default() }
    }

    /// The admission of `e` at its start under `plan`, with its lease until `expires` and the
    /// fields the stores' tests rarely vary (no breakers, a minute's rate window); a test that
    /// varies one sets it with `..`.
    pub(crate) fn admit_request<'a>(e: &'a NewExecution, plan: Plan<'a>, estimate: budget::Usage, calendar: &'a Calendar, expires: Micros) -> AdmitRequest<'a> {
        AdmitRequest {
            execution: e,
            plan,
            estimate,
            reservation_expires_at: expires,
            breaker_keys: &[],
            probe_lease: 1,
            calendar,
            now: e.started_at,
            rate_window: 60_000_000,
            record_rate_limited: true,
            remember_tenant: false,
            tenant_name: None,
        }
    }

    /// The settlement of `e` with `done` (`reserved`: it holds a reservation), with the fields
    /// the stores' tests rarely vary (no budget checks, rate scopes or breakers; no details).
    pub(crate) fn finish_request<'a>(e: &'a NewExecution, done: &'a Completion, calendar: &'a Calendar, reserved: bool) -> FinishRequest<'a> {
        FinishRequest { execution: e, completion: done, reserved, checks: &[], rate_scopes: &[], logged_tokens: 0, breakers: &[], calendar, store_details: false }
    }

    /// Admits call `id` at `now` (no tenant, estimated at 600 nano-USD and 10 tokens) under
    /// `global`, in UTC, with its lease until `expires`.
    pub(crate) fn admit(store: &dyn Store, global: &GlobalBudgets, id: &str, now: Micros, expires: Micros) -> Admitted {
        let e = execution(id, now);
        let plan = Plan { global, agent: "A", tenant_id: None, tenant_override: None };
        store.admit(&admit_request(&e, plan, budget::estimate(Nanos(600), 10), &Calendar::new("UTC").unwrap(), expires)).unwrap()
    }

    /// 1,000 nano-USD a day for all calls: room for one estimate of `admit`'s (600), not two.
    fn one_call_a_day() -> GlobalBudgets {
        GlobalBudgets { limits: Limits { daily_cost: Some(Nanos(1000)), ..Default::default() }, ..Default::default() }
    }

    /// Shared by both stores' tests: a call whose process died keeps its reservation until its
    /// lease runs out; the next admission after that releases it and closes its row as
    /// abandoned. Returns when only the last call admitted ("c") holds a reservation.
    pub(crate) fn reservations_of_a_dead_process_expire(store: &dyn Store) {
        let global = one_call_a_day();
        let t0 = 1_800_000_000_000_000;
        assert!(matches!(admit(store, &global, "a", t0, t0 + 1_000), Admitted::Go { .. }));
        // "a" never finishes; while its lease runs, a second estimate does not fit.
        assert!(matches!(admit(store, &global, "b", t0 + 500, t0 + 10_000), Admitted::Blocked(_)));
        // After the lease, "a" is released and closed as abandoned.
        assert!(matches!(admit(store, &global, "c", t0 + 2_000, t0 + 10_000), Admitted::Go { .. }));
        let (row, _) = store.execution("a").unwrap().unwrap();
        let get = |name: &str| row.iter().find(|(n, _)| *n == name).unwrap().1.clone();
        assert_eq!(get("status"), Cell::Text("error".into()));
        assert_eq!(get("error_class"), Cell::Text("Abandoned".into()));
        let q = Query { filters: vec![Filter::Eq(Field::parse("status").unwrap(), Value::Text("blocked".into()))], ..Default::default() };
        assert_eq!(store.query_aggregate(&q, &Aggregate::Count).unwrap(), Cell::Int(1));
    }

    /// Shared by both stores' tests: a renewed lease keeps the call's reservation past its
    /// first expiry, until the renewed one; renewing a call that has none changes nothing.
    pub(crate) fn a_renewed_lease_outlives_its_first_expiry(store: &dyn Store) {
        let global = one_call_a_day();
        let t0 = 1_800_000_000_000_000;
        assert!(matches!(admit(store, &global, "a", t0, t0 + 1_000), Admitted::Go { .. }));
        assert_eq!(store.renew_leases(&["a".to_string(), "gone".to_string()], t0 + 5_000).unwrap(), 1);
        // Past the first expiry, "a" still holds its reservation.
        assert!(matches!(admit(store, &global, "b", t0 + 2_000, t0 + 10_000), Admitted::Blocked(_)));
        assert!(matches!(admit(store, &global, "c", t0 + 6_000, t0 + 10_000), Admitted::Go { .. }));
        assert_eq!(store.renew_leases(&[], t0).unwrap(), 0);
    }

    /// Shared by both stores' tests: `set_timezone` moves settled usage and in-flight
    /// reservations to the new zone's periods, and a write keyed by the old zone is refused.
    pub(crate) fn set_timezone_moves_counters_and_refuses_stale_writers(store: &dyn Store) {
        let (utc, berlin) = (Calendar::new("UTC").unwrap(), Calendar::new("Europe/Berlin").unwrap());
        let global = GlobalBudgets { limits: Limits { daily_executions: Some(2), ..Default::default() }, ..Default::default() };
        // 23:30 UTC on Nov 30 is Dec 1 in Berlin.
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-30T23:30:00Z").unwrap().timestamp_micros();
        let admit = |id: &str, cal: &Calendar| {
            let plan = Plan { global: &global, agent: "A", tenant_id: None, tenant_override: None };
            store.admit(&admit_request(&execution(id, t), plan, budget::estimate(Nanos(600), 10), cal, t + 3_600_000_000))
        };
        let settle = |id: &str, cal: &Calendar| {
            let done = Completion::refused(Status::Success, "", String::new(), t + 1);
            store.finish(&finish_request(&execution(id, t), &done, cal, true))
        };
        // "a" settles and "b" stays in flight, both on UTC's Nov 30.
        assert!(matches!(admit("a", &utc).unwrap(), Admitted::Go { .. }));
        settle("a", &utc).unwrap();
        assert!(matches!(admit("b", &utc).unwrap(), Admitted::Go { .. }));
        assert_eq!(store.usage("global", "2026-11-30").unwrap().executions, 1);

        assert_eq!(store.timezone().unwrap(), "UTC");
        store.set_timezone(&berlin).unwrap();
        assert_eq!(store.timezone().unwrap(), "Europe/Berlin");
        assert_eq!(store.usage("global", "2026-11-30").unwrap().executions, 0);
        assert_eq!(store.usage("global", "2026-12-01").unwrap().executions, 1);
        assert_eq!(store.usage("global", "2026-12").unwrap().executions, 1);

        // A process still on UTC is told the new zone and writes nothing.
        match admit("c", &utc) {
            Err(Error::TimezoneChanged(z)) => assert_eq!(z, "Europe/Berlin"),
            other => panic!("{other:?}"),
        }
        assert!(store.execution("c").unwrap().is_none());
        assert!(matches!(settle("b", &utc), Err(Error::TimezoneChanged(_))));
        // "b"'s reservation moved to Berlin's Dec 1 with "a": the limit of 2 is taken.
        assert!(matches!(admit("c", &berlin).unwrap(), Admitted::Blocked(_)));
        settle("b", &berlin).unwrap();
        assert_eq!(store.usage("global", "2026-12-01").unwrap().executions, 2);
        // Released exactly: nothing is left reserved, so a rebuild changes nothing.
        assert!(matches!(admit("d", &berlin).unwrap(), Admitted::Blocked(_)));
        store.rebuild_counters().unwrap();
        assert_eq!(store.usage("global", "2026-12-01").unwrap().executions, 2);
        assert_eq!(store.usage("global", "2026-11-30").unwrap().executions, 0);
    }

    /// Shared by both stores' tests: the running totals of the rate limits refuse exactly
    /// what counting the window would (the admissions stamped after `now - window`, later
    /// stamps included), with clocks that lag (a call that read its clock, then waited for
    /// the lock), tokens corrected at settlement, and calls that outlive the window.
    pub(crate) fn rate_totals_refuse_what_counting_the_window_would(store: &dyn Store) {
        let cal = Calendar::new("UTC").unwrap();
        let (window, rpm, tpm) = (10_000_000, 5, 400);
        let global = GlobalBudgets { limits: Limits { rpm: Some(rpm), tpm: Some(tpm), ..Default::default() }, ..Default::default() };
        let mut seed = 7u64;
        let mut random = |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) % n) as i64
        };
        // The model: every admission (stamp, id, tokens), as the log holds them.
        let mut log: Vec<(Micros, String, i64)> = Vec::new();
        let mut in_flight: Vec<(NewExecution, Vec<String>)> = Vec::new();
        let mut clock = chrono::DateTime::parse_from_rfc3339("2026-11-30T12:00:00Z").unwrap().timestamp_micros();
        let (mut admitted, mut refused, mut lagging) = (0, 0, 0);
        for i in 0..600 {
            clock += random(1_500_000);
            let lag = if random(3) == 0 { random(2_000_000) } else { 0 };
            lagging += i32::from(lag > 0);
            let now = clock - lag;
            let tokens = 10 + random(90);
            let in_window = log.iter().filter(|(at, _, _)| *at > now - window);
            let (n, used) = in_window.fold((0, 0), |(n, t), e| (n + 1, t + e.2));
            let expected = if n >= rpm {
                Some(("global_rpm", n))
            } else if used + tokens > tpm {
                Some(("global_tpm", used))
            } else {
                None
            };
            let e = execution(&crate::execution::new_id(now), now);
            let plan = Plan { global: &global, agent: "A", tenant_id: None, tenant_override: None };
            let req = admit_request(&e, plan, budget::estimate(Nanos(0), tokens), &cal, now + 3_600_000_000);
            let got = store.admit(&AdmitRequest { rate_window: window, ..req }).unwrap();
            match (got, expected) {
                (Admitted::Go { rate_scopes, .. }, None) => {
                    admitted += 1;
                    log.push((now, e.id.clone(), tokens));
                    in_flight.push((e, rate_scopes));
                }
                (Admitted::RateLimited(b), Some((name, current))) => {
                    refused += 1;
                    assert_eq!((b.check.name, b.current), (name, current), "call {i}");
                }
                (got, expected) => panic!("call {i}: got {got:?}, expected {expected:?}"),
            }
            // Settle a call in flight now and then, with fewer tokens than it reserved.
            if random(2) == 0 && !in_flight.is_empty() {
                let (e, rate_scopes) = in_flight.remove(random(in_flight.len() as u64) as usize);
                let entry = log.iter_mut().find(|l| l.1 == e.id).unwrap();
                let logged_tokens = entry.2;
                entry.2 = random(entry.2 as u64 + 1);
                let mut done = Completion::refused(Status::Success, "", String::new(), clock);
                (done.error_class, done.error_message) = (None, None);
                done.usage = crate::pricing::Usage::new(entry.2, 0, 0);
                store.finish(&FinishRequest { rate_scopes: &rate_scopes, logged_tokens, ..finish_request(&e, &done, &cal, false) }).unwrap();
            }
        }
        assert!(admitted > 100 && refused > 100 && lagging > 100, "{admitted} admitted, {refused} refused, {lagging} lagging");
    }

    /// Shared by both stores' tests: an unexpired entry is kept against a second writer and
    /// an expired one replaced; entries are per tenant; each write removes at most
    /// `cache::SWEEP` expired entries.
    pub(crate) fn cache_entries_keep_the_first_writer_and_are_swept(store: &dyn Store) {
        let t: Micros = 1_800_000_000_000_000;
        let entry = |content: &str, at: Micros, ttl: Micros| cache::Entry {
            content: content.into(),
            model: "m".into(),
            provider: "p".into(),
            finish_reason: Some("stop".into()),
            execution_id: format!("e-{content}"),
            created_at: at,
            expires_at: at + ttl,
        };
        let get = |tenant: Option<&str>, key: &str, now: Micros| store.cache_get(tenant, key, now).unwrap().map(|e| e.content);
        store.cache_put(Some("t1"), "k", &entry("a", t, 10)).unwrap();
        store.cache_put(Some("t1"), "k", &entry("b", t + 1, 10)).unwrap();
        assert_eq!(get(Some("t1"), "k", t + 9).as_deref(), Some("a"));
        assert_eq!(store.cache_get(Some("t1"), "k", t).unwrap(), Some(entry("a", t, 10)));
        assert_eq!((get(Some("t2"), "k", t), get(None, "k", t)), (None, None), "another tenant, no tenant");
        assert_eq!(get(Some("t1"), "k", t + 10), None, "expired at expires_at");
        store.cache_put(Some("t1"), "k", &entry("c", t + 10, 10)).unwrap();
        assert_eq!(get(Some("t1"), "k", t + 11).as_deref(), Some("c"));
        // 250 entries expiring at t + 1 (read back at t, while still there).
        let old: Vec<String> = (0..250).map(|i| format!("old{i}")).collect();
        for k in &old {
            store.cache_put(None, k, &entry("o", t, 1)).unwrap();
        }
        let left = || old.iter().filter(|k| get(None, k, t).is_some()).count();
        assert_eq!(left(), 250);
        // The expired "c" (at t + 20) and 250 old ones: one write removes 100 of them.
        store.cache_put(None, "new", &entry("n", t + 100, 1000)).unwrap();
        let c_left = usize::from(get(Some("t1"), "k", t + 11).is_some());
        assert_eq!(left() + c_left, 251 - cache::SWEEP as usize);
        for _ in 0..2 {
            store.cache_put(None, "new", &entry("n2", t + 100, 1000)).unwrap();
        }
        assert_eq!((left(), get(Some("t1"), "k", t + 11)), (0, None));
        assert_eq!(get(None, "new", t + 100).as_deref(), Some("n"), "still the first, unexpired");
    }

    #[test]
    fn reservations_move_to_the_periods_of_the_new_zone() {
        let berlin = Calendar::new("Europe/Berlin").unwrap();
        // 23:30 UTC on Nov 30 is 00:30 on Dec 1 in Berlin.
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-30T23:30:00Z").unwrap().timestamp_micros();
        let utc_keys: Vec<CounterKey> = [("global", "2026-11-30"), ("global", "2026-11"), ("tenant:t", "2026-11-30")]
            .iter()
            .map(|(s, p)| (s.to_string(), p.to_string()))
            .collect();
        let moved = rekey(&utc_keys, &berlin, t);
        let want: Vec<CounterKey> =
            [("global", "2026-12-01"), ("global", "2026-12"), ("tenant:t", "2026-12-01")].iter().map(|(s, p)| (s.to_string(), p.to_string())).collect();
        assert_eq!(moved, want);
    }

    #[test]
    fn a_write_keyed_by_another_zone_is_refused_with_the_stored_one() {
        let utc = Calendar::new("UTC").unwrap();
        let berlin = Calendar::new("Europe/Berlin").unwrap();
        assert!(keyed_like(None, &utc).is_ok());
        assert!(keyed_like(Some("Europe/Berlin".into()), &berlin).is_ok());
        match keyed_like(Some("Europe/Berlin".into()), &utc) {
            Err(crate::error::Error::TimezoneChanged(z)) => assert_eq!(z, "Europe/Berlin"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(keyed_like(None, &berlin), Err(crate::error::Error::TimezoneChanged(z)) if z == "UTC"));
    }

    #[test]
    fn unknown_url_schemes_are_errors_with_the_password_masked() {
        for url in ["postgresql+psycopg2://app:secret@db/x", "mysql://app:secret@db/x", "sqlite:/x.db", "http://app:secret@h/"] {
            let e = open(url, "UTC").err().expect(url).to_string();
            assert!(!e.contains("secret") && e.contains("database"), "{e}");
        }
        // Upper-case schemes are the same schemes: this one reaches SQLite.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        assert!(open(&format!("SQLITE:///{}", path.display()), "UTC").is_ok());
        assert!(path.exists());
    }

    #[test]
    fn rebuild_leaves_out_calls_never_admitted_and_calls_in_flight() {
        assert!(
            counted_executions_sql(Dialect::Sqlite).contains("WHERE status NOT IN ('running', 'blocked', 'short_circuited', 'rate_limited')"),
            "{}",
            counted_executions_sql(Dialect::Sqlite)
        );
    }
}
