//! Tenant budgets.

use postgres::Row as PgRow;

use super::connect::PgResult;
use super::db::{Db, OnCommitLoss, Tx};
use super::PostgresStore;
use crate::budget::{Enforcement, Limits, TenantBudget};
use crate::clock::now_micros;
use crate::error::{Error, Result};
use crate::money::Nanos;
use crate::store::{budget_on_conflict, BudgetWrite, BUDGET_COLUMNS};

pub(super) fn budget_from_row(r: &PgRow) -> PgResult<TenantBudget> {
    let enforcement: String = r.try_get(8)?;
    Ok(TenantBudget {
        tenant_id: r.try_get(0)?,
        name: r.try_get(1)?,
        limits: Limits {
            daily_cost: r.try_get::<_, Option<i64>>(2)?.map(Nanos),
            monthly_cost: r.try_get::<_, Option<i64>>(3)?.map(Nanos),
            daily_tokens: r.try_get(4)?,
            monthly_tokens: r.try_get(5)?,
            daily_executions: r.try_get(6)?,
            monthly_executions: r.try_get(7)?,
            rpm: r.try_get(9)?,
            tpm: r.try_get(10)?,
            max_concurrent: r.try_get(11)?,
        },
        // The CHECK constraint keeps this to hard/soft.
        enforcement: if enforcement == "soft" { Enforcement::Soft } else { Enforcement::Hard },
    })
}

pub(super) fn stored_budget(db: &mut Db<'_, impl Sized>, tenant_id: &str) -> PgResult<Option<TenantBudget>> {
    let sql = format!("SELECT {BUDGET_COLUMNS} FROM tenant_budgets WHERE tenant_id = $1");
    db.query_opt(&sql, &[&tenant_id])?.as_ref().map(budget_from_row).transpose()
}

/// The stored budget and the `xmin` of its row (see `server_side::Stamped`).
pub(super) fn stamped_budget(db: &mut Db<'_, impl Sized>, tenant_id: &str) -> PgResult<(Option<TenantBudget>, Option<i64>)> {
    let sql = format!("SELECT {BUDGET_COLUMNS}, xmin::TEXT::BIGINT FROM tenant_budgets WHERE tenant_id = $1");
    match db.query_opt(&sql, &[&tenant_id])? {
        // The stamp follows the budget's columns.
        Some(r) => Ok((Some(budget_from_row(&r)?), Some(r.try_get(BUDGET_COLUMNS.split(',').count())?))),
        None => Ok((None, None)),
    }
}

pub(super) fn budget_get(store: &PostgresStore, tenant_id: &str) -> Result<Option<TenantBudget>> {
    store.read(|db| stored_budget(db, tenant_id))
}

pub(super) fn budget_put(store: &PostgresStore, b: &TenantBudget, write: BudgetWrite<'_>) -> Result<TenantBudget> {
    b.validate()?;
    let now = now_micros();
    let sql = format!(
        "INSERT INTO tenant_budgets ({BUDGET_COLUMNS}, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $11, $12, $13, $10, $10) ON CONFLICT (tenant_id) {}",
        budget_on_conflict(write)?
    );
    // Creating twice would fail the second time: a create that went through is the
    // budget now stored. An update can run again.
    let created = |db: &mut Tx<'_>, _: &TenantBudget| -> PgResult<bool> { Ok(stored_budget(db, &b.tenant_id)?.as_ref() == Some(b)) };
    let on_loss = match write {
        BudgetWrite::Create => OnCommitLoss::Check(&created),
        BudgetWrite::Update(_) => OnCommitLoss::Rerun,
    };
    store.write(on_loss, |db| {
        let l = &b.limits;
        let n = db.execute(
            &sql,
            &[
                &b.tenant_id,
                &b.name,
                &l.daily_cost.map(|n| n.0),
                &l.monthly_cost.map(|n| n.0),
                &l.daily_tokens,
                &l.monthly_tokens,
                &l.daily_executions,
                &l.monthly_executions,
                &b.enforcement.as_str(),
                &now,
                &l.rpm,
                &l.tpm,
                &l.max_concurrent,
            ],
        )?;
        if n == 0 {
            return Err(Error::Configuration(format!("a budget for tenant {:?} already exists", b.tenant_id)).into());
        }
        Ok(stored_budget(db, &b.tenant_id)?.ok_or_else(|| Error::Store("the budget just written is missing".into()))?)
    })
}

pub(super) fn budget_delete(store: &PostgresStore, tenant_id: &str) -> Result<bool> {
    let gone = |db: &mut Tx<'_>, _: &bool| -> PgResult<bool> { Ok(stored_budget(db, tenant_id)?.is_none()) };
    store.write(OnCommitLoss::Check(&gone), |db| Ok(db.execute("DELETE FROM tenant_budgets WHERE tenant_id = $1", &[&tenant_id])? == 1))
}

pub(super) fn budget_all(store: &PostgresStore) -> Result<Vec<TenantBudget>> {
    store.read(|db| {
        let rows = db.query(&format!("SELECT {BUDGET_COLUMNS} FROM tenant_budgets ORDER BY tenant_id"), &[])?;
        rows.iter().map(budget_from_row).collect()
    })
}
