//! Retention: purging old executions and their details in batches (`crate::retention`).

use super::db::OnCommitLoss;
use super::rebuild::stored_timezone;
use super::PostgresStore;
use crate::clock::Micros;
use crate::error::Result;
use crate::process::unpoisoned;
use crate::store::{calendar_of, Purged};

pub(super) fn purge_batch(store: &PostgresStore, details_before: Option<Micros>, executions_before: Option<Micros>, limit: i64) -> Result<Purged> {
    use crate::store::retention::{id_before, postgres as sql, Horizon, CURSOR, HORIZON};
    let mut out = Purged::default();
    if let Some(t) = executions_before {
        // Deleting what is already deleted deletes nothing: running it again is safe.
        let (n, newest) = store.write(OnCommitLoss::Rerun, |db| {
            let horizon = Horizon::of(&calendar_of(stored_timezone(db)?)?, t);
            let r = db.query_one(sql::EXECUTIONS_BATCH, &[&id_before(horizon.before), &limit])?;
            let (last, n, newest): (Option<String>, i64, Option<String>) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            if let Some(last) = last {
                db.execute(sql::DELETE_EXECUTION_DETAILS, &[&last])?;
                db.execute(sql::DELETE_EXECUTIONS, &[&last])?;
                let stored: Option<String> = db.query_opt(sql::CURSOR_GET, &[&HORIZON])?.map(|r| r.try_get(0)).transpose()?;
                if horizon.advances(stored.as_deref()) {
                    db.execute(sql::CURSOR_SET, &[&HORIZON, &horizon.encode()])?;
                }
            }
            Ok((n, newest))
        })?;
        out.executions = n;
        out.in_use |= store.calls_since_last_batch(newest);
    }
    if let Some(t) = details_before {
        let cutoff = id_before(t);
        let (n, newest) = store.write(OnCommitLoss::Rerun, |db| {
            let cursor: String = match db.query_opt(sql::CURSOR_GET, &[&CURSOR])? {
                Some(r) => r.try_get(0)?,
                None => String::new(),
            };
            let r = db.query_one(sql::DETAILS_BATCH, &[&cursor, &cutoff, &limit])?;
            let (last, n, newest): (Option<String>, i64, Option<String>) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            if let Some(last) = last {
                db.execute(sql::CLEAR_DETAILS, &[&cursor, &last])?;
                db.execute(sql::DELETE_DETAILS, &[&cursor, &last])?;
                db.execute(sql::CURSOR_SET, &[&CURSOR, &last])?;
            }
            Ok((n, newest))
        })?;
        out.details = n;
        out.in_use |= store.calls_since_last_batch(newest);
    }
    Ok(out)
}

impl PostgresStore {
    /// Whether calls were admitted since this store's last purge batch: the newest execution
    /// (`newest`, its id, None in an empty table) is not the one that batch saw. Before the
    /// store's first batch that is not known: taken as yes, so a purge starts paced for calls.
    fn calls_since_last_batch(&self, newest: Option<String>) -> bool {
        let newest = newest.unwrap_or_default();
        unpoisoned(self.purged_at_newest.lock()).replace(newest.clone()).is_none_or(|seen| seen != newest)
    }
}

pub(super) fn purge_preview(store: &PostgresStore, details_before: Option<Micros>, executions_before: Option<Micros>) -> Result<Purged> {
    use crate::store::retention::{id_before, postgres as sql, Horizon, CURSOR};
    let details_cutoff = details_before.map(id_before);
    store.read(move |db| {
        let cal = calendar_of(stored_timezone(db)?)?;
        let deleted = executions_before.map(|t| id_before(Horizon::of(&cal, t).before));
        let executions: i64 = match &deleted {
            Some(id) => db.query_one(sql::COUNT_EXECUTIONS, &[id])?.try_get(0)?,
            None => 0,
        };
        let details: i64 = match &details_cutoff {
            Some(cutoff) => {
                let cursor: String = match db.query_opt(sql::CURSOR_GET, &[&CURSOR])? {
                    Some(r) => r.try_get(0)?,
                    None => String::new(),
                };
                let kept_from = deleted.clone().unwrap_or_default();
                db.query_one(sql::COUNT_DETAILS, &[&cursor, cutoff, &kept_from])?.try_get(0)?
            }
            None => 0,
        };
        Ok(Purged { details, executions, in_use: false })
    })
}
