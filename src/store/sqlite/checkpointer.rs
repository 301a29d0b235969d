//! The SQLite store's background checkpointer: it folds the WAL back into the database file
//! and starts it over, so that no call pays for it (issue 15).

use std::mem::ManuallyDrop;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::{busy_step, connect, BUSY_TIMEOUT};
use crate::error::{Error, Result};
use crate::process::quiet;

/// `SQLITE_FCNTL_FILE_POINTER` and `SQLITE_FCNTL_JOURNAL_POINTER` (in WAL mode: the WAL's).
const FCNTL_FILE_POINTER: std::ffi::c_int = 7;
const FCNTL_JOURNAL_POINTER: std::ffi::c_int = 28;

/// Syncs the database file (`FCNTL_FILE_POINTER`) or its WAL (`FCNTL_JOURNAL_POINTER`) through
/// the connection's own handle. (Never through a descriptor of our own: closing any descriptor
/// of the database file drops every POSIX lock SQLite holds on it in this process.) A sync more
/// than SQLite's own is always safe; false if it could not be made.
fn sync_file(conn: &Connection, which: std::ffi::c_int) -> bool {
    let mut file: *mut rusqlite::ffi::sqlite3_file = std::ptr::null_mut();
    // SAFETY: this file control writes one pointer to a file object the connection owns; it
    // stays open while `conn` is borrowed, and only this thread uses the connection.
    unsafe {
        let rc = rusqlite::ffi::sqlite3_file_control(conn.handle(), c"main".as_ptr(), which, (&mut file as *mut *mut rusqlite::ffi::sqlite3_file).cast());
        if rc != rusqlite::ffi::SQLITE_OK || file.is_null() || (*file).pMethods.is_null() {
            return false;
        }
        (*(*file).pMethods).xSync.is_some_and(|sync| sync(file, rusqlite::ffi::SQLITE_SYNC_NORMAL) == rusqlite::ffi::SQLITE_OK)
    }
}

/// How often the background thread folds a WAL that is not growing back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// How soon it looks again after calls wrote: short, frequent passes keep each pass's fsync
/// small, and the restart that follows has little left to copy.
const CATCH_UP_EVERY: Duration = Duration::from_millis(10);
/// WAL frames (pages) past which the checkpointer makes writers start the WAL over.
const WAL_RESTART_FRAMES: i64 = 2000;
/// Frames a restart may find still to copy: the catch-up passes before it aim below this.
/// Calls wait while the restart syncs what it copies, and a sync takes longer the more it
/// writes (on this machine's disk 1 page ~1 ms, 64 ~5 ms, 256 ~8 ms, 1024 ~19 ms, loaded).
const RESTART_LEFTOVER_FRAMES: i64 = 64;
/// At most this many catch-up passes: writers faster than the disk would outrun any number.
const CATCH_UP_PASSES: usize = 8;
/// How soon the checkpointer tries again after a restart could not be made (a long read was
/// still in the WAL), so it catches the gap before the next one.
const RESTART_RETRY_EVERY: Duration = Duration::from_millis(10);
/// How long a restart below the cap may wait for locks in all. It holds the write lock while
/// it waits, so this bounds how long any call can wait behind it.
const RESTART_WAIT: Duration = Duration::from_millis(3);
/// The WAL's cap (bytes). Reads that overlap (two dashboards, a backup next to a scan) may
/// leave no moment when nothing reads from the WAL, so restarts that wait for nobody never
/// happen and the WAL would grow without bound (358 MB in `make bench`). Past the cap the
/// checkpointer restarts it anyway, waiting up to `CAP_WAIT` for the reads that still use it,
/// but only once the read that held the WAL back has ended: reads are coming and going, so the
/// ones running will end too. While one read stays (a long backup) no restart could succeed,
/// and trying would only make calls wait `CAP_WAIT` for nothing; the WAL grows until it ends.
const WAL_CAP_BYTES: i64 = 64 << 20;
/// How long a restart past the cap may wait for locks in all: for writers, then for the reads
/// older than the last frame to end so it can copy the WAL whole, then for the reads that began
/// meanwhile (reads that begin after it was copied whole read the database file and do not hold
/// it up), so it succeeds when overlapping reads last up to about half of it each. Calls wait
/// behind it, so this bounds their wait on the checkpointer once the WAL passed the cap.
const CAP_WAIT: Duration = Duration::from_secs(1);
/// After a restart past the cap timed out (reads longer than that), the next one waits this
/// long, so calls run at least as long as they waited.
const CAP_RETRY_AFTER: Duration = CAP_WAIT;
/// A WAL file larger than this (bytes) is cut back (to nothing) once writes pause for a round:
/// long reads make it grow. Never while calls write: SQLite's own limit (`journal_size_limit`)
/// makes the first call after each restart cut the file back, an ftruncate of 4 to 84 ms
/// measured on the calling thread with the write lock held.
const WAL_KEEP_BYTES: u64 = 16 << 20;

/// Checkpoints the WAL from a thread of its own, so no call pays for copying pages and the
/// fsync that follows (calls' connections have auto-checkpointing off). PASSIVE never
/// blocks writers or readers; several processes may each run one. Under sustained writes a
/// passive checkpoint never catches up, so past a size a RESTART checkpoint copies the few
/// frames the catch-up passes left and lets the WAL begin again, which keeps it (and page
/// lookups in it) small. It holds SQLite's write lock meanwhile (writers of every process
/// wait in their busy handler, briefly) but no lock of this process, and waits at most
/// `RESTART_WAIT` for locks in all; the frames left to copy and the two fsyncs that go with
/// them are what calls wait for. It is only tried when the last passive pass could copy the whole
/// WAL: when it could not, a read (a backup, a dashboard scan) still uses the WAL, and a
/// restart would wait for it with every writer waiting behind (it used to, holding this
/// process's writer, for up to SQLite's 30 s busy timeout). The WAL grows while such reads
/// last; the checkpointer then looks every `RESTART_RETRY_EVERY` for the gap after one, and
/// past `WAL_CAP_BYTES`, once reads turn over, it restarts the WAL waiting up to `CAP_WAIT`.
/// Every round runs inside the fork gate (a fork waits for it, `CAP_WAIT` at most).
pub(super) fn spawn_checkpointer(path: &str) -> Result<mpsc::Sender<()>> {
    let conn = connect(path)?;
    conn.busy_handler(Some(checkpoint_busy_wait))?;
    let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let cap_frames = WAL_CAP_BYTES / page.max(512);
    let wal_file = format!("{path}-wal");
    let (stop, stopped) = mpsc::channel::<()>();
    // Closed inside the fork gate like every other use of SQLite.
    let conn = ManuallyDrop::new(conn);
    std::thread::Builder::new()
        .name("tenantllm-checkpoint".into())
        .spawn(move || {
            // Each returns (busy, frames in the WAL, frames copied); a busy database just
            // means: try again later. `wait` bounds the time it waits for locks in all.
            let checkpoint = |mode: &str, wait: Duration| {
                CHECKPOINT_DEADLINE.set(Instant::now() + wait);
                conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| Ok((r.get::<_, i64>(0)? != 0, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
                    .unwrap_or((true, 0, 0))
            };
            let mut wait = CHECKPOINT_EVERY;
            let mut next_cap_restart = Instant::now();
            // (frames in the WAL, frames copied) as the last round left them; none before the
            // first round and after a restart, when there is nothing to compare with.
            let mut last: Option<(i64, i64)> = None;
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(wait) {
                let _quiet = quiet();
                let (_, mut frames, mut copied) = checkpoint("PASSIVE", Duration::ZERO);
                // No frames since the last round, which came `CHECKPOINT_EVERY` after a round.
                let unchanged = last.is_some_and(|(before, _)| before == frames);
                let paused = unchanged && wait == CHECKPOINT_EVERY;
                wait = if unchanged { CHECKPOINT_EVERY } else { CATCH_UP_EVERY };
                // Fewer frames copied than the WAL held: a read still used the WAL. Copied
                // frames moving on since a round a read held them back: that read ended. (Not
                // when the last round copied all: the read that holds them back now just began.)
                let reads_turned_over = last.is_some_and(|(held, before)| before < held && before != copied);
                if frames <= WAL_RESTART_FRAMES {
                    let oversized = std::fs::metadata(&wal_file).is_ok_and(|m| m.len() > WAL_KEEP_BYTES);
                    if paused && copied == frames && oversized && !checkpoint("TRUNCATE", RESTART_WAIT).0 {
                        frames = 0;
                    }
                    last = Some((frames, copied.min(frames)));
                    continue;
                }
                // Catch up without blocking anyone: each pass copies what writers appended
                // during the previous one, so the restart has little left to copy and sync
                // while writers wait (one pass left ~17 ms of it; this leaves ~2 ms).
                for _ in 0..CATCH_UP_PASSES {
                    let (_, now, done) = checkpoint("PASSIVE", Duration::ZERO);
                    let appended = now - frames;
                    (frames, copied) = (now, done);
                    if appended < RESTART_LEFTOVER_FRAMES {
                        break;
                    }
                }
                let restarted = if copied == frames {
                    // The restart syncs the WAL before it copies from it, and the database
                    // file after (with calls waiting), and the passes that could not copy all
                    // left the database file unsynced: syncing both here, while calls still
                    // write, leaves the restart only what was written meanwhile to sync (it
                    // synced 1-13 ms of WAL and 2-7 ms of database file with calls waiting).
                    sync_file(&conn, FCNTL_JOURNAL_POINTER);
                    sync_file(&conn, FCNTL_FILE_POINTER);
                    !checkpoint("RESTART", RESTART_WAIT).0
                } else if frames > cap_frames && reads_turned_over && Instant::now() >= next_cap_restart {
                    let done = !checkpoint("RESTART", CAP_WAIT).0;
                    next_cap_restart = Instant::now() + CAP_RETRY_AFTER;
                    done
                } else {
                    false
                };
                last = (!restarted).then_some((frames, copied));
                if !restarted {
                    wait = RESTART_RETRY_EVERY; // a read still uses the WAL
                }
            }
            let _quiet = quiet();
            drop(ManuallyDrop::into_inner(conn));
        })
        .map_err(|e| Error::Store(format!("cannot start the checkpoint thread: {e}")))?;
    Ok(stop)
}

thread_local! {
    /// When the checkpointer's current checkpoint stops waiting for locks.
    static CHECKPOINT_DEADLINE: std::cell::Cell<Instant> = std::cell::Cell::new(Instant::now());
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

    /// The checkpointer syncs the database file and its WAL through SQLite's own handles.
    #[test]
    fn the_database_file_and_its_wal_sync_through_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let conn = connect(path.to_str().unwrap()).unwrap();
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);").unwrap();
        assert!(sync_file(&conn, FCNTL_JOURNAL_POINTER));
        assert!(sync_file(&conn, FCNTL_FILE_POINTER));
    }

    /// A read held open in another connection (a backup, a dashboard scan) pins the WAL while
    /// writes grow it past its cap: no write waits on the checkpointer for it (each waited 1 s
    /// at every try past the cap before, and 30 s before that), and once the read ends the WAL
    /// starts over and, when writes pause, is cut back. The bounds are loose so a loaded machine
    /// cannot fail it; the lock waits counted are this thread's, whatever the machine's speed.
    #[test]
    fn no_write_waits_on_the_checkpointer_while_a_read_pins_the_wal_past_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let path = path.to_str().unwrap();
        let store = SqliteStore::open(path, "UTC").unwrap();
        let wal = || std::fs::metadata(format!("{path}-wal")).map_or(0, |m| m.len());
        let written = std::cell::Cell::new(0u8);
        let write = || {
            // 64 pages a write, each time other bytes (SQLite writes no page it would not change).
            written.set(written.get().wrapping_add(1));
            let blob = vec![written.get(); 256 << 10];
            let t = Instant::now();
            store
                .write(|tx| {
                    tx.execute("INSERT INTO settings (name, value) VALUES ('filler', ?1) ON CONFLICT (name) DO UPDATE SET value = excluded.value", [&blob])?;
                    Ok(())
                })
                .unwrap();
            t.elapsed()
        };
        write();
        let reader = Connection::open(path).unwrap();
        reader.execute_batch("BEGIN; SELECT count(*) FROM settings;").unwrap();
        let (waits, waited) = lock_waits::so_far();
        let (mut slowest, mut past_cap) = (Duration::ZERO, None);
        // Past the cap, then long enough for several of the checkpointer's tries.
        let deadline = Instant::now() + Duration::from_secs(120);
        while past_cap.is_none_or(|t: Instant| t.elapsed() < 2 * CAP_RETRY_AFTER) {
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
        assert!(slowest < CAP_WAIT / 2, "the slowest write took {slowest:?}");
        reader.execute_batch("COMMIT").unwrap();
        // The WAL starts over, then writes pause and it is cut back.
        let deadline = Instant::now() + Duration::from_secs(30);
        while wal() > WAL_KEEP_BYTES && Instant::now() < deadline {
            write();
            std::thread::sleep(CHECKPOINT_EVERY * 2);
        }
        assert!(wal() <= WAL_KEEP_BYTES, "the WAL is still {} bytes", wal());
    }
}
