//! The dashboard's tenants list (today's problems, the ids of the register and the budgets) and spend by tenant (`crate::store::tenant_list`).

use super::counters::usage_at;
use super::PostgresStore;
use crate::budget;
use crate::error::Result;
use crate::store::rollups::Dialect;
use crate::store::tenant_list::{self, Problems};

pub(super) fn problems_today(store: &PostgresStore, day: &str) -> Result<Vec<Problems>> {
    store.read(|db| {
        db.query(&tenant_list::problems_sql(Dialect::Postgres), &[&day])?
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
