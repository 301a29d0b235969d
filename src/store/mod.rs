//! Persistent state behind one trait, so SQLite (embedded default) and a server database can
//! provide the same guarantees. Policy lives in `budget` and `breaker`; a store only reads and
//! writes, atomically, and calls those pure functions inside its transactions.

mod pg_schema;
mod postgres;
mod schema;
mod sqlite;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use crate::breaker;
use crate::budget::{self, Breach, Check, TenantBudget};
use crate::clock::{Calendar, Micros, Period};
use crate::error::Result;
use crate::secrets::Sealed;
use crate::execution::{Aggregate, Cell, Completion, Details, Field, NewExecution, Query, Row, Status, FIELDS};

/// Everything `admit` needs to decide whether a call may start.
pub struct AdmitRequest<'a> {
    pub execution: &'a NewExecution,
    pub plan: budget::Plan<'a>,
    pub estimate: budget::Usage,
    pub reservation_expires_at: Micros,
    /// Breaker key of each model in the chain; empty when the agent has no breaker.
    pub breaker_keys: &'a [BreakerKey],
    pub probe_lease: i64,
    pub calendar: &'a Calendar,
    pub now: Micros,
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
    Go { model_index: usize, probe: bool, checks: Vec<Check>, warnings: Vec<Breach> },
    /// A hard limit would be passed; a `blocked` row is written.
    Blocked(Breach),
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
    fn finish(&self, req: &FinishRequest<'_>) -> Result<Vec<Alert>>;

    fn budget_get(&self, tenant_id: &str) -> Result<Option<TenantBudget>>;
    /// Inserts (fails if it exists when `create_only`) or replaces a budget.
    fn budget_put(&self, b: &TenantBudget, create_only: bool) -> Result<()>;
    fn budget_delete(&self, tenant_id: &str) -> Result<bool>;
    fn budget_all(&self) -> Result<Vec<TenantBudget>>;
    /// Recorded usage of a scope in a period (counters; reservations excluded).
    fn usage(&self, scope: &str, period_key: &str) -> Result<budget::Usage>;
    /// Recorded usage of every scope with the given prefix in one period ("tenant:").
    fn usage_by_scope(&self, prefix: &str, period_key: &str) -> Result<Vec<(String, budget::Usage)>>;
    /// Recorded usage of one scope per day, for days from `first_day` ("2026-11-01") on.
    fn usage_daily(&self, scope: &str, first_day: &str) -> Result<Vec<(String, budget::Usage)>>;
    /// Recomputes every counter from the execution rows; returns how many it wrote.
    fn rebuild_counters(&self, calendar: &Calendar) -> Result<usize>;

    fn query_rows(&self, q: &Query) -> Result<Vec<Row>>;
    fn query_aggregate(&self, q: &Query, agg: &Aggregate) -> Result<Cell>;
    fn query_grouped(&self, q: &Query, by: Field, agg: &Aggregate) -> Result<Vec<(Option<String>, Cell)>>;
    fn execution(&self, id: &str) -> Result<Option<(Row, Option<Details>)>>;

    /// Stores (or with `None` removes) a sealed API key for a scope ("global", "tenant:<id>").
    fn api_key_put(&self, scope: &str, provider: &str, sealed: Option<&Sealed>) -> Result<()>;
    fn api_key_get(&self, scope: &str, provider: &str) -> Result<Option<Sealed>>;
    /// Providers that have a stored key in a scope (never the keys).
    fn api_key_providers(&self, scope: &str) -> Result<Vec<String>>;

    fn breaker_status(&self, key: &BreakerKey) -> Result<breaker::State>;
    fn breaker_reset(&self, key: &BreakerKey) -> Result<()>;
    fn breakers_not_closed(&self) -> Result<Vec<BreakerStatus>>;
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

/// The row of a call refused because every model's breaker is open.
pub(crate) fn short_circuited(agent: &str, retry_at: Micros, now: Micros) -> Completion {
    let msg = format!("circuit open for every model of {agent}; retry at {retry_at} (unix micros)");
    Completion::refused(crate::execution::Status::ShortCircuited, "CircuitOpenError", msg, now)
}

/// Opens the store a `database` setting names: a path, ":memory:" or "sqlite:///path" for
/// SQLite; a "postgresql://" or "postgres://" URL for PostgreSQL.
pub fn open(database: &str) -> Result<Box<dyn Store>> {
    if database.starts_with("postgres://") || database.starts_with("postgresql://") {
        return Ok(Box::new(PostgresStore::open(database)?));
    }
    // SQLAlchemy style: sqlite:///relative.db, sqlite:////absolute.db
    let path = database.strip_prefix("sqlite:///").unwrap_or(database);
    Ok(Box::new(SqliteStore::open(path)?))
}

// ---------------------------------------------------------------- shared by both stores

/// A counter row: (scope, period). Sorted like the "C" collation sorts them.
type CounterKey = (String, String);

/// The counters one settled call adds to: global, agent and tenant, for the day and month
/// it started in.
fn usage_keys(cal: &Calendar, tenant: Option<&str>, agent: &str, at: Micros) -> Vec<CounterKey> {
    let periods = [cal.period_key(Period::Daily, at), cal.period_key(Period::Monthly, at)];
    budget::scopes_of(tenant, agent).into_iter().flat_map(|s| periods.iter().map(move |p| (s.clone(), p.clone()))).collect()
}

/// The counters a reservation holds, as stored in its `counters` column: "scope<TAB>period" lines.
fn encode_keys<'a>(keys: impl Iterator<Item = &'a CounterKey>) -> String {
    keys.map(|(s, p)| format!("{s}\t{p}")).collect::<Vec<_>>().join("\n")
}

fn decode_keys(s: &str) -> Vec<CounterKey> {
    s.lines().filter_map(|l| l.split_once('\t')).map(|(s, p)| (s.to_string(), p.to_string())).collect()
}

const BUDGET_COLUMNS: &str = "tenant_id, name, daily_limit, monthly_limit, daily_token_limit, monthly_token_limit,
     daily_execution_limit, monthly_execution_limit, enforcement";

/// The execution columns, in `FIELDS` order.
fn all_columns() -> String {
    FIELDS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// The settled executions `rebuild_counters` sums, as (tenant_id, agent, started_at,
/// total_cost, total_tokens): those that count as usage. Calls still running are left out;
/// their reservations stand for them.
fn counted_executions_sql() -> String {
    let left_out: Vec<String> = Status::ALL
        .iter()
        .filter(|s| !s.counts_as_usage() || **s == Status::Running)
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    format!("SELECT tenant_id, agent, started_at, total_cost, total_tokens FROM executions WHERE status NOT IN ({})", left_out.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuild_leaves_out_calls_never_admitted_and_calls_in_flight() {
        assert!(
            counted_executions_sql().ends_with("WHERE status NOT IN ('running', 'blocked', 'short_circuited')"),
            "{}",
            counted_executions_sql()
        );
    }
}
