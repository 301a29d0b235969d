//! The response cache (`crate::cache`): entries per tenant and key, swept as they expire.

use super::db::OnCommitLoss;
use super::PostgresStore;
use crate::cache;
use crate::clock::Micros;
use crate::error::Result;
use crate::store::{CACHE_GET_SQL, CACHE_PUT_SQL, CACHE_SWEEP_SQL};

pub(super) fn cache_get(store: &PostgresStore, tenant_id: Option<&str>, key: &str, now: Micros) -> Result<Option<cache::Entry>> {
    let (sql, tenant) = (CACHE_GET_SQL.replace('?', "$"), tenant_id.unwrap_or(""));
    store.read(|db| {
        let Some(r) = db.query_opt(&sql, &[&tenant, &key, &now])? else { return Ok(None) };
        Ok(Some(cache::Entry {
            content: r.try_get(0)?,
            model: r.try_get(1)?,
            provider: r.try_get(2)?,
            finish_reason: r.try_get(3)?,
            execution_id: r.try_get(4)?,
            created_at: r.try_get(5)?,
            expires_at: r.try_get(6)?,
        }))
    })
}

pub(super) fn cache_put(store: &PostgresStore, tenant_id: Option<&str>, key: &str, e: &cache::Entry) -> Result<()> {
    let (sweep, put, tenant) = (CACHE_SWEEP_SQL.replace('?', "$"), CACHE_PUT_SQL.replace('?', "$"), tenant_id.unwrap_or(""));
    // Running it again after a lost commit writes the same entry.
    store.write(OnCommitLoss::Rerun, |db| {
        db.execute(&sweep, &[&e.created_at, &cache::SWEEP])?;
        db.execute(&put, &[&tenant, &key, &e.content, &e.model, &e.provider, &e.finish_reason, &e.execution_id, &e.created_at, &e.expires_at])?;
        Ok(())
    })
}
