//! The PostgreSQL store, for deployments that outgrow one host: the same tables and the same
//! guarantees as the SQLite store (DESIGN §3), shared by every process that points at the
//! database.
//!
//! Concurrency: every state change is one transaction at READ COMMITTED. Where SQLite
//! serialises all writers, here each transaction locks exactly the rows its decision reads:
//! the usage counters a call is checked against (`SELECT ... FOR UPDATE`, always in
//! (scope, period) order, so two calls never wait on each other in a cycle) and the breaker
//! row it would change. The policy functions in `budget` and `breaker` then decide on rows
//! no other process can change until the transaction ends.
//!
//! Threads: the `postgres` client drives its connection with a private tokio runtime and
//! panics when called from inside another runtime, which is where the engine calls the store.
//! So every database operation runs on the store's own OS threads (`Workers`); the calling
//! thread waits for its result.
//!
//! Connection loss: a transaction interrupted before its commit was sent did not happen, so
//! it runs again on a fresh connection. When the connection drops during the commit itself,
//! the store asks the database whether it took effect (for instance: does the execution row
//! exist?) before running it again, so nothing is applied twice; when it cannot tell, the
//! call fails with a `StoreError`. TLS follows the URL's `sslmode` (see `pg_tls`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::types::Type;
use postgres::{Client, Row as PgRow};

use super::pg_schema::MIGRATIONS;
use super::pg_tls;
use super::query::{self, GroupValues, Groups};
use super::rollups::{self, Dialect, ROLLED};
use super::tenant_list::{self, TenantList, TenantListQuery};
use super::{
    all_columns, blocked, budget_on_conflict, calendar_of, counted_executions_sql, decode_keys, encode_keys, first_admitted, keyed_like, rate_limited,
    rekey, short_circuited, usage_keys, AdmitRequest, Admitted, Alert, BreakerKey, BreakerOutcome, BreakerStatus, BudgetWrite, Choice, CounterKey,
    FinishRequest, Purged, Store, BUDGET_COLUMNS, TIMEZONE_SQL, CACHE_GET_SQL, CACHE_PUT_SQL, CACHE_SWEEP_SQL,
};
use crate::breaker::{self, Admission, Phase};
use crate::cache;
use crate::budget::{self, Enforcement, Limits, TenantBudget};
use crate::clock::{now_micros, Calendar, Micros, DEFAULT_TIMEZONE};
use crate::error::{Error, Result};
use crate::execution::{Aggregate, Cell, Completion, Details, Field, Filter, GroupKey, Kind, NewExecution, Query, Row, Value, FIELDS};
use crate::money::Nanos;
use crate::process::{quiet, unpoisoned};
use crate::ratelimit::{self, RateCheck, RateUsage};
use crate::secrets::Sealed;
use crate::tenancy::SeenTenant;

/// Connections (and threads running operations) per process, unless the URL says
/// `?pool_size=N`.
const DEFAULT_POOL_SIZE: u32 = 8;
/// Tries of one operation when the connection is lost or the server aborts a transaction.
const ATTEMPTS: u32 = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a statement in a transaction waits for a row or table lock before it fails,
/// unless the URL's `options` set `lock_timeout`: SQLite's busy timeout, so a transaction stuck
/// elsewhere fails a call with a clear error instead of hanging it. (No statement_timeout: long
/// analytics queries are legitimate.)
const LOCK_TIMEOUT_MS: u64 = 30_000;
/// How long sent data may go unacknowledged before the connection counts as dead (and the
/// operation runs again on a new one): a server or network that vanished without closing the
/// connection would otherwise hang a call until the OS gives up, about 15 minutes later.
const DEAD_PEER: Duration = Duration::from_secs(30);
/// `pg_advisory_xact_lock` key that serialises migrations across processes ("tenantll").
const MIGRATION_LOCK: i64 = 0x7465_6e61_6e74_6c6c;

// ---------------------------------------------------------------- threads

type Job = Box<dyn FnOnce(&mut Slot) + Send + 'static>;

/// OS threads that run the store's database work, off any tokio runtime. They share the idle
/// connections (at most one per thread), so the threads are the pool: an operation never waits
/// for a connection, only for a thread, and no pool runs threads of its own that a fork could
/// catch at work (r2d2's parked in parking_lot's per-process table, whose bucket locks a fork
/// could copy held).
struct Workers {
    queue: mpsc::Sender<Job>,
}

impl Workers {
    fn start(n: u32, connect: Connect) -> Result<Workers> {
        let (queue, jobs) = mpsc::channel::<Job>();
        // A std mutex, not parking_lot's: idle workers wait on it, and parking_lot parks
        // waiters in one table per process whose bucket locks a fork() can catch held (the
        // child then hangs when it starts threads of its own).
        let jobs = Arc::new(std::sync::Mutex::new(jobs));
        let config = Arc::new(connect);
        let idle: Arc<std::sync::Mutex<Vec<Conn>>> = Arc::default();
        for i in 0..n {
            let (jobs, config, idle) = (jobs.clone(), config.clone(), idle.clone());
            std::thread::Builder::new()
                .name(format!("tenantllm-pg-{i}"))
                .spawn(move || {
                    // A poisoned lock still holds a usable receiver (jobs run outside it).
                    while let Ok(job) = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                        let _quiet = quiet();
                        // The connection used last: one after another, operations keep using one
                        // connection; more open only under concurrency.
                        let mut slot = Slot { config: config.clone(), conn: unpoisoned(idle.lock()).pop() };
                        job(&mut slot);
                        if let Some(conn) = slot.conn.take().filter(|c| !c.client.is_closed()) {
                            unpoisoned(idle.lock()).push(conn);
                        }
                    }
                    // The store was dropped: the last thread out closes the idle connections.
                    let _quiet = quiet();
                    drop(idle);
                })
                .map_err(|e| Error::Store(format!("cannot start the PostgreSQL store's threads: {e}")))?;
        }
        Ok(Workers { queue })
    }

    /// Runs `f` on a worker thread, with a connection, and waits for it; a
    /// panic in `f` continues here. Never called from a worker (it would wait on itself when
    /// all are busy).
    fn run<T: Send + 'static>(&self, f: impl FnOnce(&mut Slot) -> T + Send) -> T {
        let (done, result) = mpsc::sync_channel::<std::thread::Result<T>>(1);
        let job: Box<dyn FnOnce(&mut Slot) + Send + '_> = Box::new(move |slot: &mut Slot| {
            let _ = done.send(panic::catch_unwind(AssertUnwindSafe(|| f(slot))));
        });
        // SAFETY: `f` may borrow from this caller's stack, so the job is only valid for as long
        // as this call. It does not outlive it: we return only after `result.recv()` has
        // returned, which happens once the job has sent its result (after which it touches
        // nothing but its own `done` sender) or once the job was dropped (its sender with it)
        // without running. A job the queue refuses is handed back and dropped right here.
        let job = unsafe { std::mem::transmute::<Box<dyn FnOnce(&mut Slot) + Send + '_>, Job>(job) };
        drop(self.queue.send(job));
        match result.recv() {
            Ok(Ok(v)) => v,
            Ok(Err(p)) => panic::resume_unwind(p),
            Err(_) => panic!("tenantllm: the PostgreSQL store's threads are gone"),
        }
    }
}

// ---------------------------------------------------------------- connections

/// How to open a connection, and how its transactions begin.
struct Connect {
    config: postgres::Config,
    tls: pg_tls::Connector,
    /// "BEGIN", with the default lock_timeout for the transaction when the URL sets none: a
    /// `SET LOCAL` in the same round trip, since PgBouncer refuses startup options and a
    /// session setting would stay on a server connection the pooler hands to others.
    begin: Arc<str>,
}

struct Conn {
    client: Client,
    begin: Arc<str>,
}

/// The connection an operation runs on: an idle one, or one opened on first use or once lost.
struct Slot {
    config: Arc<Connect>,
    conn: Option<Conn>,
}

impl Slot {
    /// The connection, connecting if there is none or it is closed; with `validate`, one
    /// that answers (after a lost connection, or when the server may have gone away).
    fn checkout(&mut self, validate: bool, target: &str) -> Result<&mut Conn> {
        let usable = |c: &mut Conn| !c.client.is_closed() && (!validate || c.client.simple_query("").is_ok());
        if !self.conn.as_mut().is_some_and(usable) {
            self.conn = None;
            let Connect { config, tls, begin } = &*self.config;
            let client = config
                .connect(tls.clone())
                .map_err(|e| Error::Store(format!("cannot connect to PostgreSQL at {target}: {}", describe(&e))))?;
            self.conn = Some(Conn { client, begin: begin.clone() });
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }
}

/// Why a database operation failed: the database (or the connection to it), or our own
/// rules (a budget that already exists, a corrupt row).
enum Failure {
    Pg(postgres::Error),
    Rule(Error),
}

impl From<postgres::Error> for Failure {
    fn from(e: postgres::Error) -> Self {
        Failure::Pg(e)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Rule(e)
    }
}

type PgResult<T> = std::result::Result<T, Failure>;

/// The connection is gone (closed, reset, or the server ended the session).
fn connection_lost(e: &postgres::Error, client_closed: bool) -> bool {
    client_closed
        || e.is_closed()
        || e.code().is_some_and(|c| {
            let c = c.code();
            // 08: connection exception; 57P01-03: the server is shutting down or terminated us.
            c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03")
        })
}

/// The server aborted the transaction and running it again may succeed.
fn aborted_by_server(e: &postgres::Error) -> bool {
    // serialization_failure, deadlock_detected
    e.code().is_some_and(|c| matches!(c.code(), "40001" | "40P01"))
}

impl Failure {
    /// True when the transaction certainly did not commit and a new try may succeed.
    fn retryable(&self, client_closed: bool) -> bool {
        match self {
            Failure::Pg(e) => connection_lost(e, client_closed) || aborted_by_server(e),
            Failure::Rule(_) => false,
        }
    }

    fn describe(&self) -> String {
        match self {
            Failure::Pg(e) => describe(e),
            Failure::Rule(e) => e.to_string(),
        }
    }

    fn into_error(self, target: &str) -> Error {
        match self {
            Failure::Pg(e) => Error::Store(format!("PostgreSQL at {target}: {}", describe(&e))),
            Failure::Rule(e) => e,
        }
    }
}

/// An error with its cause: the client's `Display` alone says only "db error".
fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(d) = db.detail() {
            s.push_str(&format!(" ({d})"));
        }
        return s;
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// A statement parameter and the type it is sent as. Statements are unnamed, sent with their
/// parameter types and run in one round trip (`query_typed`), so nothing prepared outlives its
/// statement: PgBouncer in transaction pooling mode may run the next one on another server
/// connection, where a named statement would not exist (Debian 12's PgBouncer 1.18 cannot
/// track them; 1.21's max_prepared_statements can).
trait Param: ToSql + Sync {
    fn pg_type(&self) -> Type;
    fn as_sql(&self) -> &(dyn ToSql + Sync);
}

/// The PostgreSQL type a Rust value is sent as.
trait Typed {
    const TYPE: Type;
}

impl<T: Typed + ToSql + Sync> Param for T {
    fn pg_type(&self) -> Type {
        T::TYPE
    }
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        self
    }
}

macro_rules! typed {
    ($($t:ty => $pg:ident),* $(,)?) => { $(impl Typed for $t { const TYPE: Type = Type::$pg; })* };
}
typed!(i64 => INT8, i32 => INT4, bool => BOOL, f64 => FLOAT8, String => TEXT, str => TEXT, Vec<u8> => BYTEA, [u8] => BYTEA,
       Vec<String> => TEXT_ARRAY, [String] => TEXT_ARRAY, Vec<&str> => TEXT_ARRAY, Vec<i64> => INT8_ARRAY);

impl<T: Typed> Typed for Option<T> {
    const TYPE: Type = T::TYPE;
}

impl<T: Typed + ?Sized> Typed for &T {
    const TYPE: Type = T::TYPE;
}

type Params<'a> = [&'a dyn Param];

fn typed<'a>(params: &'a Params<'_>) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params.iter().map(|p| (p.as_sql(), p.pg_type())).collect()
}

/// Outside a transaction: each statement commits on its own.
struct Autocommit;
/// Inside one (`transact`).
struct InTransaction;

/// A connection, in a transaction (`Tx`) or not.
struct Db<'a, Scope> {
    c: &'a mut Client,
    scope: std::marker::PhantomData<Scope>,
}

impl<S> Db<'_, S> {
    fn query(&mut self, sql: &str, params: &Params<'_>) -> PgResult<Vec<PgRow>> {
        Ok(self.c.query_typed(sql, &typed(params))?)
    }
    fn query_opt(&mut self, sql: &str, params: &Params<'_>) -> PgResult<Option<PgRow>> {
        Ok(self.c.query_typed_opt(sql, &typed(params))?)
    }
    fn query_one(&mut self, sql: &str, params: &Params<'_>) -> PgResult<PgRow> {
        Ok(self.c.query_typed_one(sql, &typed(params))?)
    }
    fn execute(&mut self, sql: &str, params: &Params<'_>) -> PgResult<u64> {
        let mut rows = self.c.query_typed_raw(sql, typed(params))?;
        while rows.next()?.is_some() {}
        Ok(rows.rows_affected().unwrap_or(0))
    }
}

type Tx<'a> = Db<'a, InTransaction>;

/// An open transaction: rolled back when dropped before `commit` (a failed body, a panic).
struct Open<'a> {
    client: &'a mut Client,
    open: bool,
}

impl<'a> Open<'a> {
    fn begin(client: &'a mut Client, begin: &str) -> std::result::Result<Open<'a>, postgres::Error> {
        let tx = Open { client, open: true };
        tx.client.batch_execute(begin)?;
        Ok(tx)
    }
    fn commit(mut self) -> std::result::Result<(), postgres::Error> {
        self.open = false;
        self.client.batch_execute("COMMIT")
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if self.open && !self.client.is_closed() {
            let _ = self.client.batch_execute("ROLLBACK");
        }
    }
}

/// What to do when the connection is lost while a transaction commits, so that whether it
/// took effect is unknown.
enum OnCommitLoss<'a, T> {
    /// Running it again gives the same result (it sets values rather than adding to them).
    Rerun,
    /// Ask the database whether the transaction (which produced `T`) took effect; if it did,
    /// its result stands, otherwise it runs again.
    Check(&'a (dyn Fn(&mut Tx<'_>, &T) -> PgResult<bool> + Sync)),
}

enum TxFailure<T> {
    /// Nothing was committed.
    Failed(Failure),
    /// The connection broke during COMMIT: the transaction may or may not have committed.
    CommitLost(postgres::Error, T),
}

fn transact<T>(conn: &mut Conn, body: &mut impl FnMut(&mut Tx<'_>) -> PgResult<T>) -> std::result::Result<T, TxFailure<T>> {
    let tx = Open::begin(&mut conn.client, &conn.begin).map_err(|e| TxFailure::Failed(e.into()))?;
    let out = body(&mut Db { c: &mut *tx.client, scope: std::marker::PhantomData }).map_err(TxFailure::Failed)?;
    match tx.commit() {
        Ok(()) => Ok(out),
        Err(e) if connection_lost(&e, conn.client.is_closed()) => Err(TxFailure::CommitLost(e, out)),
        // The server refused the commit: it rolled back.
        Err(e) => Err(TxFailure::Failed(e.into())),
    }
}

/// The URL options the store reads itself (the client refuses `pool_size` and `sslrootcert`,
/// and knows only some `sslmode`s; `options` loses its lock_timeout, see `Connect::begin`).
#[derive(Debug, Default, PartialEq)]
struct OwnOptions {
    pool_size: Option<String>,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    options: Option<String>,
}

/// Cuts the store's own options out of a URL, percent-decoded.
fn take_own_options(url: &str) -> Result<(String, OwnOptions)> {
    let mut own = OwnOptions::default();
    let Some((base, query)) = url.split_once('?') else { return Ok((url.to_string(), own)) };
    let mut rest = Vec::new();
    for part in query.split('&') {
        let (name, value) = part.split_once('=').unwrap_or((part, ""));
        let slot = match name {
            "pool_size" => &mut own.pool_size,
            "sslmode" => &mut own.sslmode,
            "sslrootcert" => &mut own.sslrootcert,
            "options" => &mut own.options,
            _ => {
                rest.push(part);
                continue;
            }
        };
        let decoded = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| Error::Configuration(format!("database: {name} is not valid percent-encoded UTF-8")))?;
        *slot = Some(decoded.into_owned());
    }
    let url = if rest.is_empty() { base.to_string() } else { format!("{base}?{}", rest.join("&")) };
    Ok((url, own))
}

fn pool_size(value: Option<&str>) -> Result<u32> {
    let Some(v) = value else { return Ok(DEFAULT_POOL_SIZE) };
    v.parse()
        .ok()
        .filter(|n| (1..=1000).contains(n))
        .ok_or_else(|| Error::Configuration(format!("database: pool_size must be a whole number from 1 to 1000 (got {v:?})")))
}

/// The timeouts a URL does not set itself (see CONNECT_TIMEOUT, DEAD_PEER), and the URL's
/// `options` (server settings) without its lock_timeout; returns how transactions begin,
/// with that lock_timeout or LOCK_TIMEOUT_MS (see `Connect::begin`).
fn with_timeouts(config: &mut postgres::Config, options: Option<&str>) -> String {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(DEAD_PEER);
    }
    let mut lock_timeout = LOCK_TIMEOUT_MS.to_string();
    let mut rest = Vec::new();
    let mut words = options.unwrap_or("").split_whitespace();
    while let Some(w) = words.next() {
        let setting = match w {
            "-c" => match words.next() {
                Some(s) => s,
                None => break,
            },
            _ => w.strip_prefix("--").or_else(|| w.strip_prefix("-c")).unwrap_or(w),
        };
        match setting.strip_prefix("lock_timeout=") {
            Some(v) => lock_timeout = format!("'{}'", v.replace('\'', "''")),
            None if w == "-c" => rest.extend(["-c", setting]),
            None => rest.push(w),
        }
    }
    if !rest.is_empty() {
        config.options(&rest.join(" "));
    }
    format!("BEGIN; SET LOCAL lock_timeout = {lock_timeout}")
}

/// "user@host:port/dbname" for messages: never the password.
fn target(config: &postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    format!("{user}{host}:{port}/{}", config.get_dbname().unwrap_or(""))
}

fn migrate(tx: &mut Tx<'_>, timezone: &str) -> PgResult<()> {
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
        rebuild_rollups(tx, &cal, &cal)?;
    }
    Ok(())
}

pub struct PostgresStore {
    /// Dropping them closes their connections (on their own threads: closing one runs the
    /// client's runtime, which must not happen on a tokio thread).
    workers: Workers,
    /// Where the database is, for messages.
    target: String,
}

impl PostgresStore {
    /// Opens (and migrates) the database a "postgresql://" or "postgres://" URL names; one
    /// without a timezone gets `timezone`.
    pub fn open(url: &str, timezone: &str) -> Result<PostgresStore> {
        let (url, own) = take_own_options(url)?;
        let pool_size = pool_size(own.pool_size.as_deref())?;
        let (sslmode, tls) = pg_tls::connector(own.sslmode.as_deref(), own.sslrootcert.as_deref())?;
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e: postgres::Error| Error::Configuration(format!("database: not a valid PostgreSQL URL: {}", describe(&e))))?;
        config.ssl_mode(sslmode);
        if config.get_application_name().is_none() {
            config.application_name("tenantllm");
        }
        let begin = with_timeouts(&mut config, own.options.as_deref()).into();
        let target = target(&config);
        let workers = Workers::start(pool_size, Connect { config, tls, begin })?;
        // Connect at once, so a wrong URL fails here with the server's reason.
        workers.run(|slot: &mut Slot| -> Result<()> {
            let conn = slot.checkout(false, &target)?;
            match transact(conn, &mut |tx: &mut Tx<'_>| migrate(tx, timezone)) {
                Ok(()) => Ok(()),
                Err(TxFailure::Failed(f)) => Err(f.into_error(&target)),
                Err(TxFailure::CommitLost(e, ())) => Err(Failure::Pg(e).into_error(&target)),
            }
        })?;
        Ok(PostgresStore { workers, target })
    }

    fn gave_up(&self, last: Option<Failure>) -> Error {
        match last {
            Some(Failure::Pg(e)) => Error::Store(format!("PostgreSQL at {}: {} (gave up after {ATTEMPTS} tries)", self.target, describe(&e))),
            Some(Failure::Rule(e)) => e,
            None => Error::Store(format!("PostgreSQL at {}: the operation did not run", self.target)),
        }
    }

    /// Runs reads on a worker thread, again on a fresh connection if the connection is lost.
    fn read<T: Send + 'static>(&self, mut f: impl FnMut(&mut Db<'_, Autocommit>) -> PgResult<T> + Send) -> Result<T> {
        self.workers.run(|slot: &mut Slot| {
            let mut last = None;
            for attempt in 0..ATTEMPTS {
                let conn = slot.checkout(attempt > 0, &self.target)?;
                match f(&mut Db { c: &mut conn.client, scope: std::marker::PhantomData }) {
                    Ok(v) => return Ok(v),
                    Err(e) if e.retryable(conn.client.is_closed()) => last = Some(e),
                    Err(e) => return Err(e.into_error(&self.target)),
                }
            }
            Err(self.gave_up(last))
        })
    }

    /// Runs `body` in one transaction on a worker thread. A transaction that did not commit
    /// because the connection was lost or the server aborted it runs again; see
    /// `OnCommitLoss` for a commit whose outcome is unknown.
    fn write<T: Send + 'static>(&self, on_loss: OnCommitLoss<'_, T>, mut body: impl FnMut(&mut Tx<'_>) -> PgResult<T> + Send) -> Result<T> {
        self.workers.run(|slot: &mut Slot| {
            let mut last = None;
            for attempt in 0..ATTEMPTS {
                if attempt > 0 {
                    std::thread::sleep(Duration::from_millis(10 * attempt as u64));
                }
                let conn = slot.checkout(attempt > 0, &self.target)?;
                match transact(conn, &mut body) {
                    Ok(out) => return Ok(out),
                    Err(TxFailure::Failed(f)) if f.retryable(conn.client.is_closed()) => last = Some(f),
                    Err(TxFailure::Failed(f)) => return Err(f.into_error(&self.target)),
                    Err(TxFailure::CommitLost(e, out)) => {
                        if let OnCommitLoss::Check(check) = &on_loss {
                            match self.committed(slot, *check, &out) {
                                Ok(true) => return Ok(out),
                                Ok(false) => {}
                                Err(f) => {
                                    return Err(Error::Store(format!(
                                        "PostgreSQL at {}: the connection was lost while committing ({}), and whether the change was saved could not be checked: {}",
                                        self.target,
                                        describe(&e),
                                        f.describe()
                                    )))
                                }
                            }
                        }
                        last = Some(Failure::Pg(e));
                    }
                }
            }
            Err(self.gave_up(last))
        })
    }

    /// Whether a transaction whose commit was cut off took effect (on a fresh connection).
    fn committed<T>(&self, slot: &mut Slot, check: &(dyn Fn(&mut Tx<'_>, &T) -> PgResult<bool> + Sync), out: &T) -> PgResult<bool> {
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let conn = slot.checkout(true, &self.target)?;
            match transact(conn, &mut |db: &mut Tx<'_>| check(db, out)) {
                Ok(v) => return Ok(v),
                Err(TxFailure::Failed(f)) if f.retryable(conn.client.is_closed()) => last = Some(f),
                Err(TxFailure::Failed(f)) => return Err(f),
                // A read-only check: its commit changes nothing, and its answer was read.
                Err(TxFailure::CommitLost(_, v)) => return Ok(v),
            }
        }
        Err(last.unwrap_or_else(|| Error::Store("the check did not run".into()).into()))
    }
}

// ---------------------------------------------------------------- executions

fn insert_execution(db: &mut Tx<'_>, e: &NewExecution) -> PgResult<()> {
    db.execute(
        "INSERT INTO executions (id, agent, model_id, provider, tenant_id, status, started_at, metadata,
             parent_execution_id, root_execution_id)
         VALUES ($1, $2, $3, $4, $5, 'running', $6, $7, $8, $9)",
        &[&e.id, &e.agent, &e.model_id, &e.provider, &e.tenant_id, &e.started_at, &e.metadata, &e.parent_execution_id, &e.root_execution_id],
    )?;
    Ok(())
}

/// Adds execution `id`'s numbers, times `sign`, to its rollups (`rollups::record_sql`).
fn roll(db: &mut Tx<'_>, id: &str, periods: &[String; 2], sign: i64) -> PgResult<()> {
    for (sql, period) in rollups::record_sql(Dialect::Postgres).iter().zip(periods) {
        db.execute(sql, &[period, &sign, &id])?;
    }
    Ok(())
}

/// Closes an execution row, moving it in the rollups from any earlier outcome to this one;
/// with `store_details`, also writes its prompts and response.
fn complete_execution(db: &mut Tx<'_>, e: &NewExecution, c: &Completion, store_details: bool, cal: &Calendar) -> PgResult<()> {
    let periods = rollups::periods(cal, e.started_at);
    roll(db, &e.id, &periods, -1)?;
    let attempts = serde_json::to_string(&c.attempts).unwrap_or_else(|_| "[]".into());
    let n = db.execute(
        "UPDATE executions SET status = $2, error_class = $3, error_message = $4, chosen_model_id = $5,
             provider = COALESCE($6, provider), completed_at = $7, duration_ms = $8, input_tokens = $9,
             output_tokens = $10, cached_tokens = $11, total_tokens = $12, input_cost = $13,
             output_cost = $14, total_cost = $15, attempts_count = $16, attempts = $17, finish_reason = $18,
             cache_write_tokens = $19, cache_read_cost = $20, cache_write_cost = $21,
             time_to_first_token_ms = $22, cached = $23
         WHERE id = $1",
        &[
            &e.id,
            &c.status.as_str(),
            &c.error_class,
            &c.error_message,
            &c.chosen_model_id,
            &c.provider,
            &c.completed_at,
            &c.duration_ms,
            &c.usage.input,
            &c.usage.output,
            &c.usage.cached,
            &(c.usage.input + c.usage.output),
            &c.cost.input.0,
            &c.cost.output.0,
            &c.cost.total().0,
            &(c.attempts.len() as i64),
            &attempts,
            &c.finish_reason,
            &c.usage.cache_writes(),
            &c.cost.cache_read.0,
            &c.cost.cache_write.0,
            &c.time_to_first_token_ms,
            &i64::from(c.cached),
        ],
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

// ---------------------------------------------------------------- counters

/// A change to one counter: recorded usage and in-flight reservations (negative to release).
#[derive(Debug, Clone, Copy, Default)]
struct Delta {
    used: budget::Usage,
    reserved: budget::Usage,
}

/// Changes to apply, in key order (the order rows are locked in).
type Deltas = BTreeMap<CounterKey, Delta>;

fn usage_at(r: &PgRow, first: usize) -> PgResult<budget::Usage> {
    Ok(budget::Usage { cost: Nanos(r.try_get(first)?), tokens: r.try_get(first + 1)?, executions: r.try_get(first + 2)? })
}

fn key_arrays<'a>(keys: impl Iterator<Item = &'a CounterKey>) -> (Vec<&'a str>, Vec<&'a str>) {
    keys.map(|(s, p)| (s.as_str(), p.as_str())).unzip()
}

/// Locks the counters (creating missing ones) in key order; returns each one's recorded usage
/// and reservations, which no other transaction can change until this one ends.
fn lock_counters(db: &mut Tx<'_>, keys: &BTreeSet<CounterKey>) -> PgResult<HashMap<CounterKey, (budget::Usage, budget::Usage)>> {
    const LOCK: &str = "SELECT c.scope, c.period, c.cost, c.tokens, c.executions,
             c.reserved_cost, c.reserved_tokens, c.reserved_executions
         FROM usage_counters c JOIN unnest($1::text[], $2::text[]) AS k(scope, period) ON c.scope = k.scope AND c.period = k.period
         ORDER BY c.scope, c.period FOR UPDATE OF c";
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let (scopes, periods) = key_arrays(keys.iter());
    let mut rows = db.query(LOCK, &[&scopes, &periods])?;
    if rows.len() < keys.len() {
        // First use of a counter (a new day or month, a new tenant): create it, then lock.
        db.execute(
            "INSERT INTO usage_counters (scope, period)
             SELECT scope, period FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(scope, period, n) ORDER BY n
             ON CONFLICT (scope, period) DO NOTHING",
            &[&scopes, &periods],
        )?;
        rows = db.query(LOCK, &[&scopes, &periods])?;
    }
    rows.iter().map(|r| Ok(((r.try_get(0)?, r.try_get(1)?), (usage_at(r, 2)?, usage_at(r, 5)?)))).collect()
}

/// Applies changes to counters (creating missing ones) in key order, in one statement;
/// returns each changed counter's recorded usage afterwards.
fn bump(db: &mut Tx<'_>, deltas: &Deltas) -> PgResult<HashMap<CounterKey, budget::Usage>> {
    if deltas.is_empty() {
        return Ok(HashMap::new());
    }
    let (scopes, periods) = key_arrays(deltas.keys());
    let column = |f: fn(&Delta) -> i64| deltas.values().map(f).collect::<Vec<i64>>();
    let rows = db.query(
        "INSERT INTO usage_counters AS c (scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions)
         SELECT scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions
         FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[])
             WITH ORDINALITY AS d(scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions, n)
         ORDER BY n
         ON CONFLICT (scope, period) DO UPDATE SET cost = c.cost + EXCLUDED.cost, tokens = c.tokens + EXCLUDED.tokens,
             executions = c.executions + EXCLUDED.executions, reserved_cost = c.reserved_cost + EXCLUDED.reserved_cost,
             reserved_tokens = c.reserved_tokens + EXCLUDED.reserved_tokens,
             reserved_executions = c.reserved_executions + EXCLUDED.reserved_executions
         RETURNING scope, period, cost, tokens, executions",
        &[
            &scopes,
            &periods,
            &column(|d| d.used.cost.0),
            &column(|d| d.used.tokens),
            &column(|d| d.used.executions),
            &column(|d| d.reserved.cost.0),
            &column(|d| d.reserved.tokens),
            &column(|d| d.reserved.executions),
        ],
    )?;
    rows.iter().map(|r| Ok(((r.try_get(0)?, r.try_get(1)?), usage_at(r, 2)?))).collect()
}

/// A reservation removed from the table: its counters and its estimate.
fn reservation_at(r: &PgRow, first: usize) -> PgResult<(Vec<CounterKey>, budget::Usage)> {
    let keys: String = r.try_get(first)?;
    Ok((decode_keys(&keys), usage_at(r, first + 1)?))
}

/// Releases reservations whose lease ran out (their process died) and closes their
/// executions as abandoned, counting them as the executions they were. The counter changes
/// go into `deltas`, to be applied with the caller's own in key order.
fn expire_reservations(db: &mut Tx<'_>, cal: &Calendar, now: Micros, deltas: &mut Deltas) -> PgResult<()> {
    let expired = db.query("DELETE FROM reservations WHERE expires_at <= $1 RETURNING execution_id, counters, cost, tokens, executions", &[&now])?;
    if expired.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(expired.len());
    for r in &expired {
        ids.push(r.try_get::<_, String>(0)?);
        let (keys, est) = reservation_at(r, 1)?;
        for key in keys {
            let d = deltas.entry(key).or_default();
            d.reserved = d.reserved.plus(&est.negated());
        }
    }
    let abandoned = db.query(
        "UPDATE executions SET status = 'error', error_class = 'Abandoned',
             error_message = 'the process running this call stopped before it finished', completed_at = $2
         WHERE id = ANY($1) AND status = 'running'
         RETURNING tenant_id, agent, started_at, id",
        &[&ids, &now],
    )?;
    for r in &abandoned {
        let tenant: Option<String> = r.try_get(0)?;
        let agent: String = r.try_get(1)?;
        roll(db, r.try_get(3)?, &rollups::periods(cal, r.try_get(2)?), 1)?;
        for key in usage_keys(cal, tenant.as_deref(), &agent, r.try_get(2)?) {
            let d = deltas.entry(key).or_default();
            d.used = d.used.plus(&budget::estimate(Nanos::ZERO, 0));
        }
    }
    Ok(())
}

/// Takes the transaction-scoped advisory lock of each rate-limited scope, in scope order:
/// the window's admissions and the calls in flight are then this admission's to count.
fn lock_rate_scopes(db: &mut Tx<'_>, checks: &[RateCheck]) -> PgResult<()> {
    let scopes: BTreeSet<&str> = checks.iter().map(|c| c.scope.as_str()).collect();
    for scope in scopes {
        db.execute("SELECT pg_advisory_xact_lock(hashtextextended('tenantllm rate ' || $1, 0))", &[&scope])?;
    }
    Ok(())
}

/// The use of the scopes `checks` name (see sqlite.rs `rate_state`). A scope's totals row
/// is locked before its log is read, so a settlement correcting them either went first and
/// is seen, or waits and finds the horizon moved past its call.
fn rate_state(db: &mut Tx<'_>, checks: &[RateCheck], now: Micros, window: Micros) -> PgResult<HashMap<String, RateUsage>> {
    let mut out: HashMap<String, RateUsage> = HashMap::new();
    for scope in ratelimit::window_scopes(checks) {
        let start = now - window;
        // A new scope starts with empty totals whose horizon is this window's start.
        let r = db.query_one(
            "INSERT INTO rate_totals (scope, requests, tokens, horizon) VALUES ($1, 0, 0, $2)
             ON CONFLICT (scope) DO UPDATE SET scope = EXCLUDED.scope RETURNING requests, tokens, horizon",
            &[&scope, &start],
        )?;
        let (requests, tokens, horizon): (i64, i64, Micros) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        let use_ = match ratelimit::step(now, window, Some(horizon)) {
            ratelimit::Step::Advance { to, forget } => {
                let r = db.query_one(
                    "WITH crossed AS (
                         SELECT COUNT(*) AS n, COALESCE(SUM(tokens), 0)::bigint AS t FROM rate_events WHERE scope = $1 AND at > $2 AND at <= $3
                     ), forgotten AS (DELETE FROM rate_events WHERE scope = $1 AND at <= $4)
                     UPDATE rate_totals SET requests = requests - crossed.n, tokens = tokens - crossed.t, horizon = $3
                     FROM crossed WHERE scope = $1 RETURNING requests, tokens",
                    &[&scope, &horizon, &to, &forget],
                )?;
                RateUsage { requests: r.try_get(0)?, tokens: r.try_get(1)?, in_flight: 0 }
            }
            ratelimit::Step::Behind { since } => {
                let r = db.query_one(
                    "SELECT COUNT(*), COALESCE(SUM(tokens), 0)::bigint FROM rate_events WHERE scope = $1 AND at > $2 AND at <= $3",
                    &[&scope, &since, &horizon],
                )?;
                let (n, t): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
                RateUsage { requests: requests + n, tokens: tokens.saturating_add(t), in_flight: 0 }
            }
        };
        out.insert(scope, use_);
    }
    if let Some(scope) = ratelimit::concurrency_scope(checks) {
        out.entry(scope.clone()).or_default().in_flight = in_flight(db, &scope)?;
    }
    Ok(out)
}

/// Admissions of a scope stamped after `since` (later stamps included), and their tokens:
/// the dashboard's and CLI's view, read at any time rather than at an admission.
fn window_use(db: &mut Db<'_, impl Sized>, scope: &str, since: Micros) -> PgResult<RateUsage> {
    let r = db.query_one("SELECT COUNT(*), COALESCE(SUM(tokens), 0)::bigint FROM rate_events WHERE scope = $1 AND at > $2", &[&scope, &since])?;
    Ok(RateUsage { requests: r.try_get(0)?, tokens: r.try_get(1)?, in_flight: 0 })
}

fn in_flight(db: &mut Db<'_, impl Sized>, scope: &str) -> PgResult<i64> {
    Ok(db.query_one("SELECT COUNT(*) FROM reservations WHERE concurrency_scope = $1", &[&scope])?.try_get(0)?)
}

/// A scope's admissions stamped after `since`, oldest first.
fn window_events(db: &mut Tx<'_>, scope: &str, since: Micros) -> PgResult<Vec<(Micros, i64)>> {
    let rows = db.query("SELECT at, tokens FROM rate_events WHERE scope = $1 AND at > $2 ORDER BY at", &[&scope, &since])?;
    rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
}

/// The stored timezone. In a write it must be the first statement: `set_timezone` holds the
/// settings table exclusively while it rebuilds, so a write that read the old zone finishes
/// before the rebuild starts, and one that starts during it waits and reads the new zone.
fn stored_timezone(db: &mut Db<'_, impl Sized>) -> PgResult<Option<String>> {
    Ok(db.query_opt(TIMEZONE_SQL, &[])?.map(|r| r.try_get(0)).transpose()?)
}

/// Recomputes every counter and the rollups from the executions in `cal`'s periods (see
/// `Store::rebuild_counters`); `keyed_in` is the calendar they were keyed in until now.
fn rebuild(db: &mut Tx<'_>, keyed_in: &Calendar, cal: &Calendar) -> PgResult<usize> {
    // No call is admitted or settled meanwhile (plain reads go on). Same table order as
    // `admit` and `finish` take them in.
    db.c.batch_execute("LOCK TABLE reservations, usage_counters IN EXCLUSIVE MODE")?;
    let mut deltas = Deltas::new();
    {
        let mut rows = db.c.query_typed_raw(&counted_executions_sql(), std::iter::empty::<(&(dyn ToSql + Sync), Type)>())?;
        while let Some(r) = rows.next()? {
            let tenant: Option<String> = r.try_get(0)?;
            let agent: String = r.try_get(1)?;
            let u = budget::estimate(Nanos(r.try_get(3)?), r.try_get(4)?);
            for key in usage_keys(cal, tenant.as_deref(), &agent, r.try_get(2)?) {
                let d = deltas.entry(key).or_default();
                d.used = d.used.plus(&u);
            }
        }
    }
    let written = deltas.len();
    db.execute("DELETE FROM usage_counters", &[])?;
    // Calls in flight keep their reservations, on the periods of `cal`.
    let held = db.query(
        "SELECT r.counters, r.cost, r.tokens, r.executions, r.execution_id, e.started_at
         FROM reservations r LEFT JOIN executions e ON e.id = r.execution_id",
        &[],
    )?;
    for r in held {
        let (mut keys, est) = reservation_at(&r, 0)?;
        if let Some(started_at) = r.try_get::<_, Option<i64>>(5)? {
            let moved = rekey(&keys, cal, started_at);
            if moved != keys {
                let id: String = r.try_get(4)?;
                db.execute("UPDATE reservations SET counters = $2 WHERE execution_id = $1", &[&id, &encode_keys(moved.iter())])?;
                keys = moved;
            }
        }
        for key in keys {
            let d = deltas.entry(key).or_default();
            d.reserved = d.reserved.plus(&est);
        }
    }
    bump(db, &deltas)?;
    rebuild_rollups(db, keyed_in, cal)?;
    Ok(written)
}

/// Recomputes the daily rollups from the oldest settled call's day on, in `cal`'s periods,
/// and every monthly one (see `rollups::OLDEST_SQL`); `keyed_in` is the calendar of the
/// stored rollups.
fn rebuild_rollups(db: &mut Tx<'_>, keyed_in: &Calendar, cal: &Calendar) -> PgResult<()> {
    let oldest: Option<i64> = db.query_one(rollups::OLDEST_SQL, &[])?.try_get(0)?;
    let Some(oldest) = oldest else { return Ok(()) };
    let mut totals = rollups::Totals::default();
    {
        let mut rows = db.c.query_typed_raw(&rollups::source_sql(), std::iter::empty::<(&(dyn ToSql + Sync), Type)>())?;
        while let Some(r) = rows.next()? {
            let values = (0..ROLLED.len()).map(|i| r.try_get(5 + i)).collect::<std::result::Result<Vec<i64>, _>>()?;
            totals.add_row(cal, r.try_get(0)?, [r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?], &values);
        }
    }
    db.execute("DELETE FROM daily_rollups WHERE period >= $1", &[&rollups::kept_before(keyed_in, oldest)])?;
    let rows: Vec<_> = totals.rows().collect();
    for chunk in rows.chunks(10_000) {
        let texts: Vec<Vec<&str>> = (0..5).map(|i| chunk.iter().map(|(k, _)| k[i].as_str()).collect()).collect();
        let numbers: Vec<Vec<i64>> = (0..=ROLLED.len()).map(|i| chunk.iter().map(|(_, v)| v[i]).collect()).collect();
        let mut params: Vec<&dyn Param> = texts.iter().map(|t| t as &dyn Param).collect();
        params.extend(numbers.iter().map(|n| n as &dyn Param));
        db.execute(&rollups::pg_insert_sql(), &params)?;
    }
    db.execute("DELETE FROM monthly_rollups", &[])?;
    db.execute(&rollups::derive_monthly_sql(Dialect::Postgres), &[])?;
    Ok(())
}

// ---------------------------------------------------------------- budgets

fn budget_from_row(r: &PgRow) -> PgResult<TenantBudget> {
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

fn budget_get(db: &mut Db<'_, impl Sized>, tenant_id: &str) -> PgResult<Option<TenantBudget>> {
    let sql = format!("SELECT {BUDGET_COLUMNS} FROM tenant_budgets WHERE tenant_id = $1");
    db.query_opt(&sql, &[&tenant_id])?.as_ref().map(budget_from_row).transpose()
}

// ---------------------------------------------------------------- breakers

/// A breaker's stored state (`None`: no row, which reads as closed); with `lock`, the row is
/// locked until the transaction ends.
fn breaker_row(db: &mut Db<'_, impl Sized>, key: &BreakerKey, lock: bool) -> PgResult<Option<breaker::State>> {
    let sql = if lock {
        "SELECT phase, failures, retry_at FROM breakers WHERE key = $1 FOR UPDATE"
    } else {
        "SELECT phase, failures, retry_at FROM breakers WHERE key = $1"
    };
    let Some(r) = db.query_opt(sql, &[&key.id()])? else { return Ok(None) };
    let phase: String = r.try_get(0)?;
    let failures: String = r.try_get(1)?;
    Ok(Some(breaker::State {
        phase: Phase::parse(&phase).ok_or_else(|| Error::Store(format!("breaker {}: corrupt phase {phase:?}", key.id())))?,
        failures: breaker::State::decode_failures(&failures),
        retry_at: r.try_get(2)?,
    }))
}

fn breaker_put(db: &mut Tx<'_>, key: &BreakerKey, s: &breaker::State, now: Micros) -> PgResult<()> {
    db.execute(
        "INSERT INTO breakers (key, agent, model, tenant_id, phase, failures, retry_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (key) DO UPDATE SET phase = EXCLUDED.phase, failures = EXCLUDED.failures,
             retry_at = EXCLUDED.retry_at, updated_at = EXCLUDED.updated_at",
        &[&key.id(), &key.agent, &key.model, &key.tenant_id, &s.phase.as_str(), &s.encode_failures(), &s.retry_at, &now],
    )?;
    Ok(())
}

/// The breaker row, locked; created (closed) first if there is none, so there is a row to lock.
fn breaker_locked(db: &mut Tx<'_>, key: &BreakerKey, now: Micros) -> PgResult<breaker::State> {
    if let Some(s) = breaker_row(db, key, true)? {
        return Ok(s);
    }
    db.execute(
        "INSERT INTO breakers (key, agent, model, tenant_id, phase, failures, retry_at, updated_at)
         VALUES ($1, $2, $3, $4, 'closed', '', 0, $5) ON CONFLICT (key) DO NOTHING",
        &[&key.id(), &key.agent, &key.model, &key.tenant_id, &now],
    )?;
    Ok(breaker_row(db, key, true)?.unwrap_or_default())
}

fn breaker_admit_tx(db: &mut Tx<'_>, key: &BreakerKey, lease: i64, now: Micros) -> PgResult<Admission> {
    let state = breaker_row(db, key, false)?.unwrap_or_default();
    if let (admission, None) = breaker::admit(&state, now, lease) {
        // Closed, or open and cooling down: nothing to write, no lock needed.
        return Ok(admission);
    }
    // This call would claim the half-open probe: decide again on the locked row, so that of
    // racing processes exactly one claims it and the others see its claim.
    let state = breaker_locked(db, key, now)?;
    let (admission, new) = breaker::admit(&state, now, lease);
    if let Some(new) = new {
        breaker_put(db, key, &new, now)?;
    }
    Ok(admission)
}

/// Applies one call's outcome to its breaker; returns the alert it raises, if any.
fn breaker_record(db: &mut Tx<'_>, o: &BreakerOutcome, now: Micros) -> PgResult<Option<Alert>> {
    let state = breaker_row(db, &o.key, false)?.unwrap_or_default();
    if breaker::record(&state, &o.policy, o.success, o.probe, now).0.is_none() {
        // The common case (a success while closed): nothing changes, nothing is locked.
        return Ok(None);
    }
    let state = breaker_locked(db, &o.key, now)?;
    let (new, event) = breaker::record(&state, &o.policy, o.success, o.probe, now);
    if let Some(new) = &new {
        breaker_put(db, &o.key, new, now)?;
    }
    Ok(match (event, new) {
        (Some(breaker::Event::Opened), Some(s)) => Some(Alert::BreakerOpened { key: o.key.clone(), retry_at: s.retry_at }),
        (Some(breaker::Event::Closed), _) => Some(Alert::BreakerClosed { key: o.key.clone() }),
        _ => None,
    })
}

// ---------------------------------------------------------------- queries

type SqlArgs = Vec<Box<dyn Param + Send>>;

/// A filter value as the column's type: numbers given for text fields compare as their text,
/// text given for numeric fields as the number it spells (or matches nothing).
fn sql_value(kind: Kind, v: &Value) -> Box<dyn Param + Send> {
    match (kind, v) {
        (Kind::Text | Kind::Json, Value::Text(s)) => Box::new(s.clone()),
        (Kind::Text | Kind::Json, Value::Int(i)) => Box::new(i.to_string()),
        (_, Value::Int(i)) => Box::new(*i),
        (_, Value::Text(s)) => Box::new(s.trim().parse::<i64>().ok()),
    }
}

/// " WHERE ..." for a query's filters; field names come from the fixed `FIELDS` list.
fn where_clause(q: &Query) -> (String, SqlArgs) {
    let mut parts = Vec::new();
    let mut args: SqlArgs = Vec::new();
    for f in &q.filters {
        match f {
            Filter::Eq(Field(n, k), v) => {
                args.push(sql_value(*k, v));
                parts.push(format!("{n} = ${}", args.len()));
            }
            Filter::In(Field(n, k), vs) => {
                let mut ph = Vec::new();
                for v in vs {
                    args.push(sql_value(*k, v));
                    ph.push(format!("${}", args.len()));
                }
                parts.push(if ph.is_empty() { "FALSE".into() } else { format!("{n} IN ({})", ph.join(", ")) });
            }
            Filter::IsNull(Field(n, _)) => parts.push(format!("{n} IS NULL")),
            Filter::NotNull(Field(n, _)) => parts.push(format!("{n} IS NOT NULL")),
            Filter::Range(Field(n, _), lo, hi) => {
                if let Some(lo) = lo {
                    args.push(Box::new(*lo));
                    parts.push(format!("{n} >= ${}", args.len()));
                }
                if let Some(hi) = hi {
                    args.push(Box::new(*hi));
                    parts.push(format!("{n} < ${}", args.len()));
                }
            }
        }
    }
    let w = if parts.is_empty() { String::new() } else { format!(" WHERE {}", parts.join(" AND ")) };
    (w, args)
}

fn params(args: &SqlArgs) -> Vec<&dyn Param> {
    args.iter().map(|a| a.as_ref() as &dyn Param).collect()
}

fn cell(r: &PgRow, i: usize, kind: Kind) -> PgResult<Cell> {
    Ok(match kind {
        Kind::Text => r.try_get::<_, Option<String>>(i)?.map_or(Cell::Null, Cell::Text),
        Kind::Json => r.try_get::<_, Option<String>>(i)?.map_or(Cell::Null, Cell::Json),
        Kind::Int => r.try_get::<_, Option<i64>>(i)?.map_or(Cell::Null, Cell::Int),
        Kind::Money => r.try_get::<_, Option<i64>>(i)?.map_or(Cell::Null, |n| Cell::Money(Nanos(n))),
        Kind::Time => r.try_get::<_, Option<i64>>(i)?.map_or(Cell::Null, Cell::Time),
    })
}

fn read_row(r: &PgRow) -> PgResult<Row> {
    FIELDS.iter().enumerate().map(|(i, (n, k))| Ok((*n, cell(r, i, *k)?))).collect()
}

fn aggregate_sql(agg: &Aggregate) -> (String, Kind) {
    match agg {
        Aggregate::Count => ("COUNT(*)".into(), Kind::Int),
        // SUM of BIGINT is NUMERIC in PostgreSQL; the total must fit 64 bits, as in SQLite.
        Aggregate::Sum(Field(n, k)) => (format!("COALESCE(SUM({n}), 0)::BIGINT"), *k),
    }
}

/// The smallest string above every string that starts with `prefix` (None: there is none).
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (last as u32 + 1..=char::MAX as u32).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// A grouped query answered by rollups, plus the matching calls still running.
fn from_rollups(db: &mut Db<'_, Autocommit>, q: &Query, by: &[GroupKey], agg: &Aggregate, cal: &Calendar, plan: &rollups::Plan) -> PgResult<Vec<(GroupValues, Cell)>> {
    let mut groups = Groups::new(agg);
    for (sql, args) in &plan.statements {
        let args: Vec<&dyn Param> = args.iter().map(|a| a as &dyn Param).collect();
        for r in db.query(sql, &args)? {
            groups.begin();
            for i in 0..by.len() {
                groups.part(r.try_get::<_, Option<&str>>(i)?.map(str::as_bytes));
            }
            groups.add(r.try_get(by.len())?);
        }
    }
    if plan.running {
        scan(db, q, by, agg, cal, true, &mut groups)?;
    }
    Ok(groups.finish()?)
}

/// Adds the matching rows' totals to `groups`: grouped by the server, or streamed when the
/// day (in the database's timezone, computed here) is a key. `running_only`: just the calls
/// still running (a partial index has them).
fn scan(db: &mut Db<'_, Autocommit>, q: &Query, by: &[GroupKey], agg: &Aggregate, cal: &Calendar, running_only: bool, groups: &mut Groups) -> PgResult<()> {
    let (mut w, args) = where_clause(q);
    if running_only {
        w = format!("{w}{} status = 'running'", if w.is_empty() { " WHERE" } else { " AND" });
    }
    let cols = query::key_columns(by);
    let day = by.contains(&GroupKey::Day).then(|| cols.len() - 1);
    let sql = if day.is_some() {
        let select: Vec<String> = cols.iter().map(|c| c.to_string()).chain([query::row_value(agg)]).collect();
        format!("SELECT {} FROM executions{w}", select.join(", "))
    } else {
        let select: Vec<String> = cols.iter().map(|c| c.to_string()).chain([aggregate_sql(agg).0]).collect();
        let group = if cols.is_empty() { String::new() } else { format!(" GROUP BY {}", cols.join(", ")) };
        format!("SELECT {} FROM executions{w}{group}", select.join(", "))
    };
    let mut rows = db.c.query_typed_raw(&sql, typed(&params(&args)))?;
    while let Some(r) = rows.next()? {
        let started_at = match day {
            Some(i) => r.try_get(i)?,
            None => 0,
        };
        query::row_key(groups, by, cal, started_at, |g, i| -> PgResult<()> {
            g.part(r.try_get::<_, Option<&str>>(i)?.map(str::as_bytes));
            Ok(())
        })?;
        groups.add(r.try_get(cols.len())?);
    }
    Ok(())
}

impl Store for PostgresStore {
    fn admit(&self, req: &AdmitRequest<'_>) -> Result<Admitted> {
        let e = req.execution;
        // Every outcome writes the execution row, so its presence tells whether a commit
        // that lost its connection went through.
        let check = |db: &mut Tx<'_>, _: &Admitted| -> PgResult<bool> {
            Ok(db.query_opt("SELECT 1 FROM executions WHERE id = $1", &[&e.id])?.is_some())
        };
        self.write(OnCommitLoss::Check(&check), |db| {
            keyed_like(stored_timezone(db)?, req.calendar)?;
            if let (true, Some(tid)) = (req.remember_tenant, req.plan.tenant_id) {
                db.execute(
                    "INSERT INTO tenants (tenant_id, name, first_used_at, last_used_at) VALUES ($1, $2, $3, $3)
                     ON CONFLICT (tenant_id) DO UPDATE SET name = COALESCE(EXCLUDED.name, tenants.name),
                         first_used_at = LEAST(tenants.first_used_at, EXCLUDED.first_used_at),
                         last_used_at = GREATEST(tenants.last_used_at, EXCLUDED.last_used_at)",
                    &[&tid, &req.tenant_name, &req.now],
                )?;
            }
            let stored = match (req.plan.tenant_id, req.plan.tenant_override) {
                (Some(tid), None) => budget_get(db, tid)?,
                _ => None,
            };
            // Rate-limited scopes are locked first (before any row lock), so admissions of a
            // scope take turns and deadlock with nothing.
            let rate_checks = ratelimit::checks(&req.plan, stored.as_ref());
            lock_rate_scopes(db, &rate_checks)?;
            let mut deltas = Deltas::new();
            expire_reservations(db, req.calendar, req.now, &mut deltas)?;
            let checks = budget::checks(&req.plan, stored.as_ref(), req.calendar, req.now);
            let checked: BTreeSet<CounterKey> = checks.iter().map(|c| (c.scope.clone(), c.period_key.clone())).collect();
            let mut usage = lock_counters(db, &checked.iter().chain(deltas.keys()).cloned().collect())?;
            // What the expired reservations give back counts for this call already.
            for (key, d) in &deltas {
                if let Some((recorded, reserved)) = usage.get_mut(key) {
                    *recorded = recorded.plus(&d.used);
                    *reserved = reserved.plus(&d.reserved);
                }
            }
            let usage_of = |c: &budget::Check| usage.get(&(c.scope.clone(), c.period_key.clone())).copied().unwrap_or_default();
            let (hard, warnings) = budget::evaluate(&checks, usage_of, &req.estimate);
            if let Some(b) = hard {
                bump(db, &deltas)?;
                insert_execution(db, e)?;
                complete_execution(db, e, &blocked(&b, req.now), false, req.calendar)?;
                return Ok(Admitted::Blocked(b));
            }
            let rates = rate_state(db, &rate_checks, req.now, req.rate_window)?;
            let since = req.now - req.rate_window;
            let breach = ratelimit::evaluate(&rate_checks, |s| rates.get(s).copied().unwrap_or_default(), req.estimate.tokens, req.now, req.rate_window, |s| {
                window_events(db, s, since)
            })?;
            if let Some(b) = breach {
                bump(db, &deltas)?;
                if req.record_rate_limited {
                    insert_execution(db, e)?;
                    complete_execution(db, e, &rate_limited(&b, req.now), false, req.calendar)?;
                }
                return Ok(Admitted::RateLimited(b));
            }
            let (model_index, probe) = match first_admitted(req.breaker_keys, |key| breaker_admit_tx(db, key, req.probe_lease, req.now))? {
                Choice::Model { index, probe } => (index, probe),
                Choice::AllOpen { retry_at } => {
                    bump(db, &deltas)?;
                    insert_execution(db, e)?;
                    complete_execution(db, e, &short_circuited(&e.agent, retry_at, req.now), false, req.calendar)?;
                    return Ok(Admitted::ShortCircuited { retry_at });
                }
            };
            for key in &checked {
                let d = deltas.entry(key.clone()).or_default();
                d.reserved = d.reserved.plus(&req.estimate);
            }
            bump(db, &deltas)?;
            let concurrency = ratelimit::concurrency_scope(&rate_checks);
            let reserved = !checked.is_empty() || concurrency.is_some();
            if reserved {
                let est = &req.estimate;
                db.execute(
                    "INSERT INTO reservations (execution_id, counters, cost, tokens, executions, expires_at, concurrency_scope)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[&e.id, &encode_keys(checked.iter()), &est.cost.0, &est.tokens, &est.executions, &req.reservation_expires_at, &concurrency],
                )?;
            }
            let rate_scopes = ratelimit::window_scopes(&rate_checks);
            if !rate_scopes.is_empty() {
                // Counted in the totals unless this call's clock is behind their horizon.
                db.execute(
                    "WITH logged AS (
                         INSERT INTO rate_events (scope, at, execution_id, tokens) SELECT s, $2, $3, $4 FROM unnest($1::text[]) AS s
                     )
                     UPDATE rate_totals SET requests = requests + 1, tokens = tokens + $4 WHERE scope = ANY($1) AND horizon < $2",
                    &[&rate_scopes, &e.started_at, &e.id, &req.estimate.tokens],
                )?;
            }
            insert_execution(db, e)?;
            Ok(Admitted::Go { model_index, probe, checks, warnings, rate_scopes, reserved })
        })
    }

    fn breaker_admit(&self, key: &BreakerKey, lease: i64, now: Micros) -> Result<Admission> {
        // Only a claimed probe writes; it is there if the row holds exactly that claim.
        let check = |db: &mut Tx<'_>, a: &Admission| -> PgResult<bool> {
            Ok(match a {
                Admission::Probe => breaker_row(db, key, true)?.is_some_and(|s| s.phase == Phase::HalfOpen && s.retry_at == now + lease),
                _ => true,
            })
        };
        self.write(OnCommitLoss::Check(&check), |db| breaker_admit_tx(db, key, lease, now))
    }

    fn finish(&self, req: &FinishRequest<'_>) -> Result<Vec<Alert>> {
        let e = req.execution;
        let c = req.completion;
        // The row closed with this completion's time means it went through. The lock waits
        // out a transaction the server may still be finishing for the lost connection.
        let check = |db: &mut Tx<'_>, _: &Vec<Alert>| -> PgResult<bool> {
            let row = db.query_opt("SELECT status, completed_at FROM executions WHERE id = $1 FOR UPDATE", &[&e.id])?;
            Ok(match row {
                Some(r) => r.try_get::<_, String>(0)? == c.status.as_str() && r.try_get::<_, Option<i64>>(1)? == Some(c.completed_at),
                None => false,
            })
        };
        self.write(OnCommitLoss::Check(&check), |db| {
            keyed_like(stored_timezone(db)?, req.calendar)?;
            // The reservation (if this process's lease was not taken over) is released in the
            // same statement that adds the real usage.
            let released = if req.reserved {
                match db.query_opt("DELETE FROM reservations WHERE execution_id = $1 RETURNING counters, cost, tokens, executions", &[&e.id])? {
                    Some(r) => Some(reservation_at(&r, 0)?),
                    None => None,
                }
            } else {
                None
            };
            let taken_over = req.reserved && released.is_none();
            let (reserved_keys, estimate) = released.unwrap_or_default();
            complete_execution(db, e, c, req.store_details, req.calendar)?;
            let used = budget::settled(c, taken_over);
            let mut deltas = Deltas::new();
            for key in usage_keys(req.calendar, e.tenant_id.as_deref(), &e.agent, e.started_at) {
                deltas.entry(key).or_default().used = used;
            }
            for key in reserved_keys {
                deltas.entry(key).or_default().reserved = estimate.negated();
            }
            let recorded = bump(db, &deltas)?;
            // The logged estimate becomes the real usage, in the totals too if they count it:
            // totals first, scope by scope in the order admissions lock them (see `rate_state`).
            let tokens = budget::recorded(c).tokens;
            let mut scopes: Vec<&String> = req.rate_scopes.iter().collect();
            scopes.sort();
            for scope in scopes {
                db.execute(
                    "UPDATE rate_totals SET tokens = tokens + $4
                         - COALESCE((SELECT tokens FROM rate_events WHERE scope = $1 AND at = $2 AND execution_id = $3), $4)
                     WHERE scope = $1 AND horizon < $2",
                    &[scope, &e.started_at, &e.id, &tokens],
                )?;
                db.execute(
                    "UPDATE rate_events SET tokens = $4 WHERE scope = $1 AND at = $2 AND execution_id = $3",
                    &[scope, &e.started_at, &e.id, &tokens],
                )?;
            }
            let mut alerts = Vec::new();
            if c.status.counts_as_usage() {
                for check in req.checks {
                    let Some(now_used) = recorded.get(&(check.scope.clone(), check.period_key.clone())).copied() else { continue };
                    for t in budget::thresholds_reached(check, &now_used) {
                        let fresh = db.execute(
                            "INSERT INTO alerts_sent (scope, period, name, threshold) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                            &[&check.scope, &check.period_key, &check.name, &t],
                        )?;
                        if fresh == 1 {
                            alerts.push(Alert::Budget { check: check.clone(), threshold: t, current: now_used });
                        }
                    }
                }
            }
            for o in req.breakers {
                alerts.extend(breaker_record(db, o, c.completed_at)?);
            }
            Ok(alerts)
        })
    }

    fn renew_leases(&self, execution_ids: &[String], expires_at: Micros) -> Result<usize> {
        let ids = execution_ids.to_vec();
        let n = self.write(OnCommitLoss::Rerun, |db| {
            db.execute("UPDATE reservations SET expires_at = $1 WHERE execution_id = ANY($2)", &[&expires_at, &ids])
        })?;
        Ok(n as usize)
    }

    fn budget_get(&self, tenant_id: &str) -> Result<Option<TenantBudget>> {
        self.read(|db| budget_get(db, tenant_id))
    }

    fn budget_put(&self, b: &TenantBudget, write: BudgetWrite<'_>) -> Result<TenantBudget> {
        b.validate()?;
        let now = now_micros();
        let sql = format!(
            "INSERT INTO tenant_budgets ({BUDGET_COLUMNS}, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $11, $12, $13, $10, $10) ON CONFLICT (tenant_id) {}",
            budget_on_conflict(write)?
        );
        // Creating twice would fail the second time: a create that went through is the
        // budget now stored. An update can run again.
        let created = |db: &mut Tx<'_>, _: &TenantBudget| -> PgResult<bool> { Ok(budget_get(db, &b.tenant_id)?.as_ref() == Some(b)) };
        let on_loss = match write {
            BudgetWrite::Create => OnCommitLoss::Check(&created),
            BudgetWrite::Update(_) => OnCommitLoss::Rerun,
        };
        self.write(on_loss, |db| {
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
            Ok(budget_get(db, &b.tenant_id)?.ok_or_else(|| Error::Store("the budget just written is missing".into()))?)
        })
    }

    fn budget_delete(&self, tenant_id: &str) -> Result<bool> {
        let gone = |db: &mut Tx<'_>, _: &bool| -> PgResult<bool> { Ok(budget_get(db, tenant_id)?.is_none()) };
        self.write(OnCommitLoss::Check(&gone), |db| Ok(db.execute("DELETE FROM tenant_budgets WHERE tenant_id = $1", &[&tenant_id])? == 1))
    }

    fn budget_all(&self) -> Result<Vec<TenantBudget>> {
        self.read(|db| {
            let rows = db.query(&format!("SELECT {BUDGET_COLUMNS} FROM tenant_budgets ORDER BY tenant_id"), &[])?;
            rows.iter().map(budget_from_row).collect()
        })
    }

    fn usage(&self, scope: &str, period_key: &str) -> Result<budget::Usage> {
        self.read(|db| {
            let r = db.query_opt("SELECT cost, tokens, executions FROM usage_counters WHERE scope = $1 AND period = $2", &[&scope, &period_key])?;
            r.map(|r| usage_at(&r, 0)).transpose().map(Option::unwrap_or_default)
        })
    }

    fn rate_usage(&self, scope: &str, since: Micros) -> Result<RateUsage> {
        self.read(|db| Ok(RateUsage { in_flight: in_flight(db, scope)?, ..window_use(db, scope, since)? }))
    }

    fn tenants(&self) -> Result<Vec<SeenTenant>> {
        self.read(|db| {
            let rows = db.query("SELECT tenant_id, name, first_used_at, last_used_at FROM tenants ORDER BY tenant_id", &[])?;
            rows.iter()
                .map(|r| Ok(SeenTenant { id: r.try_get(0)?, name: r.try_get(1)?, first_used_at: r.try_get(2)?, last_used_at: r.try_get(3)? }))
                .collect()
        })
    }

    fn usage_by_scope(&self, prefix: &str, period_key: &str) -> Result<Vec<(String, budget::Usage)>> {
        // A range on the primary key: scope >= prefix AND scope < (first string past the prefix).
        let end = prefix_end(prefix);
        self.read(|db| {
            let rows = db.query(
                "SELECT scope, cost, tokens, executions FROM usage_counters
                 WHERE scope >= $1 AND ($2::text IS NULL OR scope < $2) AND period = $3 ORDER BY scope",
                &[&prefix, &end, &period_key],
            )?;
            rows.iter()
                .map(|r| {
                    let scope: String = r.try_get(0)?;
                    Ok((scope[prefix.len()..].to_string(), usage_at(r, 1)?))
                })
                .collect()
        })
    }

    fn usage_daily(&self, scope: &str, first_day: &str) -> Result<Vec<(String, budget::Usage)>> {
        self.read(|db| {
            // Daily period keys are the 10-character ones ("2026-11-28"; months are "2026-11").
            let rows = db.query(
                "SELECT period, cost, tokens, executions FROM usage_counters
                 WHERE scope = $1 AND period >= $2 AND length(period) = 10 ORDER BY period",
                &[&scope, &first_day],
            )?;
            rows.iter().map(|r| Ok((r.try_get(0)?, usage_at(r, 1)?))).collect()
        })
    }

    fn purge_batch(&self, details_before: Option<Micros>, executions_before: Option<Micros>, limit: i64) -> Result<Purged> {
        use super::retention::{id_before, postgres as sql, CURSOR};
        let mut out = Purged::default();
        if let Some(t) = executions_before {
            let cutoff = id_before(t);
            // Deleting what is already deleted deletes nothing: running it again is safe.
            out.executions = self.write(OnCommitLoss::Rerun, |db| {
                let r = db.query_one(sql::EXECUTIONS_BATCH, &[&cutoff, &limit])?;
                let (last, n): (Option<String>, i64) = (r.try_get(0)?, r.try_get(1)?);
                if let Some(last) = last {
                    db.execute(sql::DELETE_EXECUTION_DETAILS, &[&last])?;
                    db.execute(sql::DELETE_EXECUTIONS, &[&last])?;
                }
                Ok(n)
            })?;
        }
        if let Some(t) = details_before {
            let cutoff = id_before(t);
            out.details = self.write(OnCommitLoss::Rerun, |db| {
                let cursor: String = match db.query_opt(sql::CURSOR_GET, &[&CURSOR])? {
                    Some(r) => r.try_get(0)?,
                    None => String::new(),
                };
                let r = db.query_one(sql::DETAILS_BATCH, &[&cursor, &cutoff, &limit])?;
                let (last, n): (Option<String>, i64) = (r.try_get(0)?, r.try_get(1)?);
                if let Some(last) = last {
                    db.execute(sql::CLEAR_DETAILS, &[&cursor, &last])?;
                    db.execute(sql::DELETE_DETAILS, &[&cursor, &last])?;
                    db.execute(sql::CURSOR_SET, &[&CURSOR, &last])?;
                }
                Ok(n)
            })?;
        }
        Ok(out)
    }

    fn purge_preview(&self, details_before: Option<Micros>, executions_before: Option<Micros>) -> Result<Purged> {
        use super::retention::{id_before, postgres as sql, CURSOR};
        let deleted = executions_before.map(id_before);
        let details_cutoff = details_before.map(id_before);
        self.read(move |db| {
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
            Ok(Purged { details, executions })
        })
    }

    fn rebuild_counters(&self) -> Result<usize> {
        self.write(OnCommitLoss::Rerun, |db| {
            let cal = calendar_of(stored_timezone(db)?)?;
            rebuild(db, &cal, &cal)
        })
    }

    fn timezone(&self) -> Result<String> {
        Ok(self.read(stored_timezone)?.unwrap_or_else(|| DEFAULT_TIMEZONE.into()))
    }

    fn set_timezone(&self, cal: &Calendar) -> Result<usize> {
        self.write(OnCommitLoss::Rerun, |db| {
            // Waits for the writes that read the old zone; later ones wait for this (see
            // `stored_timezone`).
            db.c.batch_execute("LOCK TABLE settings IN ACCESS EXCLUSIVE MODE")?;
            let old = calendar_of(stored_timezone(db)?)?;
            db.execute(
                "INSERT INTO settings (name, value) VALUES ('timezone', $1) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                &[&cal.name()],
            )?;
            rebuild(db, &old, cal)
        })
    }

    fn query_rows(&self, q: &Query) -> Result<Vec<Row>> {
        let (w, mut args) = where_clause(q);
        let mut sql = format!("SELECT {} FROM executions{w}", all_columns());
        if !q.order.is_empty() {
            // NULLs sort as in SQLite: first ascending, last descending.
            let order: Vec<String> =
                q.order.iter().map(|(Field(n, _), desc)| format!("{n} {}", if *desc { "DESC NULLS LAST" } else { "ASC NULLS FIRST" })).collect();
            sql.push_str(&format!(" ORDER BY {}", order.join(", ")));
        }
        if q.limit.is_some() || q.offset.is_some() {
            args.push(Box::new(q.limit));
            args.push(Box::new(q.offset.unwrap_or(0)));
            sql.push_str(&format!(" LIMIT ${} OFFSET ${}", args.len() - 1, args.len()));
        }
        self.read(|db| db.query(&sql, &params(&args))?.iter().map(read_row).collect())
    }

    fn query_aggregate(&self, q: &Query, agg: &Aggregate) -> Result<Cell> {
        let (w, args) = where_clause(q);
        let (expr, kind) = aggregate_sql(agg);
        let sql = format!("SELECT {expr} FROM executions{w}");
        self.read(|db| {
            let cal = calendar_of(stored_timezone(db)?)?;
            if let Some(plan) = rollups::plan(q, &[], agg, &cal, Dialect::Postgres) {
                return Ok(from_rollups(db, q, &[], agg, &cal, &plan)?.pop().map_or_else(|| query::zero(agg), |(_, v)| v));
            }
            cell(&db.query_one(&sql, &params(&args))?, 0, kind)
        })
    }

    fn query_grouped(&self, q: &Query, by: &[GroupKey], agg: &Aggregate) -> Result<Vec<(GroupValues, Cell)>> {
        self.read(|db| {
            let cal = calendar_of(stored_timezone(db)?)?;
            if let Some(plan) = rollups::plan(q, by, agg, &cal, Dialect::Postgres) {
                return from_rollups(db, q, by, agg, &cal, &plan);
            }
            let mut groups = Groups::new(agg);
            scan(db, q, by, agg, &cal, false, &mut groups)?;
            Ok(groups.finish()?)
        })
    }

    fn execution(&self, id: &str) -> Result<Option<(Row, Option<Details>)>> {
        let sql = format!("SELECT {} FROM executions WHERE id = $1", all_columns());
        self.read(|db| {
            let Some(row) = db.query_opt(&sql, &[&id])? else { return Ok(None) };
            let details = db
                .query_opt("SELECT system_prompt, user_prompt, response, tool_calls FROM execution_details WHERE execution_id = $1", &[&id])?
                .map(|r| -> PgResult<Details> { Ok(Details { system_prompt: r.try_get(0)?, user_prompt: r.try_get(1)?, response: r.try_get(2)?, tool_calls: r.try_get(3)? }) })
                .transpose()?;
            Ok(Some((read_row(&row)?, details)))
        })
    }

    fn api_key_put(&self, scope: &str, provider: &str, sealed: Option<&Sealed>) -> Result<()> {
        let now = now_micros();
        self.write(OnCommitLoss::Rerun, |db| {
            match sealed {
                Some((nonce, ct)) => db.execute(
                    "INSERT INTO api_configurations (scope, provider, nonce, ciphertext, updated_at) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (scope, provider) DO UPDATE SET nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext,
                         updated_at = EXCLUDED.updated_at",
                    &[&scope, &provider, nonce, ct, &now],
                )?,
                None => db.execute("DELETE FROM api_configurations WHERE scope = $1 AND provider = $2", &[&scope, &provider])?,
            };
            Ok(())
        })
    }

    fn api_key_get(&self, scope: &str, provider: &str) -> Result<Option<Sealed>> {
        self.read(|db| {
            let r = db.query_opt("SELECT nonce, ciphertext FROM api_configurations WHERE scope = $1 AND provider = $2", &[&scope, &provider])?;
            r.map(|r| -> PgResult<Sealed> { Ok((r.try_get(0)?, r.try_get(1)?)) }).transpose()
        })
    }

    fn api_key_providers(&self, scope: &str) -> Result<Vec<String>> {
        self.read(|db| {
            let rows = db.query("SELECT provider FROM api_configurations WHERE scope = $1 ORDER BY provider", &[&scope])?;
            rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
        })
    }

    fn cache_get(&self, tenant_id: Option<&str>, key: &str, now: Micros) -> Result<Option<cache::Entry>> {
        let (sql, tenant) = (CACHE_GET_SQL.replace('?', "$"), tenant_id.unwrap_or(""));
        self.read(|db| {
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

    fn cache_put(&self, tenant_id: Option<&str>, key: &str, e: &cache::Entry) -> Result<()> {
        let (sweep, put, tenant) = (CACHE_SWEEP_SQL.replace('?', "$"), CACHE_PUT_SQL.replace('?', "$"), tenant_id.unwrap_or(""));
        // Running it again after a lost commit writes the same entry.
        self.write(OnCommitLoss::Rerun, |db| {
            db.execute(&sweep, &[&e.created_at, &cache::SWEEP])?;
            db.execute(&put, &[&tenant, &key, &e.content, &e.model, &e.provider, &e.finish_reason, &e.execution_id, &e.created_at, &e.expires_at])?;
            Ok(())
        })
    }

    fn breaker_status(&self, key: &BreakerKey) -> Result<breaker::State> {
        self.read(|db| Ok(breaker_row(db, key, false)?.unwrap_or_default()))
    }

    fn breaker_reset(&self, key: &BreakerKey) -> Result<()> {
        self.write(OnCommitLoss::Rerun, |db| db.execute("DELETE FROM breakers WHERE key = $1", &[&key.id()]).map(|_| ()))
    }

    fn breakers_not_closed(&self) -> Result<Vec<BreakerStatus>> {
        self.read(|db| {
            let rows = db.query("SELECT agent, model, tenant_id, phase, failures, retry_at FROM breakers WHERE phase <> 'closed' ORDER BY retry_at", &[])?;
            rows.iter()
                .map(|r| {
                    let phase: String = r.try_get(3)?;
                    let failures: String = r.try_get(4)?;
                    Ok(BreakerStatus {
                        key: BreakerKey { agent: r.try_get(0)?, model: r.try_get(1)?, tenant_id: r.try_get(2)? },
                        state: breaker::State {
                            phase: Phase::parse(&phase).unwrap_or(Phase::Open),
                            failures: breaker::State::decode_failures(&failures),
                            retry_at: r.try_get(5)?,
                        },
                    })
                })
                .collect()
        })
    }

    fn tenant_list(&self, q: &TenantListQuery) -> Result<TenantList> {
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
        self.read(|db| {
            let rows = db.query(&sql, &params)?;
            let raw = rows
                .iter()
                .map(|r| tenant_list::RawRow::read(|i| r.try_get(i), |i| r.try_get(i), |i| r.try_get(i)))
                .collect::<std::result::Result<Vec<_>, postgres::Error>>()?;
            Ok(tenant_list::assemble(raw, q.today))
        })
    }

    fn top_tenants(&self, periods: Option<&[String]>, limit: i64) -> Result<Vec<(String, budget::Usage)>> {
        let sql = tenant_list::top_tenants_sql(periods, &PG_LIST, |c| format!("SUM({c})::BIGINT"));
        let mut params: Vec<&dyn Param> = periods.unwrap_or_default().iter().map(|p| p as &dyn Param).collect();
        params.push(&limit);
        self.read(|db| db.query(&sql, &params)?.iter().map(|r| Ok((r.try_get(0)?, usage_at(r, 1)?))).collect())
    }
}

/// The tenants list's SQL for PostgreSQL.
const PG_LIST: tenant_list::Dialect = tenant_list::Dialect {
    placeholder: |n| format!("${n}"),
    greatest: "GREATEST",
    float: "DOUBLE PRECISION",
    problems_from: "executions",
    wide: "NUMERIC",
};

#[cfg(test)]
mod tests {
    //! The ones marked `#[ignore]` run against the server named by `TENANTLLM_TEST_POSTGRES_URL`,
    //! each on a database of its own: `make test` runs them (`--include-ignored`) when the
    //! variable is set, so a plain `cargo test` never reports them "ok" without a server.

    use super::*;
    use postgres::NoTls;
    use crate::budget::{GlobalBudgets, Plan};
    use crate::clock::Period;
    use crate::execution::Status;
    use crate::pricing::{Cost, Usage};
    use crate::store::SqliteStore;

    const URL_ENV: &str = "TENANTLLM_TEST_POSTGRES_URL";

    /// Runs admin SQL from a plain thread (a test may be inside a tokio runtime).
    fn on_server<T: Send + 'static>(url: &str, f: impl FnOnce(&mut Client) -> T + Send + 'static) -> T {
        let url = url.to_string();
        std::thread::spawn(move || f(&mut Client::connect(&url, NoTls).expect("connect to the test server"))).join().unwrap()
    }

    fn scalar(url: &str, sql: &str) -> i64 {
        let sql = sql.to_string();
        on_server(url, move |c| c.query_one(sql.as_str(), &[]).unwrap().get(0))
    }

    fn with_dbname(url: &str, db: &str) -> String {
        let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
        let start = base.find("://").map_or(0, |i| i + 3);
        let base = base[start..].find('/').map_or(base, |i| &base[..start + i]);
        match query {
            Some(q) => format!("{base}/{db}?{q}"),
            None => format!("{base}/{db}"),
        }
    }

    /// A new, empty database; dropped with the value.
    struct TestDb {
        admin: String,
        name: String,
        url: String,
    }

    impl TestDb {
        fn new() -> TestDb {
            let admin = std::env::var(URL_ENV).unwrap_or_else(|_| panic!("set {URL_ENV} to run the ignored PostgreSQL tests"));
            let name = format!("tl_cargo_{}", uuid::Uuid::now_v7().simple());
            let create = format!("CREATE DATABASE {name}");
            on_server(&admin, move |c| c.batch_execute(&create).unwrap());
            TestDb { url: with_dbname(&admin, &name), admin, name }
        }
        fn open(&self) -> PostgresStore {
            PostgresStore::open(&self.url, "UTC").unwrap()
        }
        fn scalar(&self, sql: &str) -> i64 {
            scalar(&self.url, sql)
        }
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            let drop_db = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
            on_server(&self.admin, move |c| c.batch_execute(&drop_db).unwrap());
        }
    }

    fn execution(id: &str, at: Micros) -> NewExecution {
        NewExecution { id: id.into(), agent: "A".into(), model_id: "mock/x".into(), provider: "mock".into(), started_at: at, metadata: "{}".into(), ..Default::default() }
    }

    fn admit_as(store: &dyn Store, global: &GlobalBudgets, e: &NewExecution, keys: &[BreakerKey], expires: Micros) -> Admitted {
        let cal = Calendar::new("UTC").unwrap();
        store
            .admit(&AdmitRequest {
                execution: e,
                plan: Plan { global, agent: "A", tenant_id: e.tenant_id.as_deref(), tenant_override: None },
                estimate: budget::estimate(Nanos(600), 10),
                reservation_expires_at: expires,
                breaker_keys: keys,
                probe_lease: 1_000_000,
                calendar: &cal,
                now: e.started_at,
                rate_window: 60_000_000,
                record_rate_limited: true,
                remember_tenant: false,
                tenant_name: None,
            })
            .unwrap()
    }

    fn admit(store: &dyn Store, global: &GlobalBudgets, id: &str, now: Micros, expires: Micros) -> Admitted {
        admit_as(store, global, &execution(id, now), &[], expires)
    }

    fn completion(status: Status, at: Micros, cost: i64) -> Completion {
        Completion {
            status,
            error_class: (status != Status::Success).then(|| "ProviderError".into()),
            error_message: None,
            chosen_model_id: Some("mock/x".into()),
            provider: None,
            completed_at: at,
            duration_ms: 5,
            usage: Usage::new(3, 4, 0),
            cost: Cost { input: Nanos(cost / 2), output: Nanos(cost - cost / 2), ..Cost::default() },
            attempts: vec![],
            finish_reason: None,
            response: Some("hi".into()),
            time_to_first_token_ms: None,
            cached: false,
        }
    }

    fn finish(store: &dyn Store, e: &NewExecution, c: &Completion, reserved: bool, breakers: &[BreakerOutcome]) -> Vec<Alert> {
        let cal = Calendar::new("UTC").unwrap();
        store
            .finish(&FinishRequest { execution: e, completion: c, reserved, checks: &[], rate_scopes: &[], breakers, calendar: &cal, store_details: true })
            .unwrap()
    }

    fn daily_limit(nanos: i64) -> GlobalBudgets {
        GlobalBudgets { limits: Limits { daily_cost: Some(Nanos(nanos)), ..Default::default() }, ..Default::default() }
    }

    const T0: Micros = 1_800_000_000_000_000;

    #[test]
    #[ignore = "needs a PostgreSQL server: TENANTLLM_TEST_POSTGRES_URL"]
    fn a_renewed_lease_outlives_its_first_expiry() {
        let db = TestDb::new();
        let store = db.open();
        let global = daily_limit(1000);
        let t0 = T0;
        assert!(matches!(admit(&store, &global, "a", t0, t0 + 1_000), Admitted::Go { .. }));
        assert_eq!(store.renew_leases(&["a".to_string(), "gone".to_string()], t0 + 5_000).unwrap(), 1);
        // Past the first expiry, "a" still holds its reservation.
        assert!(matches!(admit(&store, &global, "b", t0 + 2_000, t0 + 10_000), Admitted::Blocked(_)));
        assert!(matches!(admit(&store, &global, "c", t0 + 6_000, t0 + 10_000), Admitted::Go { .. }));
        assert_eq!(store.renew_leases(&[], t0).unwrap(), 0);
    }

    #[test]
    #[ignore = "needs a PostgreSQL server: TENANTLLM_TEST_POSTGRES_URL"]
    fn reservations_of_a_dead_process_expire() {
        let db = TestDb::new();
        let store = db.open();
        let global = daily_limit(1000);
        assert!(matches!(admit(&store, &global, "a", T0, T0 + 1_000), Admitted::Go { .. }));
        // "a" never finishes; while its lease runs, a second estimate does not fit.
        assert!(matches!(admit(&store, &global, "b", T0 + 500, T0 + 10_000), Admitted::Blocked(_)));
        // After the lease, "a" is released and closed as abandoned.
        assert!(matches!(admit(&store, &global, "c", T0 + 2_000, T0 + 10_000), Admitted::Go { .. }));
        let (row, _) = store.execution("a").unwrap().unwrap();
        let get = |name: &str| row.iter().find(|(n, _)| *n == name).unwrap().1.clone();
        assert_eq!(get("status"), Cell::Text("error".into()));
        assert_eq!(get("error_class"), Cell::Text("Abandoned".into()));
        let q = Query { filters: vec![Filter::Eq(Field::parse("status").unwrap(), Value::Text("blocked".into()))], ..Default::default() };
        assert_eq!(store.query_aggregate(&q, &Aggregate::Count).unwrap(), Cell::Int(1));
        // Only "c" holds a reservation; "a" counts as one execution.
        assert_eq!(db.scalar("SELECT reserved_cost FROM usage_counters WHERE scope = 'global' AND length(period) = 10"), 600);
        assert_eq!(db.scalar("SELECT executions FROM usage_counters WHERE scope = 'global' AND length(period) = 10"), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    #[ignore = "needs a PostgreSQL server: TENANTLLM_TEST_POSTGRES_URL"]
    async fn usable_from_inside_a_tokio_runtime() {
        let db = TestDb::new();
        // Opened, used and dropped on runtime threads, where the client itself would panic.
        let store = Arc::new(db.open());
        let global = daily_limit(1_000_000);
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let (store, global) = (store.clone(), global.clone());
                tokio::spawn(async move {
                    let e = execution(&format!("e{i:02}"), T0 + i);
                    assert!(matches!(admit(store.as_ref(), &global, &e.id, e.started_at, T0 + 60_000_000), Admitted::Go { .. }));
                    finish(store.as_ref(), &e, &completion(Status::Success, T0 + i + 1, 100), true, &[]);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(store.query_aggregate(&Query::default(), &Aggregate::Count).unwrap(), Cell::Int(16));
        assert_eq!(store.usage("global", "2027-01-15").unwrap().cost, Nanos(1600));
        tokio::spawn(async move { drop(store) }).await.unwrap();
        assert_eq!(db.scalar("SELECT COUNT(*) FROM reservations"), 0);
    }

    #[test]
    #[ignore = "needs a PostgreSQL server: TENANTLLM_TEST_POSTGRES_URL"]
    fn set_timezone_moves_counters_and_refuses_stale_writers() {
        let db = TestDb::new();
        super::super::tests::set_timezone_moves_counters_and_refuses_stale_writers(&db.open());
    }

    #[test]
    #[ignore = "needs a PostgreSQL server: TENANTLLM_TEST_POSTGRES_URL"]
    fn rate_totals_refuse_what_counting_the_window_would() {
        let db = TestDb::new();
        super::super::tests::rate_totals_refuse_what_counting_the_window_would(&db.open());
    }

    #[test]
    #[ignore = "needs a PostgreSQL server: TENANTLLM_TEST_POSTGRES_URL"]
    fn cache_entries_keep_the_first_writer_and_are_swept() {
        let db = TestDb::new();
        super::super::tests::cache_entries_keep_the_first_writer_and_are_swept(&db.open());
    }

    #[test]
    #[ignore = "needs a PostgreSQL server: TENANTLLM_TEST_POSTGRES_URL"]
    fn concurrent_first_migrations_and_newer_schemas() {
        let db = TestDb::new();
        let opened: Vec<_> = (0..4)
            .map(|_| {
                let url = db.url.clone();
                std::thread::spawn(move || PostgresStore::open(&url, "UTC").map(drop))
            })
            .collect();
        for t in opened {
            t.join().unwrap().unwrap();
        }
        assert_eq!(db.scalar("SELECT COUNT(*) FROM schema_version"), 1);
        assert_eq!(db.scalar("SELECT MAX(version) FROM schema_version"), MIGRATIONS.len() as i64);
        on_server(&db.url, |c| c.batch_execute("UPDATE schema_version SET version = 999").unwrap());
        let e = PostgresStore::open(&db.url, "UTC").err().unwrap().to_string();
        assert!(e.contains("newer"), "{e}");
    }

    #[test]
    fn bad_urls_and_unreachable_servers_fail_clearly() {
        let e = PostgresStore::open("postgresql://u@127.0.0.1:1/x?pool_size=0", "UTC").err().unwrap().to_string();
        assert!(e.contains("pool_size"), "{e}");
        let e = PostgresStore::open("postgresql://u:secret@127.0.0.1:1/x", "UTC").err().unwrap().to_string();
        assert!(e.contains("cannot connect") && e.contains("127.0.0.1:1") && !e.contains("secret"), "{e}");
        let own = |pool_size: &str, sslmode: &str, sslrootcert: &str| OwnOptions {
            pool_size: Some(pool_size.into()),
            sslmode: Some(sslmode.into()),
            sslrootcert: Some(sslrootcert.into()),
            options: None,
        };
        assert_eq!(
            take_own_options("postgres://h/d?pool_size=3&sslmode=verify-full&application_name=x&sslrootcert=%2Fca%20dir%2Fca.pem").unwrap(),
            ("postgres://h/d?application_name=x".into(), own("3", "verify-full", "/ca dir/ca.pem"))
        );
        assert_eq!(take_own_options("postgres://h/d").unwrap(), ("postgres://h/d".into(), OwnOptions::default()));
        assert_eq!(pool_size(Some("3")).unwrap(), 3);
        assert_eq!(pool_size(None).unwrap(), DEFAULT_POOL_SIZE);
        for bad in ["postgresql://h/d?pool_size=0", "postgresql://h/d?sslmode=verify", "postgresql://h/d?sslmode=verify-ca&sslrootcert=/nonexistent.pem"] {
            assert!(matches!(PostgresStore::open(bad, "UTC"), Err(Error::Configuration(_))), "{bad}");
        }
        assert_eq!(prefix_end("tenant:").as_deref(), Some("tenant;"));
        assert_eq!(prefix_end(""), None);
    }

    #[test]
    fn timeouts_default_unless_the_url_sets_them() {
        let mut c: postgres::Config = "postgresql://u@h/d".parse().unwrap();
        assert_eq!(with_timeouts(&mut c, None), "BEGIN; SET LOCAL lock_timeout = 30000");
        assert_eq!(c.get_options(), None); // PgBouncer refuses startup options
        assert_eq!(c.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(c.get_tcp_user_timeout(), Some(&DEAD_PEER));
        let mut c: postgres::Config = "postgresql://u@h/d?connect_timeout=3&tcp_user_timeout=7".parse().unwrap();
        assert_eq!(with_timeouts(&mut c, Some("-c lock_timeout=5s")), "BEGIN; SET LOCAL lock_timeout = '5s'");
        assert_eq!(c.get_options(), None);
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(7)));
        let mut c: postgres::Config = "postgresql://u@h/d".parse().unwrap();
        let begin = with_timeouts(&mut c, Some("-c search_path=x --lock_timeout=1min -csynchronous_commit=off -c"));
        assert_eq!(begin, "BEGIN; SET LOCAL lock_timeout = '1min'");
        assert_eq!(c.get_options(), Some("-c search_path=x -csynchronous_commit=off"));
        let mut c: postgres::Config = "postgresql://u@h/d".parse().unwrap();
        assert_eq!(with_timeouts(&mut c, Some("-c lock_timeout=1'; DROP")), "BEGIN; SET LOCAL lock_timeout = '1'';'");
        assert_eq!(c.get_options(), Some("DROP"));
    }

    /// 8 threads on two stores (two processes) race 40 admissions for a limit that 10
    /// estimates fit: exactly 10 go, and settling them leaves the counters exact. `scalar`
    /// reads the stores' database.
    fn exactly_10_of_40_admitted(stores: [Arc<dyn Store>; 2], scalar: impl Fn(&str) -> i64) {
        let global = daily_limit(6000);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (store, global) = (stores[t % 2].clone(), global.clone());
                std::thread::spawn(move || {
                    let mut admitted = vec![];
                    for i in 0..5 {
                        let e = execution(&format!("t{t}-{i}"), T0 + (t * 10 + i) as i64);
                        if matches!(admit(store.as_ref(), &global, &e.id, e.started_at, T0 + 60_000_000), Admitted::Go { .. }) {
                            admitted.push(e);
                        }
                    }
                    admitted
                })
            })
            .collect();
        let admitted: Vec<NewExecution> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        let row = |col: &str| scalar(&format!("SELECT {col} FROM usage_counters WHERE scope = 'global' AND length(period) = 10"));
        assert_eq!(admitted.len(), 10);
        assert_eq!(row("reserved_cost"), 6000);
        for e in &admitted {
            finish(stores[0].as_ref(), e, &completion(Status::Success, e.started_at + 1, 500), true, &[]);
        }
        assert_eq!((row("cost"), row("executions"), row("reserved_cost"), row("reserved_executions")), (5000, 10, 0, 0));
        assert_eq!(scalar("SELECT COUNT(*) FROM executions WHERE status = 'blocked'"), 30);
    }

    #[test]
    #[ignore = "needs a PostgreSQL server: TENANTLLM_TEST_POSTGRES_URL"]
    fn hard_limit_holds_across_stores_and_threads() {
        let db = TestDb::new();
        exactly_10_of_40_admitted([Arc::new(db.open()), Arc::new(db.open())], |sql| db.scalar(sql));
    }

    /// The same race on one SQLite file (runs without a server).
    #[test]
    fn hard_limit_holds_across_sqlite_stores_and_threads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("race.db");
        let open = || Arc::new(SqliteStore::open(path.to_str().unwrap(), "UTC").unwrap());
        let file = rusqlite::Connection::open(&path).unwrap();
        exactly_10_of_40_admitted([open(), open()], |sql| file.query_row(sql, [], |r| r.get(0)).unwrap());
    }

    #[test]
    #[ignore = "needs a PostgreSQL server: TENANTLLM_TEST_POSTGRES_URL"]
    fn exactly_one_half_open_probe_across_stores() {
        let db = TestDb::new();
        let stores = [Arc::new(db.open()), Arc::new(db.open())];
        let key = BreakerKey { agent: "A".into(), model: "mock/x".into(), tenant_id: Some("t".into()) };
        let policy = breaker::Policy::new(2, 60.0, 1.0).unwrap();
        let mut alerts = vec![];
        for i in 0..2 {
            let e = execution(&format!("f{i}"), T0 + i);
            assert!(matches!(admit_as(stores[0].as_ref(), &GlobalBudgets::default(), &e, std::slice::from_ref(&key), T0 + 60_000_000), Admitted::Go { .. }));
            let outcome = BreakerOutcome { key: key.clone(), policy, success: false, probe: false };
            alerts.extend(finish(stores[0].as_ref(), &e, &completion(Status::Error, T0 + i + 1, 0), false, &[outcome]));
        }
        assert!(matches!(alerts.as_slice(), [Alert::BreakerOpened { .. }]));
        assert_eq!(stores[1].breaker_status(&key).unwrap().phase, Phase::Open);
        // After the cooldown, 8 threads over two stores race: exactly one is the probe.
        let after = T0 + 3_000_000;
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (store, key) = (stores[t % 2].clone(), key.clone());
                std::thread::spawn(move || store.breaker_admit(&key, 5_000_000, after).unwrap())
            })
            .collect();
        let admissions: Vec<Admission> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(admissions.iter().filter(|a| **a == Admission::Probe).count(), 1, "{admissions:?}");
        assert_eq!(admissions.iter().filter(|a| matches!(a, Admission::Reject { .. })).count(), 7);
        stores[1].breaker_reset(&key).unwrap();
        assert_eq!(stores[0].breaker_status(&key).unwrap(), breaker::State::default());
    }

    #[test]
    #[ignore = "needs a PostgreSQL server: TENANTLLM_TEST_POSTGRES_URL"]
    fn a_connection_killed_mid_transaction_is_retried_once_through() {
        let db = TestDb::new();
        let store = Arc::new(db.open());
        let global = daily_limit(1_000_000);
        let first = execution("first", T0);
        assert!(matches!(admit(store.as_ref(), &global, &first.id, T0, T0 + 60_000_000), Admitted::Go { .. }));
        finish(store.as_ref(), &first, &completion(Status::Success, T0 + 1, 100), true, &[]);
        // Another session holds the global counters, so the next admission waits inside its
        // transaction; that connection is then killed.
        let (locked, release) = (std::sync::mpsc::channel::<()>(), std::sync::mpsc::channel::<()>());
        let url = db.url.clone();
        let holder = std::thread::spawn(move || {
            let mut c = Client::connect(&url, NoTls).unwrap();
            let mut tx = c.transaction().unwrap();
            tx.query("SELECT * FROM usage_counters WHERE scope = 'global' FOR UPDATE", &[]).unwrap();
            locked.0.send(()).unwrap();
            release.1.recv().unwrap();
            tx.commit().unwrap();
        });
        locked.1.recv().unwrap();
        let call = {
            let (store, global) = (store.clone(), global.clone());
            std::thread::spawn(move || admit(store.as_ref(), &global, "second", T0 + 10, T0 + 60_000_000))
        };
        let waiting = "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'tenantllm' AND wait_event_type = 'Lock'";
        let mut killed = 0;
        for _ in 0..500 {
            if db.scalar(waiting) == 1 {
                killed = db.scalar(
                    "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = current_database() AND application_name = 'tenantllm' AND wait_event_type = 'Lock') t",
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(killed, 1, "the admission never waited on the lock");
        // The retry waits on the same lock until it is released, then goes through once.
        std::thread::sleep(Duration::from_millis(200));
        release.0.send(()).unwrap();
        holder.join().unwrap();
        assert!(matches!(call.join().unwrap(), Admitted::Go { .. }));
        assert_eq!(db.scalar("SELECT COUNT(*) FROM executions WHERE id = 'second'"), 1);
        assert_eq!(db.scalar("SELECT COUNT(*) FROM reservations"), 1);
        assert_eq!(db.scalar("SELECT reserved_cost FROM usage_counters WHERE scope = 'global' AND length(period) = 10"), 600);
        // Every idle pooled connection is dead now too; the next operations still work.
        db.scalar("SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'tenantllm') t");
        let second = execution("second", T0 + 10);
        finish(store.as_ref(), &second, &completion(Status::Success, T0 + 11, 100), true, &[]);
        assert_eq!(db.scalar("SELECT reserved_cost + reserved_executions FROM usage_counters WHERE scope = 'global' AND length(period) = 10"), 0);
        assert_eq!(store.query_aggregate(&Query::default(), &Aggregate::Count).unwrap(), Cell::Int(2));
    }

    /// The query layer answers exactly as SQLite's does on the same rows.
    #[test]
    #[ignore = "needs a PostgreSQL server: TENANTLLM_TEST_POSTGRES_URL"]
    fn queries_match_the_sqlite_store() {
        let db = TestDb::new();
        let pg = db.open();
        let dir = tempfile::tempdir().unwrap();
        let lite = SqliteStore::open(dir.path().join("t.db").to_str().unwrap(), "UTC").unwrap();
        let global = GlobalBudgets::default();
        // Ids are UUIDv7 minted when the call starts, as the engine makes them (SQLite narrows
        // time ranges by id).
        let v7 = |t: Micros| uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, (t / 1_000_000) as u64, (t % 1_000_000 * 1000) as u32)).to_string();
        let mut ids = vec![];
        for (i, tenant) in [Some("b"), None, Some("a"), Some("b"), Some("é"), None, Some("B")].into_iter().enumerate() {
            let at = T0 + i as i64 * 1000;
            let mut e = execution(&v7(at), at);
            ids.push(e.id.clone());
            e.tenant_id = tenant.map(str::to_string);
            let status = if i % 3 == 0 { Status::Error } else { Status::Success };
            for store in [&pg as &dyn Store, &lite] {
                assert!(matches!(admit_as(store, &global, &e, &[], T0 + 60_000_000), Admitted::Go { .. }));
                finish(store, &e, &completion(status, e.started_at + 7, 100 * i as i64 + 1), false, &[]);
            }
        }
        let f = |n: &str| Field::parse(n).unwrap();
        let queries = [
            Query::default(),
            Query { order: vec![(f("tenant_id"), false), (f("id"), true)], ..Default::default() },
            Query { order: vec![(f("tenant_id"), true), (f("id"), false)], limit: Some(3), offset: Some(1), ..Default::default() },
            Query { filters: vec![Filter::In(f("tenant_id"), vec![])], ..Default::default() },
            Query { filters: vec![Filter::In(f("tenant_id"), vec![Value::Text("a".into()), Value::Text("b".into())])], ..Default::default() },
            Query { filters: vec![Filter::IsNull(f("tenant_id")), Filter::Range(f("started_at"), Some(T0), Some(T0 + 5500))], ..Default::default() },
            Query { filters: vec![Filter::Range(f("started_at"), Some(T0 + 1000), None)], order: vec![(f("started_at"), true)], ..Default::default() },
            Query { filters: vec![Filter::Eq(f("total_tokens"), Value::Text("7".into())), Filter::NotNull(f("completed_at"))], ..Default::default() },
            Query { filters: vec![Filter::Eq(f("status"), Value::Text("error".into()))], order: vec![(f("id"), false)], offset: Some(1), ..Default::default() },
        ];
        // Without an order, rows come in either store's own order.
        let rows = |store: &dyn Store, q: &Query| {
            let mut rows = store.query_rows(q).unwrap();
            if q.order.is_empty() {
                rows.sort_by(|a, b| format!("{:?}", a[0]).cmp(&format!("{:?}", b[0])));
            }
            rows
        };
        for q in &queries {
            assert_eq!(rows(&pg, q), rows(&lite, q), "{q:?}");
            for agg in [Aggregate::Count, Aggregate::Sum(f("total_cost")), Aggregate::Sum(f("total_tokens"))] {
                assert_eq!(pg.query_aggregate(q, &agg).unwrap(), lite.query_aggregate(q, &agg).unwrap(), "{q:?} {agg:?}");
                for by in ["tenant_id", "status"] {
                    assert_eq!(pg.query_grouped(q, &[GroupKey::Field(f(by))], &agg).unwrap(), lite.query_grouped(q, &[GroupKey::Field(f(by))], &agg).unwrap(), "{q:?} {by}");
                }
            }
        }
        assert_eq!(pg.execution(&ids[2]).unwrap(), lite.execution(&ids[2]).unwrap());
        let day = Calendar::new("UTC").unwrap().period_key(Period::Daily, T0);
        assert_eq!(pg.usage_by_scope("tenant:", &day).unwrap(), lite.usage_by_scope("tenant:", &day).unwrap());
        assert_eq!(pg.usage_daily("global", "2000-01-01").unwrap(), lite.usage_daily("global", "2000-01-01").unwrap());
        assert_eq!(pg.rebuild_counters().unwrap(), lite.rebuild_counters().unwrap());
        assert_eq!(pg.usage_by_scope("", &day).unwrap(), lite.usage_by_scope("", &day).unwrap());
    }

    #[test]
    #[ignore = "needs a PostgreSQL server: TENANTLLM_TEST_POSTGRES_URL"]
    fn rollups_answer_like_rows_and_survive_purges() {
        let db = TestDb::new();
        let store = db.open();
        let url = db.url.clone();
        let sql = move |s: &str| {
            let s = s.to_string();
            on_server(&url, move |c| c.batch_execute(&s).unwrap())
        };
        let open_again = || Box::new(db.open()) as Box<dyn Store>;
        super::super::rollups::tests::rollups_answer_like_rows(&store, &sql, &open_again);
    }

    #[test]
    #[ignore = "needs a PostgreSQL server: TENANTLLM_TEST_POSTGRES_URL"]
    fn budgets_and_api_keys_round_trip() {
        let db = TestDb::new();
        let store = db.open();
        let b = TenantBudget {
            tenant_id: "t1".into(),
            name: Some("Acme".into()),
            limits: Limits { daily_cost: Some(Nanos(5)), monthly_tokens: Some(7), ..Default::default() },
            enforcement: Enforcement::Soft,
        };
        assert_eq!(store.budget_put(&b, BudgetWrite::Create).unwrap(), b);
        assert!(store.budget_put(&b, BudgetWrite::Create).unwrap_err().to_string().contains("already exists"));
        assert_eq!(store.budget_get("t1").unwrap(), Some(b.clone()));
        // Only the named fields change: the stale monthly_tokens and enforcement stay.
        let stale = TenantBudget { limits: Limits { daily_cost: Some(Nanos(9)), ..Default::default() }, ..b.clone() };
        let named = ["daily_limit".to_string()];
        let b2 = TenantBudget { limits: Limits { daily_cost: Some(Nanos(9)), ..b.limits.clone() }, ..b.clone() };
        assert_eq!(store.budget_put(&stale, BudgetWrite::Update(&named)).unwrap(), b2);
        assert_eq!(store.budget_all().unwrap(), vec![b2]);
        assert!(store.budget_delete("t1").unwrap());
        assert!(!store.budget_delete("t1").unwrap());
        let sealed = (vec![1u8, 2, 3], vec![0u8, 255, 9]);
        store.api_key_put("tenant:t1", "openai", Some(&sealed)).unwrap();
        assert_eq!(store.api_key_get("tenant:t1", "openai").unwrap(), Some(sealed));
        assert_eq!(store.api_key_providers("tenant:t1").unwrap(), vec!["openai".to_string()]);
        store.api_key_put("tenant:t1", "openai", None).unwrap();
        assert_eq!(store.api_key_get("tenant:t1", "openai").unwrap(), None);
    }

    /// A TCP relay to the test server that can cut a connection at its next COMMIT: either
    /// after passing it on (the server commits, the client never hears so) or before (the
    /// server rolls back when the connection drops).
    struct CommitCutter {
        port: u16,
        mode: Arc<std::sync::atomic::AtomicU8>,
        cuts: Arc<std::sync::atomic::AtomicUsize>,
    }

    const PASS: u8 = 0;
    const CUT_AFTER_COMMIT: u8 = 1;
    const CUT_BEFORE_COMMIT: u8 = 2;

    impl CommitCutter {
        fn start(host: String, port: u16) -> CommitCutter {
            use std::io::{Read, Write};
            use std::net::{Shutdown, TcpListener, TcpStream};
            use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering::SeqCst};
            // The simple-query message the client sends to commit.
            const COMMIT: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let cutter = CommitCutter {
                port: listener.local_addr().unwrap().port(),
                mode: Arc::new(AtomicU8::new(PASS)),
                cuts: Arc::new(AtomicUsize::new(0)),
            };
            let (mode, cuts) = (cutter.mode.clone(), cutter.cuts.clone());
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { break };
                    let server = TcpStream::connect((host.as_str(), port)).unwrap();
                    let swallow = Arc::new(AtomicBool::new(false));
                    let (mut from, mut to, quiet) = (server.try_clone().unwrap(), client.try_clone().unwrap(), swallow.clone());
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 1 << 16];
                        while let Ok(n @ 1..) = from.read(&mut buf) {
                            if !quiet.load(SeqCst) && to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                    let (mut from, mut to, mode, cuts) = (client, server, mode.clone(), cuts.clone());
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 1 << 16];
                        while let Ok(n @ 1..) = from.read(&mut buf) {
                            let at_commit = buf[..n].windows(COMMIT.len()).any(|w| w == COMMIT);
                            let cut = if at_commit { mode.swap(PASS, SeqCst) } else { PASS };
                            if cut != PASS {
                                cuts.fetch_add(1, SeqCst);
                                swallow.store(true, SeqCst);
                                if cut == CUT_AFTER_COMMIT {
                                    to.write_all(&buf[..n]).unwrap();
                                    // Let the server commit (its answer is swallowed).
                                    std::thread::sleep(Duration::from_millis(300));
                                }
                                break;
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            });
            cutter
        }
    }

    #[test]
    #[ignore = "needs a PostgreSQL server: TENANTLLM_TEST_POSTGRES_URL"]
    fn a_commit_cut_off_is_checked_never_doubled_or_lost() {
        let db = TestDb::new();
        let config: postgres::Config = db.url.parse().unwrap();
        let Some(postgres::config::Host::Tcp(host)) = config.get_hosts().first().cloned() else {
            eprintln!("skipped: the test server is not reached over TCP");
            return;
        };
        let cutter = CommitCutter::start(host, config.get_ports().first().copied().unwrap_or(5432));
        let mut url = format!("host=127.0.0.1 port={} dbname={}", cutter.port, config.get_dbname().unwrap());
        if let Some(user) = config.get_user() {
            url.push_str(&format!(" user={user}"));
        }
        if let Some(pw) = config.get_password() {
            url.push_str(&format!(" password='{}'", String::from_utf8_lossy(pw)));
        }
        let store = PostgresStore::open(&url, "UTC").unwrap();
        let global = daily_limit(1_000_000);
        for (i, cut) in [CUT_AFTER_COMMIT, CUT_BEFORE_COMMIT].into_iter().enumerate() {
            let e = execution(&format!("cut{i}"), T0 + i as i64);
            cutter.mode.store(cut, std::sync::atomic::Ordering::SeqCst);
            assert!(matches!(admit(&store, &global, &e.id, e.started_at, T0 + 60_000_000), Admitted::Go { .. }));
            cutter.mode.store(cut, std::sync::atomic::Ordering::SeqCst);
            finish(&store, &e, &completion(Status::Success, e.started_at + 1, 100), true, &[]);
        }
        assert_eq!(cutter.cuts.load(std::sync::atomic::Ordering::SeqCst), 4);
        assert_eq!(db.scalar("SELECT COUNT(*) FROM executions WHERE status = 'success'"), 2);
        assert_eq!(db.scalar("SELECT COUNT(*) FROM executions"), 2);
        let row = |col: &str| db.scalar(&format!("SELECT {col} FROM usage_counters WHERE scope = 'global' AND length(period) = 10"));
        assert_eq!((row("cost"), row("executions"), row("reserved_cost"), row("reserved_executions")), (200, 2, 0, 0));
        assert_eq!(db.scalar("SELECT COUNT(*) FROM reservations"), 0);
    }
}
