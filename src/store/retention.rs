//! The SQL of retention (`crate::retention`), for both stores. A purge runs in batches of a
//! few hundred rows, each its own short transaction, walking the time-ordered primary key
//! (UUIDv7 ids sort like their start time), so a call waiting for the write lock waits for
//! one batch at most, never for the whole purge.
//!
//! Two kinds of work:
//! - details: an execution's prompts and response (`execution_details`), its error message,
//!   its metadata and the error messages and refusals in its `attempts` are cleared; its
//!   status, model, tokens, cost and timing stay. A cursor in `settings` remembers how far
//!   clearing has got, so a batch never reads rows already cleared.
//! - executions: rows are deleted (with their details), whole days of the database's calendar
//!   at a time: the cutoff is moved back to the start of its day (`Horizon::of`). Calls still
//!   `running` are kept. The batch that deletes rows records how far deletion has got
//!   (`HORIZON`), so that `rebuild_counters` knows which days only the rollups still hold.
//!
//! Nothing here touches counters, budgets or rollups: totals survive purges.

use chrono::NaiveDate;

use crate::clock::{Calendar, Micros};

/// How far (inclusive) details have been cleared: the last id of the last batch.
pub const CURSOR: &str = "retention_details_cleared_to";
/// The settings row of the latest `Horizon`, as `Horizon::encode` writes it.
pub const HORIZON: &str = "retention_executions_deleted_before";

/// How far purges have deleted executions: every settled call that started before `before`,
/// the start of `day` in the database's timezone when it was purged. The rollups of the days
/// before `day` are all that is left of those calls, so a rebuild keeps them and counts them
/// in the counters of their days and months (`rollups::rebuild_plan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Horizon {
    pub before: Micros,
    pub day: NaiveDate,
}

impl Horizon {
    /// The horizon of a purge of the executions started before `t`: the start of `t`'s day,
    /// so a purge never leaves a day half in the rows and half only in the rollups.
    pub fn of(cal: &Calendar, t: Micros) -> Horizon {
        let day = cal.local_date(t);
        Horizon { before: cal.start_of(day), day }
    }

    /// "<before> <day>", e.g. "1795737600000000 2026-11-28".
    pub fn encode(&self) -> String {
        format!("{} {}", self.before, self.day)
    }

    pub fn decode(s: &str) -> Option<Horizon> {
        let (before, day) = s.split_once(' ')?;
        Some(Horizon { before: before.parse().ok()?, day: day.parse().ok()? })
    }

    /// Whether a batch that deleted rows up to this horizon must record it over `stored` (a
    /// later purge with a longer retention deletes nothing new and moves nothing back).
    pub fn advances(&self, stored: Option<&str>) -> bool {
        stored.and_then(Horizon::decode).is_none_or(|s| s.before < self.before)
    }
}

/// The id of the first execution that may have started at `t` or later: ids below it started
/// before `t` (see `sqlite::id_prefix`).
pub fn id_before(t: Micros) -> String {
    super::sqlite::id_prefix(t)
}

pub mod sqlite {
    /// ?1 cursor, ?2 cutoff id, ?3 batch size -> (last id, how many).
    pub const DETAILS_BATCH: &str =
        "SELECT max(id), count(*) FROM (SELECT id FROM executions WHERE id > ?1 AND id < ?2 ORDER BY id LIMIT ?3)";
    /// ?1 cursor, ?2 last id of the batch.
    pub const CLEAR_DETAILS: &str = "UPDATE executions SET error_message = NULL, metadata = '{}',
             attempts = (SELECT json_group_array(json(json_remove(value, '$.error_message', '$.refusal')))
                         FROM json_each(executions.attempts))
         WHERE id > ?1 AND id <= ?2";
    pub const DELETE_DETAILS: &str = "DELETE FROM execution_details WHERE execution_id > ?1 AND execution_id <= ?2";
    /// ?1 the setting's name (`CURSOR`, `HORIZON`).
    pub const CURSOR_GET: &str = "SELECT value FROM settings WHERE name = ?1";
    pub const CURSOR_SET: &str =
        "INSERT INTO settings (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET value = excluded.value";
    /// ?1 cutoff id, ?2 batch size -> (last id, how many).
    pub const EXECUTIONS_BATCH: &str = "SELECT max(id), count(*) FROM
         (SELECT id FROM executions WHERE id < ?1 AND status <> 'running' ORDER BY id LIMIT ?2)";
    /// ?1 last id of the batch. Running calls have no details row yet.
    pub const DELETE_EXECUTION_DETAILS: &str = "DELETE FROM execution_details WHERE execution_id <= ?1";
    pub const DELETE_EXECUTIONS: &str = "DELETE FROM executions WHERE id <= ?1 AND status <> 'running'";
    /// ?1 cutoff id -> how many executions would be deleted.
    pub const COUNT_EXECUTIONS: &str = "SELECT count(*) FROM executions WHERE id < ?1 AND status <> 'running'";
    /// ?1 cursor, ?2 details cutoff id, ?3 executions cutoff id ("" for none) -> how many
    /// executions would have their details cleared (and not be deleted).
    pub const COUNT_DETAILS: &str = "SELECT count(*) FROM executions WHERE id > ?1 AND id < ?2 AND id >= ?3";
}

/// A batch's query also reads the newest execution's id: every admitted call inserts one, so
/// when it moved between two batches calls are running and the purge paces itself for them
/// (`Purged::in_use`), where SQLite's `data_version` says any write came.
pub mod postgres {
    /// $1 cursor, $2 cutoff id, $3 batch size -> (last id, how many, newest id).
    pub const DETAILS_BATCH: &str = "SELECT max(id), count(*), (SELECT max(id) FROM executions) FROM
         (SELECT id FROM executions WHERE id > $1 AND id < $2 ORDER BY id LIMIT $3) b";
    pub const CLEAR_DETAILS: &str = "UPDATE executions SET error_message = NULL, metadata = '{}',
             attempts = (SELECT COALESCE(jsonb_agg(a.value - 'error_message' - 'refusal' ORDER BY a.n), '[]'::jsonb)::text
                         FROM jsonb_array_elements(executions.attempts::jsonb) WITH ORDINALITY AS a(value, n))
         WHERE id > $1 AND id <= $2";
    pub const DELETE_DETAILS: &str = "DELETE FROM execution_details WHERE execution_id > $1 AND execution_id <= $2";
    pub const CURSOR_GET: &str = "SELECT value FROM settings WHERE name = $1";
    pub const CURSOR_SET: &str =
        "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value";
    /// $1 cutoff id, $2 batch size -> (last id, how many, newest id).
    pub const EXECUTIONS_BATCH: &str = "SELECT max(id), count(*), (SELECT max(id) FROM executions) FROM
         (SELECT id FROM executions WHERE id < $1 AND status <> 'running' ORDER BY id LIMIT $2) b";
    pub const DELETE_EXECUTION_DETAILS: &str = "DELETE FROM execution_details WHERE execution_id <= $1";
    pub const DELETE_EXECUTIONS: &str = "DELETE FROM executions WHERE id <= $1 AND status <> 'running'";
    pub const COUNT_EXECUTIONS: &str = "SELECT count(*) FROM executions WHERE id < $1 AND status <> 'running'";
    pub const COUNT_DETAILS: &str = "SELECT count(*) FROM executions WHERE id > $1 AND id < $2 AND id >= $3";
}
