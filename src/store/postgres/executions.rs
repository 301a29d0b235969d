//! Execution rows: written at admission, closed at settlement, counted in the rollups.

use super::connect::PgResult;
use super::db::{Param, Tx};
use crate::clock::Calendar;
use crate::error::Error;
use crate::execution::{Completion, NewExecution};
use crate::store::rollups::{self, Dialect};

pub(super) fn insert_execution(db: &mut Tx<'_>, e: &NewExecution) -> PgResult<()> {
    db.execute(
        "INSERT INTO executions (id, agent, model_id, provider, tenant_id, status, started_at, metadata,
             parent_execution_id, root_execution_id)
         VALUES ($1, $2, $3, $4, $5, 'running', $6, $7, $8, $9)",
        &new_row(e),
    )?;
    Ok(())
}

/// A new row's values, in the order of `insert_execution`'s parameters (and of the server-side
/// functions' from p_id: `tenantllm_admit`, `tenantllm_block`).
pub(super) fn new_row(e: &NewExecution) -> [&dyn Param; 9] {
    [&e.id, &e.agent, &e.model_id, &e.provider, &e.tenant_id, &e.started_at, &e.metadata, &e.parent_execution_id, &e.root_execution_id]
}

/// Adds execution `id`'s numbers, times `sign`, to its rollups (`rollups::record_sql`) and
/// its day's total (`rollups::totals_record_sql_in`).
pub(super) fn roll(db: &mut Tx<'_>, id: &str, periods: &[String; 2], sign: i64) -> PgResult<()> {
    for (sql, period) in rollups::record_sql(Dialect::Postgres).iter().zip(periods) {
        db.execute(sql, &[period, &sign, &id])?;
    }
    db.execute(rollups::totals_record_sql_in(Dialect::Postgres), &[&periods[0], &sign, &id])?;
    Ok(())
}

/// What closing an execution row writes that the completion holds only as parts.
pub(super) struct Closing {
    status: &'static str,
    total_tokens: i64,
    total_cost: i64,
    attempts_count: i64,
    attempts: String,
    cache_write_tokens: i64,
    cached: i64,
}

impl Closing {
    pub(super) fn of(c: &Completion) -> Closing {
        Closing {
            status: c.status.as_str(),
            total_tokens: c.usage.input + c.usage.output,
            total_cost: c.cost.total().0,
            attempts_count: c.attempts.len() as i64,
            attempts: serde_json::to_string(&c.attempts).unwrap_or_else(|_| "[]".into()),
            cache_write_tokens: c.usage.cache_writes(),
            cached: i64::from(c.cached),
        }
    }

    /// The row's new values, in the order of `complete_execution`'s $2 to $23 (and of
    /// `tenantllm_settle`'s parameters from p_status).
    pub(super) fn params<'a>(&'a self, c: &'a Completion) -> [&'a dyn Param; 22] {
        [
            &self.status,
            &c.error_class,
            &c.error_message,
            &c.chosen_model_id,
            &c.provider,
            &c.completed_at,
            &c.duration_ms,
            &c.usage.input,
            &c.usage.output,
            &c.usage.cached,
            &self.total_tokens,
            &c.cost.input.0,
            &c.cost.output.0,
            &self.total_cost,
            &self.attempts_count,
            &self.attempts,
            &c.finish_reason,
            &self.cache_write_tokens,
            &c.cost.cache_read.0,
            &c.cost.cache_write.0,
            &c.time_to_first_token_ms,
            &self.cached,
        ]
    }
}

/// Closes an execution row, moving it in the rollups from any earlier outcome to this one;
/// with `store_details`, also writes its prompts and response.
pub(super) fn complete_execution(db: &mut Tx<'_>, e: &NewExecution, c: &Completion, store_details: bool, cal: &Calendar) -> PgResult<()> {
    let periods = rollups::periods(cal, e.started_at);
    roll(db, &e.id, &periods, -1)?;
    let closing = Closing::of(c);
    let params: Vec<&dyn Param> = std::iter::once(&e.id as &dyn Param).chain(closing.params(c)).collect();
    let n = db.execute(
        "UPDATE executions SET status = $2, error_class = $3, error_message = $4, chosen_model_id = $5,
             provider = COALESCE($6, provider), completed_at = $7, duration_ms = $8, input_tokens = $9,
             output_tokens = $10, cached_tokens = $11, total_tokens = $12, input_cost = $13,
             output_cost = $14, total_cost = $15, attempts_count = $16, attempts = $17, finish_reason = $18,
             cache_write_tokens = $19, cache_read_cost = $20, cache_write_cost = $21,
             time_to_first_token_ms = $22, cached = $23
         WHERE id = $1",
        &params,
    )?;
    if n != 1 {
        return Err(Error::Store(format!("execution {} vanished before it could be completed", e.id)).into());
    }
    roll(db, &e.id, &periods, 1)?;
    if store_details {
        db.execute(
            "INSERT INTO execution_details (execution_id, system_prompt, user_prompt, response, tool_calls) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (execution_id) DO UPDATE SET system_prompt = EXCLUDED.system_prompt,
                 user_prompt = EXCLUDED.user_prompt, response = EXCLUDED.response, tool_calls = EXCLUDED.tool_calls",
            &[&e.id, &e.system_prompt, &e.user_prompt, &c.response, &e.tool_calls],
        )?;
    }
    Ok(())
}
