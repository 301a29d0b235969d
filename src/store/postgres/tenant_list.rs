//! The dashboard's tenants list and spend by tenant (`crate::store::tenant_list`).

use super::counters::usage_at;
use super::db::Param;
use super::PostgresStore;
use crate::budget;
use crate::error::Result;
use crate::store::tenant_list::{self, TenantList, TenantListQuery};

pub(super) fn tenant_list(store: &PostgresStore, q: &TenantListQuery) -> Result<TenantList> {
    q.validate()?;
    let dialect = PG_LIST;
    let (sql, args) = tenant_list::sql(q, &dialect);
    let args: Vec<Box<dyn Param>> = args
        .into_iter()
        .map(|a| -> Box<dyn Param> {
            match a {
                tenant_list::Arg::Text(s) => Box::new(s),
                tenant_list::Arg::Int(i) => Box::new(i),
            }
        })
        .collect();
    let params: Vec<&dyn Param> = args.iter().map(|a| a.as_ref()).collect();
    store.read(|db| {
        let rows = db.query(&sql, &params)?;
        let raw = rows
            .iter()
            .map(|r| tenant_list::RawRow::read(|i| r.try_get(i), |i| r.try_get(i), |i| r.try_get(i)))
            .collect::<std::result::Result<Vec<_>, postgres::Error>>()?;
        Ok(tenant_list::assemble(raw, q.today))
    })
}

pub(super) fn top_tenants(store: &PostgresStore, periods: Option<&[String]>, limit: i64) -> Result<Vec<(String, budget::Usage)>> {
    let sql = tenant_list::top_tenants_sql(periods, &PG_LIST, |c| format!("SUM({c})::BIGINT"));
    let mut params: Vec<&dyn Param> = periods.unwrap_or_default().iter().map(|p| p as &dyn Param).collect();
    params.push(&limit);
    store.read(|db| db.query(&sql, &params)?.iter().map(|r| Ok((r.try_get(0)?, usage_at(r, 1)?))).collect())
}

/// The tenants list's SQL for PostgreSQL.
const PG_LIST: tenant_list::Dialect = tenant_list::Dialect {
    placeholder: |n| format!("${n}"),
    greatest: "GREATEST",
    float: "DOUBLE PRECISION",
    problems_from: "executions",
    wide: "NUMERIC",
};
