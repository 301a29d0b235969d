//! The schema migrations (`pg_schema`), applied once by whichever process gets there first.

use super::connect::PgResult;
use super::db::Tx;
use super::rebuild::{rebuild_plan, rebuild_rollups, stored_timezone};
use crate::error::Error;
use crate::store::pg_schema::MIGRATIONS;
use crate::store::{calendar_of, rollups};

/// `pg_advisory_xact_lock` key that serialises migrations across processes ("tenantll").
pub(super) const MIGRATION_LOCK: i64 = 0x7465_6e61_6e74_6c6c;

pub(super) fn migrate(tx: &mut Tx<'_>, timezone: &str) -> PgResult<()> {
    // Several processes starting on a new database: one migrates, the others wait and see
    // its result.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.c.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
    let current: i64 = tx.query_one("SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_version", &[])?.try_get(0)?;
    let known = MIGRATIONS.len() as i64;
    if current > known {
        return Err(Error::Store(format!(
            "the database has schema version {current}, newer than this tenantllm supports ({known}); upgrade tenantllm"
        ))
        .into());
    }
    if current == 0 {
        // Another application's tables: say so in one line instead of failing a migration.
        let foreign = tx.query_opt(
            "SELECT table_name::TEXT FROM information_schema.tables WHERE table_schema = current_schema() \
             AND table_name IN ('executions', 'tenant_budgets', 'usage_counters') LIMIT 1",
            &[],
        )?;
        if let Some(row) = foreign {
            let table: String = row.try_get(0)?;
            return Err(Error::Store(format!(
                "the database is not a tenantllm database: it has a table {table:?} but no tenantllm schema version; use another database or schema"
            ))
            .into());
        }
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current.max(0) as usize) {
        tx.c.batch_execute(sql)?;
        tx.execute("DELETE FROM schema_version", &[])?;
        tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&(i as i64 + 1)])?;
    }
    tx.execute("INSERT INTO settings (name, value) VALUES ('timezone', $1) ON CONFLICT (name) DO NOTHING", &[&timezone])?;
    if (current.max(0) as usize) < rollups::MIGRATION {
        let cal = calendar_of(stored_timezone(tx)?)?;
        let plan = rebuild_plan(tx, &cal)?;
        rebuild_rollups(tx, &plan, &cal)?;
    }
    Ok(())
}
