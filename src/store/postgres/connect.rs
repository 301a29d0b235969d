//! Connections: where database work runs (the calling thread or the store's own threads) and
//! the connections it takes, the URL options the store reads itself, how failures are told
//! apart, and the retries of `read`, `write` and `call`.

use std::panic::{self, AssertUnwindSafe};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use postgres::Client;

use super::db::{transact, Autocommit, Db, OnCommitLoss, Statements, Tx, TxFailure};
use super::PostgresStore;
use crate::error::{Error, Result};
use crate::process::{quiet, unpoisoned};
use crate::store::pg_tls;

/// Connections (and threads running operations) per process, unless the URL says
/// `?pool_size=N`.
pub(super) const DEFAULT_POOL_SIZE: u32 = 8;
/// Tries of one operation when the connection is lost or the server aborts a transaction.
pub(super) const ATTEMPTS: u32 = 3;
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a statement in a transaction waits for a row or table lock before it fails,
/// unless the URL's `options` set `lock_timeout`: SQLite's busy timeout, so a transaction stuck
/// elsewhere fails a call with a clear error instead of hanging it. (No statement_timeout: long
/// analytics queries are legitimate.)
pub(super) const LOCK_TIMEOUT_MS: u64 = 30_000;
/// How long sent data may go unacknowledged before the connection counts as dead (and the
/// operation runs again on a new one): a server or network that vanished without closing the
/// connection would otherwise hang a call until the OS gives up, about 15 minutes later.
pub(super) const DEAD_PEER: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- threads

pub(super) type Job = Box<dyn FnOnce(&mut Slot) + Send + 'static>;

/// Where the store's database work runs. A calling thread that may block runs its operation
/// itself (see `run`); one that must not (a tokio task, a current-thread runtime) hands it to
/// the store's own OS threads. Either way it takes one of the shared idle connections, and no
/// more than the pool size take one at once. No pool runs threads of its own that a fork could
/// catch at work (r2d2's parked in parking_lot's per-process table, whose bucket locks a fork
/// could copy held).
pub(super) struct Workers {
    queue: mpsc::Sender<Job>,
    pool: Arc<Pool>,
}

/// The connections: the idle ones, and how many more operations may take one.
struct Pool {
    config: Arc<Connect>,
    // std locks, not parking_lot's: waiters park in one table per process whose bucket locks a
    // fork() can catch held (the child then hangs when it starts threads of its own).
    idle: std::sync::Mutex<Vec<Conn>>,
    free: std::sync::Mutex<u32>,
    freed: std::sync::Condvar,
}

impl Pool {
    /// Runs `f` with a connection slot: the connection used last (one operation after another
    /// keeps using one connection; more open only under concurrency), once fewer than the pool
    /// size hold one. Inside the fork gate (`quiet`).
    fn with_slot<T>(&self, f: impl FnOnce(&mut Slot) -> T) -> T {
        let _permit = self.permit();
        let _quiet = quiet();
        let mut lent = Lent { idle: &self.idle, slot: Slot { config: self.config.clone(), conn: unpoisoned(self.idle.lock()).pop() } };
        f(&mut lent.slot)
    }

    fn permit(&self) -> Permit<'_> {
        let mut free = unpoisoned(self.free.lock());
        while *free == 0 {
            free = unpoisoned(self.freed.wait(free));
        }
        *free -= 1;
        Permit(self)
    }
}

/// One operation's right to a connection, given back when dropped.
struct Permit<'a>(&'a Pool);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *unpoisoned(self.0.free.lock()) += 1;
        self.0.freed.notify_one();
    }
}

/// A slot whose connection, still open, goes back to the idle ones when dropped (also when
/// the operation panicked: its transaction, if any, was rolled back by `Open`'s drop).
struct Lent<'a> {
    idle: &'a std::sync::Mutex<Vec<Conn>>,
    slot: Slot,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.slot.conn.take().filter(|c| !c.client.is_closed()) {
            unpoisoned(self.idle.lock()).push(conn);
        }
    }
}

/// Closing a connection runs its client's runtime, which must not happen on a tokio thread
/// (where a store may be dropped): a worker thread closes the idle ones.
impl Drop for Workers {
    fn drop(&mut self) {
        let idle = std::mem::take(&mut *unpoisoned(self.pool.idle.lock()));
        drop(self.queue.send(Box::new(move |_: &mut Slot| drop(idle))));
    }
}

impl Workers {
    pub(super) fn start(n: u32, connect: Connect) -> Result<Workers> {
        let (queue, jobs) = mpsc::channel::<Job>();
        let jobs = Arc::new(std::sync::Mutex::new(jobs));
        let pool = Arc::new(Pool {
            config: Arc::new(connect),
            idle: std::sync::Mutex::default(),
            free: std::sync::Mutex::new(n),
            freed: std::sync::Condvar::new(),
        });
        for i in 0..n {
            let (jobs, pool) = (jobs.clone(), pool.clone());
            std::thread::Builder::new()
                .name(format!("tenantllm-pg-{i}"))
                .spawn(move || {
                    // The lock is held only while waiting for a job, never while one runs (a
                    // poisoned lock still holds a usable receiver). Until the store is dropped.
                    loop {
                        let next = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok(job) = next else { break };
                        pool.with_slot(job);
                    }
                })
                .map_err(|e| Error::Store(format!("cannot start the PostgreSQL store's threads: {e}")))?;
        }
        Ok(Workers { queue, pool })
    }

    /// Runs `f` with a connection and returns its result; a panic in `f` continues here.
    ///
    /// The `postgres` client drives each connection with a private tokio runtime, which must
    /// not be entered from inside another runtime. A thread outside any runtime runs `f`
    /// itself. So does the thread of a multi-threaded runtime's `block_on` (where the engine's
    /// sync calls run), after leaving the runtime with `block_in_place`: handing an operation
    /// to another thread and back costs two more thread wake-ups, each a wait for a CPU on a
    /// busy machine. A tokio task (async calls) or a current-thread runtime cannot leave its
    /// runtime: `f` goes to a worker thread, and this thread waits for it.
    pub(super) fn run<T: Send + 'static>(&self, f: impl FnOnce(&mut Slot) -> T + Send) -> T {
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current() {
            Err(_) => self.pool.with_slot(f),
            Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread && tokio::task::try_id().is_none() => {
                tokio::task::block_in_place(|| self.pool.with_slot(f))
            }
            Ok(_) => self.on_worker(f),
        }
    }

    /// Runs `f` on a worker thread and waits for it. Never called from a worker (it would
    /// wait on itself when all are busy).
    fn on_worker<T: Send + 'static>(&self, f: impl FnOnce(&mut Slot) -> T + Send) -> T {
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
pub(super) struct Connect {
    pub(super) config: postgres::Config,
    pub(super) tls: pg_tls::Connector,
    /// "BEGIN", with the default lock_timeout for the transaction when the URL sets none: a
    /// `SET LOCAL` in the same round trip, since PgBouncer refuses startup options and a
    /// session setting would stay on a server connection the pooler hands to others.
    pub(super) begin: Arc<str>,
    /// The URL's `statement_cache_size` (`Statements`).
    pub(super) statement_cache_size: usize,
}

pub(super) struct Conn {
    pub(super) client: Client,
    pub(super) begin: Arc<str>,
    pub(super) statements: Statements,
}

/// The connection an operation runs on: an idle one, or one opened on first use or once lost.
pub(super) struct Slot {
    pub(super) config: Arc<Connect>,
    pub(super) conn: Option<Conn>,
}

impl Slot {
    /// The connection, connecting if there is none or it is closed; with `validate`, one
    /// that answers (after a lost connection, or when the server may have gone away).
    pub(super) fn checkout(&mut self, validate: bool, target: &str) -> Result<&mut Conn> {
        let usable = |c: &mut Conn| !c.client.is_closed() && (!validate || c.client.simple_query("").is_ok());
        if !self.conn.as_mut().is_some_and(usable) {
            self.conn = None;
            let Connect { config, tls, begin, statement_cache_size } = &*self.config;
            let client = config
                .connect(tls.clone())
                .map_err(|e| Error::Store(format!("cannot connect to PostgreSQL at {target}: {}", describe(&e))))?;
            self.conn = Some(Conn { client, begin: begin.clone(), statements: Statements::new(*statement_cache_size) });
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }
}

/// Why a database operation failed: the database (or the connection to it), or our own
/// rules (a budget that already exists, a corrupt row).
pub(super) enum Failure {
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

pub(super) type PgResult<T> = std::result::Result<T, Failure>;

/// What one try of an operation came to (see `PostgresStore::retrying`).
enum Try<T> {
    Done(T),
    Failed(Failure),
    /// The connection was lost when the operation may have taken effect; if it did, this
    /// was its result.
    Unsure(postgres::Error, T),
}

/// The connection is gone (closed, reset, or the server ended the session).
pub(super) fn connection_lost(e: &postgres::Error, client_closed: bool) -> bool {
    client_closed
        || e.is_closed()
        || e.code().is_some_and(|c| {
            let c = c.code();
            // 08: connection exception; 57P01-03: the server is shutting down or terminated us.
            c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03")
        })
}

/// The server aborted the transaction and running it again may succeed.
pub(super) fn aborted_by_server(e: &postgres::Error) -> bool {
    // serialization_failure, deadlock_detected
    e.code().is_some_and(|c| matches!(c.code(), "40001" | "40P01"))
}

impl Failure {
    /// True when the transaction certainly did not commit and a new try may succeed.
    pub(super) fn retryable(&self, client_closed: bool) -> bool {
        match self {
            Failure::Pg(e) => connection_lost(e, client_closed) || aborted_by_server(e),
            Failure::Rule(_) => false,
        }
    }

    pub(super) fn describe(&self) -> String {
        match self {
            Failure::Pg(e) => describe(e),
            Failure::Rule(e) => e.to_string(),
        }
    }

    pub(super) fn into_error(self, target: &str) -> Error {
        match self {
            Failure::Pg(e) => Error::Store(format!("PostgreSQL at {target}: {}", describe(&e))),
            Failure::Rule(e) => e,
        }
    }
}

/// An error with its cause: the client's `Display` alone says only "db error".
pub(super) fn describe(e: &postgres::Error) -> String {
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

/// The URL options the store reads itself (the client refuses `pool_size`, `sslrootcert` and
/// `statement_cache_size`, and knows only some `sslmode`s; `options` loses its lock_timeout,
/// see `Connect::begin`).
#[derive(Debug, Default, PartialEq)]
pub(super) struct OwnOptions {
    pub(super) pool_size: Option<String>,
    pub(super) statement_cache_size: Option<String>,
    pub(super) sslmode: Option<String>,
    pub(super) sslrootcert: Option<String>,
    pub(super) options: Option<String>,
}

/// Cuts the store's own options out of a URL, percent-decoded.
pub(super) fn take_own_options(url: &str) -> Result<(String, OwnOptions)> {
    let mut own = OwnOptions::default();
    let Some((base, query)) = url.split_once('?') else { return Ok((url.to_string(), own)) };
    let mut rest = Vec::new();
    for part in query.split('&') {
        let (name, value) = part.split_once('=').unwrap_or((part, ""));
        let slot = match name {
            "pool_size" => &mut own.pool_size,
            "statement_cache_size" => &mut own.statement_cache_size,
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

pub(super) fn pool_size(value: Option<&str>) -> Result<u32> {
    let Some(v) = value else { return Ok(DEFAULT_POOL_SIZE) };
    v.parse()
        .ok()
        .filter(|n| (1..=1000).contains(n))
        .ok_or_else(|| Error::Configuration(format!("database: pool_size must be a whole number from 1 to 1000 (got {v:?})")))
}

/// How many statements each connection keeps prepared (`db::Statements`): 0 unless the URL
/// says.
pub(super) fn statement_cache_size(value: Option<&str>) -> Result<usize> {
    let Some(v) = value else { return Ok(0) };
    v.parse().ok().filter(|n| *n <= 10_000).ok_or_else(|| {
        Error::Configuration(format!("database: statement_cache_size must be a whole number from 0 to 10000 (got {v:?})"))
    })
}

/// The timeouts a URL does not set itself (see CONNECT_TIMEOUT, DEAD_PEER), and the URL's
/// `options` (server settings) without its lock_timeout; returns that lock_timeout or
/// LOCK_TIMEOUT_MS, which every transaction sets for itself (see `Connect::begin`).
pub(super) fn with_timeouts(config: &mut postgres::Config, options: Option<&str>) -> String {
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
            Some(v) => lock_timeout = v.to_string(),
            None if w == "-c" => rest.extend(["-c", setting]),
            None => rest.push(w),
        }
    }
    if !rest.is_empty() {
        config.options(&rest.join(" "));
    }
    lock_timeout
}

/// How a transaction begins, with its lock_timeout (see `Connect::begin`).
pub(super) fn begin_sql(lock_timeout: &str) -> String {
    format!("BEGIN; SET LOCAL lock_timeout = '{}'", lock_timeout.replace('\'', "''"))
}

/// "user@host:port/dbname" for messages: never the password.
pub(super) fn target(config: &postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    format!("{user}{host}:{port}/{}", config.get_dbname().unwrap_or(""))
}

impl PostgresStore {
    pub(super) fn gave_up(&self, last: Option<Failure>) -> Error {
        match last {
            Some(Failure::Pg(e)) => Error::Store(format!("PostgreSQL at {}: {} (gave up after {ATTEMPTS} tries)", self.target, describe(&e))),
            Some(Failure::Rule(e)) => e,
            None => Error::Store(format!("PostgreSQL at {}: the operation did not run", self.target)),
        }
    }

    /// Runs `once` on a worker thread, up to ATTEMPTS times: again while it fails in a way a
    /// new try may not (`Failure::retryable`), each time after a longer pause and on a
    /// connection that answers. When it lost the connection where it may have taken effect
    /// (`Try::Unsure`), `on_loss` says whether to ask the database or simply run it again.
    fn retrying<T: Send + 'static>(&self, on_loss: OnCommitLoss<'_, T>, mut once: impl FnMut(&mut Conn) -> Try<T> + Send) -> Result<T> {
        self.workers.run(|slot: &mut Slot| {
            let mut last = None;
            for attempt in 0..ATTEMPTS {
                if attempt > 0 {
                    std::thread::sleep(Duration::from_millis(10 * attempt as u64));
                }
                let conn = slot.checkout(attempt > 0, &self.target)?;
                match once(conn) {
                    Try::Done(v) => return Ok(v),
                    Try::Failed(f) if f.retryable(conn.client.is_closed()) => last = Some(f),
                    Try::Failed(f) => return Err(f.into_error(&self.target)),
                    Try::Unsure(e, out) => {
                        if let OnCommitLoss::Check(check) = &on_loss {
                            match self.committed(slot, *check, &out) {
                                Ok(true) => return Ok(out),
                                Ok(false) => {}
                                Err(f) => return Err(self.unknown_commit(&e, &f)),
                            }
                        }
                        last = Some(Failure::Pg(e));
                    }
                }
            }
            Err(self.gave_up(last))
        })
    }

    /// Runs reads on a worker thread, again on a fresh connection if the connection is lost.
    pub(super) fn read<T: Send + 'static>(&self, mut f: impl FnMut(&mut Db<'_, Autocommit>) -> PgResult<T> + Send) -> Result<T> {
        self.retrying(OnCommitLoss::Rerun, |conn| match f(&mut Db::new(&mut conn.client, &mut conn.statements)) {
            Ok(v) => Try::Done(v),
            Err(f) => Try::Failed(f),
        })
    }

    /// Runs `body` in one transaction on a worker thread. A transaction that did not commit
    /// because the connection was lost or the server aborted it runs again; see
    /// `OnCommitLoss` for a commit whose outcome is unknown.
    pub(super) fn write<T: Send + 'static>(&self, on_loss: OnCommitLoss<'_, T>, mut body: impl FnMut(&mut Tx<'_>) -> PgResult<T> + Send) -> Result<T> {
        self.retrying(on_loss, |conn| match transact(conn, &mut body) {
            Ok(out) => Try::Done(out),
            Err(TxFailure::Failed(f)) => Try::Failed(f),
            Err(TxFailure::CommitLost(e, out)) => Try::Unsure(e, out),
        })
    }

    /// Runs `body`, one statement that commits on its own (a server-side function), on a
    /// worker thread; again on a fresh connection when it certainly did not take effect.
    /// When the connection is lost while it runs, `took_effect` tells (asked on a fresh
    /// connection); if it did, its result is lost with the connection: None.
    pub(super) fn call<T: Send + 'static>(
        &self,
        took_effect: &(dyn Fn(&mut Tx<'_>) -> PgResult<bool> + Sync),
        mut body: impl FnMut(&mut Db<'_, Autocommit>) -> PgResult<T> + Send,
    ) -> Result<Option<T>> {
        let check = |db: &mut Tx<'_>, _: &Option<T>| took_effect(db);
        self.retrying(OnCommitLoss::Check(&check), |conn| match body(&mut Db::new(&mut conn.client, &mut conn.statements)) {
            Ok(v) => Try::Done(Some(v)),
            Err(Failure::Pg(e)) if connection_lost(&e, conn.client.is_closed()) => Try::Unsure(e, None),
            Err(f) => Try::Failed(f),
        })
    }

    fn unknown_commit(&self, lost: &postgres::Error, check: &Failure) -> Error {
        Error::Store(format!(
            "PostgreSQL at {}: the connection was lost while committing ({}), and whether the change was saved could not be checked: {}",
            self.target,
            describe(lost),
            check.describe()
        ))
    }

    /// Whether a transaction whose commit was cut off took effect (on a fresh connection).
    pub(super) fn committed<T>(&self, slot: &mut Slot, check: &(dyn Fn(&mut Tx<'_>, &T) -> PgResult<bool> + Sync), out: &T) -> PgResult<bool> {
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
