//! The WAL's restart gate: what this process's SQLite writes and its checkpointer share so
//! the WAL starts over under a writer that never pauses (issue 15).
//!
//! SQLite starts the WAL over at a write that begins once every frame was copied back and no
//! read uses the WAL. Writes back to back leave no such moment: a checkpoint pass copies and
//! syncs for milliseconds while the writer appends, and a RESTART checkpoint waiting for
//! SQLite's write lock finds it free for microseconds between two writes and hardly ever got
//! it (the WAL grew to 350-450 MB). So the checkpointer closes this gate, which every write of
//! this process passes before it begins: it waits for the write under way, restarts (copying
//! the few frames its catch-up passes left), and the next write starts the WAL over.
//!
//! That alone bounds the WAL only if the checkpointer's passes keep up with the writer; a
//! writer faster than the disk's syncs would outrun them. So writes also learn the WAL's size
//! at each commit (SQLite's WAL hook) and, past `HOLD_FRAMES`, wait here until the
//! checkpointer has restarted it: the WAL stays under `HOLD_FRAMES` and one write whatever the
//! writer's speed. Not while restarts fail (a read still uses the WAL, or another process
//! writes): calls would wait for the read, which is the WAL's cap's business (`WAL_CAP_BYTES`).

use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::lock_waits;
use crate::process::unpoisoned;

/// WAL frames past which writes wait for the checkpointer to restart the WAL (~31 MB of 4 kB
/// pages: four times the size at which it starts catching up to restart it).
pub(super) const HOLD_FRAMES: i64 = 8000;
/// How long a write waits at the gate at most, whatever the checkpointer does (a restart past
/// the cap may keep it closed up to its `CAP_WAIT`, as SQLite's write lock would).
const MOST_WAIT: Duration = Duration::from_secs(1);

#[derive(Default)]
pub(super) struct WalGate {
    /// Frames in the WAL after this process's last commit; 0 once the checkpointer restarted it
    /// (the next write starts it over).
    frames: AtomicI64,
    state: Mutex<State>,
    /// Writes waiting at the gate: the gate opened or the WAL's state changed.
    changed: Condvar,
    /// The checkpointer, between two rounds: a write began to wait past `HOLD_FRAMES`.
    wanted: Condvar,
}

#[derive(Default)]
struct State {
    /// The checkpointer restarts the WAL: writes wait until it is done.
    closed: bool,
    /// Writes that passed the gate and have not ended.
    writing: usize,
    /// The last restart failed or could not be tried (a read still used the WAL): writes past
    /// `HOLD_FRAMES` do not wait until one succeeds.
    stalled: bool,
    /// Wake the checkpointer now (a write waits for it, or the store is closing).
    woken: bool,
}

/// A write that passed the gate, until it is dropped.
pub(super) struct Writing<'a>(&'a WalGate);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut s = unpoisoned(self.0.state.lock());
        s.writing -= 1;
        if s.closed && s.writing == 0 {
            self.0.changed.notify_all();
        }
    }
}

/// SQLite's WAL hook: called after each commit of the connection with the frames in the WAL.
unsafe extern "C" fn on_commit(gate: *mut c_void, _db: *mut rusqlite::ffi::sqlite3, _name: *const c_char, frames: c_int) -> c_int {
    // SAFETY: `install` passed a `WalGate` that outlives the connection.
    let gate = unsafe { &*(gate as *const WalGate) };
    gate.frames.store(i64::from(frames), Ordering::Relaxed);
    rusqlite::ffi::SQLITE_OK
}

impl WalGate {
    /// Makes `conn`'s commits tell the gate the WAL's size. `self` must outlive `conn`, and
    /// `conn` must not set `wal_autocheckpoint` afterwards (it replaces the hook).
    pub(super) fn install(&self, conn: &Connection) {
        // SAFETY: the hook reads the gate through the pointer, which the caller keeps valid
        // while the connection lives.
        unsafe { rusqlite::ffi::sqlite3_wal_hook(conn.handle(), Some(on_commit), (self as *const WalGate).cast_mut().cast()) };
    }

    fn must_wait(&self, s: &State) -> bool {
        s.closed || (!s.stalled && self.frames.load(Ordering::Relaxed) > HOLD_FRAMES)
    }

    /// Passes the gate before a write begins: waits while the checkpointer restarts the WAL,
    /// or while the WAL is past `HOLD_FRAMES` and restarts succeed, `MOST_WAIT` at most
    /// (counted as a lock wait).
    pub(super) fn pass(&self) -> Writing<'_> {
        let mut s = unpoisoned(self.state.lock());
        if self.must_wait(&s) {
            if !s.closed {
                self.wake_locked(&mut s);
            }
            let started = Instant::now();
            while self.must_wait(&s) {
                let Some(left) = MOST_WAIT.checked_sub(started.elapsed()) else { break };
                s = unpoisoned(self.changed.wait_timeout(s, left)).0;
            }
            lock_waits::record(true, started.elapsed());
        }
        s.writing += 1;
        Writing(self)
    }

    /// Frames in the WAL after this process's last commit (0 after a restart, until the next).
    #[cfg(test)]
    pub(super) fn frames(&self) -> i64 {
        self.frames.load(Ordering::Relaxed)
    }

    /// The checkpointer's pause between two rounds: `wait`, or until a write waits for it past
    /// `HOLD_FRAMES` (it would otherwise wait for the rest of the pause, up to 200 ms).
    pub(super) fn sleep(&self, wait: Duration) {
        let s = unpoisoned(self.state.lock());
        let mut s = unpoisoned(self.wanted.wait_timeout_while(s, wait, |s| !s.woken)).0;
        s.woken = false;
    }

    /// Ends the checkpointer's pause now.
    pub(super) fn wake(&self) {
        let mut s = unpoisoned(self.state.lock());
        self.wake_locked(&mut s);
    }

    fn wake_locked(&self, s: &mut State) {
        s.woken = true;
        self.wanted.notify_one();
    }

    /// Writes wait past `HOLD_FRAMES`: the checkpointer should restart without catching up.
    pub(super) fn holding(&self) -> bool {
        !unpoisoned(self.state.lock()).stalled && self.frames.load(Ordering::Relaxed) > HOLD_FRAMES
    }

    /// Closes the gate, waits for the writes under way to end (`wait` at most), runs `restart`
    /// (true: the WAL starts over at the next write) and opens the gate. False without running
    /// it if a write outlasted `wait`.
    pub(super) fn restart(&self, wait: Duration, restart: impl FnOnce() -> bool) -> bool {
        let mut s = unpoisoned(self.state.lock());
        s.closed = true;
        let drained = self.drained(s, wait).writing == 0;
        let ok = drained && restart();
        let mut s = unpoisoned(self.state.lock());
        s.closed = false;
        s.stalled = !ok;
        if ok {
            self.frames.store(0, Ordering::Relaxed);
        }
        self.changed.notify_all();
        ok
    }

    fn drained<'a>(&self, mut s: MutexGuard<'a, State>, wait: Duration) -> MutexGuard<'a, State> {
        let started = Instant::now();
        while s.writing > 0 {
            let Some(left) = wait.checked_sub(started.elapsed()) else { break };
            s = unpoisoned(self.changed.wait_timeout(s, left)).0;
        }
        s
    }

    /// No restart can be tried now (a read still uses the WAL): writes past `HOLD_FRAMES` go
    /// on until one succeeds.
    pub(super) fn stall(&self) {
        let mut s = unpoisoned(self.state.lock());
        if !s.stalled {
            s.stalled = true;
            self.changed.notify_all();
        }
    }
}
