//! Retention (`configure(retention={"details_days": 30, "executions_days": 400})`): old
//! executions lose their details (prompts, response, metadata, error messages) after
//! `details_days` and are deleted after `executions_days`. Applied by `tl.purge()` and, when
//! configured, by one background thread per engine, in batches (`store::retention`), each its
//! own short transaction, with a pause after each sized from what the batch took
//! (`pause_after`). On SQLite, where every write takes one lock, a batch takes it only when no
//! write holds or waits for it, holds it about 4 ms (the longest a call waits for the purge)
//! and, while calls write, the pause after it is 49 times as long, so the purge has the lock
//! 2 % of the time and calls the rest. On PostgreSQL a batch locks only its own rows, but it
//! competes with calls for the server: while calls are admitted (the newest execution moved
//! since the last batch) the pause after it is 9 times what it took, so the purge keeps the
//! server busy a tenth of the time; when none are, batches follow one another. Executions go
//! by whole days of the database's calendar. Counters, budgets and rollups are never touched.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::clock::{now_micros, Calendar, Micros};
use crate::error::{config_err, Result};
use crate::store::{lock_waits, Purged, Store};

/// The longest retention a setting may name (about 100 years).
pub const MAX_DAYS: i64 = 36_500;
/// Rows in every batch where writes do not share one lock.
pub const BATCH: i64 = 500;
/// Rows per batch at least, and in the first one where writes share one lock.
const MIN_BATCH: i64 = 4;
/// Rows per batch at most where writes share one lock (about 3 µs each on SQLite).
const MAX_BATCH: i64 = 5_000;
/// How long a batch should hold SQLite's write lock: each next batch is sized from how long the
/// last one took, so a call that comes during one waits at most about this long whatever the
/// machine's speed. A batch is one transaction: a call that comes during it waits for all of
/// it, and under calls back to back nearly every batch meets one. So at the same share of the
/// lock, fewer longer batches make fewer calls wait: counted in `make bench`'s purge under
/// load, 4 ms batches met 83 calls per 100,000 rows purged where 1 ms ones met 215 (a
/// transaction's own cost, ~200 µs, is spread over more rows too).
const BATCH_TIME: Duration = Duration::from_millis(4);
/// The background thread's pause between two batches, during which calls write.
const PAUSE: Duration = Duration::from_millis(20);
/// Where every write takes one lock, the pause after a batch is this many times what the batch
/// held it for while other writes come (`Purged::in_use`): the purge then has the lock 1/50 of
/// the time. (At half the time, its old pause, 3-4 times as many calls waited during a purge
/// as with none, and p99 rose 1.2-3x; at 1/20, on an idle machine, p99 still rose 1.9-2.2x,
/// at 1/50 1.5-1.6x.) On an idle database it goes over 10x as fast.
const IN_USE_PAUSE_PER_HELD: u32 = 49;
/// Where writes do not share one lock (PostgreSQL), the pause after a batch is this many times
/// what it took while calls are admitted (`Purged::in_use`): the purge keeps the server busy
/// 1/10 of the time, about 3,000 rows/s here. Unpaced, its batches ran back to back
/// (16,000-31,000 rows/s) and calls' p50 during a purge was up to 5.7x that before it, 1.9x
/// that with none (`benches/run.py --retention`). With no calls there is nobody to make room
/// for and the batches follow one another (less the background thread's `PAUSE`): a call that
/// comes then shares the server with one batch, and the next batch sees it and slows down.
const SERVER_PAUSE_PER_HELD: u32 = 9;
/// How often the background thread looks for expired rows (it also looks once at start).
pub const INTERVAL_ENV: &str = "TENANTLLM_RETENTION_INTERVAL_SECONDS";
const DEFAULT_INTERVAL: Duration = Duration::from_secs(3600);

const DAY: Micros = 86_400_000_000;

/// Start times before which details are cleared and executions deleted (None: that kind is off).
pub type Cutoffs = (Option<Micros>, Option<Micros>);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Days after which an execution's details are cleared (1 to `MAX_DAYS`); None: kept.
    pub details_days: Option<i64>,
    /// Days after which an execution is deleted (1 to `MAX_DAYS`); None: kept.
    pub executions_days: Option<i64>,
}

impl Retention {
    pub fn new(details_days: Option<i64>, executions_days: Option<i64>) -> Result<Retention> {
        for (name, v) in [("details_days", details_days), ("executions_days", executions_days)] {
            if let Some(d) = v.filter(|d| !(1..=MAX_DAYS).contains(d)) {
                return config_err(format!("retention[{name:?}] must be a whole number of days from 1 to {MAX_DAYS} (got {d})"));
            }
        }
        Ok(Retention { details_days, executions_days })
    }

    pub fn is_set(&self) -> bool {
        self.details_days.is_some() || self.executions_days.is_some()
    }

    /// (details before, executions before) as of `now`. Executions are deleted by whole days
    /// of the database's calendar `cal`: up to the start of the day `executions_days` ago, so
    /// the rows of a day are all kept or all gone (the store rounds the same way and records
    /// the day, `store::retention::Horizon`).
    pub fn cutoffs(&self, now: Micros, cal: &Calendar) -> Cutoffs {
        let day_start = |t: Micros| cal.start_of(cal.local_date(t));
        (self.details_days.map(|d| now - d * DAY), self.executions_days.map(|d| day_start(now - d * DAY)))
    }
}

/// Set at interpreter exit (`drain_tasks`): no batch starts after it.
static STOPPING: AtomicBool = AtomicBool::new(false);
/// Batches running now, so exit can wait for them to commit.
static RUNNING: AtomicUsize = AtomicUsize::new(0);

struct Running;

impl Running {
    fn enter() -> Option<Running> {
        RUNNING.fetch_add(1, Ordering::SeqCst);
        if STOPPING.load(Ordering::SeqCst) {
            RUNNING.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Running)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Stops retention work in this process: no batch starts after this, and a batch under way
/// gets up to `timeout` to commit.
pub fn stop(timeout: Duration) {
    STOPPING.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + timeout;
    while RUNNING.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Clears details of executions started before `details` and deletes those started before
/// `executions`, batch after batch, until nothing is left, `keep_going` says stop, or the
/// process is exiting. Between two batches it pauses at least `pause`, and longer after a batch
/// that took long (`pause_after`), so calls get the database (`tl.purge()` too, which passes
/// no pause). Where every write takes one lock (SQLite) batches are sized to hold it about
/// `BATCH_TIME`. Returns what it did.
pub fn purge(store: &dyn Store, cutoffs: Cutoffs, pause: Duration, keep_going: impl Fn() -> bool) -> Result<Purged> {
    paced(store, cutoffs, pause, keep_going, std::thread::sleep)
}

/// `purge`, pausing between two batches with `sleep`.
fn paced(store: &dyn Store, cutoffs: Cutoffs, pause: Duration, keep_going: impl Fn() -> bool, mut sleep: impl FnMut(Duration)) -> Result<Purged> {
    let (mut details, mut executions) = cutoffs;
    let mut total = Purged::default();
    let shares_one_lock = store.writes_share_one_lock();
    let mut limit = if shares_one_lock { MIN_BATCH } else { BATCH };
    while (details.is_some() || executions.is_some()) && keep_going() {
        let (started, waited) = (Instant::now(), lock_waits().1);
        // Executions first: clearing the details of rows still to be deleted would count them
        // in both (the first batches are small).
        let clearing = if executions.is_none() { details } else { None };
        let done = {
            let Some(_running) = Running::enter() else { break };
            store.purge_batch(clearing, executions, limit)?
        };
        // What the batch held the database for: its time less its wait for the lock.
        let held = started.elapsed().saturating_sub(lock_waits().1.saturating_sub(waited));
        total.details += done.details;
        total.executions += done.executions;
        // A kind whose batch came back short is done.
        if clearing.is_some() && done.details < limit {
            details = None;
        }
        if done.executions < limit {
            executions = None;
        }
        if shares_one_lock {
            limit = next_batch(limit, held);
        }
        if details.is_some() || executions.is_some() {
            sleep(pause_after(pause, held, shares_one_lock, done.in_use));
        }
    }
    Ok(total)
}

/// The pause after a batch that held the database for `held`: at least `pause`. Where writes
/// share one lock, at least as long as the batch held it, so that other writers (another
/// process's calls, which this process cannot see waiting) get the lock at least half the
/// time, and while the database is in use `IN_USE_PAUSE_PER_HELD` times as long. Elsewhere
/// `SERVER_PAUSE_PER_HELD` times as long while calls are admitted, and no longer otherwise.
fn pause_after(pause: Duration, held: Duration, shares_one_lock: bool, in_use: bool) -> Duration {
    let per_held = match (shares_one_lock, in_use) {
        (true, true) => IN_USE_PAUSE_PER_HELD,
        (true, false) => 1,
        (false, true) => SERVER_PAUSE_PER_HELD,
        (false, false) => 0,
    };
    pause.max(held * per_held)
}

/// The size of the batch after one of `limit` rows that held the database for `held`.
fn next_batch(limit: i64, held: Duration) -> i64 {
    let scaled = limit as f64 * BATCH_TIME.as_secs_f64() / held.as_secs_f64().max(1e-6);
    (scaled as i64).clamp(MIN_BATCH, MAX_BATCH)
}

/// How often the background thread runs (`INTERVAL_ENV`: seconds, 1 to 86400).
pub fn interval_from_env() -> Result<Duration> {
    match std::env::var(INTERVAL_ENV) {
        Err(_) => Ok(DEFAULT_INTERVAL),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if (1.0..=86_400.0).contains(&s) => Ok(Duration::from_secs_f64(s)),
            _ => config_err(format!("{INTERVAL_ENV} must be a number of seconds from 1 to 86400 (got {v:?})")),
        },
    }
}

/// Starts the background thread: it purges at once, then every `every`, until the returned
/// sender is dropped (with the engine) or the process exits. In a forked child the thread
/// does not exist; the child's own engine starts its own.
pub fn start(store: Arc<dyn Store>, retention: Retention, every: Duration) -> Option<mpsc::Sender<()>> {
    let (stop, stopped) = mpsc::channel::<()>();
    let started = std::thread::Builder::new().name("tenantllm-retention".into()).spawn(move || loop {
        // Engine dropped: `recv_timeout` says Disconnected and the loop ends.
        let alive = || matches!(stopped.try_recv(), Err(mpsc::TryRecvError::Empty));
        // A failure (a busy or unreachable database) is tried again at the next interval.
        let _ = store.timezone().and_then(|zone| Calendar::new(&zone)).and_then(|cal| purge(&*store, retention.cutoffs(now_micros(), &cal), PAUSE, alive));
        if !matches!(stopped.recv_timeout(every), Err(mpsc::RecvTimeoutError::Timeout)) {
            break;
        }
    });
    started.ok().map(|_| stop)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// For a store whose writes do not share one lock: a purge of `rows` old executions
    /// (already in `store`, all settled and started before `before`), in batches of `BATCH`,
    /// while `admit_call` (another session admitting a call) runs during the pauses after the
    /// batches `calls_after` lists (from 0). The pause after a batch is `per_held` times what
    /// it took when calls were admitted since the batch before it (or there is none: not known),
    /// and none otherwise. What `sleep` sees is no time (nothing here is timed) but the pauses
    /// asked for: zero, or not. A batch's time is what `sleep` sees between two pauses, less
    /// `admit_call`'s (a little more than the purge measured, more on a busy machine), so the
    /// long pauses must add up to half `per_held` times that at least.
    pub(crate) fn pauses_follow_calls(store: &dyn Store, rows: i64, before: Micros, per_held: u32, calls_after: &[usize], mut admit_call: impl FnMut()) {
        let mut pauses: Vec<(Duration, Duration)> = Vec::new();
        let mut since = Instant::now();
        let done = paced(store, (None, Some(before)), Duration::ZERO, || true, |pause| {
            pauses.push((since.elapsed(), pause));
            if calls_after.contains(&(pauses.len() - 1)) {
                admit_call();
            }
            since = Instant::now();
        })
        .unwrap();
        assert_eq!(done.executions, rows);
        assert_eq!(pauses.len() as i64, rows / BATCH, "{pauses:?}");
        for (i, (_, pause)) in pauses.iter().enumerate() {
            let long = i == 0 || calls_after.contains(&(i - 1));
            assert_eq!(!pause.is_zero(), long, "after batch {i} (calls after batches {calls_after:?}), (batch, pause after it): {pauses:?}");
        }
        let (took, paused) = pauses.iter().filter(|(_, p)| !p.is_zero()).fold((Duration::ZERO, Duration::ZERO), |(t, p), (took, pause)| (t + *took, p + *pause));
        assert!(paused >= took * per_held / 2, "(batch, pause after it): {pauses:?}");
    }

    #[test]
    fn days_out_of_range_are_refused_by_name() {
        assert!(Retention::new(Some(1), Some(MAX_DAYS)).is_ok());
        let e = Retention::new(Some(0), None).unwrap_err().to_string();
        assert!(e.contains("details_days") && e.contains("got 0"), "{e}");
        let e = Retention::new(None, Some(MAX_DAYS + 1)).unwrap_err().to_string();
        assert!(e.contains("executions_days"), "{e}");
        assert!(!Retention::default().is_set());
    }

    /// SQLite's rate limits log their admissions in the executions rows and read them up to two
    /// windows back: the shortest retention deletes none of those.
    #[test]
    fn no_retention_deletes_an_admission_a_rate_limit_still_reads() {
        let now = 1_800_000_000_000_000;
        let (_, deleted_before) = Retention::new(None, Some(1)).unwrap().cutoffs(now, &Calendar::new("UTC").unwrap());
        assert!(deleted_before.unwrap() < now - 2 * crate::ratelimit::MAX_WINDOW.as_micros() as Micros);
    }

    #[test]
    fn batches_are_sized_to_hold_the_database_about_batch_time() {
        assert_eq!(next_batch(500, BATCH_TIME * 10), 50);
        assert_eq!(next_batch(50, BATCH_TIME / 2), 100);
        assert_eq!(next_batch(500, Duration::ZERO), MAX_BATCH);
        assert_eq!(next_batch(MIN_BATCH, Duration::from_secs(1)), MIN_BATCH);
    }

    /// While calls write to SQLite, the purge has the lock 1/50 of the time; on an idle
    /// database half. PostgreSQL's server is busy with it 1/10 of the time while calls are
    /// admitted, and all of it when none are.
    #[test]
    fn the_pause_after_a_batch_is_sized_from_what_it_held() {
        let held = Duration::from_micros(300);
        assert_eq!(pause_after(Duration::ZERO, held, true, true), held * 49);
        assert_eq!(pause_after(Duration::ZERO, held, true, false), held);
        assert_eq!(pause_after(Duration::ZERO, held, false, true), held * 9);
        assert_eq!(pause_after(Duration::ZERO, held, false, false), Duration::ZERO);
        // The background thread's own pause is the least.
        assert_eq!(pause_after(PAUSE, held, true, true), PAUSE);
        assert_eq!(pause_after(PAUSE, held * 100, true, true), held * 4900);
        assert_eq!(pause_after(PAUSE, held, false, true), PAUSE);
        assert_eq!(pause_after(PAUSE, held * 100, false, false), PAUSE);
    }

    #[test]
    fn cutoffs_are_whole_days_before_now_and_executions_go_by_whole_days() {
        let r = Retention::new(Some(30), Some(3)).unwrap();
        let hours = |h: i64| h * 3_600_000_000;
        assert_eq!(r.cutoffs(100 * DAY + hours(5), &Calendar::new("UTC").unwrap()), (Some(70 * DAY + hours(5)), Some(97 * DAY)));
        // The day starts at midnight in the database's zone (UTC-5 in January).
        let t = chrono::DateTime::parse_from_rfc3339("2027-01-10T03:00:00Z").unwrap().timestamp_micros();
        let ny = chrono::DateTime::parse_from_rfc3339("2027-01-06T05:00:00Z").unwrap().timestamp_micros();
        assert_eq!(r.cutoffs(t, &Calendar::new("America/New_York").unwrap()).1, Some(ny));
    }
}
