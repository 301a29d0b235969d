//! The PostgreSQL store, for deployments that outgrow one host: the same tables and the same
//! guarantees as the SQLite store (DESIGN §3), shared by every process that points at the
//! database.
//!
//! Concurrency: every state change is one transaction at READ COMMITTED. Where SQLite
//! serialises all writers, here each transaction locks exactly the rows its decision reads:
//! the usage counters a call is checked against (`SELECT ... FOR UPDATE`, always in
//! (scope, period) order, so two calls never wait on each other in a cycle) and the breaker
//! row it would change. The policy functions in `budget` and `breaker` then decide on rows
//! no other process can change until the transaction ends.
//!
//! Threads: the `postgres` client drives its connection with a private tokio runtime and
//! panics when called from inside another runtime, which is where the engine calls the store.
//! So a database operation runs on the calling thread once it has left the engine's runtime
//! (a sync call), or else on the store's own OS threads while the caller waits (`Workers`).
//!
//! Connection loss: a transaction interrupted before its commit was sent did not happen, so
//! it runs again on a fresh connection. When the connection drops during the commit itself,
//! the store asks the database whether it took effect (for instance: does the execution row
//! exist?) before running it again, so nothing is applied twice; when it cannot tell, the
//! call fails with a `StoreError`. TLS follows the URL's `sslmode` (see `pg_tls`).
//!
//! Modules: `connect` (threads, connections, retries), `db` (statements and transactions),
//! `migrate`, `admission` (admit and settle, with `counters`, `rates`, `executions`,
//! `breakers`; `server_side` runs the common case in one round trip), `budgets`, `api_keys`, `queries` (reads), `rebuild` (timezone changes), `retention`, `cache` and `tenant_list`.

mod admission;
mod api_keys;
mod breakers;
mod budgets;
mod cache;
mod connect;
mod counters;
mod db;
mod executions;
mod migrate;
mod queries;
mod rates;
mod rebuild;
mod record;
mod retention;
mod server_side;
mod tenant_list;
#[cfg(test)]
mod tests;

use connect::{
    begin_sql, describe, pool_size, statement_cache_size, take_own_options, target, with_timeouts, Connect, Failure, Slot, Workers,
};
use db::{transact, Tx, TxFailure};
use migrate::migrate;
use server_side::StoredBudgets;

use super::{AdmitRequest, Admitted, Alert, BreakerKey, BreakerStatus, BudgetWrite, FinishRequest, Purged, Store};
use crate::breaker::{self, Admission};
use crate::budget::{self, TenantBudget};
use crate::cache::Entry;
use crate::clock::{Calendar, Micros};
use crate::error::{Error, Result};
use crate::execution::{Aggregate, Cell, Details, GroupKey, Query, Row};
use crate::ratelimit::RateUsage;
use crate::secrets::Sealed;
use crate::store::pg_tls;
use crate::store::query::GroupValues;
use crate::tenancy::SeenTenant;

pub struct PostgresStore {
    /// Dropping them closes their connections (on their own threads: closing one runs the
    /// client's runtime, which must not happen on a tokio thread).
    workers: Workers,
    /// Where the database is, for messages.
    target: String,
    /// How long a statement waits for a lock (see `connect::LOCK_TIMEOUT_MS`); the
    /// server-side functions set it for their own transactions.
    lock_timeout: String,
    /// The tenants' stored budgets as last read, for admissions in one round trip.
    budgets: StoredBudgets,
    /// The newest execution's id ("" when none) as the last purge batch read it: retention
    /// compares it with the next one's to tell whether calls are running (`retention.rs`).
    purged_at_newest: std::sync::Mutex<Option<String>>,
}

impl PostgresStore {
    /// Opens (and migrates) the database a "postgresql://" or "postgres://" URL names; one
    /// without a timezone gets `timezone`.
    pub fn open(url: &str, timezone: &str) -> Result<PostgresStore> {
        let (url, own) = take_own_options(url)?;
        let pool_size = pool_size(own.pool_size.as_deref())?;
        let statement_cache_size = statement_cache_size(own.statement_cache_size.as_deref())?;
        let (sslmode, tls) = pg_tls::connector(own.sslmode.as_deref(), own.sslrootcert.as_deref())?;
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e: postgres::Error| Error::Configuration(format!("database: not a valid PostgreSQL URL: {}", describe(&e))))?;
        config.ssl_mode(sslmode);
        if config.get_application_name().is_none() {
            config.application_name("tenantllm");
        }
        let lock_timeout = with_timeouts(&mut config, own.options.as_deref());
        let begin = begin_sql(&lock_timeout).into();
        let target = target(&config);
        let workers = Workers::start(pool_size, Connect { config, tls, begin, statement_cache_size })?;
        // Connect at once, so a wrong URL fails here with the server's reason.
        workers.run(|slot: &mut Slot| -> Result<()> {
            let conn = slot.checkout(false, &target)?;
            match transact(conn, &mut |tx: &mut Tx<'_>| migrate(tx, timezone)) {
                Ok(()) => Ok(()),
                Err(TxFailure::Failed(f)) => Err(f.into_error(&target)),
                Err(TxFailure::CommitLost(e, ())) => Err(Failure::Pg(e).into_error(&target)),
            }
        })?;
        Ok(PostgresStore { workers, target, lock_timeout, budgets: StoredBudgets::default(), purged_at_newest: Default::default() })
    }
}

impl Store for PostgresStore {
    fn admit(&self, req: &AdmitRequest<'_>) -> Result<Admitted> {
        admission::admit(self, req)
    }

    fn breaker_admit(&self, key: &BreakerKey, lease: i64, now: Micros) -> Result<Admission> {
        breakers::breaker_admit(self, key, lease, now)
    }

    fn finish(&self, req: &FinishRequest<'_>) -> Result<Vec<Alert>> {
        admission::finish(self, req)
    }

    fn renew_leases(&self, execution_ids: &[String], expires_at: Micros) -> Result<usize> {
        admission::renew_leases(self, execution_ids, expires_at)
    }

    fn budget_get(&self, tenant_id: &str) -> Result<Option<TenantBudget>> {
        budgets::budget_get(self, tenant_id)
    }

    fn budget_put(&self, b: &TenantBudget, write: BudgetWrite<'_>) -> Result<TenantBudget> {
        budgets::budget_put(self, b, write)
    }

    fn budget_delete(&self, tenant_id: &str) -> Result<bool> {
        budgets::budget_delete(self, tenant_id)
    }

    fn budget_all(&self) -> Result<Vec<TenantBudget>> {
        budgets::budget_all(self)
    }

    fn usage(&self, scope: &str, period_key: &str) -> Result<budget::Usage> {
        queries::usage(self, scope, period_key)
    }

    fn rate_usage(&self, scope: &str, since: Micros) -> Result<RateUsage> {
        queries::rate_usage(self, scope, since)
    }

    fn tenants(&self) -> Result<Vec<SeenTenant>> {
        queries::tenants(self)
    }

    fn tenant(&self, tenant_id: &str) -> Result<Option<SeenTenant>> {
        queries::tenant(self, tenant_id)
    }

    fn usage_by_scope(&self, prefix: &str, period_key: &str) -> Result<Vec<(String, budget::Usage)>> {
        queries::usage_by_scope(self, prefix, period_key)
    }

    fn usage_daily(&self, scope: &str, first_day: &str) -> Result<Vec<(String, budget::Usage)>> {
        queries::usage_daily(self, scope, first_day)
    }

    fn purge_batch(&self, details_before: Option<Micros>, executions_before: Option<Micros>, limit: i64) -> Result<Purged> {
        retention::purge_batch(self, details_before, executions_before, limit)
    }

    fn purge_preview(&self, details_before: Option<Micros>, executions_before: Option<Micros>) -> Result<Purged> {
        retention::purge_preview(self, details_before, executions_before)
    }

    fn rebuild_counters(&self) -> Result<usize> {
        rebuild::rebuild_counters(self)
    }

    fn timezone(&self) -> Result<String> {
        rebuild::timezone(self)
    }

    fn set_timezone(&self, cal: &Calendar) -> Result<usize> {
        rebuild::set_timezone(self, cal)
    }

    fn query_rows(&self, q: &Query) -> Result<Vec<Row>> {
        queries::query_rows(self, q)
    }

    fn query_aggregate(&self, q: &Query, agg: &Aggregate) -> Result<Cell> {
        queries::query_aggregate(self, q, agg)
    }

    fn query_grouped(&self, q: &Query, by: &[GroupKey], agg: &Aggregate) -> Result<Vec<(GroupValues, Cell)>> {
        queries::query_grouped(self, q, by, agg)
    }

    fn execution(&self, id: &str) -> Result<Option<(Row, Option<Details>)>> {
        queries::execution(self, id)
    }

    fn api_key_put(&self, scope: &str, provider: &str, sealed: Option<&Sealed>) -> Result<()> {
        api_keys::api_key_put(self, scope, provider, sealed)
    }

    fn api_key_get(&self, scope: &str, provider: &str) -> Result<Option<Sealed>> {
        api_keys::api_key_get(self, scope, provider)
    }

    fn api_key_providers(&self, scope: &str) -> Result<Vec<String>> {
        api_keys::api_key_providers(self, scope)
    }

    fn cache_get(&self, tenant_id: Option<&str>, key: &str, now: Micros) -> Result<Option<Entry>> {
        cache::cache_get(self, tenant_id, key, now)
    }

    fn cache_put(&self, tenant_id: Option<&str>, key: &str, e: &Entry) -> Result<()> {
        cache::cache_put(self, tenant_id, key, e)
    }

    fn breaker_status(&self, key: &BreakerKey) -> Result<breaker::State> {
        breakers::breaker_status(self, key)
    }

    fn breaker_reset(&self, key: &BreakerKey) -> Result<()> {
        breakers::breaker_reset(self, key)
    }

    fn breakers_not_closed(&self) -> Result<Vec<BreakerStatus>> {
        breakers::breakers_not_closed(self)
    }

    fn problems_today(&self, day: &str) -> Result<Vec<crate::store::tenant_list::Problems>> {
        tenant_list::problems_today(self, day)
    }

    fn tenant_ids(&self, of: crate::store::tenant_list::Holders, names: bool) -> Result<Vec<(String, Option<String>)>> {
        tenant_list::tenant_ids(self, of, names)
    }

    fn top_tenants(&self, period_key: &str, limit: i64) -> Result<Vec<(String, budget::Usage)>> {
        tenant_list::top_tenants(self, period_key, limit)
    }
}
