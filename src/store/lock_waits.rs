//! How long this thread's store calls waited for locks: SQLite's write lock held by another
//! connection (the busy handler's sleeps: another process, or this process's checkpointer)
//! and this process's writer connection held by another thread (a call, a lease renewal, a
//! retention batch). Counted per thread, so a benchmark can tell a call that waited on the
//! database from one the machine slowed down, whatever the machine's load.

use std::cell::Cell;
use std::time::Duration;

thread_local! {
    static WAITED: Cell<(u64, Duration)> = const { Cell::new((0, Duration::ZERO)) };
}

/// Adds `d` to the time waited; `first`: it is the first sleep of a new wait.
pub(super) fn record(first: bool, d: Duration) {
    WAITED.with(|w| {
        let (n, total) = w.get();
        w.set((n + u64::from(first), total + d));
    });
}

/// This thread's waits so far: how many, and how long in all.
pub fn so_far() -> (u64, Duration) {
    WAITED.with(Cell::get)
}
