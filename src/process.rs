//! State that belongs to one process and must be rebuilt in a child made by `fork()`.
//!
//! A forked child (Celery prefork, `gunicorn --preload`, a multiprocessing fork pool) gets
//! a copy of the parent's memory but only the thread that forked: a tokio runtime's workers,
//! the SQLite checkpointer, the PostgreSQL store's threads and the lease renewer are gone,
//! and locks they held stay held forever. So each such value is kept with the id of the
//! process that built it, checked on every use (one `getpid`, no lock): a child builds its
//! own on first use. The parent's copy is leaked in the child, never dropped, because
//! dropping it would wait for threads that do not exist there, or close the parent's SQLite
//! file and so drop the POSIX locks the parent still holds on it.
//!
//! A pid check rather than an `at_fork` hook: it also covers forks that run no hooks, and
//! it keeps the rebuilding next to the values it rebuilds.

use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::LockResult;

/// The guard of a std lock, poisoned or not: a panic while it was held is caught at the
/// binding boundary and the state it guards stays consistent (each holder writes it whole).
/// std locks rather than parking_lot's: parking_lot parks contended threads in one global
/// table, and a fork while another thread is inside it leaves that table locked in the child.
pub fn unpoisoned<G>(r: LockResult<G>) -> G {
    r.unwrap_or_else(|e| e.into_inner())
}

struct Entry<T> {
    pid: u32,
    value: T,
}

/// A value built at most once per process (once more in each forked child).
pub struct PerProcess<T> {
    /// Points to a leaked `Entry`; replaced (never freed) when the pid differs, freed only
    /// by `Drop` in the process that built it.
    slot: AtomicPtr<Entry<T>>,
}

impl<T> PerProcess<T> {
    pub const fn empty() -> Self {
        PerProcess { slot: AtomicPtr::new(std::ptr::null_mut()) }
    }

    /// Holds `value`, built by this process.
    pub fn new(value: T) -> Self {
        PerProcess { slot: AtomicPtr::new(Box::into_raw(Box::new(Entry { pid: std::process::id(), value }))) }
    }

    /// This process's value, built with `make` if this process has none yet.
    pub fn get_or_try_init<E>(&self, make: impl FnOnce() -> Result<T, E>) -> Result<&T, E> {
        let pid = std::process::id();
        let current = self.slot.load(Ordering::Acquire);
        // SAFETY: a non-null slot points to an Entry that is freed only by `Drop` (which has
        // `&mut self`, so no borrow handed out here is alive); replacing it leaks the old
        // one. So it outlives `&self`.
        if let Some(e) = unsafe { current.as_ref() } {
            if e.pid == pid {
                return Ok(&e.value);
            }
        }
        let fresh = Box::into_raw(Box::new(Entry { pid, value: make()? }));
        match self.slot.compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire) {
            // The parent's entry (if any) is leaked on purpose; see the module comment.
            // SAFETY: `fresh` is now the slot's entry, alive as long as `self` (see above).
            Ok(_) => Ok(unsafe { &(*fresh).value }),
            Err(winner) => {
                // Another thread of this process built one first: keep theirs. Ours was
                // built here, so dropping it is safe.
                // SAFETY: `fresh` was never shared; `winner` is alive as above.
                drop(unsafe { Box::from_raw(fresh) });
                Ok(unsafe { &(*winner).value })
            }
        }
    }
}

impl<T> Drop for PerProcess<T> {
    fn drop(&mut self) {
        let p = *self.slot.get_mut();
        // SAFETY: `&mut self`: no borrow of the entry is alive.
        if unsafe { p.as_ref() }.is_some_and(|e| e.pid == std::process::id()) {
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

// SAFETY: the cell hands out `&T` to any thread and may drop `T` on any thread, like a
// `OnceLock<T>`.
unsafe impl<T: Send + Sync> Sync for PerProcess<T> {}
unsafe impl<T: Send> Send for PerProcess<T> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_once_per_process_and_keeps_the_first_value() {
        let cell = PerProcess::empty();
        assert_eq!(*cell.get_or_try_init(|| Ok::<_, ()>(1)).unwrap(), 1);
        assert_eq!(*cell.get_or_try_init(|| Ok::<_, ()>(2)).unwrap(), 1);
        assert_eq!(PerProcess::<i32>::empty().get_or_try_init(|| Err("no")), Err("no"));
        assert_eq!(*PerProcess::new(3).get_or_try_init(|| Ok::<_, ()>(4)).unwrap(), 3);
    }

    #[test]
    fn a_value_from_another_process_is_replaced_and_leaked() {
        let cell = PerProcess::new(std::sync::Arc::new(1));
        let parents = cell.get_or_try_init(|| Ok::<_, ()>(Default::default())).unwrap().clone();
        // Pretend the entry was built by the parent of a fork.
        unsafe { (*cell.slot.load(Ordering::Acquire)).pid = 0 };
        assert_eq!(**cell.get_or_try_init(|| Ok::<_, ()>(std::sync::Arc::new(2))).unwrap(), 2);
        unsafe { (*cell.slot.load(Ordering::Acquire)).pid = 0 };
        drop(cell);
        // Neither the parent's value nor the "child's" was dropped.
        assert_eq!(std::sync::Arc::strong_count(&parents), 2);
    }
}
