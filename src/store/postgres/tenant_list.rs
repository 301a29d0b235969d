//! The dashboard's tenants list (today's problems, the ids of the register and the budgets) and spend by tenant (`crate::store::tenant_list`).

use super::counters::usage_at;
use super::PostgresStore;
use crate::budget;
use crate::error::Result;
use crate::store::rollups::Dialect;
use crate::store::tenant_list::{self, Problems};

/// Today's failed and refused calls per tenant, from the day's rollups (their key starts with
/// the day): every call is in its start's day's rollup once it has an outcome, and running
/// ones are neither failed nor refused. Not from the rows: an index on `status` (migration 11's
/// `executions_problems` was partial on it) made every settlement's UPDATE of its row a new
/// row version in all the table's indexes instead of a heap-only one (migration 20).
const PROBLEMS_SQL: &str = "SELECT tenant_id,
        COALESCE(SUM(calls) FILTER (WHERE status IN ('error', 'timeout')), 0)::BIGINT,
        COALESCE(SUM(calls) FILTER (WHERE status IN ('blocked', 'rate_limited')), 0)::BIGINT
    FROM daily_rollups
    WHERE period = $1 AND status IN ('error', 'timeout', 'blocked', 'rate_limited') AND tenant_id <> ''
    GROUP BY tenant_id";

pub(super) fn problems_today(store: &PostgresStore, day: &str) -> Result<Vec<Problems>> {
    store.read(|db| {
        db.query(PROBLEMS_SQL, &[&day])?
            .iter()
            .map(|r| Ok(Problems { tenant_id: r.try_get(0)?, failed: r.try_get(1)?, refused: r.try_get(2)? }))
            .collect()
    })
}

pub(super) fn tenant_ids(store: &PostgresStore, of: tenant_list::Holders, names: bool) -> Result<Vec<(String, Option<String>)>> {
    let sql = tenant_list::ids_sql(of, names);
    store.read(|db| db.query(sql, &[])?.iter().map(|r| Ok((r.try_get(0)?, if names { r.try_get(1)? } else { None }))).collect())
}

pub(super) fn top_tenants(store: &PostgresStore, period_key: &str, limit: i64) -> Result<Vec<(String, budget::Usage)>> {
    let sql = tenant_list::top_tenants_sql(Dialect::Postgres);
    store.read(|db| db.query(&sql, &[&period_key, &limit])?.iter().map(|r| Ok((r.try_get(0)?, usage_at(r, 1)?))).collect())
}
