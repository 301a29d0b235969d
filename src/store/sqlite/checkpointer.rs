//! The SQLite store's background checkpointer: it folds the WAL back into the database file
//! and starts it over, so that no call pays for it (issue 15).

use std::mem::ManuallyDrop;
use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::{busy_step, connect, lock_waits, BUSY_TIMEOUT};
use crate::error::{Error, Result};
use crate::process::{quiet, unpoisoned};

/// `SQLITE_FCNTL_FILE_POINTER`: the database file's file object.
const FCNTL_FILE_POINTER: c_int = 7;
/// `SQLITE_FCNTL_JOURNAL_POINTER`: the WAL's file object (in WAL mode).
const FCNTL_JOURNAL_POINTER: c_int = 28;

/// The file object of the file `which` names (`FCNTL_FILE_POINTER`, `FCNTL_JOURNAL_POINTER`):
/// the connection's own handle. (Never a descriptor of our own: closing any descriptor of the
/// database file drops every POSIX lock SQLite holds on it in this process.) It stays open
/// while `conn` is borrowed, and only the thread that owns `conn` may use it.
fn file_of(conn: &Connection, which: c_int) -> Option<*mut rusqlite::ffi::sqlite3_file> {
    let mut file: *mut rusqlite::ffi::sqlite3_file = std::ptr::null_mut();
    // SAFETY: this file control writes one pointer to a file object the connection owns.
    let rc = unsafe { rusqlite::ffi::sqlite3_file_control(conn.handle(), c"main".as_ptr(), which, (&mut file as *mut *mut rusqlite::ffi::sqlite3_file).cast()) };
    // SAFETY: a file object SQLite returned is valid; `pMethods` is null once it is closed.
    (rc == rusqlite::ffi::SQLITE_OK && !file.is_null() && unsafe { !(*file).pMethods.is_null() }).then_some(file)
}

/// Syncs the file `which` names through the connection's own handle (`file_of`). A sync more
/// than SQLite's own is always safe; false if it could not be made.
fn sync_file(conn: &Connection, which: c_int) -> bool {
    let _quiet = quiet();
    // SAFETY: `file_of`'s object, used by the thread that owns `conn`.
    file_of(conn, which).is_some_and(|file| unsafe { (*(*file).pMethods).xSync.is_some_and(|sync| sync(file, rusqlite::ffi::SQLITE_SYNC_NORMAL) == rusqlite::ffi::SQLITE_OK) })
}

fn sync_database_file(conn: &Connection) -> bool {
    sync_file(conn, FCNTL_FILE_POINTER)
}

/// How often the background thread folds a WAL that is not growing back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// How soon it looks again after calls wrote: short, frequent passes keep each pass's fsync
/// small, and the restart that follows has little left to copy.
const CATCH_UP_EVERY: Duration = Duration::from_millis(10);
/// WAL frames (pages) past which the checkpointer makes writers start the WAL over. Under
/// writes that never pause each restart makes one call wait (1-8 ms here): no restart can
/// hold writes for less than its copy and two fsyncs. Restarting less often would make fewer
/// calls wait (at 8,000 frames one in ~570, not ~150), but every write would pay more: SQLite's
/// WAL index hashes each frame by its page, and the pages every call rewrites make probe chains
/// that grow with the frames since the WAL started over (`walIndexAppend` ran ~11K instructions
/// a call at 2,000 frames, ~39K at 8,000: +5 % a call). A pause in the writes as long as a pass
/// and its syncs lets SQLite start the WAL over by itself, with no call waiting.
const WAL_RESTART_FRAMES: i64 = 2000;
/// Frames a restart may find still to copy: the catch-up passes before it aim below this.
/// Calls wait while the restart syncs what it copies, and a sync takes longer the more it
/// writes (on this machine's disk 1 page ~1 ms, 64 ~5 ms, 256 ~8 ms, 1024 ~19 ms, loaded).
const RESTART_LEFTOVER_FRAMES: i64 = 64;
/// Frames a restart may copy with this process's writes held: what was written since the last
/// pass ended, a handful while calls write back to back. More were written while that pass ran
/// (it was long), and another pass copies them first.
const RESTART_COPY_FRAMES: i64 = 256;
/// At most this many catch-up passes: writers faster than the disk would outrun any number.
const CATCH_UP_PASSES: usize = 8;
/// How soon the checkpointer tries again after a restart could not be made (a long read was
/// still in the WAL), so it catches the gap before the next one.
const RESTART_RETRY_EVERY: Duration = Duration::from_millis(10);
/// How long a restart below the cap may wait for locks in all: for the write under way to
/// end, and for a read that began since the last pass. It holds this process's writes and
/// SQLite's write lock meanwhile, so this bounds how long any call can wait behind it (with
/// the copy and syncs of the frames left).
const RESTART_WAIT: Duration = Duration::from_millis(3);
/// How long forks may interrupt the checkpointer's passes with none made whole: then one is,
/// and the forks meanwhile wait for it (`run_checkpoint`).
const FORK_INTERRUPTS_FOR: Duration = Duration::from_secs(1);
/// The WAL's cap (bytes). Past it, writes are held while a checkpoint runs in any process
/// (`hold_back`, `HOLD_WAIT` at most each time), and a restart is tried once the frames a read
/// pins are few (`RESTART_COPY_FRAMES`, a read that just began), not only when no read pins
/// any. No write waits longer on it: reads that overlap with no gap between them (two
/// dashboards, a backup next to a scan, a scan begun again as the last one ends) leave no
/// moment when no read uses the WAL, and SQLite cannot start over a WAL a read uses. Only
/// holding every write until a whole read has ended would restart it: that made calls wait up
/// to 1 s (1.1-1.6 s under back-to-back reads of 1 s, which foil it anyway). The WAL grows while
/// such reads go on, and starts over in the first gap between them that the passes reach.
const WAL_CAP_BYTES: i64 = 64 << 20;
/// A WAL file larger than this (bytes) is cut back to it once writes pause for a round
/// (`cut_back`): long reads make it grow. Never while calls write: SQLite's own limit
/// (`journal_size_limit`) makes the first call after each restart cut the file back, an
/// ftruncate of 4 to 84 ms measured on the calling thread with the write lock held.
const WAL_KEEP_BYTES: u64 = 16 << 20;
/// The most a step of a cut back cuts off the WAL file (bytes), with writes held. An ftruncate
/// on this machine's disk takes 2-8 ms whatever it frees (ext4's journal), and more the more it
/// frees: the whole file at once (`wal_checkpoint(TRUNCATE)`, which the cut back was) took 3-8 ms
/// for 8 MB, 11-47 ms for 32 and 64 MB, 67-84 ms for 200 MB (load 2.5); 4 MB at a time at most
/// 4-10 ms a step, 1 or 2 MB no less.
const CUT_STEP_BYTES: i64 = 4 << 20;
/// Writes are free this long between two steps of a cut back.
const CUT_PAUSE: Duration = Duration::from_millis(2);
/// The WAL file's header and each frame's header (bytes): frame n (from 1) ends at
/// `WAL_HEADER + n * (FRAME_HEADER + page size)`.
const WAL_HEADER: i64 = 32;
const FRAME_HEADER: i64 = 24;
/// The first region of SQLite's WAL index (`WALINDEX_PGSZ`, bytes), which begins with its
/// header: two copies of 48 bytes, each with the frames in the WAL (`mxFrame`, a u32 in the
/// machine's order) at byte 16 (the WAL format, documented and stable: `walformat.html`).
const WAL_INDEX_REGION: c_int = 32768;
const WAL_INDEX_HEADER: usize = 48;
const WAL_INDEX_FRAMES: usize = 16;

/// SQLite's answer (`news`) to `PRAGMA wal_checkpoint(mode)` on the checkpointer's connection;
/// `wait` bounds the time it waits for locks in all. Inside the fork gate: a fork waits for one
/// checkpoint at most, not for a round of them. A passive pass that copies a large WAL (seconds
/// on a busy disk after a long read; SQLite cannot copy it in parts) is interrupted by a fork
/// instead (`interrupt_for_fork`): the fork waits for one page's copy, or for the sync of the
/// WAL before the copy or of the database file after it, which SQLite does not interrupt. The
/// pass then answers an error, no news, and its copy counts for nothing (SQLite records what a
/// pass copied only once it copied all): the next round copies again. Not once passes were
/// interrupted for `FORK_INTERRUPTS_FOR`, until the WAL starts over or is small again: forks
/// that come again and again (a pool whose workers each run one task) would otherwise stop
/// every pass, and the WAL would never be copied or start over; a burst of forks (a pool
/// starting its workers) waits for no pass. Not a
/// restart either: it holds this process's writes for a few frames' copy, and interrupted would
/// have held them for nothing.
fn run_checkpoint(conn: &Connection, shared: &WalShared, mode: &str, wait: Duration) -> Option<(bool, i64, i64)> {
    let _quiet = quiet();
    CHECKPOINT_DEADLINE.set(Instant::now() + wait);
    shared.in_pass.store(true, Ordering::Relaxed);
    let interruptible = mode == "PASSIVE" && INTERRUPTED_SINCE.get().is_none_or(|since| since.elapsed() < FORK_INTERRUPTS_FOR);
    *unpoisoned(shared.interruptible.lock()) = interruptible;
    let done = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| Ok((r.get::<_, i64>(0)? != 0, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)));
    // From here on no fork interrupts this connection: an interrupt that came as the pass
    // ended leaves SQLite's flag set, and the next statement clears it as it begins.
    *unpoisoned(shared.interruptible.lock()) = false;
    shared.in_pass.store(false, Ordering::Relaxed);
    let interrupted = matches!(&done, Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted));
    // Forks may interrupt passes again only once the WAL started over or is small: ended by any
    // pass made whole, forks that come faster than a pass (a pool forking per task, at steady
    // writes) would interrupt every catch-up pass after it, and the WAL would never start over.
    let settled = matches!(&done, Ok((busy, frames, _)) if (mode != "PASSIVE" && !busy) || (0..=WAL_RESTART_FRAMES).contains(frames));
    INTERRUPTED_SINCE.set(match (interrupted, settled) {
        (true, _) => INTERRUPTED_SINCE.get().or(Some(Instant::now())),
        (false, true) => None,
        (false, false) => INTERRUPTED_SINCE.get(),
    });
    #[cfg(test)]
    shared.interrupted_passes.fetch_add(usize::from(interrupted), Ordering::Relaxed);
    news(done)
}

/// Makes every fork of this process interrupt the checkpointer's passive pass under way, if
/// any (see `run_checkpoint`), through `conn`'s interrupt handle: it outlives the connection
/// safely (an interrupt after the close does nothing) and takes no lock a fork could wait for
/// long (`WalShared::interruptible` is held for no wait; the handle's own lock for the close).
/// The checkpoint's own statement only: `interruptible` is true only around it, and SQLite
/// clears an interrupt as the connection's next statement begins.
fn interrupt_for_fork(conn: &Connection, wal: &Arc<WalShared>) -> crate::process::OnFork {
    let handle = conn.get_interrupt_handle();
    let wal = Arc::clone(wal);
    crate::process::on_fork(move || {
        let interruptible = unpoisoned(wal.interruptible.lock());
        if *interruptible {
            handle.interrupt();
        }
    })
}

/// The frames in the WAL by SQLite's WAL index (its header's `mxFrame`), read through the
/// connection's own mapping of the index: nothing is opened or closed. Exact while the caller
/// holds SQLite's write lock: SQLite adds frames and starts the WAL over only with it held.
/// None if it could not be read or its two copies differ.
fn frames_in_use(conn: &Connection) -> Option<i64> {
    let file = file_of(conn, FCNTL_FILE_POINTER)?;
    let mut region: *mut c_void = std::ptr::null_mut();
    // SAFETY: `file_of`'s object, used by the thread that owns `conn`. `xShmMap` (methods of
    // version 2 and later) with `extend` 0 returns the mapping the connection has in WAL mode,
    // which stays mapped while the connection lives; both reads are inside its first region,
    // aligned (the mapping is page-aligned, the offsets multiples of 4).
    unsafe {
        let methods = &*(*file).pMethods;
        let map = methods.xShmMap.filter(|_| methods.iVersion >= 2)?;
        if map(file, 0, WAL_INDEX_REGION, 0, &mut region) != rusqlite::ffi::SQLITE_OK || region.is_null() {
            return None;
        }
        let at = |offset: usize| std::ptr::read_volatile(region.cast::<u8>().add(offset).cast::<u32>());
        let (first, second) = (at(WAL_INDEX_FRAMES), at(WAL_INDEX_HEADER + WAL_INDEX_FRAMES));
        (first == second).then_some(i64::from(first))
    }
}

/// What one step of a cut back found.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Step {
    /// It cut this many bytes off the WAL file (0: it started the WAL over).
    Cut(i64),
    /// The file ends at `WAL_KEEP_BYTES` or at the frames in use: nothing more to cut.
    Done,
    /// The frames in use (the WAL's last run, all copied) reach past `WAL_KEEP_BYTES`: the WAL
    /// must start over before they can be cut.
    InUse,
    /// SQLite's write lock could not be had in time, or a write came since the last step: the
    /// rest waits for the next pause.
    Stop,
}

/// Cuts an idle WAL file back to `WAL_KEEP_BYTES`, `CUT_STEP_BYTES` at a time, each step with
/// this process's writes held (`gate`) and SQLite's write lock taken (`RESTART_WAIT` at most to
/// get it) and inside the fork gate, `CUT_PAUSE` apart. So no write, and no fork, waits for
/// more than one step, whatever the WAL's size: `wal_checkpoint(TRUNCATE)` cut the whole file
/// at once with SQLite's write lock held (the first call after it 14 ms, others 1-9).
/// Safe as SQLite's own `journal_size_limit` (`walLimitSize`): it cuts only past the frames in
/// use, read from the WAL index with the write lock held. Readers read no frame past those
/// (a read's frames are the WAL's as the read began, at most those now); no writer can add one
/// while the lock is held; recovery reads frames from the start and stops at the first that is
/// cut or of an earlier run. Frames of the WAL's last run, all copied, that reach past the size
/// kept are only cut once the WAL started over (`start_over`). Stops when a write comes, also
/// before the first step: `frames`, the frames the round found all copied. (A write under way
/// grows the file before its frames count: a restart then would copy them with writes held.)
/// Nor does it wait for a write of this process under way: the WAL is not idle.
fn cut_back(conn: &Connection, shared: &WalShared, page: i64, frames: i64) {
    let (mut seen, mut started_over) = (Some(frames), false);
    loop {
        let step = {
            let _quiet = quiet();
            let Some(_held) = super::try_locked(&shared.gate) else {
                return;
            };
            let step = match cut_step(conn, page, &mut seen) {
                Step::InUse if !started_over => {
                    started_over = start_over(conn, shared);
                    seen = None;
                    if started_over { Step::Cut(0) } else { Step::Stop }
                }
                step => step,
            };
            #[cfg(test)]
            if let Step::Cut(bytes) = step {
                unpoisoned(shared.cut_steps.lock()).push((bytes, crate::process::quiet_depth()));
            }
            step
        };
        if !matches!(step, Step::Cut(_)) || shared.stopped.load(Ordering::Acquire) {
            return;
        }
        std::thread::sleep(CUT_PAUSE);
    }
}

/// One step of `cut_back`, the write gate held: takes SQLite's write lock, cuts at most
/// `CUT_STEP_BYTES` off the WAL file's end, never into the frames in use nor below
/// `WAL_KEEP_BYTES`, and lets the lock go (nothing was written). `seen`: the frames in use at
/// the last step, which a write since would have changed.
fn cut_step(conn: &Connection, page: i64, seen: &mut Option<i64>) -> Step {
    CHECKPOINT_DEADLINE.set(Instant::now() + RESTART_WAIT);
    if conn.execute_batch("BEGIN IMMEDIATE").is_err() {
        return Step::Stop;
    }
    let step = (|| {
        let in_use = frames_in_use(conn)?;
        if seen.replace(in_use).is_some_and(|before| before != in_use) {
            return Some(Step::Stop);
        }
        let (end, keep) = (WAL_HEADER + in_use * (FRAME_HEADER + page), WAL_KEEP_BYTES as i64);
        let wal = file_of(conn, FCNTL_JOURNAL_POINTER)?;
        let mut size: i64 = 0;
        // SAFETY: `file_of`'s object, used by the thread that owns `conn`.
        let methods = unsafe { &*(*wal).pMethods };
        (unsafe { methods.xFileSize?(wal, &mut size) } == rusqlite::ffi::SQLITE_OK).then_some(())?;
        if size <= end.max(keep) {
            return Some(if size > keep { Step::InUse } else { Step::Done });
        }
        let to = end.max(keep).max(size - CUT_STEP_BYTES);
        // SAFETY: as above; SQLite truncates the WAL file through the same call (`walLimitSize`).
        (unsafe { methods.xTruncate?(wal, to) } == rusqlite::ffi::SQLITE_OK).then_some(Step::Cut(size - to))
    })()
    .unwrap_or(Step::Stop);
    let _ = conn.execute_batch("ROLLBACK");
    step
}

/// Starts an idle WAL over, the write gate held, so that `cut_back` can cut the frames of its
/// last run: a restart (one try, `RESTART_WAIT` for locks at most; all is copied, so it copies
/// nothing) makes sure no read uses the WAL, then a write that changes nothing (the database's
/// `user_version` set to itself) begins the WAL's next run, as SQLite begins one for any write
/// once the WAL is copied whole and no read uses it (`walRestartLog`); the reads that began
/// since then read the database file, not the WAL. Not if a write came in between. True if it
/// wrote.
fn start_over(conn: &Connection, shared: &WalShared) -> bool {
    let Some((false, frames, copied)) = run_checkpoint(conn, shared, "RESTART", RESTART_WAIT) else {
        return false;
    };
    CHECKPOINT_DEADLINE.set(Instant::now() + RESTART_WAIT);
    if copied != frames || conn.execute_batch("BEGIN IMMEDIATE").is_err() {
        return false;
    }
    let written = (frames_in_use(conn) == Some(frames))
        .then(|| conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)))
        .and_then(|version| version.ok())
        .is_some_and(|version| conn.execute_batch(&format!("PRAGMA user_version = {version}; COMMIT")).is_ok());
    if !written {
        let _ = conn.execute_batch("ROLLBACK");
    }
    written
}

/// Checkpoints the WAL from a thread of its own, so no call pays for copying pages and the
/// fsync that follows (calls' connections have auto-checkpointing off). PASSIVE never
/// blocks writers or readers; several processes may each run one. Under sustained writes a
/// passive checkpoint never catches up, so past a size a RESTART checkpoint copies the few
/// frames the catch-up passes left and lets the WAL begin again, which keeps it (and page
/// lookups in it) small. A restart needs SQLite's write lock, which writes back to back leave
/// free for microseconds (it hardly ever got it, and under one fast writer the WAL grew without
/// bound, 350-450 MB); so it holds `WalShared::gate` (every write of this process holds it
/// while it runs), which it gets once the write under way has ended, and no other begins. Other processes'
/// writers wait in their busy handler. It waits at most `RESTART_WAIT` for locks in all; the frames left to
/// copy and the two fsyncs that go with them are what calls wait for, so it copies
/// `RESTART_COPY_FRAMES` at most (more were written while a long pass ran: another pass copies
/// them first, with no call waiting). It is only tried when the
/// last passive pass could copy nearly the whole WAL: when it could not, a read (a backup, a
/// dashboard scan) still uses the WAL, and a restart would wait for it with every writer waiting
/// behind (it used to, holding this process's writer, for up to SQLite's 30 s busy timeout). The
/// WAL grows while such reads last; the checkpointer then looks every `RESTART_RETRY_EVERY` for
/// the gap after one (past `WAL_CAP_BYTES`, also for a read that pins few frames). A restart
/// that found a read still in the WAL is not tried again until the reads turn over.
/// So no write waits on the checkpointer longer than `HOLD_WAIT` before it begins, and then
/// `RESTART_WAIT` for locks, the copy of `RESTART_COPY_FRAMES` frames at most and two fsyncs
/// if a restart holds the gate: 3-12 ms on this machine's disk.
/// Each checkpoint, sync and step of a cut back runs inside the fork gate, not the whole round
/// (a fork waited for a round: 29-45 ms after an 80 MB write; now 5-19 ms), and a fork
/// interrupts a passive pass under way (`run_checkpoint`).
pub(super) fn spawn_checkpointer(path: &str, wal: Arc<WalShared>) -> Result<Checkpointer> {
    let conn = connect(path)?;
    conn.busy_handler(Some(checkpoint_busy_wait))?;
    let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let cap_frames = WAL_CAP_BYTES / page.max(512);
    wal.cap_frames.store(cap_frames, Ordering::Relaxed);
    #[cfg(target_os = "linux")]
    let _ = super::ofd_locks::inode_of_path(&format!("{path}-shm")).map(|shm| wal.shm.set(shm));
    let wal_file = format!("{path}-wal");
    let on_fork = interrupt_for_fork(&conn, &wal);
    // Closed inside the fork gate like every other use of SQLite.
    let conn = ManuallyDrop::new(conn);
    let shared = Arc::clone(&wal);
    let thread = std::thread::Builder::new()
        .name("tenantllm-checkpoint".into())
        .spawn(move || {
            let checkpoint = |mode: &str, wait: Duration| run_checkpoint(&conn, &shared, mode, wait);
            // A passive checkpoint: (frames in the WAL, frames copied), or no news.
            let pass = || checkpoint("PASSIVE", Duration::ZERO).map(|(_, frames, copied)| (frames, copied));
            // A restart, with this process's writes held (`gate`) by the caller: one try,
            // `RESTART_WAIT` for locks at most; the frames the WAL held once made.
            let restart = || {
                match checkpoint("RESTART", RESTART_WAIT) {
                    Some((false, frames, _)) => Some(frames),
                    _ => None,
                }
            };
            let mut wait = CHECKPOINT_EVERY;
            // The frames copied when a restart last found a read still in the WAL: no restart
            // is tried again until the copied frames move on (that read ended), so that writes
            // are not held every round for a read that goes on.
            let mut failed_at: Option<i64> = None;
            // (frames in the WAL, frames copied) as the last round left them; none before the
            // first round and after a restart, when there is nothing to compare with.
            let mut last: Option<(i64, i64)> = None;
            // The WAL's frames when this thread last restarted it. A restart leaves them in the
            // WAL's header until the next write starts the WAL over, so until then every pass
            // reports that many, all copied: read as such, an idle WAL would be restarted again
            // (two fsyncs and the write gate) every `CATCH_UP_EVERY` for as long as nobody wrote.
            let mut restarted_at: Option<i64> = None;
            loop {
                std::thread::park_timeout(wait);
                if shared.stopped.load(Ordering::Acquire) {
                    break;
                }
                // Another process's checkpointer is at work: no restart of ours could be made
                // meanwhile, so no write waits for one. (Or a fork interrupted the pass: the
                // next round, `RESTART_RETRY_EVERY` on, copies again.)
                // What this round sees goes with the commits made before it looked.
                let mut commits = shared.commits();
                let Some((mut frames, mut copied)) = pass() else {
                    shared.stalled.store(true, Ordering::Relaxed);
                    wait = RESTART_RETRY_EVERY;
                    continue;
                };
                // The frames SQLite's header says the WAL holds, for the cut back.
                let in_header = frames;
                // Nothing written since this thread restarted the WAL: it is empty. (A new WAL
                // of exactly as many frames would only wait for the next round.)
                if restarted_at == Some(frames) && copied == frames {
                    (frames, copied) = (0, 0);
                }
                // No frames since the last round, which came `CHECKPOINT_EVERY` after a round.
                let unchanged = last.is_some_and(|(before, _)| before == frames);
                let paused = unchanged && wait == CHECKPOINT_EVERY;
                wait = if unchanged { CHECKPOINT_EVERY } else { CATCH_UP_EVERY };
                if frames <= WAL_RESTART_FRAMES {
                    let oversized = std::fs::metadata(&wal_file).is_ok_and(|m| m.len() > WAL_KEEP_BYTES);
                    if paused && copied == frames && oversized {
                        // Whether it cut all, stopped for a write or started the WAL over with
                        // a write of its own, the next rounds look again: what this round saw
                        // may be stale (a write may have committed meanwhile, and told the
                        // writes how many frames the WAL holds).
                        cut_back(&conn, &shared, page, in_header);
                        (last, restarted_at) = (None, None);
                        continue;
                    }
                    last = Some((frames, copied.min(frames)));
                    failed_at = None;
                    shared.seen(frames, false, commits);
                    continue;
                }
                // Catch up without blocking anyone: each pass copies what writers appended
                // during the previous one, so the restart has little left to copy and sync
                // while writers wait (one pass left ~17 ms of it; this leaves ~2 ms). Until a
                // pass leaves no fewer frames than the one before: more passes cannot catch up
                // with a writer faster than their copies and syncs, and the WAL grows meanwhile.
                let mut appended = i64::MAX;
                for _ in 0..CATCH_UP_PASSES {
                    let Some((now, done)) = pass() else {
                        break;
                    };
                    let before = std::mem::replace(&mut appended, now - frames);
                    (frames, copied) = (now, done);
                    if appended < RESTART_LEFTOVER_FRAMES || appended >= before {
                        break;
                    }
                }
                // All copied but what a write under way (or just committed: its read mark is
                // still taken as a pass ends) or a read that just began holds back; past the
                // cap, up to `RESTART_COPY_FRAMES` of it (a read that began a little earlier).
                let leftover = if frames > cap_frames { RESTART_COPY_FRAMES } else { RESTART_LEFTOVER_FRAMES };
                let (restarted, stalled) = if frames - copied < leftover && failed_at != Some(copied) {
                    // Whether a restart now would copy few enough frames, with the gate held.
                    // The WAL holds as many as this process's last commit left (exact: no
                    // write of this process is under way), or as the last pass saw (another
                    // process's commits).
                    let small = |frames: i64, copied: i64| {
                        let frames = shared.frames.load(Ordering::Relaxed).max(frames);
                        frames - copied <= RESTART_COPY_FRAMES
                    };
                    let mut passes = CATCH_UP_PASSES;
                    loop {
                        // The restart copies what was written since the last pass began, syncs
                        // the WAL before and the database file after, with calls waiting. So
                        // first sync the database file (the passes that could not copy all
                        // left it unsynced: a long one, seconds' worth on a busy disk), then
                        // pass once more (it syncs the WAL first), then hold the writes: the
                        // restart copies and syncs only what was written during that pass.
                        // (Syncing both files, then holding the writes, left it what was written
                        // during both syncs: 1,881 ms once after a long pass on a busy disk.)
                        sync_database_file(&conn);
                        let Some(now) = pass() else {
                            break (None, true); // another process's checkpointer
                        };
                        (frames, copied) = now;
                        if frames - copied >= leftover {
                            break (None, true); // a read began
                        }
                        // The fork gate before the write gate, as writes take them.
                        let inside = quiet();
                        let held = unpoisoned(shared.gate.lock());
                        // More than `RESTART_COPY_FRAMES` were written during that pass (a long
                        // one): another pass copies them first, with no call waiting (writers
                        // faster than the disk are held past `HOLD_FRAMES`, and past the cap
                        // during every pass). Past the cap too: calls would wait for the copy.
                        if small(frames, copied) {
                            let made = restart();
                            if made.is_some() {
                                // No commit of this process while the gate is held: the
                                // restart's empty WAL goes with the commits made so far.
                                commits = shared.commits();
                            }
                            #[cfg(test)]
                            shared.restart_holds.fetch_add(1, Ordering::Relaxed);
                            #[cfg(test)]
                            let _ = made.map(|made| unpoisoned(shared.restart_copies.lock()).push((made, made - copied)));
                            // A read in the WAL: not again until it ended.
                            failed_at = made.is_none().then_some(copied);
                            break (made, made.is_none());
                        }
                        drop(held);
                        drop(inside);
                        // Not a read that holds the WAL back: writes past `HOLD_FRAMES` wait.
                        shared.stalled.store(false, Ordering::Relaxed);
                        if passes == 0 {
                            break (None, false);
                        }
                        passes -= 1;
                    }
                } else {
                    // A read pins the WAL. Once it ends, the restart must come before the next
                    // read begins (back-to-back reads leave a few ms), so the pass that copies
                    // what was written meanwhile must be short, and SQLite's sync of the WAL
                    // (all written since its last pass: up to 100 MB a second of reads) was
                    // most of it: sync it now, a little each round. (Not when nothing was
                    // written since the last round, which synced it: a read that stays with
                    // writes paused would fsync an unchanged file every `RESTART_RETRY_EVERY`.)
                    if !unchanged {
                        sync_file(&conn, FCNTL_JOURNAL_POINTER);
                        #[cfg(test)]
                        shared.wal_syncs.fetch_add(1, Ordering::Relaxed);
                    }
                    (None, true)
                };
                restarted_at = restarted;
                last = restarted.is_none().then_some((frames, copied));
                shared.seen(if restarted.is_some() { 0 } else { frames }, stalled, commits);
                if restarted.is_none() {
                    wait = RESTART_RETRY_EVERY; // a read still uses the WAL, or writes outran the passes
                }
            }
            drop(on_fork);
            let _quiet = quiet();
            drop(ManuallyDrop::into_inner(conn));
        })
        .map_err(|e| Error::Store(format!("cannot start the checkpoint thread: {e}")))?;
    let _ = wal.thread.set(thread.thread().clone());
    Ok(Checkpointer(wal))
}

/// What SQLite's answer to `PRAGMA wal_checkpoint` says: (busy, frames in the WAL, frames
/// copied), or none when it brings no news: an error, or a checkpoint that could not begin
/// because another connection's holds SQLite's checkpoint lock (another process's checkpointer
/// in a pass), when SQLite says -1 and -1. Read as counts, those made a WAL of -1 frames (an
/// error, of 0): this process's count went to -1 between its commits, and the restart took the
/// gate, deferred and synced the database file 8 times a round, then let writes wait past
/// `HOLD_FRAMES` for a restart it could not make (with two processes calling back to back, all
/// of 68-95 deferrals a process in 6,000 calls); an error let writes past the cap go unheld.
fn news(answer: rusqlite::Result<(bool, i64, i64)>) -> Option<(bool, i64, i64)> {
    answer.ok().filter(|&(_, frames, _)| frames >= 0)
}

/// WAL frames past which this process's writes wait for the checkpointer to restart the WAL
/// (~31 MB of 4 kB pages), while restarts succeed. The checkpointer's passes sync what they copy,
/// and a writer faster than that grows the WAL while one does (one sync of 330 ms on a loaded
/// disk let one unpaced writer grow it to 71 MB): writes waiting here bound it whatever the disk.
const HOLD_FRAMES: i64 = 4 * WAL_RESTART_FRAMES;
/// How long a write waits for that (and past the cap for a checkpoint under way) at most: a few
/// ms, so writes are slowed (to ~500 a second while the checkpointer is behind), not stopped
/// for a pass. A pass that copies and syncs a large WAL takes 0.1 s to seconds on a busy disk,
/// and writes waited for it, and for the restart after it, up to 1 s each (2 s for a call's
/// admission and settlement).
const HOLD_WAIT: Duration = Duration::from_millis(2);
/// How often a waiting write looks whether the WAL started over.
const HOLD_STEP: Duration = Duration::from_micros(250);

/// SQLite's checkpoint lock: byte 121 of the WAL index (`WALINDEX_LOCK_OFFSET` 120, plus
/// `WAL_CKPT_LOCK` 1), held by every checkpoint while it runs.
#[cfg(target_os = "linux")]
const CHECKPOINT_LOCK_BYTE: i64 = 121;

/// What this process's writes share with its checkpointer.
#[derive(Default)]
pub(super) struct WalShared {
    /// Every write of this process holds it while it runs (`SqliteStore::write`); the
    /// checkpointer holds it to restart the WAL between two writes. (Held only until the write
    /// took the writer, the write under way when the checkpointer took it made the restart
    /// wait for SQLite's write lock, sleeping in its busy handler 250 us at a time with writes
    /// held, and the call that wrote it waited in its own busy handler for the restart: one
    /// wait of 4-5 ms per 9,000 calls. Its frames were also unknown to the restart.)
    pub(super) gate: Mutex<()>,
    /// Frames in the WAL after the writer's last commit (SQLite's WAL hook, `install`) or as
    /// the checkpointer last saw them (0 once it restarted the WAL).
    frames: AtomicI64,
    /// This process's commits so far (the WAL hook), held while `frames` is written: the
    /// checkpointer's view of `frames` is stored only if no commit came since it looked (`seen`).
    commits: Mutex<u64>,
    /// The checkpointer's last restart failed or could not be tried (a read still uses the
    /// WAL): writes do not wait past `HOLD_FRAMES`, the WAL's cap handles reads.
    stalled: AtomicBool,
    /// The WAL's cap in frames (`WAL_CAP_BYTES`); none until the checkpointer starts.
    cap_frames: AtomicI64,
    /// A checkpoint of this process's checkpointer is under way.
    in_pass: AtomicBool,
    /// A passive pass is under way that a fork may interrupt (`run_checkpoint`). A lock, not
    /// an atomic: a fork's interrupt must not land after the pass (on the next statement).
    interruptible: Mutex<bool>,
    /// The WAL index (`-shm`) file's inode, whose `CHECKPOINT_LOCK_BYTE` tells whether another
    /// process's checkpoint is under way; none until the checkpointer starts.
    #[cfg(target_os = "linux")]
    shm: OnceLock<super::ofd_locks::Inode>,
    /// The checkpointer's thread. A commit that grows the WAL past `WAL_RESTART_FRAMES` wakes
    /// it: writes that begin after a pause would otherwise have all its pause between two rounds
    /// (`CHECKPOINT_EVERY`; one unpaced writer grew the WAL to 89 MB in that time).
    thread: OnceLock<Thread>,
    /// The store closed: the checkpointer ends.
    stopped: AtomicBool,
    /// The frames in the WAL at each restart that followed the passes, and those it copied
    /// with writes held.
    #[cfg(test)]
    restart_copies: Mutex<Vec<(i64, i64)>>,
    /// The checkpoints a fork interrupted.
    #[cfg(test)]
    interrupted_passes: std::sync::atomic::AtomicUsize,
    /// The restarts tried with writes held (`gate`).
    #[cfg(test)]
    restart_holds: std::sync::atomic::AtomicUsize,
    /// The checkpointer's syncs of the WAL while a read pinned it.
    #[cfg(test)]
    wal_syncs: std::sync::atomic::AtomicUsize,
    /// Each step of a cut back that cut: (bytes cut, how deep the fork gate was entered).
    #[cfg(test)]
    cut_steps: Mutex<Vec<(i64, usize)>>,
}

impl WalShared {
    /// Before a write begins: past `HOLD_FRAMES`, unless restarts are stalled, waits until the
    /// checkpointer restarted the WAL; past the WAL's cap, while a checkpoint runs, waits for
    /// it to end; `HOLD_WAIT` at most in all (a lock wait), then writes anyway. Held a few ms
    /// each time, again and again while the checkpointer is behind, writers are slowed (to
    /// ~500 writes a second each), not stopped for a pass: a pass past the cap copies and syncs
    /// at the disk's pace (3.2 s once, loaded), and writes waited for it up to 1 s each.
    pub(super) fn hold_back(&self) {
        let frames = || self.frames.load(Ordering::Relaxed);
        let behind = || frames() > HOLD_FRAMES && !self.stalled.load(Ordering::Relaxed);
        let past_cap = || frames() > self.cap_frames.load(Ordering::Relaxed) && self.checkpoint_under_way();
        if !behind() && !past_cap() {
            return;
        }
        self.thread.get().map(Thread::unpark);
        let started = Instant::now();
        while (behind() || past_cap()) && started.elapsed() < HOLD_WAIT {
            std::thread::sleep(HOLD_STEP);
        }
        lock_waits::record(true, started.elapsed());
    }

    /// A checkpoint is under way: this process's checkpointer's, or another's (another process's
    /// checkpointer, which holds SQLite's checkpoint lock while it copies and syncs). Past the cap
    /// writes wait for either: while another process's pass ran, this one's were busy and writes
    /// past the cap went on at full speed, each process holding only its own.
    fn checkpoint_under_way(&self) -> bool {
        #[cfg(target_os = "linux")]
        let elsewhere = || self.shm.get().is_some_and(|&shm| super::ofd_locks::locked_elsewhere(shm, CHECKPOINT_LOCK_BYTE));
        #[cfg(not(target_os = "linux"))]
        let elsewhere = || false;
        self.in_pass.load(Ordering::Relaxed) || elsewhere()
    }

    /// The checkpointer saw `frames` in the WAL at the end of a round, as it was when this
    /// process had made `commits` commits; `stalled`: it could not restart it. A commit since
    /// told the writes the frames after it, which the checkpointer's view must not replace: a
    /// 48 MB write's count replaced by a round's stale 2 frames let the next writes go unheld.
    fn seen(&self, frames: i64, stalled: bool, commits: u64) {
        let made = unpoisoned(self.commits.lock());
        if *made == commits {
            self.frames.store(frames, Ordering::Relaxed);
        }
        drop(made);
        self.stalled.store(stalled, Ordering::Relaxed);
    }

    /// This process's commits so far: what a round's view of the WAL goes with (`seen`).
    fn commits(&self) -> u64 {
        *unpoisoned(self.commits.lock())
    }

    /// Makes `conn`'s commits wake the checkpointer (`thread`). `self` must outlive `conn`, and
    /// `conn` must not set `wal_autocheckpoint` afterwards (it replaces the hook).
    pub(super) fn install(&self, conn: &Connection) {
        // SAFETY: the hook reads `self` through the pointer, which the caller keeps valid while
        // the connection lives.
        unsafe { rusqlite::ffi::sqlite3_wal_hook(conn.handle(), Some(on_commit), (self as *const WalShared).cast_mut().cast()) };
    }
}

/// SQLite's WAL hook: called after each commit of the connection with the frames in the WAL.
unsafe extern "C" fn on_commit(wal: *mut c_void, _db: *mut rusqlite::ffi::sqlite3, _name: *const c_char, frames: c_int) -> c_int {
    // SAFETY: `install` was given a `WalShared` that outlives the connection.
    let wal = unsafe { &*(wal as *const WalShared) };
    let frames = i64::from(frames);
    let mut commits = unpoisoned(wal.commits.lock());
    *commits += 1;
    let before = wal.frames.swap(frames, Ordering::Relaxed);
    drop(commits);
    // Once as it passes (it falls back when the WAL starts over), not at every commit after.
    if before <= WAL_RESTART_FRAMES && frames > WAL_RESTART_FRAMES {
        wal.thread.get().map(Thread::unpark);
    }
    rusqlite::ffi::SQLITE_OK
}

/// The store's handle on its checkpointer: dropping it ends the thread.
pub(super) struct Checkpointer(Arc<WalShared>);

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Release);
        self.0.thread.get().map(Thread::unpark);
    }
}

thread_local! {
    /// When the checkpointer's current checkpoint stops waiting for locks.
    static CHECKPOINT_DEADLINE: std::cell::Cell<Instant> = std::cell::Cell::new(Instant::now());
    /// Since when forks interrupted every checkpoint of the checkpointer (`run_checkpoint`).
    static INTERRUPTED_SINCE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// The checkpointer's: the same steps, until `CHECKPOINT_DEADLINE`.
fn checkpoint_busy_wait(tries: i32) -> bool {
    let left = CHECKPOINT_DEADLINE.get().saturating_duration_since(Instant::now());
    let step = busy_step(tries, BUSY_TIMEOUT).map(|step| step.min(left));
    step.filter(|step| !step.is_zero()).map(std::thread::sleep).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::lock_waits;
    use crate::store::sqlite::SqliteStore;

    /// A store on a new file in `dir`, and the file's path.
    fn open_in(dir: &tempfile::TempDir) -> (SqliteStore, String) {
        let path = dir.path().join("t.db").to_str().unwrap().to_owned();
        (SqliteStore::open(&path, "UTC").unwrap(), path)
    }

    /// The size of the WAL of the database at `path` (0 while there is none).
    fn wal_size(path: &str) -> u64 {
        std::fs::metadata(format!("{path}-wal")).map_or(0, |m| m.len())
    }

    /// Writes `value` as the setting `name`: one write of as many pages.
    fn put_setting(store: &SqliteStore, name: &str, value: &[u8]) {
        let sql = "INSERT INTO settings (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET value = excluded.value";
        store.write(|tx| Ok(tx.execute(sql, rusqlite::params![name, value]).map(drop)?)).unwrap();
    }

    /// Writes a small setting every `RESTART_RETRY_EVERY` until the checkpointer started the
    /// WAL over, 60 s at most.
    fn assert_the_wal_starts_over(store: &SqliteStore) {
        let t = Instant::now();
        while store.wal.frames.load(Ordering::Relaxed) > WAL_RESTART_FRAMES {
            assert!(t.elapsed() < Duration::from_secs(60), "the WAL did not start over in 60 s");
            put_setting(store, "small", b"after");
            std::thread::sleep(RESTART_RETRY_EVERY);
        }
    }

    /// The checkpointer's busy handler waits in the same steps as calls', until its deadline.
    #[test]
    fn the_checkpointer_waits_until_its_deadline_at_most() {
        CHECKPOINT_DEADLINE.set(Instant::now() + Duration::from_millis(3));
        let start = Instant::now();
        let tries = (0..).take_while(|n| checkpoint_busy_wait(*n)).count();
        assert!((1..=13).contains(&tries) && start.elapsed() >= Duration::from_millis(3), "{tries} {:?}", start.elapsed());
        CHECKPOINT_DEADLINE.set(Instant::now());
        assert!(!checkpoint_busy_wait(0));
    }

    /// An error and SQLite's "busy, -1 and -1" are no news; any other answer is read as it
    /// comes. (An error read as a busy WAL of 0 frames, under `HOLD_FRAMES` and the cap: writes
    /// past either went on unheld until the next round.)
    #[test]
    fn an_error_or_a_busy_checkpoint_is_no_news() {
        assert_eq!(news(Err(rusqlite::Error::InvalidQuery)), None);
        assert_eq!(news(Ok((true, -1, -1))), None);
        assert_eq!(news(Ok((true, 300, 200))), Some((true, 300, 200)));
        assert_eq!(news(Ok((false, 0, 0))), Some((false, 0, 0)));
    }

    /// The checkpointer syncs the database file through SQLite's own handle.
    #[test]
    fn the_database_file_syncs_through_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let conn = connect(path.to_str().unwrap()).unwrap();
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);").unwrap();
        assert!(sync_database_file(&conn));
    }

    /// Every write holds the checkpointer's gate until it has committed, retention's too. (Held
    /// only until the write had the writer, a restart that took the gate meanwhile waited for
    /// SQLite's write lock in its busy handler, 250 us at a time with every other write held,
    /// and the call whose write it was waited in its own busy handler for the whole restart:
    /// one wait of 4-5 ms per 9,000 calls.)
    #[test]
    fn a_write_holds_the_checkpointers_gate_until_it_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open_in(&dir);
        let gate_held = || Ok(store.wal.gate.try_lock().is_err());
        assert!(store.write(|_| gate_held()).unwrap());
        assert!(store.write_when_free(|_| gate_held()).unwrap());
    }

    /// Past the cap a write waits for a checkpoint under way, `HOLD_WAIT` at most, whatever
    /// the checkpoint (one expected to copy held writes up to 1 s). Below the cap, and with no
    /// checkpoint under way, it waits for nothing. (No checkpointer here: nothing ends the pass.)
    #[test]
    fn past_the_cap_a_write_waits_a_little_for_a_checkpoint_under_way() {
        let wal = WalShared::default();
        wal.cap_frames.store(100, Ordering::Relaxed);
        let waits = || lock_waits::so_far().0;
        let held = |frames: i64, in_pass: bool| {
            wal.frames.store(frames, Ordering::Relaxed);
            wal.in_pass.store(in_pass, Ordering::Relaxed);
            let (before, t) = (waits(), Instant::now());
            wal.hold_back();
            (waits() > before).then(|| t.elapsed())
        };
        assert_eq!(held(101, false), None);
        assert_eq!(held(100, true), None);
        let waited = held(101, true).expect("a write past the cap did not wait for the checkpoint under way");
        assert!(waited >= HOLD_WAIT, "it waited {waited:?}");
    }

    /// A read pins the WAL while writes grow it to half as much again as its cap, then ends:
    /// the checkpointer's next pass copies and syncs all the read held back (~100 MB), and
    /// writes past the cap did not wait for it (it was not expected to copy), so the WAL grew
    /// by all they wrote meanwhile (to 177 MB against the 64 MB cap next to CPU hogs). Now each
    /// waits for it, `HOLD_WAIT` at most. Counted, not timed: the writes that began while that
    /// pass ran, and those of them that waited (no other wait is possible then: the read left
    /// restarts stalled, so none waits past `HOLD_FRAMES`, and a pass takes no lock a write needs).
    #[test]
    fn the_pass_after_a_pinning_read_holds_writes_past_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path) = open_in(&dir);
        let frames = || store.wal.frames.load(Ordering::Relaxed);
        let cap = store.wal.cap_frames.load(Ordering::Relaxed);
        put_setting(&store, "small", b"0");
        let reader = Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN; SELECT count(*) FROM settings;").unwrap();
        let mut written = 0u8;
        while frames() < cap * 3 / 2 {
            written = written.wrapping_add(1);
            put_setting(&store, "filler", &vec![written; 8 << 20]);
        }
        // Rounds of the checkpointer (10 ms apart) that the read pins.
        std::thread::sleep(CHECKPOINT_EVERY);
        reader.execute_batch("COMMIT").unwrap();
        let first = frames();
        let (t, mut largest, mut writes, mut during, mut held) = (Instant::now(), first, 0u64, 0, 0);
        // One-page writes until the checkpointer started the WAL over.
        while frames() > WAL_RESTART_FRAMES {
            assert!(t.elapsed() < Duration::from_secs(60), "the WAL did not start over in 60 s");
            let (in_pass, waits) = (store.wal.in_pass.load(Ordering::Relaxed) && frames() > cap, lock_waits::so_far().0);
            put_setting(&store, "small", &writes.to_le_bytes());
            if in_pass {
                during += 1;
                held += u64::from(lock_waits::so_far().0 > waits);
            }
            largest = largest.max(frames());
            writes += 1;
        }
        eprintln!("{writes} writes in {:?} until the WAL started over, {held} of {during} held during the pass, from {first} frames to {largest} at most", t.elapsed());
        // The pass copies ~25,000 frames, a write one: many begin during it. (The last may find
        // it ended.)
        assert!(during >= 3, "{during} writes began during the pass");
        assert!(held + 1 >= during, "{held} of the {during} writes that began during the pass waited for it");
    }

    /// SQLite's checkpoint lock on the database at `path` (byte 121 of the WAL index), as a
    /// checkpointer in a pass holds it, for as long as the file lives (an OFD lock).
    fn checkpoint_lock_held_elsewhere(path: &str) -> std::fs::File {
        use std::os::fd::AsRawFd;
        let shm = std::fs::OpenOptions::new().read(true).write(true).open(format!("{path}-shm")).unwrap();
        // SAFETY: a plain C struct, all zeroes a valid value.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        (lock.l_type, lock.l_whence, lock.l_start, lock.l_len) = (libc::F_WRLCK as _, libc::SEEK_SET as _, 121, 1);
        // SAFETY: an open descriptor and a valid flock.
        assert_eq!(unsafe { libc::fcntl(shm.as_raw_fd(), libc::F_OFD_SETLK, &lock) }, 0, "{}", std::io::Error::last_os_error());
        shm
    }

    /// The database whose checkpoint lock `a_checkpoint_lock_held_in_a_child_process` takes.
    const LOCK_HOLDER_DB: &str = "TENANTLLM_TEST_CHECKPOINT_LOCK_OF";

    /// Another process whose checkpointer is in a pass on the database at `path`, until the
    /// child is dropped with its stdin: this test binary run again for
    /// `a_checkpoint_lock_held_in_a_child_process`, once it holds the lock.
    struct CheckpointInAnotherProcess(std::process::Child, std::io::BufReader<std::process::ChildStdout>);

    impl CheckpointInAnotherProcess {
        fn start(path: &str) -> Self {
            use std::io::BufRead;
            use std::process::{Command, Stdio};
            let name = "store::sqlite::checkpointer::tests::a_checkpoint_lock_held_in_a_child_process";
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args([name, "--exact", "--include-ignored", "--nocapture", "--test-threads=1"])
                .env(LOCK_HOLDER_DB, path)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            while !line.contains("checkpoint lock held") {
                line.clear();
                assert!(out.read_line(&mut line).unwrap() > 0, "the child process ended without taking the lock");
            }
            Self(child, out)
        }
    }

    impl Drop for CheckpointInAnotherProcess {
        fn drop(&mut self) {
            use std::io::Read;
            drop(self.0.stdin.take());
            // Read to the end, so the child's test harness can report before it exits.
            let _ = self.1.read_to_end(&mut Vec::new());
            let _ = self.0.wait();
        }
    }

    /// Run by `CheckpointInAnotherProcess` in a child process (otherwise it does nothing): holds
    /// the checkpoint lock of the database named in `LOCK_HOLDER_DB` until stdin closes.
    #[test]
    #[ignore = "a helper run in a child process by other tests"]
    fn a_checkpoint_lock_held_in_a_child_process() {
        let Ok(path) = std::env::var(LOCK_HOLDER_DB) else { return };
        let _held = checkpoint_lock_held_elsewhere(&path);
        println!("checkpoint lock held");
        let _ = std::io::stdin().read_line(&mut String::new());
    }

    /// While another process's checkpointer is in a pass (a real process holding SQLite's
    /// checkpoint lock), this one's passes are busy: a write past the WAL's cap waited for none
    /// of them (the cap's state was this process's own: it waited only while its own
    /// checkpointer was in a pass) and went on at full speed while the other copied and synced
    /// at the disk's pace. Now it waits for a checkpoint under way in any process, `HOLD_WAIT`
    /// at most. Counted: the writes that waited. Linux only: elsewhere another process's
    /// checkpoint lock is not seen (`ofd_locks`).
    #[test]
    #[cfg(target_os = "linux")]
    fn past_the_cap_writes_wait_a_little_for_another_processs_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path) = open_in(&dir);
        let frames = || store.wal.frames.load(Ordering::Relaxed);
        let cap = store.wal.cap_frames.load(Ordering::Relaxed);
        put_setting(&store, "small", b"0");
        let other = CheckpointInAnotherProcess::start(&path);
        let mut written = 0u8;
        while frames() <= cap {
            written = written.wrapping_add(1);
            put_setting(&store, "filler", &vec![written; 8 << 20]);
        }
        let before = lock_waits::so_far().0;
        for n in 0..20u8 {
            put_setting(&store, "small", &[n; 100]);
        }
        let waited = lock_waits::so_far().0 - before;
        assert_eq!(waited, 20, "{waited} of 20 writes past the cap waited for the other process's checkpoint");
        drop(other);
        assert_the_wal_starts_over(&store);
    }

    /// While another process's checkpointer is in a pass, each of this one's is busy (SQLite
    /// says -1 frames): no write waits for a restart this process cannot make, and once the
    /// other's pass ends the WAL starts over. (The -1 was read as a WAL of -1 frames: after
    /// each round this process's count said -1, after each commit the WAL's real size, past
    /// `HOLD_FRAMES`, and a write then waited for the checkpointer's next round.)
    #[test]
    fn no_write_waits_while_another_processs_checkpointer_is_at_work() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path) = open_in(&dir);
        let frames = || store.wal.frames.load(Ordering::Relaxed);
        let written = std::cell::Cell::new(0u8);
        let write = |bytes: usize| {
            written.set(written.get().wrapping_add(1));
            put_setting(&store, "filler", &vec![written.get(); bytes]);
        };
        write(1);
        let other = CheckpointInAnotherProcess::start(&path);
        while frames() <= HOLD_FRAMES {
            write(256 << 10);
        }
        // Small writes back to back, while the checkpointer's rounds go on.
        let (before, t) = (lock_waits::so_far(), Instant::now());
        while t.elapsed() < 10 * RESTART_RETRY_EVERY {
            write(100);
        }
        let (waits, waited) = (lock_waits::so_far().0 - before.0, lock_waits::so_far().1 - before.1);
        assert_eq!(waits, 0, "writes waited {waited:?} in all ({waits} waits) while another checkpointer worked");
        drop(other);
        assert_the_wal_starts_over(&store);
    }

    /// A read held open in another connection (a backup, a dashboard scan) pins the WAL while
    /// writes grow it past its cap: no write waits on the checkpointer for it (each waited 1 s
    /// at every try past the cap before, and 30 s before that), and once the read ends the WAL
    /// starts over and, when writes pause, is cut back. The bounds are loose so a loaded machine
    /// cannot fail it; the lock waits counted are this thread's, whatever the machine's speed.
    #[test]
    fn no_write_waits_on_the_checkpointer_while_a_read_pins_the_wal_past_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path) = open_in(&dir);
        let path = path.as_str();
        let wal = || wal_size(path);
        let written = std::cell::Cell::new(0u8);
        let write = || {
            // 64 pages a write, each time other bytes (SQLite writes no page it would not change).
            written.set(written.get().wrapping_add(1));
            let t = Instant::now();
            put_setting(&store, "filler", &vec![written.get(); 256 << 10]);
            t.elapsed()
        };
        write();
        let reader = Connection::open(path).unwrap();
        reader.execute_batch("BEGIN; SELECT count(*) FROM settings;").unwrap();
        let (waits, waited) = lock_waits::so_far();
        let (mut slowest, mut past_cap) = (Duration::ZERO, None);
        // Past the cap, then long enough for several of the checkpointer's tries.
        let deadline = Instant::now() + Duration::from_secs(120);
        while past_cap.is_none_or(|t: Instant| t.elapsed() < Duration::from_secs(2)) {
            assert!(Instant::now() < deadline, "the WAL did not pass its cap in 2 minutes ({} bytes)", wal());
            slowest = slowest.max(write());
            if past_cap.is_none() && wal() > WAL_CAP_BYTES as u64 + (8 << 20) {
                past_cap = Some(Instant::now());
            }
            if past_cap.is_some() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let (waits, waited) = (lock_waits::so_far().0 - waits, lock_waits::so_far().1 - waited);
        assert!(waited < Duration::from_millis(100), "writes waited {waited:?} for locks in all ({waits} waits)");
        assert!(slowest < Duration::from_millis(500), "the slowest write took {slowest:?}");
        reader.execute_batch("COMMIT").unwrap();
        // The WAL starts over, then writes pause and it is cut back.
        let deadline = Instant::now() + Duration::from_secs(30);
        while wal() > WAL_KEEP_BYTES && Instant::now() < deadline {
            write();
            std::thread::sleep(CHECKPOINT_EVERY * 2);
        }
        assert!(wal() <= WAL_KEEP_BYTES, "the WAL is still {} bytes", wal());
    }

    /// A write that leaves the WAL past the size at which the checkpointer restarts it, then
    /// nothing: once restarted, the idle WAL is cut back (the restart leaves its frames in the
    /// WAL's header until the next write, and the checkpointer read them as a WAL still to
    /// restart, every `CATCH_UP_EVERY` for as long as nobody wrote, never cutting it back).
    #[test]
    fn an_idle_wal_restarted_is_cut_back_not_restarted_again() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path) = open_in(&dir);
        // Past `WAL_RESTART_FRAMES` and `WAL_KEEP_BYTES` in one write.
        put_setting(&store, "filler", &vec![7u8; 24 << 20]);
        assert!(wal_size(&path) > WAL_KEEP_BYTES);
        let deadline = Instant::now() + Duration::from_secs(10);
        while wal_size(&path) > WAL_KEEP_BYTES && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(wal_size(&path) <= WAL_KEEP_BYTES, "the idle WAL is still {} bytes", wal_size(&path));
    }

    /// An idle WAL file far past `WAL_KEEP_BYTES` (one write of 48 MB, which the checkpointer
    /// copied and restarted: frames of the WAL's last run, all copied, reach to its end), then
    /// nothing: it is cut back to `WAL_KEEP_BYTES`, `CUT_STEP_BYTES` at most with writes held
    /// and each step inside a fork-gate entry of its own (the first step starts the WAL over,
    /// cutting nothing). `wal_checkpoint(TRUNCATE)` cut the whole file at once with SQLite's
    /// write lock held, inside the round's fork-gate entry. Counted, not timed: the bytes each
    /// step cut. The data and the database's `user_version` are as they were.
    #[test]
    fn an_idle_wal_is_cut_back_a_few_mb_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path) = open_in(&dir);
        Connection::open(&path).unwrap().execute_batch("PRAGMA user_version = 7").unwrap();
        put_setting(&store, "filler", &vec![9u8; 48 << 20]);
        let grown = wal_size(&path) as i64;
        let cut = || unpoisoned(store.wal.cut_steps.lock()).iter().map(|&(bytes, _)| bytes).sum::<i64>();
        // Until the WAL is cut back and every step that cut it is counted (a step counts what
        // it cut once the file is cut).
        let deadline = Instant::now() + Duration::from_secs(30);
        while (wal_size(&path) > WAL_KEEP_BYTES || cut() < grown - wal_size(&path) as i64) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(wal_size(&path) <= WAL_KEEP_BYTES, "the idle WAL is still {} bytes", wal_size(&path));
        let steps = unpoisoned(store.wal.cut_steps.lock()).clone();
        let cut = cut();
        eprintln!("{} steps cut {cut} bytes: {steps:?}", steps.len());
        assert!(cut >= (32 << 20), "the steps cut {cut} bytes");
        // A few MB a step (the bound, not `CUT_STEP_BYTES`, which a change could raise).
        assert!(steps.iter().all(|&(bytes, depth)| bytes <= 4 << 20 && depth == 1), "(bytes cut, fork-gate depth) a step: {steps:?}");
        let reader = Connection::open(&path).unwrap();
        let (version, length): (i64, i64) = reader
            .query_row("SELECT (SELECT user_version FROM pragma_user_version), length(value) FROM settings WHERE name = 'filler'", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        assert_eq!((version, length), (7, 48 << 20));
    }

    /// A write that leaves the WAL far past `HOLD_FRAMES`, under its cap (a purge, a large prompt): the
    /// checkpointer's pass then copies and syncs it for a long time (0.3-0.8 s here at load 4-8,
    /// seconds on a busy disk), and a write after it waited in `hold_back` until the pass and the
    /// restart after it ended, up to 1 s (2 s for a call's admission and settlement). Now each
    /// write about to begin is held `HOLD_WAIT` at most, again and again while the pass runs:
    /// counted, not timed (a wall-clock bound failed under load).
    #[test]
    fn a_long_pass_holds_writes_again_and_again_not_once_until_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open_in(&dir);
        // ~1.5 times `HOLD_FRAMES`, under the cap (past it writes wait for the pass, see
        // `no_write_grows_the_wal_past_its_cap_while_a_pass_runs`): the pass copies and syncs ~48 MB.
        put_setting(&store, "filler", &vec![1u8; 48 << 20]);
        assert!(store.wal.frames.load(Ordering::Relaxed) > HOLD_FRAMES);
        let (mut longest, mut holds) = (Duration::ZERO, 0);
        let t = Instant::now();
        // Writes about to begin, until the checkpointer started the WAL over.
        while store.wal.frames.load(Ordering::Relaxed) > WAL_RESTART_FRAMES && t.elapsed() < Duration::from_secs(60) {
            let held = Instant::now();
            store.wal.hold_back();
            longest = longest.max(held.elapsed());
            holds += 1;
        }
        eprintln!("{holds} holds in {:?} until the WAL started over, the longest {longest:?}", t.elapsed());
        // Each hold but the last ended with the WAL still to start over: at its own deadline
        // (`HOLD_WAIT`, plus the sleeps' overshoot and whatever else a loaded machine adds:
        // once over 200 ms at load 4-5), not at the restart's. Before, the first was held
        // until the WAL started over (1 hold, 0.3-0.8 s).
        assert!(holds >= 3, "{holds} holds before the WAL started over");
        put_setting(&store, "small", b"written");
    }

    /// A WAL past its cap while the checkpointer's pass copies and syncs it (seconds on a busy
    /// disk): writes went on at full speed meanwhile, and the cap could only act between two
    /// passes (one pass of 3.2 s let calls grow the WAL from 26 to 190 MB in `test_wal.py`).
    /// Then past the cap a write waited for the pass to end, up to 1 s. Now each waits
    /// `HOLD_WAIT` at most, again and again while the pass runs. Counted, not timed: the writes
    /// that began during that pass, and those of them that waited.
    #[test]
    fn writes_past_the_cap_are_held_a_little_each_while_a_pass_runs() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open_in(&dir);
        let frames = || store.wal.frames.load(Ordering::Relaxed);
        let cap = store.wal.cap_frames.load(Ordering::Relaxed);
        // ~1.25 times the cap in one write: the pass copies and syncs ~80 MB.
        put_setting(&store, "filler", &vec![1u8; 80 << 20]);
        let first = frames();
        let (mut largest, mut writes, mut during, mut held, mut written) = (first, 0, 0, 0, 0u8);
        let t = Instant::now();
        // One-page writes, other bytes each time, until the checkpointer started the WAL over.
        while frames() > WAL_RESTART_FRAMES && t.elapsed() < Duration::from_secs(60) {
            let (in_pass, waits) = (store.wal.in_pass.load(Ordering::Relaxed) && frames() > cap, lock_waits::so_far().0);
            written = written.wrapping_add(1);
            put_setting(&store, "small", &[written; 100]);
            if in_pass {
                during += 1;
                held += u64::from(lock_waits::so_far().0 > waits);
            }
            largest = largest.max(frames());
            writes += 1;
        }
        eprintln!("{writes} writes in {:?} until the WAL started over, {held} of {during} held during a pass, from {first} frames to {largest} at most", t.elapsed());
        assert!(during >= 3, "{during} writes began during the pass");
        // (The last may find it ended.)
        assert!(held + 1 >= during, "{held} of the {during} writes that began during the pass waited for it");
    }

    /// Reads held back to back in another connection (a dashboard that scans again as soon as
    /// its last scan ends): at every moment one uses the WAL, and no restart can be made while
    /// writes go on. Past the cap the checkpointer held this process's writes up to 1 s at a
    /// time, trying again and again to restart a WAL that a read it could not outwait used
    /// (calls waited 1.1-1.6 s in `make bench`). Now each time it holds the writes it makes one
    /// try (`restart` holds the gate for one `checkpoint` call: one try a hold by construction;
    /// one try per read, not per round, is `a_read_that_stays_is_met_by_one_restart_try_not_one_a_round`).
    /// Here: writes go on past the cap while reads turn over, and once they stop the WAL starts over.
    #[test]
    fn back_to_back_reads_then_none_the_wal_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path) = open_in(&dir);
        let frames = || store.wal.frames.load(Ordering::Relaxed);
        let cap = store.wal.cap_frames.load(Ordering::Relaxed);
        put_setting(&store, "small", b"0");
        let reading = std::sync::atomic::AtomicBool::new(true);
        let reads = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let reader = Connection::open(&path).unwrap();
                let mut reads = 0;
                while reading.load(Ordering::Relaxed) {
                    reader.execute_batch("BEGIN; SELECT count(*) FROM settings;").unwrap();
                    std::thread::sleep(Duration::from_millis(100));
                    reader.execute_batch("COMMIT").unwrap();
                    reads += 1;
                }
                reads
            });
            let mut written = 0u8;
            // Past the cap, then small writes while reads turn over (30 or more).
            while frames() < cap + cap / 4 {
                written = written.wrapping_add(1);
                put_setting(&store, "filler", &vec![written; 8 << 20]);
            }
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(3) {
                written = written.wrapping_add(1);
                put_setting(&store, "small", &[written; 4096]);
            }
            reading.store(false, Ordering::Relaxed);
            reader.join().unwrap()
        });
        let holds = store.wal.restart_holds.load(Ordering::Relaxed);
        eprintln!("{reads} reads; restarts tried with the writes held: {holds}");
        assert_the_wal_starts_over(&store);
    }

    /// Past the cap a read stays open (a backup begun as writes paused) with a few frames
    /// written after it began, and no more: the checkpointer's restart finds it in the WAL
    /// and is not tried again until it ends, though every round finds few frames left to copy
    /// (tried each round, it held the writes `RESTART_WAIT` every `RESTART_RETRY_EVERY` for as
    /// long as the read lasted), and it syncs the WAL only when it grew (it synced the
    /// unchanged WAL every round). Counted, not timed: its holds of the writes, its syncs.
    #[test]
    fn a_read_that_stays_is_met_by_one_restart_try_not_one_a_round() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path) = open_in(&dir);
        let frames = || store.wal.frames.load(Ordering::Relaxed);
        let holds = || store.wal.restart_holds.load(Ordering::Relaxed);
        let cap = store.wal.cap_frames.load(Ordering::Relaxed);
        put_setting(&store, "small", b"0");
        // An earlier read pins the WAL while it grows past the cap, so that the read that stays
        // begins on frames not yet copied (on a WAL copied whole it would read the database
        // file and hold nothing).
        let (pin, reader) = (Connection::open(&path).unwrap(), Connection::open(&path).unwrap());
        pin.execute_batch("BEGIN; SELECT count(*) FROM settings;").unwrap();
        let mut written = 0u8;
        while frames() <= cap {
            written = written.wrapping_add(1);
            put_setting(&store, "filler", &vec![written; 8 << 20]);
        }
        reader.execute_batch("BEGIN; SELECT count(*) FROM settings;").unwrap();
        put_setting(&store, "small", b"after the read began");
        pin.execute_batch("COMMIT").unwrap();
        let syncs = || store.wal.wal_syncs.load(Ordering::Relaxed);
        // The pass after the earlier read ended copies all it held back (seconds on a busy
        // disk), then a restart is tried and finds the read that stays.
        let (t, tried) = (Instant::now(), holds());
        while holds() == tried {
            assert!(t.elapsed() < Duration::from_secs(60), "no restart was tried in 60 s");
            std::thread::sleep(RESTART_RETRY_EVERY);
        }
        let before = (holds(), syncs());
        // 50 of the checkpointer's rounds while the read stays.
        std::thread::sleep(50 * RESTART_RETRY_EVERY);
        let (tries, synced) = (holds() - before.0, syncs() - before.1);
        reader.execute_batch("COMMIT").unwrap();
        assert!(tries <= 1, "{tries} more restarts held the writes while the read stayed");
        // Nothing was written since: the WAL needed no sync.
        assert!(synced <= 1, "the WAL, unchanged, was synced {synced} times");
        assert_the_wal_starts_over(&store);
    }

    /// A read pins the WAL while writes grow it (to 6,000 frames), then ends, and writes go on
    /// back to back: the pass that follows copies all the read held back (long), and the
    /// restart after the catch-up passes synced the WAL and the database file (what that pass
    /// copied), then held the writes and copied and synced all that was written meanwhile (one
    /// round: 0, 1,224 and 4,607 frames in three runs at load 8; 1,881 ms with writes held once
    /// on a busy disk). Now it passes once more after syncing the database file and holds the
    /// writes only when that pass left `RESTART_COPY_FRAMES` at most (17-255 frames in 26
    /// rounds, release and debug builds, next to two CPU hogs). Three rounds.
    #[test]
    fn no_restart_copies_what_was_written_during_a_long_pass() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path) = open_in(&dir);
        let written = std::cell::Cell::new(0u8);
        // A write of `pages` pages, other bytes each time.
        let write = |pages: usize| {
            written.set(written.get().wrapping_add(1));
            put_setting(&store, "filler", &vec![written.get(); pages << 12]);
        };
        let frames = || store.wal.frames.load(Ordering::Relaxed);
        let cap = store.wal.cap_frames.load(Ordering::Relaxed);
        let reader = Connection::open(&path).unwrap();
        for _ in 0..3 {
            write(1);
            reader.execute_batch("BEGIN; SELECT count(*) FROM settings;").unwrap();
            while frames() < 6000 {
                write(64);
            }
            reader.execute_batch("COMMIT").unwrap();
            let (t, mut writes, mut largest) = (Instant::now(), 0, 0);
            // 16-page writes back to back until the checkpointer started the WAL over, paused
            // while the WAL is three quarters of its cap: past the cap a restart is made
            // whatever it copies, and under load the writes outran the passes up to there
            // (once 2,313 writes grew the WAL to 45,309 frames), leaving no restart to check.
            while frames() > WAL_RESTART_FRAMES {
                assert!(t.elapsed() < Duration::from_secs(60), "the WAL did not start over in 60 s");
                if frames() > cap * 3 / 4 {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                write(16);
                largest = largest.max(frames());
                writes += 1;
            }
            eprintln!("{writes} writes in {:?} until the WAL started over, at {largest} frames at most", t.elapsed());
        }
        let restarts = unpoisoned(store.wal.restart_copies.lock()).clone();
        eprintln!("restarts (frames in the WAL, frames copied with writes held): {restarts:?}");
        assert!(!restarts.is_empty(), "no restart");
        assert!(restarts.iter().all(|&(_, copied)| copied <= RESTART_COPY_FRAMES), "restarts (frames in the WAL, frames copied with writes held): {restarts:?}");
    }

    /// One writer writing back to back, unpaced, as fast as the machine lets it: the WAL starts
    /// over again and again and stays under its cap. Before the write gate the checkpointer's
    /// restart raced the writer for SQLite's write lock, free for microseconds between two
    /// writes, hardly ever got it, and the WAL grew without bound (350-450 MB in a benchmark).
    /// Writes wait only for a restart (the write under way, the frames left to copy and the
    /// syncs) and past `HOLD_FRAMES` for the checkpointer's passes to catch up (this thread's
    /// waits: no other connection writes).
    #[test]
    fn one_writer_back_to_back_keeps_the_wal_under_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path) = open_in(&dir);
        // Four times the cap of 16 kB writes (four pages and more each, other bytes each time).
        let (blob, writes) = (16 << 10, 4 * WAL_CAP_BYTES as usize / (16 << 10));
        let started = Instant::now();
        let (largest, (longest, waits)) = std::thread::scope(|s| {
            let writer = s.spawn(|| {
                let (before, mut longest) = (lock_waits::so_far(), Duration::ZERO);
                for n in 0..writes {
                    let value = vec![n as u8; blob];
                    let t = Instant::now();
                    put_setting(&store, &format!("filler{}", n % 64), &value);
                    longest = longest.max(t.elapsed());
                }
                let after = lock_waits::so_far();
                (longest, (after.0 - before.0, after.1 - before.1))
            });
            let mut largest = 0;
            while !writer.is_finished() {
                largest = largest.max(wal_size(&path));
                std::thread::sleep(Duration::from_millis(2));
            }
            (largest, writer.join().unwrap())
        });
        let took = started.elapsed();
        eprintln!(
            "{writes} writes in {took:.1?}, largest WAL {:.1} MB, {} waits, {:?} in all, longest write {longest:?}",
            largest as f64 / f64::from(1 << 20),
            waits.0,
            waits.1
        );
        // `HOLD_FRAMES` and a write, more after a failed restart (15-39 MB seen in 4-8x the cap
        // written at load 8-10); without writes waiting past it, 23-71 MB at load 8-10 (the
        // WAL grows while a pass syncs, 330 ms once on a loaded disk).
        assert!(largest < WAL_CAP_BYTES as u64, "the WAL reached {} MB in {writes} writes", largest >> 20);
        // Loose, so a loaded machine cannot fail it (at load 8-10 the longest was 31-73 ms).
        assert!(longest < Duration::from_secs(1), "a write took {longest:?}");
        assert!(waits.1 < took / 2, "writes waited {:?} in all", waits.1);
    }

    /// Set in the process `a_fork_interrupts_a_long_pass_which_the_next_rounds_make_again` runs.
    const FORKING_PROCESS: &str = "TENANTLLM_TEST_FORKS_INTERRUPT_A_PASS";

    /// A fork while the checkpointer's passive pass copies a large WAL: the fork waited for the
    /// whole pass (seconds on a busy disk), and every call entering the fork gate behind it.
    /// Now the fork interrupts it, and the next rounds copy again. In a process of its own (this
    /// test binary run again): its forks would also wait for the other tests' checkpoints and
    /// writes inside the gate and interrupt their passes (a write of another test waited 0.4 s
    /// for a fork once, and that test failed).
    #[test]
    fn a_fork_interrupts_a_long_pass_which_the_next_rounds_make_again() {
        let name = "store::sqlite::checkpointer::tests::forks_interrupt_a_long_pass_in_a_process_of_their_own";
        crate::process::run_alone(name, FORKING_PROCESS);
    }

    /// Run by `a_fork_interrupts_a_long_pass_which_the_next_rounds_make_again` in a process of
    /// its own (otherwise it does nothing). Counted, not timed: forks made from this thread while
    /// a pass that may be interrupted is under way (each child exits at once), until one
    /// interrupted a pass or the WAL started over anyway.
    #[test]
    #[ignore = "run in a process of its own by another test"]
    fn forks_interrupt_a_long_pass_in_a_process_of_their_own() {
        if std::env::var_os(FORKING_PROCESS).is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (store, path) = open_in(&dir);
        let frames = || store.wal.frames.load(Ordering::Relaxed);
        let size = 128 << 20;
        let reader = Connection::open(&path).unwrap();
        let count = || reader.query_row("SELECT count(*) FROM settings", [], |r| r.get::<_, i64>(0)).unwrap();
        let before = count();
        // One write of ~128 MB: it wakes the checkpointer, whose pass copies and syncs it all.
        put_setting(&store, "filler", &vec![7u8; size]);
        let (t, mut forks) = (Instant::now(), 0);
        while store.wal.interrupted_passes.load(Ordering::Relaxed) == 0 && frames() > WAL_RESTART_FRAMES {
            assert!(t.elapsed() < Duration::from_secs(60), "the WAL did not start over in 60 s");
            if !*unpoisoned(store.wal.interruptible.lock()) {
                std::thread::sleep(Duration::from_micros(100));
                continue;
            }
            crate::process::fork_a_child_that_exits();
            forks += 1;
        }
        let interrupted = store.wal.interrupted_passes.load(Ordering::Relaxed);
        eprintln!("{forks} forks in {:?}, {interrupted} passes interrupted", t.elapsed());
        assert!(forks >= 1 && interrupted >= 1, "{forks} forks during a pass, {interrupted} passes interrupted");
        // The next rounds copy it all and start the WAL over; nothing was lost meanwhile.
        assert_the_wal_starts_over(&store);
        let filler: bool = reader.query_row("SELECT value = ?1 FROM settings WHERE name = 'filler'", [vec![7u8; size]], |r| r.get(0)).unwrap();
        assert!(filler, "the filler changed");
        // The filler and the small setting `assert_the_wal_starts_over` wrote.
        assert_eq!(count(), before + 2);
        assert_eq!(reader.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0)).unwrap(), "ok");
    }
}
