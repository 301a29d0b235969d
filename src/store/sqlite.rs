//! The embedded SQLite store: one file in WAL mode, shared safely by threads and processes.
//! Every state change is one `BEGIN IMMEDIATE` transaction, so checks and writes are atomic
//! across processes (SQLite serialises writers on the file lock).

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError};
use std::time::{Duration, Instant};

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, ToSql, TransactionBehavior};

use super::lock_waits;
use super::query::{self, GroupValues, Groups, Rows};
use super::rollups::{self, Dialect, Rolled, ROLLED};
use super::schema::MIGRATIONS;
use super::tenant_list;
use checkpointer::{spawn_checkpointer, Checkpointer, WalShared};
use super::{
    all_columns, blocked, budget_on_conflict, calendar_of, counted_executions_sql, decode_keys, encode_keys, first_admitted, keyed_like, rate_limited,
    rekey, short_circuited, usage_keys, day_usage_keys, kept_usage_sql, AdmitRequest, Admitted, Alert, BreakerKey, BreakerStatus, BudgetWrite, Choice, CounterKey, FinishRequest, Purged,
    Store, BUDGET_COLUMNS, SEEN_COLUMNS, TIMEZONE_SQL, CACHE_GET_SQL, CACHE_PUT_SQL, CACHE_SWEEP_SQL,
};
use crate::breaker::{self, Admission, Phase};
use crate::cache;
use crate::budget::{self, Check, Enforcement, Limits, TenantBudget};
use crate::clock::{now_micros, Calendar, Micros, DEFAULT_TIMEZONE};
use crate::error::{Error, Result};
use crate::execution::{Aggregate, Cell, Completion, Details, Field, Filter, GroupKey, Kind, NewExecution, Query, Row, Value, FIELDS};
use crate::money::Nanos;
use crate::process::{quiet, unpoisoned};
use crate::ratelimit::{self, RateCheck, RateUsage};
use crate::secrets::Sealed;
use crate::tenancy::SeenTenant;

mod checkpointer;
#[cfg(target_os = "linux")]
mod ofd_locks;

pub struct SqliteStore {
    /// Writes (and reads inside write transactions).
    writer: ManuallyDrop<Mutex<Connection>>,
    /// Threads waiting for `writer` now: no retention batch begins while one waits
    /// (`write_when_free`), and one that finds one as it ends says the database is in use.
    writers_waiting: AtomicUsize,
    /// The writer's data version once the last retention transaction has committed
    /// (`u64::MAX`: none yet), so the next one can tell whether another write came in between.
    purged_at_version: AtomicU64,
    /// What writes share with the checkpointer: every write holds its gate while it runs (and
    /// waits past `HOLD_FRAMES` for a restart before), and its commits wake the checkpointer
    /// when the WAL grows (`checkpointer`).
    wal: Arc<WalShared>,
    /// Analytics and listing, so long queries do not hold up calls. `None` for ":memory:",
    /// where a second connection would be a different database.
    reader: ManuallyDrop<Option<Mutex<Connection>>>,
    /// Dropping it stops the background checkpointer.
    _checkpointer: Option<Checkpointer>,
    /// The stored timezone as the writer last read it (locked inside the writer's lock).
    timezone: Mutex<SeenTimezone>,
}

/// The stored timezone and the data version (`data_version`) through which the writer knows
/// it: every admission and settlement checks the zone it keys counters by against the stored
/// one, and reads it again only when another connection has written since (a statement per
/// transaction was ~1.3 % of a guarded call). This connection's own commits move the version
/// on (`SqliteStore::write`); `set_timezone` forgets the zone.
#[derive(Default)]
struct SeenTimezone {
    valid_at: Option<u32>,
    zone: Option<String>,
}

/// `SQLITE_FCNTL_DATA_VERSION` (SQLite 3.26; the bindings of older headers lack it).
const FCNTL_DATA_VERSION: std::ffi::c_int = 35;

/// The main database's data version as this connection sees it inside a transaction: it
/// changes whenever the file's content changes, by this connection's commits or by any other
/// connection's, in this process or another (unlike `PRAGMA data_version`, which ignores this
/// connection's). None if SQLite could not tell.
fn data_version(conn: &Connection) -> Option<u32> {
    let mut version: u32 = 0;
    // SAFETY: the handle lives while `conn` is borrowed, and this file control writes one
    // unsigned int through the pointer.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_file_control(conn.handle(), c"main".as_ptr(), FCNTL_DATA_VERSION, (&mut version as *mut u32).cast())
    };
    (rc == rusqlite::ffi::SQLITE_OK).then_some(version)
}

/// How often retention looks whether the writer is free (`SqliteStore::write_when_free`).
const FREE_POLL: Duration = Duration::from_micros(50);

/// Our SQLite (compiled into the extension, private to it: see Cargo.toml), set up once before
/// its first connection. Memory statistics off (`SQLITE_CONFIG_MEMSTATUS`): they take a global
/// mutex and update counters around every allocation (~6 % of a guarded call's instructions on
/// Debian's SQLite) and nothing of ours reads them; SQLite accepts this only before it starts,
/// and nothing but this module starts our copy (Python's sqlite3 has its own). Then, on Linux,
/// our locks as open file description locks, which Python's copy cannot drop (`ofd_locks`).
fn start() -> Result<()> {
    static STARTED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STARTED
        .get_or_init(|| {
            // SAFETY: a start-time option taking one int (refused, changing nothing, if a
            // connection opened without `start` started SQLite first: only tests do).
            unsafe { rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0 as std::ffi::c_int) };
            #[cfg(target_os = "linux")]
            ofd_locks::install()?;
            Ok(())
        })
        .clone()
        .map_err(|e| Error::Store(format!("cannot set up SQLite: {e}")))
}

const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits for another connection's lock in short steps. SQLite's own busy handler sleeps 1, 2,
/// 5, 10, 15, 20, 25... ms between tries, so a call that found the lock taken for 5 ms waited
/// 8, and one behind a 20 ms transaction 43. This one tries every 250 µs for the first 50 ms,
/// then every 2 ms, until it has slept `BUSY_TIMEOUT` in all. Its sleeps count as this
/// thread's lock waits.
fn busy_wait(tries: i32) -> bool {
    let step = busy_step(tries, BUSY_TIMEOUT);
    if let Some(step) = step {
        let started = Instant::now();
        std::thread::sleep(step);
        lock_waits::record(tries == 0, started.elapsed());
    }
    step.is_some()
}

/// How long to sleep before try `tries + 1`; `None` once `limit` has been slept.
fn busy_step(tries: i32, limit: Duration) -> Option<Duration> {
    const FINE_TRIES: u32 = 200;
    const FINE: Duration = Duration::from_micros(250);
    const COARSE: Duration = Duration::from_millis(2);
    let tries = tries.max(0) as u32;
    let slept = FINE * tries.min(FINE_TRIES) + COARSE * tries.saturating_sub(FINE_TRIES);
    (slept < limit).then_some(if tries < FINE_TRIES { FINE } else { COARSE })
}

fn connect(path: &str) -> Result<Connection> {
    start()?;
    let conn = Connection::open(path).map_err(|e| Error::Store(format!("cannot open database {path:?}: {e}")))?;
    conn.busy_handler(Some(busy_wait))?;
    if path != ":memory:" {
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| Error::Store(format!("database {path:?} is not usable: {e}")))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Store(format!("database {path:?}: could not enable WAL mode (got {mode})")));
        }
    }
    // NORMAL is durable across process crashes in WAL mode; only an OS crash can lose the
    // last transactions.
    // secure_delete: off, SQLite's own default, said anyway: on, it zeroes the old bytes of
    // every row a call rewrites or deletes (counters, reservations, the rate log); Debian's
    // libsqlite3 turns it on by default. Retention's purges turn it on (`erasing`).
    // journal_size_limit: no limit (SQLite's default, said anyway): the checkpointer cuts the
    // WAL back, never a call (see `WAL_KEEP_BYTES`).
    conn.execute_batch(
        "PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON; PRAGMA wal_autocheckpoint=0; PRAGMA secure_delete=OFF; PRAGMA journal_size_limit=-1;",
    )?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// The connection for queries. It reads the database file through a memory map: scans of
/// the execution table then copy no pages through `pread`, which was a tenth of an
/// ad-hoc group-by's time. (The WAL is never mapped; writers keep plain I/O.)
fn connect_reader(path: &str) -> Result<Connection> {
    let conn = connect(path)?;
    conn.execute_batch("PRAGMA mmap_size=1073741824;")?;
    Ok(conn)
}

fn migrate(conn: &mut Connection, path: &str, timezone: &str) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .map_err(|e| Error::Store(format!("database {path:?} is not a tenantllm database or is corrupt: {e}")))?;
    let current: i64 = tx.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if current > known {
        return Err(Error::Store(format!(
            "database {path:?} has schema version {current}, newer than this tenantllm supports ({known}); upgrade tenantllm"
        )));
    }
    if current == 0 {
        // Another application's file: say so in one line (the failing CREATE TABLE's error
        // would quote a whole migration).
        let foreign: Option<String> = tx
            .query_row(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('executions', 'tenant_budgets', 'usage_counters') LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(table) = foreign {
            return Err(Error::Store(format!(
                "database {path:?} is not a tenantllm database: it has a table {table:?} but no tenantllm schema version; use another file"
            )));
        }
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.execute_batch(sql).map_err(|e| Error::Store(format!("database {path:?}: migration {} failed: {}", i + 1, first_line(&e.to_string()))))?;
        tx.execute("DELETE FROM schema_version", [])?;
        tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [i as i64 + 1])?;
    }
    tx.execute("INSERT OR IGNORE INTO settings (name, value) VALUES ('timezone', ?1)", [timezone])?;
    if (current as usize) < rollups::MIGRATION {
        let cal = calendar_of(stored_timezone(&tx)?)?;
        rebuild_rollups(&tx, &rebuild_plan(&tx, &cal)?, &cal)?;
    }
    tx.commit()?;
    Ok(())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

impl SqliteStore {
    /// Opens (creating and migrating) the database at `path`; one without a timezone gets `timezone`.
    pub fn open(path: &str, timezone: &str) -> Result<SqliteStore> {
        if path.trim().is_empty() {
            return crate::error::config_err("database must be a file path, \":memory:\" or \"sqlite:///path\"");
        }
        let _quiet = quiet();
        let mut writer = connect(path)?;
        migrate(&mut writer, path, timezone)?;
        // It outlives the writer (`Drop` closes that first).
        let wal = Arc::<WalShared>::default();
        wal.install(&writer);
        let writer = ManuallyDrop::new(Mutex::new(writer));
        let timezone = Mutex::new(SeenTimezone::default());
        if path == ":memory:" {
            return Ok(SqliteStore {
                writer,
                writers_waiting: AtomicUsize::new(0),
                purged_at_version: AtomicU64::new(u64::MAX),
                wal,
                reader: ManuallyDrop::new(None),
                _checkpointer: None,
                timezone,
            });
        }
        let checkpointer = spawn_checkpointer(path, Arc::clone(&wal))?;
        Ok(SqliteStore {
            reader: ManuallyDrop::new(Some(Mutex::new(connect_reader(path)?))),
            _checkpointer: Some(checkpointer),
            writer,
            writers_waiting: AtomicUsize::new(0),
            purged_at_version: AtomicU64::new(u64::MAX),
            wal,
            timezone,
        })
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let _quiet = quiet();
        let conn = unpoisoned(self.reader.as_ref().unwrap_or(&self.writer).lock());
        f(&conn)
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction (the write lock taken up front, so it
    /// cannot fail to upgrade later). BEGIN/COMMIT are cached statements: parsing them
    /// again on every call was a measurable share of a call's cost.
    /// The stored timezone stays known across this connection's own commits (`SeenTimezone`).
    fn write<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let _quiet = quiet();
        self.wal.hold_back();
        let _gate = locked(&self.wal.gate, Some(&self.writers_waiting));
        let conn = locked(&self.writer, Some(&self.writers_waiting));
        self.transaction(&conn, f)
    }

    /// `write` for work that can wait (retention): it takes the writer only once neither it nor
    /// the gate is held or waited for, looking again every `FREE_POLL` (a lock wait), so it
    /// never queues ahead of a call's write, nor holds the gate while it waits for the writer
    /// (a call's next write would wait behind it for the gate: during a purge, calls waited
    /// there 40 % more often).
    fn write_when_free<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let _quiet = quiet();
        self.wal.hold_back();
        let started = Instant::now();
        let mut polls = 0;
        let (_gate, conn) = loop {
            let free = self.writers_waiting.load(Ordering::SeqCst) == 0;
            if let Some(held) = free.then(|| try_locked(&self.wal.gate)).flatten().and_then(|gate| Some((gate, try_locked(&self.writer)?))) {
                break held;
            }
            std::thread::sleep(FREE_POLL);
            polls += 1;
        };
        if polls > 0 {
            lock_waits::record(true, started.elapsed());
        }
        self.transaction(&conn, f)
    }

    /// `f` in a transaction on the writer, `conn`, which the caller holds.
    fn transaction<T>(&self, conn: &Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        let open = OpenTx(conn);
        let began = data_version(conn);
        let out = f(conn)?;
        conn.prepare_cached("COMMIT")?.execute([])?;
        std::mem::forget(open);
        let mut seen = unpoisoned(self.timezone.lock());
        if began.is_some() && seen.valid_at == began {
            seen.valid_at = data_version(conn);
        }
        Ok(out)
    }

    /// Runs one retention transaction: `purge` (`erasing`) purges some rows and says how many.
    /// Also says whether the database is in use: another write committed since this store's
    /// previous retention transaction (by any connection: the data version moved on by more
    /// than that transaction's own commit), or a write of this process waits for the writer as
    /// it ends. `retention::purge` then pauses longer after the batch.
    fn purge_tx(&self, purge: impl FnOnce(&Connection) -> Result<i64>) -> Result<(i64, bool)> {
        self.write_when_free(|tx| {
            let version = data_version(tx);
            // This transaction's own commit moves the version on by one.
            let after = version.map_or(u64::MAX, |v| u64::from(v.wrapping_add(1)));
            let others_wrote = version.is_none_or(|v| u64::from(v) != self.purged_at_version.swap(after, Ordering::SeqCst));
            let n = erasing(tx, || purge(tx))?;
            Ok((n, others_wrote || self.writers_waiting.load(Ordering::SeqCst) > 0))
        })
    }

    /// Refuses a write keyed by another timezone than the stored one (`keyed_like`), reading
    /// the stored one only if another connection wrote since the writer last knew it.
    fn keyed_like(&self, tx: &Connection, calendar: &Calendar) -> Result<()> {
        let now = data_version(tx);
        let mut seen = unpoisoned(self.timezone.lock());
        if now.is_none() || seen.valid_at != now {
            seen.zone = stored_timezone(tx)?;
            seen.valid_at = now;
        }
        keyed_like(seen.zone.clone(), calendar)
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        let _quiet = quiet();
        // SAFETY: dropped once, here, and never used again.
        unsafe {
            ManuallyDrop::drop(&mut self.reader);
            ManuallyDrop::drop(&mut self.writer);
        }
    }
}

/// Runs `f` (in `tx`'s transaction) with SQLite's `secure_delete` on, so that what it deletes
/// or overwrites is zeroed, not left in the free space of the pages it leaves and in freed
/// pages: purged prompts and responses are gone from the database file once the checkpointer
/// has copied those pages back (README, "Retention"). Calls' connections keep it off
/// (`connect`): they rewrite counters and reservations, nothing that must be erased.
fn erasing<T>(tx: &Connection, f: impl FnOnce() -> Result<T>) -> Result<T> {
    tx.execute_batch("PRAGMA secure_delete=ON")?;
    let out = f();
    tx.execute_batch("PRAGMA secure_delete=OFF")?;
    out
}

/// Locks `lock`, counting the time as a lock wait when another thread held it (timed only then)
/// and, meanwhile, this thread in `waiting`.
fn locked<'a, T>(lock: &'a Mutex<T>, waiting: Option<&AtomicUsize>) -> MutexGuard<'a, T> {
    try_locked(lock).unwrap_or_else(|| {
        let started = Instant::now();
        waiting.map(|w| w.fetch_add(1, Ordering::SeqCst));
        let guard = unpoisoned(lock.lock());
        waiting.map(|w| w.fetch_sub(1, Ordering::SeqCst));
        lock_waits::record(true, started.elapsed());
        guard
    })
}

/// `lock` if no other thread holds it.
fn try_locked<T>(lock: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match lock.try_lock() {
        Ok(guard) => Some(guard),
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Rolls back a transaction that did not reach COMMIT (an error or a panic in its body).
struct OpenTx<'a>(&'a Connection);

impl Drop for OpenTx<'_> {
    fn drop(&mut self) {
        let _ = self.0.execute_batch("ROLLBACK");
    }
}

// ---------------------------------------------------------------- executions

fn opt_text(s: &Option<String>) -> Option<&str> {
    s.as_deref()
}

const INSERT_EXECUTION_SQL: &str = "INSERT INTO executions (id, agent, model_id, provider, tenant_id, status, started_at, metadata,
         parent_execution_id, root_execution_id, rate_scopes, rate_tokens)
     VALUES (?1, ?2, ?3, ?4, ?5, 'running', ?6, ?7, ?8, ?9, ?10, ?11)";

/// Writes a call's `running` row; `logged`: the rate limits' logs it is admitted to (its
/// `rate_scopes`, `log_bits`) and its estimated tokens.
fn insert_execution(tx: &Connection, e: &NewExecution, logged: Option<(i64, i64)>) -> Result<()> {
    tx.prepare_cached(INSERT_EXECUTION_SQL)?.execute(params![
        e.id,
        e.agent,
        e.model_id,
        e.provider,
        opt_text(&e.tenant_id),
        e.started_at,
        e.metadata,
        opt_text(&e.parent_execution_id),
        opt_text(&e.root_execution_id),
        logged.map(|l| l.0),
        logged.map(|l| l.1),
    ])?;
    Ok(())
}

/// Adds execution `id`'s numbers as its row holds them, times `sign`, to its rollups
/// (`rollups::record_sql`) and its day's totals (`rollups::totals_record_sql`): a row whose lease
/// expired is added as abandoned, and settlement takes such a row out (-1) before it rewrites it.
fn roll(tx: &Connection, id: &str, periods: &[String; 2], sign: i64) -> Result<()> {
    for (sql, period) in rollups::record_sql(Dialect::Sqlite).iter().zip(periods) {
        tx.prepare_cached(sql)?.execute(params![period, sign, id])?;
    }
    tx.prepare_cached(rollups::totals_record_sql())?.execute(params![periods[0], sign, id])?;
    Ok(())
}

/// Adds a call just closed with `c` to its rollups and its day's totals from the numbers it
/// was closed with (`rollups::add_settled_sql`), without reading its row back.
fn add_settled(tx: &Connection, e: &NewExecution, c: &Completion, numbers: &Rolled, periods: &[String; 2]) -> Result<()> {
    let [daily, monthly, totals] = rollups::add_settled_sql();
    for (sql, period) in [(daily, &periods[0]), (monthly, &periods[1]), (totals, &periods[0])] {
        let key: [&dyn ToSql; 5] = [period, &e.tenant_id.as_deref().unwrap_or(""), &e.agent, &e.model_id, &c.status.as_str()];
        tx.prepare_cached(sql)?.execute(params_from_iter(key.into_iter().chain(numbers.iter().map(|v| v as &dyn ToSql))))?;
    }
    Ok(())
}

/// Writes an execution's outcome (`COMPLETE_SQL` or `COMPLETE_RUNNING_SQL`), its numbers
/// being `rollups::settled_values(c)`; the rows changed.
fn close_execution(tx: &Connection, sql: &str, e: &NewExecution, c: &Completion, numbers: &Rolled) -> Result<usize> {
    let attempts = serde_json::to_string(&c.attempts).unwrap_or_else(|_| "[]".into());
    // The row keeps a call's unknown time to first token as NULL; the rollups add 0.
    let [input, output, cached, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_writes, cache_read_cost, cache_write_cost, duration_ms, _] =
        *numbers;
    Ok(tx.prepare_cached(sql)?.execute(params![
        e.id,
        c.status.as_str(),
        opt_text(&c.error_class),
        opt_text(&c.error_message),
        opt_text(&c.chosen_model_id),
        opt_text(&c.provider),
        c.completed_at,
        duration_ms,
        input,
        output,
        cached,
        total_tokens,
        input_cost,
        output_cost,
        total_cost,
        attempts_count,
        attempts,
        opt_text(&c.finish_reason),
        cache_writes,
        cache_read_cost,
        cache_write_cost,
        c.time_to_first_token_ms,
        i64::from(c.cached),
        budget::recorded(c).tokens,
    ])?)
}

macro_rules! complete_sql {
    ($condition:literal) => {
        concat!(
            "UPDATE executions SET status = ?2, error_class = ?3, error_message = ?4, chosen_model_id = ?5,
                 provider = COALESCE(?6, provider), completed_at = ?7, duration_ms = ?8, input_tokens = ?9,
                 output_tokens = ?10, cached_tokens = ?11, total_tokens = ?12, input_cost = ?13,
                 output_cost = ?14, total_cost = ?15, attempts_count = ?16, attempts = ?17, finish_reason = ?18,
                 cache_write_tokens = ?19, cache_read_cost = ?20, cache_write_cost = ?21,
                 time_to_first_token_ms = ?22, cached = ?23,
                 rate_tokens = iif(rate_tokens IS NULL, NULL, ?24)
             WHERE id = ?1",
            $condition
        )
    };
}
/// Closes execution ?1 whatever its status.
const COMPLETE_SQL: &str = complete_sql!("");
/// Closes execution ?1 if it is still running.
const COMPLETE_RUNNING_SQL: &str = complete_sql!(" AND status = 'running'");

/// Closes an execution row, moving it in the rollups from any earlier outcome to this one;
/// with `store_details`, also writes its prompts and response (once, at the end, to keep the
/// start of a call to one small write).
fn complete_execution(tx: &Connection, e: &NewExecution, c: &Completion, store_details: bool, cal: &Calendar) -> Result<()> {
    let periods = rollups::periods(cal, e.started_at);
    // A running row (nearly always) is in no rollup: closing it needs no subtraction first.
    // Only one that already had an outcome (its lease was taken over) is moved.
    let numbers = rollups::settled_values(c);
    if close_execution(tx, COMPLETE_RUNNING_SQL, e, c, &numbers)? == 0 {
        roll(tx, &e.id, &periods, -1)?;
        if close_execution(tx, COMPLETE_SQL, e, c, &numbers)? != 1 {
            return Err(Error::Store(format!("execution {} vanished before it could be completed", e.id)));
        }
    }
    add_settled(tx, e, c, &numbers, &periods)?;
    if store_details {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO execution_details (execution_id, system_prompt, user_prompt, response, tool_calls)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![e.id, opt_text(&e.system_prompt), opt_text(&e.user_prompt), opt_text(&c.response), opt_text(&e.tool_calls)])?;
    }
    Ok(())
}

/// One change to a counter: `used` is added to its recorded usage, `reserve` (negative to
/// release) to its in-flight reservations.
struct Bump<'a> {
    key: &'a CounterKey,
    used: budget::Usage,
    reserve: budget::Usage,
}

/// A counter after a change: (recorded, reserved).
type Totals = (budget::Usage, budget::Usage);

/// Applies counter changes: a single-row upsert each (a multi-row upsert needs a statement
/// journal and cost more), without RETURNING (SQLite buffers returned rows in a temporary
/// B-tree per execution); `totals` reads counters back when they are needed.
fn bump(tx: &Connection, changes: &[Bump<'_>]) -> Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO usage_counters (scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (scope, period) DO UPDATE SET cost = cost + excluded.cost, tokens = tokens + excluded.tokens,
             executions = executions + excluded.executions, reserved_cost = reserved_cost + excluded.reserved_cost,
             reserved_tokens = reserved_tokens + excluded.reserved_tokens,
             reserved_executions = reserved_executions + excluded.reserved_executions",
    )?;
    for c in changes {
        let (u, r) = (&c.used, &c.reserve);
        stmt.execute(params![c.key.0, c.key.1, u.cost.0, u.tokens, u.executions, r.cost.0, r.tokens, r.executions])?;
    }
    Ok(())
}

/// The totals of several counters, one point lookup each (an OR of keys in one query makes
/// SQLite build a temporary B-tree to de-duplicate); counters never written are absent.
fn totals(c: &Connection, keys: &[CounterKey]) -> Result<HashMap<CounterKey, Totals>> {
    let mut stmt = c.prepare_cached(
        "SELECT cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions
         FROM usage_counters WHERE scope = ?1 AND period = ?2",
    )?;
    let mut out = HashMap::with_capacity(keys.len());
    for key in keys {
        let found = stmt
            .query_row(params![key.0, key.1], |r| {
                let usage = |i: usize| -> rusqlite::Result<budget::Usage> {
                    Ok(budget::Usage { cost: Nanos(r.get(i)?), tokens: r.get(i + 1)?, executions: r.get(i + 2)? })
                };
                Ok((usage(0)?, usage(3)?))
            })
            .optional()?;
        if let Some(t) = found {
            out.insert(key.clone(), t);
        }
    }
    Ok(out)
}

/// A counter's recorded usage (in-flight reservations excluded).
fn counter(c: &Connection, key: (&str, &str)) -> Result<budget::Usage> {
    Ok(c.prepare_cached("SELECT cost, tokens, executions FROM usage_counters WHERE scope = ?1 AND period = ?2")?
        .query_row(params![key.0, key.1], |r| Ok(budget::Usage { cost: Nanos(r.get(0)?), tokens: r.get(1)?, executions: r.get(2)? }))
        .optional()?
        .unwrap_or_default())
}

/// A reservation removed from the table: its counters and its estimate.
fn release_row(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<(Vec<CounterKey>, budget::Usage)> {
    let keys: String = r.get(first)?;
    let est = budget::Usage { cost: Nanos(r.get(first + 1)?), tokens: r.get(first + 2)?, executions: r.get(first + 3)? };
    Ok((decode_keys(&keys), est))
}

/// The log a scope's admissions are in (`executions.rate_scopes`, migration 16): the global
/// one, or a tenant's.
#[derive(Clone, Copy)]
enum Log<'a> {
    Global,
    Tenant(&'a str),
}

impl<'a> Log<'a> {
    fn of(scope: &'a str) -> Log<'a> {
        scope.strip_prefix("tenant:").map_or(Log::Global, Log::Tenant)
    }

    /// The bit of `executions.rate_scopes` that puts a call in this log.
    fn bit(self) -> i64 {
        match self {
            Log::Global => 1,
            Log::Tenant(_) => 2,
        }
    }

    /// `sql[0]` for the global log, `sql[1]` (whose ?3 is the tenant) for a tenant's.
    fn pick(self, sql: [&'static str; 2]) -> (&'static str, Option<&'a str>) {
        match self {
            Log::Global => (sql[0], None),
            Log::Tenant(t) => (sql[1], Some(t)),
        }
    }
}

/// SQL conditions on `executions e`: the rows of a log, the global one (`global`) or tenant
/// ?3's (`tenant`, through `executions_tenant`, whose entries end in the id).
macro_rules! in_log {
    (global) => {
        "e.rate_scopes & 1"
    };
    (tenant) => {
        "e.tenant_id = ?3 AND e.rate_scopes & 2"
    };
}

/// SQL conditions on `executions e`: stamped after `$lo` and, with `$hi`, at or before it (SQL
/// expressions of micros), found through the ids: an admitted call's id is minted in its
/// stamp's millisecond (`execution::new_id`), so these rows' ids sort from `id_prefix($lo)`
/// to before `id_prefix($hi + 1 ms)`.
macro_rules! stamped {
    ($lo:literal) => {
        concat!("e.id >= printf('%08x-%04x', (", $lo, ") / 1000 >> 16, (", $lo, ") / 1000 & 65535) AND e.started_at > ", $lo)
    };
    ($lo:literal, $hi:literal) => {
        concat!(
            stamped!($lo),
            " AND e.id < printf('%08x-%04x', ((", $hi, ") / 1000 + 1) >> 16, ((", $hi, ") / 1000 + 1) & 65535) AND e.started_at <= ", $hi
        )
    };
}

/// A scope's totals row, tagged `$tag` (a literal); `$scope`: a parameter holding the
/// scope, or its literal.
macro_rules! totals_sql {
    ($scope:literal, $tag:literal) => {
        concat!("SELECT ", $tag, ", requests, tokens, horizon FROM rate_totals WHERE scope = ", $scope)
    };
}

/// The totals rows of window scopes `scopes` (the global one, a tenant's, or both: one
/// statement either way), in their order: (settled admissions' totals, horizon), None for a
/// scope without a row.
fn scope_totals(tx: &Connection, scopes: &[String]) -> Result<Vec<Option<(RateUsage, Micros)>>> {
    const GLOBAL: &str = totals_sql!("'global'", "0");
    const TENANT: &str = totals_sql!("?1", "1");
    const BOTH: &str = concat!(totals_sql!("'global'", "0"), " UNION ALL ", totals_sql!("?1", "1"));
    let tenant = scopes.iter().find(|s| matches!(Log::of(s), Log::Tenant(_)));
    let global = scopes.iter().any(|s| matches!(Log::of(s), Log::Global));
    let read = |r: &rusqlite::Row<'_>| Ok((r.get::<_, i64>(0)?, RateUsage { requests: r.get(1)?, tokens: r.get(2)?, in_flight: 0 }, r.get(3)?));
    let mut stmt = tx.prepare_cached(match (global, tenant) {
        (true, Some(_)) => BOTH,
        (true, None) => GLOBAL,
        (false, _) => TENANT,
    })?;
    let rows: Vec<(i64, RateUsage, Micros)> = match tenant {
        Some(t) => stmt.query_map([t], read)?.collect::<rusqlite::Result<_>>()?,
        None => stmt.query_map([], read)?.collect::<rusqlite::Result<_>>()?,
    };
    Ok(scopes
        .iter()
        .map(|s| {
            let tag = i64::from(matches!(Log::of(s), Log::Tenant(_)));
            rows.iter().find(|r| r.0 == tag).map(|r| (r.1, r.2))
        })
        .collect())
}

/// Scope ?1's logged admissions stamped in (?2, ?4] (?3: `in_log!`'s tenant), and their tokens.
macro_rules! between_sql {
    ($log:ident) => {
        concat!("SELECT COUNT(*), COALESCE(SUM(e.rate_tokens), 0) FROM executions e WHERE ", in_log!($log), " AND ", stamped!("?2", "?4"))
    };
}

/// A scope's logged admissions stamped in (`lo`, `hi`], and their tokens.
fn logged_between(tx: &Connection, scope: &str, lo: Micros, hi: Micros) -> Result<RateUsage> {
    let (sql, tenant) = Log::of(scope).pick([between_sql!(global), between_sql!(tenant)]);
    // ?1 (the scope) is bound but unused: the statements share `in_log!`'s ?3.
    Ok(tx.prepare_cached(sql)?.query_row(params![scope, lo, tenant.unwrap_or_default(), hi], |r| {
        Ok(RateUsage { requests: r.get(0)?, tokens: r.get(1)?, in_flight: 0 })
    })?)
}

/// A scope's use as this admission counts it (`rate_state`), and what it does to its totals.
struct ScopeUse {
    scope: String,
    use_: RateUsage,
    /// A window limit applies (the call is logged in this scope), not only `max_concurrent`.
    window: bool,
    /// The horizon the admission moves the totals to, and the settled admissions' totals
    /// after it (None: they stay).
    moved: Option<(Micros, RateUsage)>,
    /// The scope has a totals row.
    stored: bool,
}

/// How far a scope's horizon may trail its window's start before an admission moves it:
/// a quarter of the window (see `rate_state`).
const HORIZON_LAG_DIVISOR: i64 = 4;

/// How far behind the window's start a horizon has every admission its totals count out of
/// the window, whatever window each process has: `MAX_WINDOW` and a quarter (see `rate_state`).
const RESTART_AFTER: Micros = ratelimit::MAX_WINDOW.as_micros() as i64 * (HORIZON_LAG_DIVISOR + 1) / HORIZON_LAG_DIVISOR;

/// The calls in flight of a global and a tenant's log (admitted, neither settled nor expired:
/// migration 17) stamped after `?1` (global) or `?2` (tenant `?3`'s), and their estimated
/// tokens; and the calls holding `?4`'s `max_concurrent` slot (NULLs when none). Only calls in
/// flight have a reservation, so it is a short scan (the expiry sweep's too).
const FLYING_SQL: &str = "SELECT SUM(g), SUM(g * tokens), SUM(t), SUM(t * tokens), SUM(concurrency_scope = ?4)
    FROM (SELECT tokens, concurrency_scope, rate_scopes & 1 AND started_at > ?1 AS g,
              rate_scopes & 2 AND tenant_id = ?3 AND started_at > ?2 AS t FROM reservations)";

/// The calls in flight of the window scopes `scopes` stamped after `after[i]`, in their order,
/// and the calls holding `slot`'s `max_concurrent` slot.
fn flying(tx: &Connection, scopes: &[String], after: &[Micros], slot: Option<&str>) -> Result<(Vec<RateUsage>, i64)> {
    let (mut global, mut tenant) = (Micros::MAX, (Micros::MAX, None));
    for (s, &a) in scopes.iter().zip(after) {
        match Log::of(s) {
            Log::Global => global = a,
            Log::Tenant(t) => tenant = (a, Some(t)),
        }
    }
    let sum = |r: &rusqlite::Row<'_>, i: usize| Ok::<i64, rusqlite::Error>(r.get::<_, Option<i64>>(i)?.unwrap_or(0));
    let usage = |r: &rusqlite::Row<'_>, i: usize| Ok::<_, rusqlite::Error>(RateUsage { requests: sum(r, i)?, tokens: sum(r, i + 1)?, in_flight: 0 });
    let (g, t, slots) =
        tx.prepare_cached(FLYING_SQL)?.query_row(params![global, tenant.0, tenant.1, slot], |r| Ok((usage(r, 0)?, usage(r, 2)?, sum(r, 4)?)))?;
    Ok((scopes.iter().map(|s| if matches!(Log::of(s), Log::Global) { g } else { t }).collect(), slots))
}

/// The use of the scopes `checks` name for a call estimated at `tokens`: admissions and their
/// tokens stamped after `now - window` (later stamps included), from each scope's running
/// totals of its settled admissions (see `ratelimit::step`) and its calls in flight, and
/// calls holding a `max_concurrent` slot.
///
/// The totals count the settled admissions stamped after their horizon, the calls in flight
/// those stamped after it too; while it is behind the window's start they count a few more
/// than the window holds. An admission that fits every limit of a scope even so leaves the
/// horizon where it is and reads nothing from the log; it is moved (the admissions it crosses
/// read and taken away) only to tell a refusal exactly, or once it trails the window's start
/// by a quarter of the window, which bounds the part of the log read then.
///
/// Every admission the totals count is stamped at most a window and a quarter after their
/// horizon (one that moves it moves it to its stamp less a window; one that leaves it is
/// stamped less than a window and a quarter after it), so once the window starts
/// `RESTART_AFTER` or more after the horizon, all of them left it and the totals restart
/// without reading the log (a scope after a long pause).
fn rate_state(tx: &Connection, checks: &[RateCheck], tokens: i64, now: Micros, window: Micros) -> Result<Vec<ScopeUse>> {
    let start = now - window;
    let windows = ratelimit::window_scopes(checks);
    let slot = ratelimit::concurrency_scope(checks);
    if windows.is_empty() && slot.is_none() {
        return Ok(Vec::new());
    }
    let stored = if windows.is_empty() { Vec::new() } else { scope_totals(tx, &windows)? };
    let after: Vec<Micros> = stored.iter().map(|t| t.map_or(start, |t| t.1)).collect();
    let (fly, slots) = flying(tx, &windows, &after, slot.as_deref())?;
    let mut out = Vec::with_capacity(windows.len() + 1);
    for ((scope, totals), fly) in windows.iter().zip(stored).zip(fly) {
        let settled = totals.map(|t| t.0).unwrap_or_default();
        let mut use_ = settled.plus(&fly);
        let horizon = totals.map(|t| t.1);
        let moved = match (ratelimit::step(now, window, horizon), horizon) {
            (ratelimit::Step::Behind { since }, Some(h)) => {
                use_ = use_.plus(&logged_between(tx, scope, since, h)?);
                None
            }
            (ratelimit::Step::Advance { .. }, Some(h)) if start - h < window / HORIZON_LAG_DIVISOR && fits(checks, scope, &use_, tokens) => None,
            // The log is the executions rows, which retention keeps for days: nothing to forget.
            (_, h) => {
                // The calls in flight the window's start leaves behind are not in the totals.
                let later = if h.is_some() && fly.requests > 0 { flying(tx, std::slice::from_ref(scope), &[start], None)?.0[0] } else { fly };
                let left = match h {
                    Some(h) if start - h >= RESTART_AFTER => RateUsage::default(),
                    // The admissions crossed, less those in flight.
                    Some(h) if use_.requests > 0 => settled.minus(&logged_between(tx, scope, h, start)?.minus(&fly.minus(&later))),
                    _ => settled,
                };
                use_ = left.plus(&later);
                Some((start, left))
            }
        };
        out.push(ScopeUse { scope: scope.clone(), use_, window: true, moved, stored: horizon.is_some() });
    }
    // A scope with no window limit logs nothing: only its calls in flight count.
    if let Some(slot) = slot {
        match out.iter_mut().find(|u| u.scope == slot) {
            Some(u) => u.use_.in_flight = slots,
            None => out.push(ScopeUse { scope: slot, use_: RateUsage { in_flight: slots, ..Default::default() }, window: false, moved: None, stored: false }),
        }
    }
    Ok(out)
}

/// Whether a call estimated at `tokens` fits every window limit of `scope` with its use at
/// `use_` (counting more admissions than the window holds, it fits the window too).
fn fits(checks: &[RateCheck], scope: &str, use_: &RateUsage, tokens: i64) -> bool {
    checks.iter().filter(|c| c.scope == scope).all(|c| match c.kind {
        ratelimit::Kind::Requests => use_.requests < c.limit,
        ratelimit::Kind::Tokens => use_.tokens.saturating_add(tokens) <= c.limit,
        ratelimit::Kind::Concurrent => true,
    })
}

/// The `rate_scopes` of an admitted call logged in window `scopes` (migration 16), NULL if none:
/// a tenant's log holds only its own calls.
fn log_bits(e: &NewExecution, scopes: &[String]) -> Result<Option<i64>> {
    let mut bits = 0;
    for scope in scopes {
        let log = Log::of(scope);
        if let Log::Tenant(t) = log {
            if e.tenant_id.as_deref() != Some(t) {
                return Err(Error::Store(format!("execution {} of tenant {:?} cannot be logged in {scope}", e.id, e.tenant_id)));
            }
        }
        bits |= log.bit();
    }
    Ok((bits != 0).then_some(bits))
}

/// The window scopes of a call logged with `rate_scopes` `bits` (`log_bits`) for `tenant`.
fn logged_scopes(bits: i64, tenant: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if bits & Log::Global.bit() != 0 {
        out.push("global".to_string());
    }
    if let (true, Some(t)) = (bits & Log::Tenant("").bit() != 0, tenant) {
        out.push(budget::tenant_scope(t));
    }
    out
}

/// Writes the totals an admission moved (their horizon, and the settled admissions after
/// it); the admission itself is counted by its reservation until it settles. An UPDATE of a
/// row read costs less than an upsert.
fn write_totals(tx: &Connection, scopes: &[ScopeUse]) -> Result<()> {
    for s in scopes {
        let Some((horizon, t)) = s.moved else { continue };
        let sql = if s.stored {
            "UPDATE rate_totals SET requests = ?2, tokens = ?3, horizon = ?4 WHERE scope = ?1"
        } else {
            "INSERT INTO rate_totals (scope, requests, tokens, horizon) VALUES (?1, ?2, ?3, ?4)"
        };
        tx.prepare_cached(sql)?.execute(params![s.scope, t.requests, t.tokens, horizon])?;
    }
    Ok(())
}

/// Adds a call that left the calls in flight (settled, or its lease expired) to the totals of
/// window `scopes` if they count it (stamped at `at`, after their horizon): `requests` (1, or
/// 0 for a call already added when its lease expired) and `tokens` (its real tokens, or those
/// less the estimate added then). Nothing to add, nothing written.
fn rate_settle(tx: &Connection, scopes: &[String], at: Micros, requests: i64, tokens: i64) -> Result<()> {
    if scopes.is_empty() || requests == 0 && tokens == 0 {
        return Ok(());
    }
    let mut stmt = tx.prepare_cached("UPDATE rate_totals SET requests = requests + ?3, tokens = tokens + ?4 WHERE scope = ?1 AND horizon < ?2")?;
    for scope in scopes {
        stmt.execute(params![scope, at, requests, tokens])?;
    }
    Ok(())
}

/// Admissions of a scope stamped after `since` (later stamps included), and their tokens:
/// the dashboard's and CLI's view, read at any time rather than at an admission.
fn window_use(c: &Connection, scope: &str, since: Micros) -> Result<RateUsage> {
    macro_rules! sql {
        ($log:ident) => {
            concat!("SELECT COUNT(*), COALESCE(SUM(e.rate_tokens), 0) FROM executions e WHERE ", in_log!($log), " AND ", stamped!("?2"))
        };
    }
    let (sql, tenant) = Log::of(scope).pick([sql!(global), sql!(tenant)]);
    let read = |r: &rusqlite::Row<'_>| Ok(RateUsage { requests: r.get(0)?, tokens: r.get(1)?, in_flight: 0 });
    let mut stmt = c.prepare_cached(sql)?;
    // ?1 (the scope) is bound but unused: the statements share `in_log!`'s ?3.
    Ok(match tenant {
        None => stmt.query_row(params![scope, since], read),
        Some(t) => stmt.query_row(params![scope, since, t], read),
    }?)
}

/// The calls holding a scope's `max_concurrent` slot (their reservations say so).
fn in_flight(c: &Connection, scope: &str) -> Result<i64> {
    Ok(c.prepare_cached("SELECT COUNT(*) FROM reservations WHERE concurrency_scope = ?1")?.query_row([scope], |r| r.get(0))?)
}

/// A scope's admissions stamped after `since`, oldest first.
fn window_events(c: &Connection, scope: &str, since: Micros) -> Result<Vec<(Micros, i64)>> {
    macro_rules! sql {
        ($log:ident) => {
            concat!("SELECT e.started_at, e.rate_tokens FROM executions e WHERE ", in_log!($log), " AND ", stamped!("?2"), " ORDER BY e.started_at")
        };
    }
    let (sql, tenant) = Log::of(scope).pick([sql!(global), sql!(tenant)]);
    let read = |r: &rusqlite::Row<'_>| Ok((r.get(0)?, r.get(1)?));
    let mut stmt = c.prepare_cached(sql)?;
    let rows: rusqlite::Result<Vec<(Micros, i64)>> = match tenant {
        None => stmt.query_map(params![scope, since], read)?.collect(),
        Some(t) => stmt.query_map(params![scope, since, t], read)?.collect(),
    };
    Ok(rows?)
}

/// The reservation of a call in flight that holds nothing (no budget, log or slot): no
/// counters, and a lease (?2) renewed like any other, so a call whose process died is closed
/// as abandoned by the expiry sweep (migration 19 gives one to the rows migration 18 wrote
/// with a lease that never ran out).
const HOLD_NOTHING_SQL: &str = "INSERT INTO reservations (execution_id, counters, cost, tokens, executions, expires_at)
     VALUES (?1, '', 0, 0, 0, ?2)";

/// Releases reservations whose lease ran out (their process died) and closes their
/// executions as abandoned, counting them as the executions they were.
fn expire_reservations(tx: &Connection, cal: &Calendar, now: Micros) -> Result<()> {
    // Nearly always there is none. A DELETE ... RETURNING builds a temporary table for its
    // rows even when it returns none, so a plain look comes first.
    let any: bool = tx.prepare_cached("SELECT EXISTS (SELECT 1 FROM reservations WHERE expires_at <= ?1)")?.query_row([now], |r| r.get(0))?;
    if !any {
        return Ok(());
    }
    type Expired = (String, (Vec<CounterKey>, budget::Usage), Option<(Micros, i64, Option<String>)>); // (execution, reservation, its stamp and logs)
    let expired: Vec<Expired> = tx
        .prepare_cached("DELETE FROM reservations WHERE expires_at <= ?1 RETURNING execution_id, counters, cost, tokens, executions, started_at, rate_scopes, tenant_id")?
        .query_map([now], |r| {
            let logged = match (r.get::<_, Option<Micros>>(5)?, r.get::<_, Option<i64>>(6)?) {
                (Some(at), Some(bits)) => Some((at, bits, r.get(7)?)),
                _ => None,
            };
            Ok((r.get(0)?, release_row(r, 1)?, logged))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for (id, (keys, est), logged) in expired {
        // A logged call leaves the calls in flight: its logs' totals count it at its estimate.
        if let Some((at, bits, tenant)) = logged {
            rate_settle(tx, &logged_scopes(bits, tenant.as_deref()), at, 1, est.tokens)?;
        }
        let release: Vec<Bump<'_>> = keys.iter().map(|key| Bump { key, used: budget::Usage::default(), reserve: est.negated() }).collect();
        bump(tx, &release)?;
        let row: Option<(Option<String>, String, Micros)> = tx
            .prepare_cached("SELECT tenant_id, agent, started_at FROM executions WHERE id = ?1 AND status = 'running'")?
            .query_row([&id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        if let Some((tenant, agent, started)) = row {
            tx.prepare_cached(
                "UPDATE executions SET status = 'error', error_class = 'Abandoned',
                     error_message = 'the process running this call stopped before it finished', completed_at = ?2
                 WHERE id = ?1",
            )?
            .execute(params![id, now])?;
            roll(tx, &id, &rollups::periods(cal, started), 1)?;
            let keys = usage_keys(cal, tenant.as_deref(), &agent, started);
            let counted: Vec<Bump<'_>> =
                keys.iter().map(|key| Bump { key, used: budget::estimate(Nanos::ZERO, 0), reserve: budget::Usage::default() }).collect();
            bump(tx, &counted)?;
        }
    }
    Ok(())
}

fn stored_timezone(c: &Connection) -> Result<Option<String>> {
    Ok(c.prepare_cached(TIMEZONE_SQL)?.query_row([], |r| r.get(0)).optional()?)
}

/// Recomputes every counter and the rollups from the executions in `cal`'s periods (see
/// `Store::rebuild_counters`); `keyed_in` is the calendar they were keyed in until now.
fn rebuild(tx: &Connection, keyed_in: &Calendar, cal: &Calendar) -> Result<usize> {
    let plan = rebuild_plan(tx, keyed_in)?;
    rebuild_rollups(tx, &plan, cal)?;
    let mut totals: HashMap<CounterKey, budget::Usage> = HashMap::new();
    if let Some(before) = &plan.usage_before {
        let mut stmt = tx.prepare(&kept_usage_sql(Dialect::Sqlite))?;
        let mut rows = stmt.query([before])?;
        while let Some(r) = rows.next()? {
            let (day, tenant, agent): (String, Option<String>, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
            let u = budget::Usage { executions: r.get(3)?, cost: Nanos(r.get(4)?), tokens: r.get(5)? };
            for key in day_usage_keys(tenant.as_deref(), &agent, &day) {
                let t = totals.entry(key).or_default();
                *t = t.plus(&u);
            }
        }
    }
    {
        let mut stmt = tx.prepare(&counted_executions_sql(Dialect::Sqlite))?;
        let mut rows = stmt.query([plan.rows_from])?;
        while let Some(r) = rows.next()? {
            let started_at: Micros = r.get(2)?;
            let tenant: Option<String> = r.get(0)?;
            let agent: String = r.get(1)?;
            let u = budget::estimate(Nanos(r.get(3)?), r.get(4)?);
            for key in usage_keys(cal, tenant.as_deref(), &agent, started_at) {
                let t = totals.entry(key).or_default();
                *t = t.plus(&u);
            }
        }
    }
    tx.execute("DELETE FROM usage_counters", [])?;
    let recorded: Vec<Bump<'_>> = totals.iter().map(|(key, u)| Bump { key, used: *u, reserve: budget::Usage::default() }).collect();
    for chunk in recorded.chunks(100) {
        bump(tx, chunk)?;
    }
    // Calls in flight keep their reservations, on the periods of `cal`.
    type Held = (String, (Vec<CounterKey>, budget::Usage), Option<Micros>); // (execution, reservation, call's start)
    let held: Vec<Held> = tx
        .prepare(
            "SELECT r.execution_id, r.counters, r.cost, r.tokens, r.executions, e.started_at
             FROM reservations r LEFT JOIN executions e ON e.id = r.execution_id",
        )?
        .query_map([], |r| Ok((r.get(0)?, release_row(r, 1)?, r.get(5)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (id, (keys, est), started_at) in &held {
        let keys = match started_at {
            Some(t) => {
                let moved = rekey(keys, cal, *t);
                if &moved != keys {
                    tx.execute("UPDATE reservations SET counters = ?2 WHERE execution_id = ?1", params![id, encode_keys(moved.iter())])?;
                }
                moved
            }
            None => keys.clone(),
        };
        bump(tx, &keys.iter().map(|key| Bump { key, used: budget::Usage::default(), reserve: *est }).collect::<Vec<_>>())?;
    }
    Ok(totals.len())
}

/// What a rebuild of rollups keyed in `keyed_in` keeps (`rollups::rebuild_plan`).
fn rebuild_plan(tx: &Connection, keyed_in: &Calendar) -> Result<rollups::Rebuild> {
    use super::retention::{sqlite::CURSOR_GET, Horizon, HORIZON};
    let horizon: Option<String> = tx.prepare_cached(CURSOR_GET)?.query_row([HORIZON], |r| r.get(0)).optional()?;
    let oldest: Option<Micros> = tx.query_row(rollups::OLDEST_SQL, [], |r| r.get(0))?;
    Ok(rollups::rebuild_plan(horizon.as_deref().and_then(Horizon::decode), oldest, keyed_in))
}

/// Recomputes the daily rollups `plan` says, in `cal`'s periods, and every monthly one and
/// daily total (see `rollups::OLDEST_SQL`).
fn rebuild_rollups(tx: &Connection, plan: &rollups::Rebuild, cal: &Calendar) -> Result<()> {
    let Some(first_day) = &plan.rollups else { return Ok(()) };
    let mut totals = plan.totals();
    {
        let mut stmt = tx.prepare(&rollups::source_sql(Dialect::Sqlite))?;
        let mut rows = stmt.query([plan.rows_from])?;
        let mut values = vec![0; ROLLED.len()];
        while let Some(r) = rows.next()? {
            let started_at: Micros = r.get(0)?;
            for (i, v) in values.iter_mut().enumerate() {
                *v = r.get(5 + i)?;
            }
            totals.add_row(cal, started_at, [r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?], &values);
        }
    }
    tx.execute("DELETE FROM daily_rollups WHERE period >= ?1", [first_day])?;
    let placeholders: Vec<String> = (1..=ROLLED.len() + 6).map(|i| format!("?{i}")).collect();
    let mut insert = tx.prepare(&format!(
        "INSERT INTO daily_rollups ({}) VALUES ({}) {}",
        rollups::insert_columns(),
        placeholders.join(", "),
        rollups::add_on_conflict()
    ))?;
    for (key, values) in totals.rows() {
        let texts = key.into_iter().map(SqlValue::Text);
        insert.execute(params_from_iter(texts.chain(values.into_iter().map(SqlValue::Integer))))?;
    }
    tx.execute("DELETE FROM monthly_rollups", [])?;
    tx.execute(&rollups::derive_monthly_sql(Dialect::Sqlite), [])?;
    tx.execute("DELETE FROM daily_totals", [])?;
    tx.execute(&rollups::derive_totals_sql(), [])?;
    Ok(())
}

// ---------------------------------------------------------------- budgets

fn seen_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SeenTenant> {
    Ok(SeenTenant { id: r.get(0)?, name: r.get(1)?, first_used_at: r.get(2)?, last_used_at: r.get(3)? })
}

fn budget_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TenantBudget> {
    let enforcement: String = r.get(8)?;
    Ok(TenantBudget {
        tenant_id: r.get(0)?,
        name: r.get(1)?,
        limits: Limits {
            daily_cost: r.get::<_, Option<i64>>(2)?.map(Nanos),
            monthly_cost: r.get::<_, Option<i64>>(3)?.map(Nanos),
            daily_tokens: r.get(4)?,
            monthly_tokens: r.get(5)?,
            daily_executions: r.get(6)?,
            monthly_executions: r.get(7)?,
            rpm: r.get(9)?,
            tpm: r.get(10)?,
            max_concurrent: r.get(11)?,
        },
        // The CHECK constraint keeps this to hard/soft.
        enforcement: if enforcement == "soft" { Enforcement::Soft } else { Enforcement::Hard },
    })
}

fn budget_get(conn: &Connection, tenant_id: &str) -> Result<Option<TenantBudget>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {BUDGET_COLUMNS} FROM tenant_budgets WHERE tenant_id = ?1"))?
        .query_row([tenant_id], budget_from_row)
        .optional()?)
}

// ---------------------------------------------------------------- breakers

fn breaker_get(conn: &Connection, key: &BreakerKey) -> Result<breaker::State> {
    let row: Option<(String, String, i64)> = conn
        .prepare_cached("SELECT phase, failures, retry_at FROM breakers WHERE key = ?1")?
        .query_row([key.id()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    Ok(match row {
        None => breaker::State::default(),
        Some((phase, failures, retry_at)) => breaker::State {
            phase: Phase::parse(&phase).ok_or_else(|| Error::Store(format!("breaker {}: corrupt phase {phase:?}", key.id())))?,
            failures: breaker::State::decode_failures(&failures),
            retry_at,
        },
    })
}

fn breaker_put(tx: &Connection, key: &BreakerKey, s: &breaker::State, now: Micros) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO breakers (key, agent, model, tenant_id, phase, failures, retry_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (key) DO UPDATE SET phase = excluded.phase, failures = excluded.failures,
             retry_at = excluded.retry_at, updated_at = excluded.updated_at",
    )?
    .execute(params![key.id(), key.agent, key.model, opt_text(&key.tenant_id), s.phase.as_str(), s.encode_failures(), s.retry_at, now])?;
    Ok(())
}

fn breaker_admit_tx(tx: &Connection, key: &BreakerKey, lease: i64, now: Micros) -> Result<Admission> {
    let state = breaker_get(tx, key)?;
    let (admission, new) = breaker::admit(&state, now, lease);
    if let Some(new) = new {
        breaker_put(tx, key, &new, now)?;
    }
    Ok(admission)
}

// ---------------------------------------------------------------- queries

fn sql_value(v: &Value) -> SqlValue {
    match v {
        Value::Text(s) => SqlValue::Text(s.clone()),
        Value::Int(i) => SqlValue::Integer(*i),
    }
}

/// How far an execution's id timestamp may be from its `started_at` (both are read from the
/// clock within microseconds of each other; the margin covers small clock steps).
const ID_SKEW: Micros = 1_000_000;

/// The UUIDv7 text prefix of ids minted at `t`: 48 bits of Unix milliseconds as
/// "xxxxxxxx-xxxx", which sorts like the time.
pub(super) fn id_prefix(t: Micros) -> String {
    let ms = (t.max(0) / 1000) as u64;
    format!("{:08x}-{:04x}", ms >> 16, ms & 0xffff)
}

/// " WHERE ..." for a query's filters; field names come from the fixed `FIELDS` list.
fn where_clause(q: &Query) -> (String, Vec<SqlValue>) {
    let mut parts = Vec::new();
    let mut args = Vec::new();
    for f in &q.filters {
        match f {
            Filter::Eq(Field(n, _), v) => {
                args.push(sql_value(v));
                parts.push(format!("{n} = ?{}", args.len()));
            }
            Filter::In(Field(n, _), vs) => {
                let mut ph = Vec::new();
                for v in vs {
                    args.push(sql_value(v));
                    ph.push(format!("?{}", args.len()));
                }
                parts.push(if ph.is_empty() { "0".into() } else { format!("{n} IN ({})", ph.join(", ")) });
            }
            Filter::IsNull(Field(n, _)) => parts.push(format!("{n} IS NULL")),
            Filter::NotNull(Field(n, _)) => parts.push(format!("{n} IS NOT NULL")),
            // Time order is id order here (see `query_rows`): the id alone bounds the page.
            Filter::Before(_, id) => {
                args.push(SqlValue::Text(id.clone()));
                parts.push(format!("id < ?{}", args.len()));
            }
            Filter::Range(Field(n, _), lo, hi) => {
                if *n == "started_at" {
                    // Narrow by the time-ordered primary key first; the exact bounds follow.
                    for (bound, op) in [(lo.map(|t| t - ID_SKEW), ">="), (hi.map(|t| t + ID_SKEW), "<")] {
                        if let Some(t) = bound {
                            args.push(SqlValue::Text(id_prefix(t)));
                            parts.push(format!("id {op} ?{}", args.len()));
                        }
                    }
                }
                if let Some(lo) = lo {
                    args.push(SqlValue::Integer(*lo));
                    parts.push(format!("{n} >= ?{}", args.len()));
                }
                if let Some(hi) = hi {
                    args.push(SqlValue::Integer(*hi));
                    parts.push(format!("{n} < ?{}", args.len()));
                }
            }
        }
    }
    let w = if parts.is_empty() { String::new() } else { format!(" WHERE {}", parts.join(" AND ")) };
    (w, args)
}

fn cell(r: &rusqlite::Row<'_>, i: usize, kind: Kind) -> rusqlite::Result<Cell> {
    let v: SqlValue = r.get(i)?;
    Ok(match (v, kind) {
        (SqlValue::Null, _) => Cell::Null,
        (SqlValue::Integer(n), Kind::Money) => Cell::Money(Nanos(n)),
        (SqlValue::Integer(n), Kind::Time) => Cell::Time(n),
        (SqlValue::Integer(n), _) => Cell::Int(n),
        (SqlValue::Text(s), Kind::Json) => Cell::Json(s),
        (SqlValue::Text(s), _) => Cell::Text(s),
        (other, _) => {
            return Err(rusqlite::Error::InvalidColumnType(i, format!("{other:?}"), rusqlite::types::Type::Null));
        }
    })
}

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    FIELDS.iter().enumerate().map(|(i, (n, k))| Ok((*n, cell(r, i, *k)?))).collect()
}

fn aggregate_sql(agg: &Aggregate) -> (String, Kind) {
    match agg {
        Aggregate::Count => ("COUNT(*)".into(), Kind::Int),
        Aggregate::Sum(Field(n, k)) => (format!("COALESCE(SUM({n}), 0)"), *k),
    }
}

/// A grouped query answered by rollups, plus the matching calls still running.
fn from_rollups(c: &Connection, q: &Query, by: &[GroupKey], agg: &Aggregate, cal: &Calendar, plan: &rollups::Plan) -> Result<Vec<(GroupValues, Cell)>> {
    let mut groups = Groups::new(agg);
    for (sql, args) in &plan.statements {
        let mut stmt = c.prepare_cached(sql)?;
        let mut rows = stmt.query(params_from_iter(args.iter()))?;
        while let Some(r) = rows.next()? {
            groups.begin();
            for i in 0..by.len() {
                groups.part(text_ref(r, i)?);
            }
            groups.add_calls(r.get(by.len())?, r.get(by.len() + 1)?);
        }
    }
    for edge in &plan.edges {
        scan(c, edge, by, agg, cal, Rows::Settled, &mut groups)?;
    }
    if plan.running {
        scan(c, q, by, agg, cal, Rows::Running, &mut groups)?;
    }
    groups.finish()
}

fn text_ref<'a>(r: &'a rusqlite::Row<'_>, i: usize) -> Result<Option<&'a [u8]>> {
    Ok(match r.get_ref(i)? {
        rusqlite::types::ValueRef::Text(t) => Some(t),
        _ => None,
    })
}

/// Adds the matching rows (`rows`: all, or the running or settled ones) to `groups`, in one
/// streaming scan (SQLite's GROUP BY sorts every row through a temporary B-tree first, which
/// was most of the time).
fn scan(c: &Connection, q: &Query, by: &[GroupKey], agg: &Aggregate, cal: &Calendar, rows: Rows, groups: &mut Groups) -> Result<()> {
    let (w, args) = where_clause(q);
    let w = rows.narrow(w);
    let cols = query::key_columns(by);
    let day = by.contains(&GroupKey::Day).then(|| cols.len() - 1);
    let value = cols.len();
    let select: Vec<String> = cols.iter().map(|c| c.to_string()).chain([query::row_value(agg)]).collect();
    let mut stmt = c.prepare_cached(&format!("SELECT {} FROM executions{w}", select.join(", ")))?;
    let mut rows = stmt.query(params_from_iter(args.iter()))?;
    while let Some(r) = rows.next()? {
        let started_at = match day {
            Some(i) => r.get(i)?,
            None => 0,
        };
        query::row_key(groups, by, cal, started_at, |g, i| -> Result<()> {
            g.part(text_ref(r, i)?);
            Ok(())
        })?;
        groups.add(r.get(value)?);
    }
    Ok(())
}

impl Store for SqliteStore {
    fn purge_batch(&self, details_before: Option<Micros>, executions_before: Option<Micros>, limit: i64) -> Result<Purged> {
        use super::retention::{id_before, sqlite as sql, Horizon, CURSOR, HORIZON};
        let mut out = Purged::default();
        if let Some(t) = executions_before {
            let (n, in_use) = self.purge_tx(|tx| {
                let horizon = Horizon::of(&calendar_of(stored_timezone(tx)?)?, t);
                let (last, n): (Option<String>, i64) = tx
                    .prepare_cached(sql::EXECUTIONS_BATCH)?
                    .query_row(params![id_before(horizon.before), limit], |r| Ok((r.get(0)?, r.get(1)?)))?;
                if let Some(last) = last {
                    tx.prepare_cached(sql::DELETE_EXECUTION_DETAILS)?.execute(params![last])?;
                    tx.prepare_cached(sql::DELETE_EXECUTIONS)?.execute(params![last])?;
                    let stored: Option<String> = tx.prepare_cached(sql::CURSOR_GET)?.query_row(params![HORIZON], |r| r.get(0)).optional()?;
                    if horizon.advances(stored.as_deref()) {
                        tx.prepare_cached(sql::CURSOR_SET)?.execute(params![HORIZON, horizon.encode()])?;
                    }
                }
                Ok(n)
            })?;
            out.executions = n;
            out.in_use |= in_use;
        }
        if let Some(t) = details_before {
            let (n, in_use) = self.purge_tx(|tx| {
                let cursor: String =
                    tx.prepare_cached(sql::CURSOR_GET)?.query_row(params![CURSOR], |r| r.get(0)).optional()?.unwrap_or_default();
                let (last, n): (Option<String>, i64) =
                    tx.prepare_cached(sql::DETAILS_BATCH)?.query_row(params![cursor, id_before(t), limit], |r| Ok((r.get(0)?, r.get(1)?)))?;
                if let Some(last) = last {
                    tx.prepare_cached(sql::CLEAR_DETAILS)?.execute(params![cursor, last])?;
                    tx.prepare_cached(sql::DELETE_DETAILS)?.execute(params![cursor, last])?;
                    tx.prepare_cached(sql::CURSOR_SET)?.execute(params![CURSOR, last])?;
                }
                Ok(n)
            })?;
            out.details = n;
            out.in_use |= in_use;
        }
        Ok(out)
    }

    fn purge_preview(&self, details_before: Option<Micros>, executions_before: Option<Micros>) -> Result<Purged> {
        use super::retention::{id_before, sqlite as sql, Horizon, CURSOR};
        self.read(|c| {
            let cal = calendar_of(stored_timezone(c)?)?;
            let deleted = executions_before.map(|t| id_before(Horizon::of(&cal, t).before));
            let executions = match &deleted {
                Some(id) => c.prepare_cached(sql::COUNT_EXECUTIONS)?.query_row(params![id], |r| r.get(0))?,
                None => 0,
            };
            let details = match details_before {
                Some(t) => {
                    let cursor: String =
                        c.prepare_cached(sql::CURSOR_GET)?.query_row(params![CURSOR], |r| r.get(0)).optional()?.unwrap_or_default();
                    let kept_from = deleted.unwrap_or_default();
                    c.prepare_cached(sql::COUNT_DETAILS)?.query_row(params![cursor, id_before(t), kept_from], |r| r.get(0))?
                }
                None => 0,
            };
            Ok(Purged { details, executions, in_use: false })
        })
    }

    fn is_sqlite_file(&self) -> bool {
        self.reader.is_some()
    }

    fn writes_share_one_lock(&self) -> bool {
        true
    }

    fn admit(&self, req: &AdmitRequest<'_>) -> Result<Admitted> {
        let e = req.execution;
        self.write(|tx| {
            self.keyed_like(tx, req.calendar)?;
            if let (true, Some(tid)) = (req.remember_tenant, req.plan.tenant_id) {
                tx.prepare_cached(
                    "INSERT INTO tenants (tenant_id, name, first_used_at, last_used_at) VALUES (?1, ?2, ?3, ?3)
                     ON CONFLICT (tenant_id) DO UPDATE SET name = COALESCE(excluded.name, name),
                         first_used_at = MIN(first_used_at, excluded.first_used_at), last_used_at = MAX(last_used_at, excluded.last_used_at)",
                )?
                .execute(params![tid, req.tenant_name, req.now])?;
            }
            expire_reservations(tx, req.calendar, req.now)?;
            let stored = match (req.plan.tenant_id, req.plan.tenant_override) {
                (Some(tid), None) => budget_get(tx, tid)?,
                _ => None,
            };
            let checks = budget::checks(&req.plan, stored.as_ref(), req.calendar, req.now);
            let mut keys: Vec<CounterKey> = Vec::new();
            for c in &checks {
                let key = (c.scope.clone(), c.period_key.clone());
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
            let current = totals(tx, &keys)?;
            let in_use = |c: &Check| current.get(&(c.scope.clone(), c.period_key.clone())).copied().unwrap_or_default();
            let est = req.estimate;
            let (hard, warnings) = budget::evaluate(&checks, in_use, &est);
            if let Some(b) = hard {
                insert_execution(tx, e, None)?;
                complete_execution(tx, e, &blocked(&b, req.now), false, req.calendar)?;
                return Ok(Admitted::Blocked(b));
            }
            let rate_checks = ratelimit::checks(&req.plan, stored.as_ref());
            let rates = rate_state(tx, &rate_checks, est.tokens, req.now, req.rate_window)?;
            let since = req.now - req.rate_window;
            let use_of = |s: &str| rates.iter().find(|u| u.scope == s).map_or_else(RateUsage::default, |u| u.use_);
            let breach = ratelimit::evaluate(&rate_checks, use_of, est.tokens, req.now, req.rate_window, |s| window_events(tx, s, since))?;
            if let Some(b) = breach {
                write_totals(tx, &rates)?;
                if req.record_rate_limited {
                    insert_execution(tx, e, None)?;
                    complete_execution(tx, e, &rate_limited(&b, req.now), false, req.calendar)?;
                }
                return Ok(Admitted::RateLimited(b));
            }
            let (model_index, probe) = match first_admitted(req.breaker_keys, |key| breaker_admit_tx(tx, key, req.probe_lease, req.now))? {
                Choice::Model { index, probe } => (index, probe),
                Choice::AllOpen { retry_at } => {
                    write_totals(tx, &rates)?;
                    insert_execution(tx, e, None)?;
                    complete_execution(tx, e, &short_circuited(&e.agent, retry_at, req.now), false, req.calendar)?;
                    return Ok(Admitted::ShortCircuited { retry_at });
                }
            };
            let concurrency = ratelimit::concurrency_scope(&rate_checks);
            write_totals(tx, &rates)?;
            let rate_scopes: Vec<String> = rates.into_iter().filter(|u| u.window).map(|u| u.scope).collect();
            let bits = log_bits(e, &rate_scopes)?;
            // A call logged or holding a slot is counted in flight by its reservation.
            let reserved = !keys.is_empty() || concurrency.is_some() || bits.is_some();
            if reserved {
                bump(tx, &keys.iter().map(|key| Bump { key, used: budget::Usage::default(), reserve: est }).collect::<Vec<_>>())?;
                tx.prepare_cached(
                    "INSERT INTO reservations (execution_id, counters, cost, tokens, executions, expires_at, concurrency_scope, started_at, rate_scopes, tenant_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )?
                .execute(params![
                    e.id,
                    encode_keys(keys.iter()),
                    est.cost.0,
                    est.tokens,
                    est.executions,
                    req.reservation_expires_at,
                    concurrency,
                    e.started_at,
                    bits,
                    opt_text(&e.tenant_id)
                ])?;
            } else {
                // Every call in flight has a row here (migration 18); one holding nothing has
                // no counters, and its lease.
                tx.prepare_cached(HOLD_NOTHING_SQL)?.execute(params![e.id, req.reservation_expires_at])?;
            }
            insert_execution(tx, e, bits.map(|bits| (bits, est.tokens)))?;
            Ok(Admitted::Go { model_index, probe, checks, warnings, rate_scopes, reserved })
        })
    }

    fn breaker_admit(&self, key: &BreakerKey, lease: i64, now: Micros) -> Result<Admission> {
        self.write(|tx| breaker_admit_tx(tx, key, lease, now))
    }

    fn finish(&self, req: &FinishRequest<'_>) -> Result<Vec<Alert>> {
        let e = req.execution;
        let c = req.completion;
        self.write(|tx| {
            self.keyed_like(tx, req.calendar)?;
            complete_execution(tx, e, c, req.store_details, req.calendar)?;
            // The reservation (if this process's lease was not taken over) is released in the
            // same statements that add the real usage.
            // Read, then deleted: a DELETE ... RETURNING builds a temporary table for its row.
            // A logged call holds one too (the store's own; an engine's `reserved` is its
            // budgets' and slot's); any other call's holds nothing (migration 18). Every
            // call's has a lease, so one gone was taken over: its row was closed as abandoned
            // and counted.
            let delete = "DELETE FROM reservations WHERE execution_id = ?1";
            let (released, taken_over) = if req.reserved || !req.rate_scopes.is_empty() {
                let held = tx
                    .prepare_cached("SELECT counters, cost, tokens, executions FROM reservations WHERE execution_id = ?1")?
                    .query_row([&e.id], |r| release_row(r, 0))
                    .optional()?;
                if held.is_some() {
                    tx.prepare_cached(delete)?.execute([&e.id])?;
                }
                let gone = held.is_none();
                (held, gone)
            } else {
                (None, tx.prepare_cached(delete)?.execute([&e.id])? == 0)
            };
            let in_flight = released.is_some();
            let (reserved_keys, estimate) = released.unwrap_or_default();
            let used = budget::settled(c, taken_over);
            let mut keys = usage_keys(req.calendar, e.tenant_id.as_deref(), &e.agent, e.started_at);
            keys.extend(reserved_keys.iter().filter(|k| !keys.contains(k)).cloned().collect::<Vec<_>>());
            let changes: Vec<Bump<'_>> = keys
                .iter()
                .map(|key| Bump {
                    key,
                    used,
                    reserve: if reserved_keys.contains(key) { estimate.negated() } else { budget::Usage::default() },
                })
                .collect();
            bump(tx, &changes)?;
            // The logged estimate became the real usage as the row was closed, and the call left
            // the calls in flight with its reservation: the totals that count it add it, or if
            // its lease expired (they added its estimate then) the difference.
            let tokens = budget::recorded(c).tokens;
            match in_flight {
                true => rate_settle(tx, req.rate_scopes, e.started_at, 1, tokens)?,
                false => rate_settle(tx, req.rate_scopes, e.started_at, 0, tokens - req.logged_tokens)?,
            }
            let check_keys: Vec<CounterKey> = req.checks.iter().map(|c| (c.scope.clone(), c.period_key.clone())).collect();
            let after = if c.status.counts_as_usage() { totals(tx, &check_keys)? } else { HashMap::new() };
            let mut alerts = Vec::new();
            if c.status.counts_as_usage() {
                for check in req.checks {
                    let Some((now_used, _)) = after.get(&(check.scope.clone(), check.period_key.clone())).copied() else { continue };
                    for t in budget::thresholds_reached(check, &now_used) {
                        let fresh = tx
                            .prepare_cached("INSERT OR IGNORE INTO alerts_sent (scope, period, name, threshold) VALUES (?1, ?2, ?3, ?4)")?
                            .execute(params![check.scope, check.period_key, check.name, t])?;
                        if fresh == 1 {
                            alerts.push(Alert::Budget { check: check.clone(), threshold: t, current: now_used });
                        }
                    }
                }
            }
            for o in req.breakers {
                let state = breaker_get(tx, &o.key)?;
                let (new, event) = breaker::record(&state, &o.policy, o.success, o.probe, c.completed_at);
                if let Some(new) = &new {
                    breaker_put(tx, &o.key, new, c.completed_at)?;
                }
                match (event, new) {
                    (Some(breaker::Event::Opened), Some(s)) => alerts.push(Alert::BreakerOpened { key: o.key.clone(), retry_at: s.retry_at }),
                    (Some(breaker::Event::Closed), _) => alerts.push(Alert::BreakerClosed { key: o.key.clone() }),
                    _ => {}
                }
            }
            Ok(alerts)
        })
    }

    fn renew_leases(&self, execution_ids: &[String], expires_at: Micros) -> Result<usize> {
        let ids = serde_json::to_string(execution_ids).map_err(|e| Error::Store(e.to_string()))?;
        self.write(|tx| {
            Ok(tx
                .prepare_cached("UPDATE reservations SET expires_at = ?1 WHERE execution_id IN (SELECT value FROM json_each(?2))")?
                .execute(params![expires_at, ids])?)
        })
    }

    fn budget_get(&self, tenant_id: &str) -> Result<Option<TenantBudget>> {
        self.read(|c| budget_get(c, tenant_id))
    }

    fn budget_put(&self, b: &TenantBudget, write: BudgetWrite<'_>) -> Result<TenantBudget> {
        b.validate()?;
        let now = now_micros();
        let on_conflict = budget_on_conflict(write)?;
        self.write(|tx| {
            let l = &b.limits;
            let n = tx.execute(
                &format!(
                    "INSERT INTO tenant_budgets ({BUDGET_COLUMNS}, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?11, ?12, ?13, ?10, ?10) ON CONFLICT (tenant_id) {on_conflict}"
                ),
                params![
                    b.tenant_id,
                    b.name,
                    l.daily_cost.map(|n| n.0),
                    l.monthly_cost.map(|n| n.0),
                    l.daily_tokens,
                    l.monthly_tokens,
                    l.daily_executions,
                    l.monthly_executions,
                    b.enforcement.as_str(),
                    now,
                    l.rpm,
                    l.tpm,
                    l.max_concurrent
                ],
            )?;
            if n == 0 {
                return Err(Error::Configuration(format!("a budget for tenant {:?} already exists", b.tenant_id)));
            }
            budget_get(tx, &b.tenant_id)?.ok_or_else(|| Error::Store("the budget just written is missing".into()))
        })
    }

    fn budget_delete(&self, tenant_id: &str) -> Result<bool> {
        self.write(|tx| Ok(tx.execute("DELETE FROM tenant_budgets WHERE tenant_id = ?1", [tenant_id])? == 1))
    }

    fn budget_all(&self) -> Result<Vec<TenantBudget>> {
        self.read(|c| {
            let mut stmt = c.prepare(&format!("SELECT {BUDGET_COLUMNS} FROM tenant_budgets ORDER BY tenant_id"))?;
            let rows = stmt.query_map([], budget_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn usage(&self, scope: &str, period_key: &str) -> Result<budget::Usage> {
        self.read(|c| counter(c, (scope, period_key)))
    }

    fn rate_usage(&self, scope: &str, since: Micros) -> Result<RateUsage> {
        self.read(|c| Ok(RateUsage { in_flight: in_flight(c, scope)?, ..window_use(c, scope, since)? }))
    }

    fn tenants(&self) -> Result<Vec<SeenTenant>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!("SELECT {SEEN_COLUMNS} FROM tenants ORDER BY tenant_id"))?;
            let rows = stmt.query_map([], seen_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn tenant(&self, tenant_id: &str) -> Result<Option<SeenTenant>> {
        self.read(|c| Ok(c.prepare_cached(&format!("SELECT {SEEN_COLUMNS} FROM tenants WHERE tenant_id = ?1"))?.query_row([tenant_id], seen_from_row).optional()?))
    }

    fn usage_by_scope(&self, prefix: &str, period_key: &str) -> Result<Vec<(String, budget::Usage)>> {
        self.read(|c| {
            // Range scan on the primary key: scope >= prefix AND scope < prefix + U+10FFFF.
            let mut stmt = c.prepare_cached(
                "SELECT scope, cost, tokens, executions FROM usage_counters
                 WHERE scope >= ?1 AND scope < ?1 || char(1114111) AND period = ?2 ORDER BY scope",
            )?;
            let rows = stmt
                .query_map(params![prefix, period_key], |r| {
                    // Every scope in the range starts with the prefix: cut in place.
                    let mut scope: String = r.get(0)?;
                    scope.replace_range(..prefix.len(), "");
                    Ok((scope, budget::Usage { cost: Nanos(r.get(1)?), tokens: r.get(2)?, executions: r.get(3)? }))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn usage_daily(&self, scope: &str, first_day: &str) -> Result<Vec<(String, budget::Usage)>> {
        self.read(|c| {
            // Daily period keys are the 10-character ones ("2026-11-28"; months are "2026-11").
            let mut stmt = c.prepare_cached(
                "SELECT period, cost, tokens, executions FROM usage_counters
                 WHERE scope = ?1 AND period >= ?2 AND length(period) = 10 ORDER BY period",
            )?;
            let rows = stmt
                .query_map(params![scope, first_day], |r| {
                    Ok((r.get(0)?, budget::Usage { cost: Nanos(r.get(1)?), tokens: r.get(2)?, executions: r.get(3)? }))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn rebuild_counters(&self) -> Result<usize> {
        self.write(|tx| {
            let cal = calendar_of(stored_timezone(tx)?)?;
            rebuild(tx, &cal, &cal)
        })
    }

    fn timezone(&self) -> Result<String> {
        Ok(self.read(stored_timezone)?.unwrap_or_else(|| DEFAULT_TIMEZONE.into()))
    }

    fn set_timezone(&self, cal: &Calendar) -> Result<usize> {
        self.write(|tx| {
            unpoisoned(self.timezone.lock()).valid_at = None;
            let old = calendar_of(stored_timezone(tx)?)?;
            tx.execute(
                "INSERT INTO settings (name, value) VALUES ('timezone', ?1) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                [cal.name()],
            )?;
            rebuild(tx, &old, cal)
        })
    }

    fn query_rows(&self, q: &Query) -> Result<Vec<Row>> {
        let (w, mut args) = where_clause(q);
        let mut sql = format!("SELECT {} FROM executions{w}", all_columns());
        if !q.order.is_empty() {
            // Time order is id order (UUIDv7), which the primary key serves without a sort.
            let column = |n: &'static str| if n == "started_at" { "id" } else { n };
            let order: Vec<String> =
                q.order.iter().map(|(Field(n, _), desc)| format!("{} {}", column(n), if *desc { "DESC" } else { "ASC" })).collect();
            sql.push_str(&format!(" ORDER BY {}", order.join(", ")));
        }
        if q.limit.is_some() || q.offset.is_some() {
            args.push(SqlValue::Integer(q.limit.unwrap_or(-1)));
            args.push(SqlValue::Integer(q.offset.unwrap_or(0)));
            sql.push_str(&format!(" LIMIT ?{} OFFSET ?{}", args.len() - 1, args.len()));
        }
        self.read(|c| {
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params_from_iter(args.iter()), read_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn query_aggregate(&self, q: &Query, agg: &Aggregate) -> Result<Cell> {
        let (w, args) = where_clause(q);
        let (expr, kind) = aggregate_sql(agg);
        let sql = format!("SELECT {expr} FROM executions{w}");
        self.read(|c| {
            let cal = calendar_of(stored_timezone(c)?)?;
            if let Some(plan) = rollups::plan(q, &[], agg, &cal, Dialect::Sqlite) {
                return Ok(from_rollups(c, q, &[], agg, &cal, &plan)?.pop().map_or_else(|| query::zero(agg), |(_, v)| v));
            }
            Ok(c.prepare_cached(&sql)?.query_row(params_from_iter(args.iter()), |r| cell(r, 0, kind))?)
        })
    }

    fn query_grouped(&self, q: &Query, by: &[GroupKey], agg: &Aggregate) -> Result<Vec<(GroupValues, Cell)>> {
        self.read(|c| {
            let cal = calendar_of(stored_timezone(c)?)?;
            if let Some(plan) = rollups::plan(q, by, agg, &cal, Dialect::Sqlite) {
                return from_rollups(c, q, by, agg, &cal, &plan);
            }
            let mut groups = Groups::new(agg);
            scan(c, q, by, agg, &cal, Rows::All, &mut groups)?;
            groups.finish()
        })
    }

    fn execution(&self, id: &str) -> Result<Option<(Row, Option<Details>)>> {
        self.read(|c| {
            let row = c
                .prepare_cached(&format!("SELECT {} FROM executions WHERE id = ?1", all_columns()))?
                .query_row([id], read_row)
                .optional()?;
            let Some(row) = row else { return Ok(None) };
            let details = c
                .prepare_cached("SELECT system_prompt, user_prompt, response, tool_calls FROM execution_details WHERE execution_id = ?1")?
                .query_row([id], |r| Ok(Details { system_prompt: r.get(0)?, user_prompt: r.get(1)?, response: r.get(2)?, tool_calls: r.get(3)? }))
                .optional()?;
            Ok(Some((row, details)))
        })
    }

    fn api_key_put(&self, scope: &str, provider: &str, sealed: Option<&Sealed>) -> Result<()> {
        self.write(|tx| {
            match sealed {
                Some((nonce, ct)) => tx.execute(
                    "INSERT INTO api_configurations (scope, provider, nonce, ciphertext, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (scope, provider) DO UPDATE SET nonce = excluded.nonce, ciphertext = excluded.ciphertext,
                         updated_at = excluded.updated_at",
                    params![scope, provider, nonce, ct, now_micros()],
                )?,
                None => tx.execute("DELETE FROM api_configurations WHERE scope = ?1 AND provider = ?2", params![scope, provider])?,
            };
            Ok(())
        })
    }

    fn api_key_get(&self, scope: &str, provider: &str) -> Result<Option<Sealed>> {
        self.read(|c| {
            Ok(c.prepare_cached("SELECT nonce, ciphertext FROM api_configurations WHERE scope = ?1 AND provider = ?2")?
                .query_row(params![scope, provider], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?)
        })
    }

    fn api_key_providers(&self, scope: &str) -> Result<Vec<String>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT provider FROM api_configurations WHERE scope = ?1 ORDER BY provider")?;
            let rows = stmt.query_map([scope], |r| r.get(0))?.collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(rows)
        })
    }

    fn cache_get(&self, tenant_id: Option<&str>, key: &str, now: Micros) -> Result<Option<cache::Entry>> {
        self.read(|c| {
            let entry = |r: &rusqlite::Row<'_>| {
                Ok(cache::Entry {
                    content: r.get(0)?,
                    model: r.get(1)?,
                    provider: r.get(2)?,
                    finish_reason: r.get(3)?,
                    execution_id: r.get(4)?,
                    created_at: r.get(5)?,
                    expires_at: r.get(6)?,
                })
            };
            Ok(c.prepare_cached(CACHE_GET_SQL)?.query_row(params![tenant_id.unwrap_or(""), key, now], entry).optional()?)
        })
    }

    fn cache_put(&self, tenant_id: Option<&str>, key: &str, e: &cache::Entry) -> Result<()> {
        self.write(|tx| {
            tx.prepare_cached(CACHE_SWEEP_SQL)?.execute(params![e.created_at, cache::SWEEP])?;
            tx.prepare_cached(CACHE_PUT_SQL)?.execute(params![
                tenant_id.unwrap_or(""),
                key,
                e.content,
                e.model,
                e.provider,
                e.finish_reason,
                e.execution_id,
                e.created_at,
                e.expires_at
            ])?;
            Ok(())
        })
    }

    fn breaker_status(&self, key: &BreakerKey) -> Result<breaker::State> {
        self.read(|c| breaker_get(c, key))
    }

    fn breaker_reset(&self, key: &BreakerKey) -> Result<()> {
        self.write(|tx| Ok(tx.execute("DELETE FROM breakers WHERE key = ?1", [key.id()]).map(|_| ())?))
    }

    fn breakers_not_closed(&self) -> Result<Vec<BreakerStatus>> {
        self.read(|c| {
            let mut stmt = c.prepare("SELECT agent, model, tenant_id, phase, failures, retry_at FROM breakers WHERE phase != 'closed' ORDER BY retry_at")?;
            let rows = stmt
                .query_map([], |r| {
                    let phase: String = r.get(3)?;
                    let failures: String = r.get(4)?;
                    Ok(BreakerStatus {
                        key: BreakerKey { agent: r.get(0)?, model: r.get(1)?, tenant_id: r.get(2)? },
                        state: breaker::State {
                            phase: Phase::parse(&phase).unwrap_or(Phase::Open),
                            failures: breaker::State::decode_failures(&failures),
                            retry_at: r.get(5)?,
                        },
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn problems_today(&self, day: &str) -> Result<Vec<tenant_list::Problems>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&tenant_list::problems_sql(Dialect::Sqlite))?;
            let rows = stmt
                .query_map([day], |r| Ok(tenant_list::Problems { tenant_id: r.get(0)?, failed: r.get(1)?, refused: r.get(2)? }))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn tenant_ids(&self, of: tenant_list::Holders, names: bool) -> Result<Vec<(String, Option<String>)>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(tenant_list::ids_sql(of, names))?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, if names { r.get(1)? } else { None })))?.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn top_tenants(&self, period_key: &str, limit: i64) -> Result<Vec<(String, budget::Usage)>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&tenant_list::top_tenants_sql(Dialect::Sqlite))?;
            let rows = stmt
                .query_map(params![period_key, limit], |r| {
                    Ok((r.get(0)?, budget::Usage { cost: Nanos(r.get(1)?), tokens: r.get(2)?, executions: r.get(3)? }))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{admit, admit_request, execution, finish_request};
    use super::*;
    use crate::budget::{GlobalBudgets, Plan};
    use crate::clock::Period;
    use crate::execution::Field;

    #[test]
    fn busy_waits_in_short_steps_first_and_gives_up_after_the_busy_timeout() {
        assert_eq!(busy_step(0, BUSY_TIMEOUT), Some(Duration::from_micros(250)));
        let steps: Vec<Duration> = (0..).map_while(|n| busy_step(n, BUSY_TIMEOUT)).collect();
        let slept: Duration = steps.iter().sum();
        assert!(slept >= BUSY_TIMEOUT && slept < BUSY_TIMEOUT + Duration::from_millis(3), "{slept:?}");
        assert_eq!(steps.iter().filter(|s| **s < Duration::from_millis(1)).count(), 200); // the first 50 ms
    }

    /// A retention batch says whether the database is in use: another write committed since
    /// the previous batch (of this connection or another). It never begins while a write of
    /// this process waits for the writer.
    #[test]
    fn a_retention_batch_says_whether_other_writes_came() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db").to_str().unwrap().to_owned();
        let store = SqliteStore::open(&path, "UTC").unwrap();
        let old = now_micros() - 86_400_000_000;
        store
            .write(|tx| {
                (0..200).try_for_each(|n| insert_execution(tx, &execution(&format!("{}-{n:04}", id_prefix(old)), old), None))?;
                tx.execute("UPDATE executions SET status = 'success'", [])?;
                Ok(())
            })
            .unwrap();
        let purge = |limit| {
            // Purges go by whole days: up to the start of today, after every row.
            let done = store.purge_batch(Some(now_micros()), Some(now_micros()), limit).unwrap();
            (done.executions, done.in_use)
        };
        assert_eq!(purge(20), (20, true)); // the inserts came after no batch
        assert_eq!(purge(20), (20, false));
        store.write(|tx| Ok(tx.execute("UPDATE settings SET value = value WHERE name = 'timezone'", [])?)).unwrap();
        assert_eq!(purge(20), (20, true));
        assert_eq!(purge(20), (20, false));
        // A write of this process waiting for the writer as the batch began: the batch waits
        // until it has gone.
        store.writers_waiting.store(1, Ordering::SeqCst);
        let purged = std::thread::scope(|s| {
            let purging = s.spawn(|| purge(20));
            std::thread::sleep(Duration::from_millis(20));
            assert!(!purging.is_finished());
            store.writers_waiting.store(0, Ordering::SeqCst);
            purging.join().unwrap()
        });
        assert_eq!(purged, (20, false));
        assert_eq!(purge(20), (20, false));
        // Another process's write.
        Connection::open(&path).unwrap().execute("INSERT INTO settings (name, value) VALUES ('other', 'process')", []).unwrap();
        assert_eq!(purge(20), (20, true));
        assert_eq!(purge(100), (60, false));
        assert_eq!(purge(100), (0, false));
    }

    /// An admission's outcome as the rate tests compare it: "go", or the rate limit that
    /// refused it.
    fn rate_outcome(a: Admitted) -> &'static str {
        match a {
            Admitted::Go { .. } => "go",
            Admitted::RateLimited(r) => r.check.name,
            other => panic!("{other:?}"),
        }
    }

    fn untenanted(global: &GlobalBudgets) -> Plan<'_> {
        Plan { global, agent: "A", tenant_id: None, tenant_override: None }
    }

    #[test]
    fn set_timezone_rekeys_counters_and_reservations_and_stale_writers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db").to_str().unwrap(), "UTC").unwrap();
        super::super::tests::set_timezone_moves_counters_and_refuses_stale_writers(&store);
    }

    /// The writer knows the stored timezone across its own commits, and reads it again once
    /// another connection (here a second store on the file, as another process would be) wrote.
    #[test]
    fn a_timezone_set_by_another_connection_is_seen_at_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (one, other) = (SqliteStore::open(path.to_str().unwrap(), "UTC").unwrap(), SqliteStore::open(path.to_str().unwrap(), "UTC").unwrap());
        let global = GlobalBudgets::default();
        let t0 = 1_800_000_000_000_000;
        let admit = |store: &SqliteStore, id: &str, zone: &str| {
            let cal = Calendar::new(zone).unwrap();
            let e = execution(id, t0);
            store.admit(&admit_request(&e, untenanted(&global), budget::estimate(Nanos(600), 10), &cal, t0 + 1_000_000))
        };
        admit(&one, "a", "UTC").unwrap();
        admit(&one, "b", "UTC").unwrap();
        other.set_timezone(&Calendar::new("Asia/Tokyo").unwrap()).unwrap();
        assert!(matches!(admit(&one, "c", "UTC"), Err(Error::TimezoneChanged(z)) if z == "Asia/Tokyo"));
        admit(&one, "c", "Asia/Tokyo").unwrap();
        admit(&other, "d", "Asia/Tokyo").unwrap();
        admit(&one, "e", "Asia/Tokyo").unwrap();
        // Its own change too.
        one.set_timezone(&Calendar::new("UTC").unwrap()).unwrap();
        assert!(matches!(admit(&one, "f", "Asia/Tokyo"), Err(Error::TimezoneChanged(z)) if z == "UTC"));
        assert!(matches!(admit(&other, "f", "Asia/Tokyo"), Err(Error::TimezoneChanged(z)) if z == "UTC"));
        admit(&one, "f", "UTC").unwrap();
    }

    #[test]
    fn rate_totals_refuse_what_counting_the_window_would() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db").to_str().unwrap(), "UTC").unwrap();
        super::super::tests::rate_totals_refuse_what_counting_the_window_would(&store);
    }

    #[test]
    fn cache_entries_keep_the_first_writer_and_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db").to_str().unwrap(), "UTC").unwrap();
        super::super::tests::cache_entries_keep_the_first_writer_and_are_swept(&store);
    }

    #[test]
    fn rollups_answer_like_rows_and_survive_purges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let path = path.to_str().unwrap();
        let store = SqliteStore::open(path, "UTC").unwrap();
        let sql = |s: &str| {
            let c = Connection::open(path).unwrap();
            // The database from before the rollups that the test makes last (setting the schema
            // version back) predates migration 16 too, whose columns cannot be added twice.
            if s.starts_with("UPDATE schema_version") {
                c.execute_batch(
                    "ALTER TABLE executions DROP COLUMN rate_scopes; ALTER TABLE executions DROP COLUMN rate_tokens;
                     CREATE TABLE rate_events (scope TEXT, at INTEGER, execution_id TEXT, tokens INTEGER)",
                )
                .unwrap();
            }
            c.execute_batch(s).unwrap()
        };
        let open_again = || Box::new(SqliteStore::open(path, "UTC").unwrap()) as Box<dyn Store>;
        super::super::rollups::tests::rollups_answer_like_rows(&store, &sql, &open_again);
    }

    #[test]
    fn rebuild_after_a_purge_keeps_totals_and_counters() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db").to_str().unwrap(), "UTC").unwrap();
        super::super::rollups::tests::rebuild_after_a_purge_keeps_totals_and_counters(&store);
    }

    /// Settlement adds a call to its rollups from the values it closed the row with, not by
    /// reading the row back: every rolled field (each given a value of its own here) is what
    /// rebuilding the rollups from the row gives, in the daily and monthly rollups and the
    /// daily totals.
    #[test]
    fn rollups_added_at_settlement_are_what_the_row_rebuilds() {
        use crate::execution::{Attempt, Status};
        use crate::pricing::{Cost, Usage};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(path.to_str().unwrap(), "UTC").unwrap();
        let (cal, global, t0) = (Calendar::new("UTC").unwrap(), GlobalBudgets::default(), 1_800_000_000_000_000);
        let e = NewExecution { tenant_id: Some("acme".into()), ..execution("a", t0) };
        let plan = Plan { global: &global, agent: "A", tenant_id: Some("acme"), tenant_override: None };
        assert!(matches!(store.admit(&admit_request(&e, plan, budget::estimate(Nanos(600), 10), &cal, t0 + 1_000_000)).unwrap(), Admitted::Go { .. }));
        let attempt = Attempt {
            model: "mock/x".into(),
            provider: "mock".into(),
            status: "success",
            error_class: None,
            error_message: None,
            http_status: None,
            input_tokens: 0,
            output_tokens: 0,
            cached_tokens: 0,
            cache_write_tokens: 0,
            cost_nanos: 0,
            cache_read_cost_nanos: 0,
            cache_write_cost_nanos: 0,
            duration_ms: 0,
            started_at: t0,
            finish_reason: None,
            refusal: None,
            dropped_params: vec![],
        };
        let done = Completion {
            status: Status::Success,
            error_class: None,
            error_message: None,
            chosen_model_id: Some("mock/x".into()),
            provider: Some("mock".into()),
            completed_at: t0 + 1000,
            duration_ms: 29,
            usage: Usage { cache_write: 19, cache_write_1h: 23, ..Usage::new(11, 13, 17) },
            cost: Cost { input: Nanos(31), output: Nanos(37), cache_read: Nanos(41), cache_write: Nanos(43) },
            attempts: vec![attempt.clone(), attempt.clone(), attempt],
            finish_reason: None,
            response: None,
            time_to_first_token_ms: Some(47),
            cached: false,
        };
        let finish = finish_request(&e, &done, &cal, true);
        store.finish(&finish).unwrap();
        let read = || -> Vec<Vec<SqlValue>> {
            let c = Connection::open(&path).unwrap();
            ["daily_rollups", "monthly_rollups", "daily_totals"]
                .iter()
                .map(|t| c.query_row(&format!("SELECT * FROM {t}"), [], |r| (0..r.as_ref().column_count()).map(|i| r.get(i)).collect()).unwrap())
                .collect()
        };
        let settled = read();
        // calls, then every rolled field: none is 0.
        let daily: Vec<SqlValue> = settled[0][5..].to_vec();
        assert_eq!(daily.len(), ROLLED.len() + 1);
        assert!(daily.iter().all(|v| *v != SqlValue::Integer(0)), "{daily:?}");
        store.rebuild_counters().unwrap();
        assert_eq!(read(), settled);
    }

    #[test]
    fn a_database_without_a_timezone_gets_its_first_openers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let path = path.to_str().unwrap();
        drop(SqliteStore::open(path, "UTC").unwrap());
        // What a tenantllm from before stored timezones left: schema version 1, no settings
        // (and none of the later migrations' columns).
        Connection::open(path)
            .unwrap()
            .execute_batch(
                "DROP TABLE settings; ALTER TABLE executions DROP COLUMN cache_write_tokens;
                 ALTER TABLE executions DROP COLUMN cache_read_cost; ALTER TABLE executions DROP COLUMN cache_write_cost;
                 ALTER TABLE executions DROP COLUMN time_to_first_token_ms;
                 DROP TABLE tenants; DROP TABLE rate_totals; ALTER TABLE reservations DROP COLUMN concurrency_scope;
                 ALTER TABLE executions DROP COLUMN rate_scopes; ALTER TABLE executions DROP COLUMN rate_tokens;
                 ALTER TABLE tenant_budgets DROP COLUMN rpm_limit; ALTER TABLE tenant_budgets DROP COLUMN tpm_limit;
                 ALTER TABLE tenant_budgets DROP COLUMN max_concurrent;
                 ALTER TABLE execution_details DROP COLUMN tool_calls;
                 DROP TABLE daily_rollups; DROP TABLE monthly_rollups;
                 DROP TABLE response_cache; ALTER TABLE executions DROP COLUMN cached;
                 DROP INDEX usage_counters_scope;
                 UPDATE schema_version SET version = 1",
            )
            .unwrap();
        assert_eq!(SqliteStore::open(path, "Asia/Tokyo").unwrap().timezone().unwrap(), "Asia/Tokyo");
        // Later openers find it set.
        assert_eq!(SqliteStore::open(path, "UTC").unwrap().timezone().unwrap(), "Asia/Tokyo");
    }

    /// Column `column` of `explain` (`EXPLAIN` or `EXPLAIN QUERY PLAN`) of `sql`, its
    /// parameters unbound.
    fn explained(c: &Connection, explain: &str, sql: &str, column: usize) -> Vec<String> {
        let mut stmt = c.prepare(&format!("{explain} {sql}")).unwrap();
        let unbound = params_from_iter(std::iter::repeat_n(SqlValue::Null, stmt.parameter_count()));
        stmt.query_map(unbound, |r| r.get(column)).unwrap().collect::<rusqlite::Result<_>>().unwrap()
    }

    /// A call's writes to its row build no throwaway B-tree (`OpenEphemeral`, what an IN list of
    /// more than two constants compiles to, as in a partial index's WHERE), and the settling
    /// update writes the table's B-tree alone: no index has a column or condition it changes
    /// (migration 20 dropped the last, `executions_problems`).
    #[test]
    fn a_calls_writes_to_its_execution_build_no_temporary_tables() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db").to_str().unwrap(), "UTC").unwrap();
        store
            .write(|c| {
                // B-trees written: the table (WITHOUT ROWID) and, for the insert, its two indexes.
                for (sql, written) in [(INSERT_EXECUTION_SQL, 3), (COMPLETE_SQL, 1), (COMPLETE_RUNNING_SQL, 1)] {
                    let ops = explained(c, "EXPLAIN", sql, 1);
                    assert_eq!(ops.iter().filter(|op| *op == "OpenWrite").count(), written, "{sql}: {ops:?}");
                    assert!(!ops.iter().any(|op| op == "OpenEphemeral"), "{sql}: {ops:?}");
                }
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn a_renewed_lease_outlives_its_first_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db").to_str().unwrap(), "UTC").unwrap();
        super::super::tests::a_renewed_lease_outlives_its_first_expiry(&store);
    }

    /// The rate limits' logs are the executions rows (migration 16): the global log and each
    /// tenant's hold their own admissions only, found by ranges of the primary key and of
    /// `executions_tenant` (never a scan of the table), across windows that move.
    #[test]
    fn each_log_counts_its_own_admissions_through_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(path.to_str().unwrap(), "UTC").unwrap();
        let cal = Calendar::new("UTC").unwrap();
        let global = GlobalBudgets { limits: Limits { rpm: Some(3), ..Default::default() }, ..Default::default() };
        let limits = |t: &str| TenantBudget { tenant_id: t.into(), limits: Limits { rpm: Some(2), ..Default::default() }, ..Default::default() };
        let (a, b) = (limits("a"), limits("b"));
        let t0 = 1_800_000_000_000_000;
        let admit = |tenant: &TenantBudget, now: Micros| {
            let e = NewExecution { tenant_id: Some(tenant.tenant_id.clone()), ..execution(&crate::execution::new_id(now), now) };
            let plan = Plan { global: &global, agent: "A", tenant_id: Some(&tenant.tenant_id), tenant_override: Some(tenant) };
            rate_outcome(store.admit(&admit_request(&e, plan, budget::estimate(Nanos(0), 10), &cal, now + 3_600_000_000)).unwrap())
        };
        let minute = 60_000_000;
        assert_eq!([admit(&a, t0), admit(&b, t0 + 1), admit(&a, t0 + 2), admit(&b, t0 + 3)], ["go", "go", "go", "global_rpm"]);
        let t1 = t0 + minute + 1;
        assert_eq!([admit(&a, t1), admit(&a, t1 + 1), admit(&a, t1 + 2), admit(&b, t1 + 3)], ["go", "go", "tenant_rpm", "go"]);
        let t2 = t1 + minute / 2;
        assert_eq!([admit(&b, t2), admit(&a, t2 + 1)], ["global_rpm", "global_rpm"]);
        let t3 = t1 + minute + 2;
        // b's admission at t1 + 3 leaves the window at t3 + 1.
        assert_eq!([admit(&b, t3), admit(&b, t3 + 1), admit(&b, t3 + 2)], ["go", "go", "tenant_rpm"]);
        let used = |scope: &str, now: Micros| store.rate_usage(scope, now - minute).unwrap().requests;
        assert_eq!([used("global", t3 + 1), used("tenant:a", t3 + 1), used("tenant:b", t3 + 1)], [2, 0, 2]);
        // Later stamps count too.
        assert_eq!([used("global", t1 + 3), used("tenant:a", t1 + 3), used("tenant:b", t1 + 3)], [5, 2, 3]);
        // Each statement that reads a log searches an index for it.
        let c = Connection::open(&path).unwrap();
        for sql in [between_sql!(global), between_sql!(tenant)] {
            let plan = explained(&c, "EXPLAIN QUERY PLAN", sql, 3);
            assert!(plan.iter().all(|p| p.starts_with("SEARCH")), "{sql}: {plan:?}");
            assert!(plan.iter().any(|p| p.contains(if sql.contains("?3") { "INDEX executions_tenant (tenant_id=? AND id>? AND id<?)" } else { "PRIMARY KEY (id>? AND id<?)" })), "{plan:?}");
        }
    }

    /// An admission that fits reads nothing from the log and leaves the horizon; a scope's
    /// horizon left behind by a pause is moved by reading only the admissions it crosses, and
    /// after a pause of `RESTART_AFTER` or more by reading nothing (every admission counted left
    /// the window), however many calls not logged (made while the limit was lifted, say) the
    /// range of ids it would read holds.
    #[test]
    fn a_horizon_behind_reads_at_most_what_it_crosses() {
        use rusqlite::StatementStatus::VmStep;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db").to_str().unwrap(), "UTC").unwrap();
        let cal = Calendar::new("UTC").unwrap();
        let global = GlobalBudgets { limits: Limits { rpm: Some(2), ..Default::default() }, ..Default::default() };
        let minute = 60_000_000;
        let t0 = 1_800_000_000_000_000;
        let admit = |now: Micros| {
            let e = execution(&crate::execution::new_id(now), now);
            let plan = Plan { global: &global, agent: "A", tenant_id: None, tenant_override: None };
            rate_outcome(store.admit(&admit_request(&e, plan, budget::estimate(Nanos(0), 10), &cal, now + 3_600_000_000)).unwrap())
        };
        // Rows between horizon and window start: unlogged calls (rate_scopes NULL), a thousand a
        // minute from `from` for `minutes`.
        let unlogged = |from: Micros, minutes: i64| {
            let w = store.writer.lock().unwrap();
            for i in 0..minutes * 1000 {
                let at = from + i * 60_000;
                insert_execution(&w, &execution(&crate::execution::new_id(at), at), None).unwrap();
            }
        };
        // VM steps of the statement that reads the global log since asked last.
        let log_reads = || store.writer.lock().unwrap().prepare_cached(between_sql!(global)).unwrap().reset_status(VmStep);
        let horizon = || -> Micros { store.writer.lock().unwrap().query_row("SELECT horizon FROM rate_totals WHERE scope = 'global'", [], |r| r.get(0)).unwrap() };
        assert_eq!([admit(t0), admit(t0 + 1_000)], ["go", "go"]);
        assert_eq!(log_reads(), 0, "calls that fit the totals read nothing");
        // A refusal is told exactly: the horizon moves to the window's start.
        assert_eq!(admit(t0 + 2_000), "global_rpm");
        assert!(log_reads() > 0);
        assert_eq!(horizon(), t0 + 2_000 - minute);
        // A minute on, the first admission left the window: the totals (2) refuse a call the
        // window takes, so the horizon moves, reading the admissions crossed.
        assert_eq!(admit(t0 + minute + 500), "go");
        assert!(log_reads() > 0);
        assert_eq!(horizon(), t0 + 500);
        // A pause of half an hour with 30,000 unlogged calls: the admissions crossed are read
        // from the index (all of those calls ahead of them too: it reads a range of ids).
        unlogged(t0 + 2 * minute, 30);
        let long = t0 + 35 * minute;
        assert_eq!([admit(long), admit(long + 1_000), admit(long + 2_000)], ["go", "go", "global_rpm"]);
        assert!(log_reads() > 30_000);
        // Past RESTART_AFTER, though: nothing read however many calls there were.
        unlogged(long + minute, RESTART_AFTER / minute);
        let longer = long + RESTART_AFTER + 2 * minute;
        assert_eq!(admit(longer), "go");
        assert_eq!(log_reads(), 0);
        assert_eq!(horizon(), longer - minute);
        assert_eq!([admit(longer + 1_000), admit(longer + 2_000)], ["go", "global_rpm"]);
        assert_eq!(store.rate_usage("global", longer - minute).unwrap().requests, 2);
    }

    /// With the longest window, an admission that left the horizon where it was is stamped up
    /// to a quarter window past `MAX_WINDOW` after it: a horizon `MAX_WINDOW` behind the
    /// window's start does not restart the totals while it may still be in the window.
    #[test]
    fn a_call_admitted_behind_a_trailing_horizon_counts_in_the_longest_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db").to_str().unwrap(), "UTC").unwrap();
        let cal = Calendar::new("UTC").unwrap();
        let global = GlobalBudgets { limits: Limits { rpm: Some(2), ..Default::default() }, ..Default::default() };
        let w = ratelimit::MAX_WINDOW.as_micros() as i64;
        let t0 = 1_800_000_000_000_000;
        let admit = |now: Micros| {
            let e = execution(&crate::execution::new_id(now), now);
            let plan = Plan { global: &global, agent: "A", tenant_id: None, tenant_override: None };
            let req = AdmitRequest { rate_window: w, ..admit_request(&e, plan, budget::estimate(Nanos(0), 10), &cal, now + 3_600_000_000) };
            rate_outcome(store.admit(&req).unwrap())
        };
        // The second fits the totals and leaves their horizon at t0 - w; at t0 + 1.1 w the
        // window holds it and the third fills it.
        let at = [t0, t0 + w / 5, t0 + w * 11 / 10, t0 + w * 11 / 10 + 1];
        assert_eq!(at.map(admit), ["go", "go", "go", "global_rpm"]);
    }

    /// Migration 16 moves the admissions logged before it into the executions rows and
    /// restarts the totals behind a horizon past the migration: an admission right after it
    /// still counts them (one whose id was minted a millisecond after its stamp included),
    /// and once the window has moved past the horizon the totals carry on from the log.
    #[test]
    fn the_admissions_logged_before_migration_16_still_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let path = path.to_str().unwrap();
        drop(SqliteStore::open(path, "UTC").unwrap());
        let cal = Calendar::new("UTC").unwrap();
        let global = GlobalBudgets { limits: Limits { rpm: Some(3), ..Default::default() }, ..Default::default() };
        let now = now_micros();
        // What migration 15 left after three admissions: rows in the log, totals counting them.
        let c = Connection::open(path).unwrap();
        c.execute_batch(
            "ALTER TABLE executions DROP COLUMN rate_scopes; ALTER TABLE executions DROP COLUMN rate_tokens;
             CREATE TABLE rate_events (scope TEXT NOT NULL, at INTEGER NOT NULL, execution_id TEXT NOT NULL, tokens INTEGER NOT NULL,
                 PRIMARY KEY (scope, at, execution_id)) WITHOUT ROWID;
             UPDATE schema_version SET version = 15",
        )
        .unwrap();
        for (i, at) in [now - 3_000, now - 2_000, now - 1_500].into_iter().enumerate() {
            let id = crate::execution::new_id(at + if i == 2 { 1_000 } else { 0 });
            c.execute(
                "INSERT INTO executions (id, agent, model_id, provider, status, started_at) VALUES (?1, 'A', 'mock/x', 'mock', 'success', ?2)",
                params![id, at],
            )
            .unwrap();
            c.execute("INSERT INTO rate_events VALUES ('global', ?1, ?2, 10)", params![at, id]).unwrap();
        }
        c.execute("INSERT INTO rate_totals (scope, requests, tokens, horizon) VALUES ('global', 3, 30, ?1)", [now - 3_000 - 60_000_000]).unwrap();
        drop(c);
        let store = SqliteStore::open(path, "UTC").unwrap();
        let admit = |now: Micros| {
            let e = execution(&crate::execution::new_id(now), now);
            match store.admit(&admit_request(&e, untenanted(&global), budget::estimate(Nanos(0), 10), &cal, now + 3_600_000_000)).unwrap() {
                Admitted::Go { .. } => None,
                Admitted::RateLimited(r) => Some(r.current),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(admit(now), Some(3));
        assert_eq!(store.rate_usage("global", now - 60_000_000).unwrap(), RateUsage { requests: 3, tokens: 30, in_flight: 0 });
        // The moved admissions left the window; the horizon is passed a window on.
        let later = now + 62_000_000;
        assert_eq!([admit(later), admit(later + 1), admit(later + 2), admit(later + 3)], [None, None, None, Some(3)]);
    }

    /// `rate_totals.in_flight` counts the calls holding a `max_concurrent` slot: an admission
    /// adds one, its settlement or its lease's expiry (never both) takes it away, whether or
    /// not the scope has a window limit too.
    #[test]
    fn calls_in_flight_are_counted_until_settled_or_expired() {
        use crate::execution::Status;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db").to_str().unwrap(), "UTC").unwrap();
        let cal = Calendar::new("UTC").unwrap();
        let global = GlobalBudgets::default();
        let t0 = 1_800_000_000_000_000;
        for (tenant, rpm) in [("only", None), ("both", Some(1000))] {
            let limits = TenantBudget { tenant_id: tenant.into(), limits: Limits { max_concurrent: Some(2), rpm, ..Default::default() }, ..Default::default() };
            let scope = budget::tenant_scope(tenant);
            let admit = |id: &str, now: Micros, expires: Micros| {
                let e = NewExecution { tenant_id: Some(tenant.into()), ..execution(&format!("{tenant}-{id}"), now) };
                let plan = Plan { global: &global, agent: "A", tenant_id: Some(tenant), tenant_override: Some(&limits) };
                let got = store.admit(&admit_request(&e, plan, budget::estimate(Nanos(0), 10), &cal, expires)).unwrap();
                (e, got)
            };
            let finish = |e: &NewExecution, rate_scopes: &[String], at: Micros| {
                let mut done = Completion::refused(Status::Success, "", String::new(), at);
                (done.error_class, done.error_message) = (None, None);
                let req = FinishRequest { rate_scopes, logged_tokens: 10, ..finish_request(e, &done, &cal, true) };
                store.finish(&req).unwrap();
            };
            let in_flight = || store.rate_usage(&scope, t0).unwrap().in_flight;
            let scopes = |got: &Admitted| match got {
                Admitted::Go { rate_scopes, .. } => rate_scopes.clone(),
                other => panic!("{tenant}: not admitted: {other:?}"),
            };
            let (a, got_a) = admit("a", t0, t0 + 1_000);
            let (b, got_b) = admit("b", t0 + 10, t0 + 3_600_000_000);
            let (a_scopes, b_scopes) = (scopes(&got_a), scopes(&got_b));
            assert_eq!(in_flight(), 2);
            assert!(matches!(admit("c", t0 + 20, t0 + 3_600_000_000).1, Admitted::RateLimited(r) if r.check.name == "tenant_concurrent"));
            finish(&b, &b_scopes, t0 + 30);
            assert_eq!(in_flight(), 1);
            let (_c, got_c) = admit("c2", t0 + 40, t0 + 3_600_000_000);
            scopes(&got_c);
            // a's lease ran out: the next admission releases its slot.
            let (_d, got_d) = admit("d", t0 + 2_000, t0 + 3_600_000_000);
            scopes(&got_d);
            assert_eq!(in_flight(), 2);
            // a settles after all: its slot was already released, not again.
            finish(&a, &a_scopes, t0 + 2_010);
            assert_eq!(in_flight(), 2);
            assert!(matches!(admit("e", t0 + 2_020, t0 + 3_600_000_000).1, Admitted::RateLimited(_)));
        }
    }

    #[test]
    fn reservations_of_a_dead_process_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db").to_str().unwrap(), "UTC").unwrap();
        super::super::tests::reservations_of_a_dead_process_expire(&store);
    }

    /// A call holding nothing has a lease too: once it runs out, its row is closed as
    /// abandoned and counted as one execution at no cost, as a budgeted call's is, and its
    /// late settlement records its usage without a second execution.
    #[test]
    fn an_unbudgeted_call_s_lease_runs_out_and_its_late_settlement_counts_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db").to_str().unwrap(), "UTC").unwrap();
        let (cal, none) = (Calendar::new("UTC").unwrap(), GlobalBudgets::default());
        let t0 = 1_800_000_000_000_000;
        assert!(matches!(admit(&store, &none, "a", t0, t0 + 1_000), Admitted::Go { reserved: false, .. }));
        let status = |id: &str| store.execution(id).unwrap().unwrap().0.into_iter().find(|(n, _)| *n == "status").unwrap().1;
        let executions = || store.usage("global", &cal.period_key(Period::Daily, t0)).unwrap();
        // Renewed, it outlives its first expiry; then it runs out.
        assert_eq!(store.renew_leases(&["a".to_string()], t0 + 5_000).unwrap(), 1);
        assert!(matches!(admit(&store, &none, "b", t0 + 2_000, t0 + 1_000_000), Admitted::Go { .. }));
        assert_eq!(status("a"), Cell::Text("running".into()));
        assert!(matches!(admit(&store, &none, "c", t0 + 6_000, t0 + 1_000_000), Admitted::Go { .. }));
        assert_eq!(status("a"), Cell::Text("error".into()));
        assert_eq!(executions(), budget::estimate(Nanos::ZERO, 0));
        let mut done = Completion::refused(crate::execution::Status::Success, "", String::new(), t0 + 7_000);
        (done.error_class, done.error_message) = (None, None);
        done.usage = crate::pricing::Usage::new(3, 4, 0);
        let e = execution("a", t0);
        store
            .finish(&finish_request(&e, &done, &cal, false))
            .unwrap();
        assert_eq!(status("a"), Cell::Text("success".into()));
        assert_eq!(executions(), budget::estimate(Nanos::ZERO, 7));
    }

    /// Every call in flight has a reservation (one holding nothing: `HOLD_NOTHING_SQL`),
    /// and queries answered by rollups find the calls still running from them. Migration 18
    /// gives one to the calls running when it is applied (an admission without budgets wrote
    /// its row alone before it) and drops the partial index they were found from; migration
    /// 19 gives those a lease, ending an hour after it runs.
    #[test]
    fn calls_in_flight_are_found_from_their_reservations_across_migrations_18_and_19() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let open = || SqliteStore::open(path.to_str().unwrap(), "UTC").unwrap();
        let limited = GlobalBudgets { limits: Limits { daily_cost: Some(Nanos(1000)), ..Default::default() }, ..Default::default() };
        let t0 = now_micros();
        let store = open();
        assert!(matches!(admit(&store, &limited, "a-reserved", t0, t0 + 60_000_000), Admitted::Go { reserved: true, .. }));
        store.write(|tx| insert_execution(tx, &execution("b-from-before", t0), None)).unwrap();
        drop(store);
        let c = Connection::open(&path).unwrap();
        c.execute_batch("CREATE INDEX executions_running ON executions (started_at) WHERE status = 'running'; UPDATE schema_version SET version = 17")
            .unwrap();
        let store = open();
        assert!(matches!(admit(&store, &GlobalBudgets::default(), "c-unreserved", t0, t0 + 120_000_000), Admitted::Go { reserved: false, .. }));
        let leases = || -> Vec<(String, bool, i64, i64)> {
            c.prepare("SELECT execution_id, counters = '', cost, expires_at FROM reservations ORDER BY execution_id")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        let mut got = leases();
        let migrated = got[1].3;
        assert!((t0 + 3_600_000_000..=now_micros() + 3_600_000_000).contains(&migrated), "{migrated}");
        got[1].3 = 0;
        assert_eq!(
            got,
            [("a-reserved".into(), false, 600, t0 + 60_000_000), ("b-from-before".into(), true, 0, 0), ("c-unreserved".into(), true, 0, t0 + 120_000_000)]
        );
        let index: i64 = c.query_row("SELECT COUNT(*) FROM sqlite_schema WHERE name = 'executions_running'", [], |r| r.get(0)).unwrap();
        assert_eq!(index, 0);
        let by_status = || {
            let by = [GroupKey::Field(Field::parse("status").unwrap())];
            assert!(rollups::plan(&Query::default(), &by, &Aggregate::Count, &Calendar::new("UTC").unwrap(), Dialect::Sqlite).is_some());
            let mut got = store.query_grouped(&Query::default(), &by, &Aggregate::Count).unwrap();
            got.sort_by(|a, b| a.0.cmp(&b.0));
            got
        };
        let status = |s: &str, n: i64| (vec![Some(s.to_string())], Cell::Int(n));
        assert_eq!(by_status(), [status("running", 3)]);
        // Only a lease that ran out is swept; a settlement releases one like any other.
        let cal = Calendar::new("UTC").unwrap();
        let later = t0 + 90_000_000;
        assert!(matches!(admit(&store, &GlobalBudgets::default(), "d-later", later, later + 1), Admitted::Go { .. }));
        let e = execution("c-unreserved", t0);
        let done = short_circuited("A", later, later);
        let finish = finish_request(&e, &done, &cal, false);
        store.finish(&finish).unwrap();
        assert_eq!(leases().iter().map(|l| l.0.as_str()).collect::<Vec<_>>(), ["b-from-before", "d-later"]);
        assert_eq!(by_status(), [status("error", 1), status("running", 2), status("short_circuited", 1)]);
        // Once its lease has run out, the call from before is closed as abandoned.
        assert!(matches!(admit(&store, &GlobalBudgets::default(), "e-after", migrated, migrated + 1), Admitted::Go { .. }));
        assert_eq!(leases().iter().map(|l| l.0.as_str()).collect::<Vec<_>>(), ["e-after"]);
        assert_eq!(by_status(), [status("error", 3), status("running", 1), status("short_circuited", 1)]);
    }

    #[test]
    fn id_prefixes_sort_like_time() {
        let id = uuid::Uuid::now_v7().to_string();
        let now = now_micros();
        assert!(id_prefix(now - 5_000) < id && id < id_prefix(now + 5_000), "{id}");
        assert_eq!(id_prefix(0), "00000000-0000");
    }

    #[test]
    fn newer_schema_and_garbage_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, b"this is not a database at all, not even close.......").unwrap();
        assert!(SqliteStore::open(junk.to_str().unwrap(), "UTC").is_err());
        let newer = dir.path().join("newer.db");
        drop(SqliteStore::open(newer.to_str().unwrap(), "UTC").unwrap());
        Connection::open(&newer).unwrap().execute("UPDATE schema_version SET version = 999", []).unwrap();
        let e = SqliteStore::open(newer.to_str().unwrap(), "UTC").err().unwrap().to_string();
        assert!(e.contains("newer"), "{e}");
    }
}
