//! State that belongs to one process and must be rebuilt in a child made by `fork()`.
//!
//! A forked child (Celery prefork, `gunicorn --preload`, a multiprocessing fork pool) gets
//! a copy of the parent's memory but only the thread that forked: a tokio runtime's workers,
//! the SQLite checkpointer, the PostgreSQL store's threads and the lease renewer are gone,
//! and locks they held stay held forever. So each such value is kept with the id of the
//! process that built it, checked on every use (`pid()`: no system call, no lock): a child
//! builds its own on first use. The parent's copy is leaked in the child, never dropped,
//! because dropping it would wait for threads that do not exist there, or close the parent's
//! SQLite file and so drop the POSIX locks the parent still holds on it.
//!
//! A pid check rather than rebuilding in an `at_fork` hook: it keeps the rebuilding next to
//! the values it rebuilds, and it happens on the child's first use, in its own time. The pid
//! itself is cached, and forgotten in the child by a `pthread_atfork` handler: glibc's
//! `getpid` is a system call, and a SQLite call checks the pid at each of its ~15 file locks.
//! Every `fork()` runs the handlers (Python's `os.fork`, multiprocessing, Celery, gunicorn),
//! and so does the fork gate below, which the database libraries already rely on.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{LockResult, Once};
use std::time::{Duration, Instant};

/// The guard of a std lock, poisoned or not: a panic while it was held is caught at the
/// binding boundary and the state it guards stays consistent (each holder writes it whole).
/// std locks rather than parking_lot's: parking_lot parks contended threads in one global
/// table, and a fork while another thread is inside it leaves that table locked in the child.
pub fn unpoisoned<G>(r: LockResult<G>) -> G {
    r.unwrap_or_else(|e| e.into_inner())
}

/// This process's id, cached: 0 until first asked, and again in a child made by `fork()`
/// (`after_fork_in_child`), which then asks the kernel once.
static PID: AtomicU32 = AtomicU32::new(0);

/// This process's id, without a system call once known (see the module comment).
pub fn pid() -> u32 {
    let cached = PID.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    // The handler that forgets the pid is in place before the pid is remembered: a fork after
    // this store runs it.
    fork_hooks();
    let pid = std::process::id();
    PID.store(pid, Ordering::Relaxed);
    pid
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
        PerProcess { slot: AtomicPtr::new(Box::into_raw(Box::new(Entry { pid: pid(), value }))) }
    }

    /// This process's value, built with `make` if this process has none yet.
    pub fn get_or_try_init<E>(&self, make: impl FnOnce() -> Result<T, E>) -> Result<&T, E> {
        let pid = pid();
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

    /// The value the parent built, in a child made by `fork()` that has not built its own yet:
    /// for the child to let go of what it inherited (`None` in the process that built it).
    /// Asks the kernel for the pid: it runs in `pthread_atfork` child handlers, which may run
    /// before the one that forgets the cached pid.
    pub fn inherited(&self) -> Option<&T> {
        // SAFETY: as in `get_or_try_init`: an entry outlives `&self`.
        unsafe { self.slot.load(Ordering::Acquire).as_ref() }.filter(|e| e.pid != std::process::id()).map(|e| &e.value)
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

// ---------------------------------------------------------------- the fork gate

/// `fork()` copies every lock in the state it is in, and only the forking thread goes on in
/// the child. SQLite's global mutexes (its allocator's, its file table's) are taken by any
/// thread using any connection; a fork while one was held left it held forever, and the
/// child hung on its first `open` (seen under gdb, one fork in ~50 on a busy machine). So
/// every use of a database library runs inside `quiet()`, and a fork first waits (in a
/// `pthread_atfork` handler) until no thread is inside, while new entries wait for the fork.
///
/// Two atomics rather than a lock: a lock can itself be caught held by the fork.
static FORKING: AtomicBool = AtomicBool::new(false);
static INSIDE: AtomicUsize = AtomicUsize::new(0);
/// How long a fork waits for threads inside the gate before it goes ahead anyway: the gate
/// must never turn a slow query into a hung `fork()`.
const FORK_WAIT: Duration = Duration::from_secs(10);

thread_local! {
    /// How deep this thread is in the gate: only the outermost entry counts, so a nested one
    /// never waits for a fork that waits for its own thread.
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Held while this thread uses a database library; see the gate above.
pub struct Quiet(());

/// Enters the gate (waits while a fork is under way).
pub fn quiet() -> Quiet {
    fork_hooks();
    if DEPTH.get() == 0 {
        loop {
            while FORKING.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_micros(100));
            }
            INSIDE.fetch_add(1, Ordering::SeqCst);
            // A fork that began between the check and the increment did not see us: step out.
            if !FORKING.load(Ordering::SeqCst) {
                break;
            }
            INSIDE.fetch_sub(1, Ordering::SeqCst);
        }
    }
    DEPTH.set(DEPTH.get() + 1);
    Quiet(())
}

/// How deep this thread is in the fork gate (1: its outermost entry, which a fork waits for).
#[cfg(test)]
pub fn quiet_depth() -> usize {
    DEPTH.get()
}

impl Drop for Quiet {
    fn drop(&mut self) {
        DEPTH.set(DEPTH.get() - 1);
        if DEPTH.get() == 0 {
            INSIDE.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Installs the fork gate's handlers and the pid cache's, once per process (a child inherits
/// them).
fn fork_hooks() {
    static HOOKS: Once = Once::new();
    HOOKS.call_once(|| {
        // SAFETY: the handlers touch atomics, sleep, and call the fork hooks (`on_fork`) under
        // a spin flag held for no wait; the hooks take short locks of their own. All of it
        // happens before the fork in the parent, and the child handler only resets atomics and
        // replaces its copy of the hooks unread, so the child inherits no lock held.
        unsafe { libc::pthread_atfork(Some(before_fork), Some(after_fork_in_parent), Some(after_fork_in_child)) };
    });
}

extern "C" fn before_fork() {
    FORKING.store(true, Ordering::SeqCst);
    // The forking thread itself may be inside (a fork from code called in a query): not waited for.
    let own = usize::from(DEPTH.get() > 0);
    let deadline = Instant::now() + FORK_WAIT;
    while INSIDE.load(Ordering::SeqCst) > own && Instant::now() < deadline {
        // Again at every look, not once: a long operation that began its work after the last
        // call (e.g. after an interrupt that came too early to count) is stopped too.
        HOOKS.interrupt_all();
        std::thread::sleep(Duration::from_micros(50));
    }
}

extern "C" fn after_fork_in_parent() {
    FORKING.store(false, Ordering::SeqCst);
}

extern "C" fn after_fork_in_child() {
    // A new process: `pid()` asks the kernel again on its first use.
    PID.store(0, Ordering::Relaxed);
    // The parent's operations are not the child's to interrupt.
    HOOKS.forget_inherited();
    // Only this thread came along: threads still inside when the wait gave up are gone.
    INSIDE.store(usize::from(DEPTH.get() > 0), Ordering::SeqCst);
    FORKING.store(false, Ordering::SeqCst);
}

// ---------------------------------------------------------------- interrupting for a fork

/// Calls that stop a long operation inside the gate (a database library's work that can be
/// interrupted and tried again later), so that a fork waits for a moment, not for the whole
/// operation. `before_fork` calls every one while it waits; each must return at once, never
/// enter the gate nor wait for a thread inside it, and only stop work that is safe to stop.
type Hook = Box<dyn Fn() + Send + Sync>;

struct Hooks {
    /// A spin lock rather than a std lock: a fork whose wait gave up may copy it held, and the
    /// child, whose only thread is the forking one, then takes it back by storing false.
    locked: AtomicBool,
    /// Guarded by `locked`: the hooks by the id `on_fork` gave them.
    list: UnsafeCell<Vec<(u64, Hook)>>,
    next: AtomicU64,
}

// SAFETY: `list` is only used with `locked` taken (or in a forked child, with one thread).
unsafe impl Sync for Hooks {}

static HOOKS: Hooks = Hooks { locked: AtomicBool::new(false), list: UnsafeCell::new(Vec::new()), next: AtomicU64::new(0) };

impl Hooks {
    /// Runs `f` on the list with the lock taken. The lock is only taken inside the gate (by
    /// `on_fork` and `OnFork`'s drop) or by `before_fork` while no thread can enter it, and is
    /// held for no wait: so once no other thread is inside, nobody holds it as the fork goes on.
    fn with<R>(&self, f: impl FnOnce(&mut Vec<(u64, Hook)>) -> R) -> R {
        while self.locked.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            std::thread::yield_now();
        }
        // SAFETY: the lock is ours.
        let r = f(unsafe { &mut *self.list.get() });
        self.locked.store(false, Ordering::Release);
        r
    }

    fn interrupt_all(&self) {
        self.with(|list| {
            for (_, hook) in list.iter() {
                // A panic must not unwind out of the fork handler (an abort): the hook is
                // then simply not run.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(hook));
            }
        });
    }

    /// In a forked child: an empty list, unlocked. The parent's hooks are leaked, not dropped
    /// (they belong to the parent's threads and handles; see the module comment), and the list
    /// is not read: a thread the fork's wait gave up on may have been changing it.
    fn forget_inherited(&self) {
        // SAFETY: the child has one thread, this one, and nothing of the list is read.
        unsafe { std::ptr::write(self.list.get(), Vec::new()) };
        self.locked.store(false, Ordering::Release);
    }
}

/// A hook registered by `on_fork`: dropping it removes the hook (dropped in this process).
#[must_use = "the hook is removed when this is dropped"]
pub struct OnFork(u64);

/// Makes every fork of this process call `hook` before (and while) it waits for the threads
/// inside the gate; see `Hook`.
pub fn on_fork(hook: impl Fn() + Send + Sync + 'static) -> OnFork {
    let _quiet = quiet();
    let id = HOOKS.next.fetch_add(1, Ordering::Relaxed);
    let hook: Hook = Box::new(hook);
    HOOKS.with(|list| list.push((id, hook)));
    OnFork(id)
}

impl Drop for OnFork {
    fn drop(&mut self) {
        let _quiet = quiet();
        // Dropped once the lock is let go: dropping a hook may take the time a drop takes.
        let gone = HOOKS.with(|list| list.iter().position(|(id, _)| *id == self.0).map(|at| list.swap_remove(at)));
        drop(gone);
    }
}

// SAFETY: the cell hands out `&T` to any thread and may drop `T` on any thread, like a
// `OnceLock<T>`.
unsafe impl<T: Send + Sync> Sync for PerProcess<T> {}
unsafe impl<T: Send> Send for PerProcess<T> {}

/// Forks a child that exits at once, and reaps it: what a test's fork runs the handlers with.
#[cfg(test)]
pub(crate) fn fork_a_child_that_exits() {
    // SAFETY: the child only exits, without unwinding.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork failed");
    if child == 0 {
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: our own child.
    assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child did not exit");
}

/// Runs the ignored test `name` of this test binary in a process of its own, with `env` set
/// (the test does nothing without it): a fork waits until no thread is inside the gate and
/// holds every thread at its door meanwhile, so a test that forks stalls the tests running
/// beside it (a checkpointer test counting the writes that began during a pass saw too few).
#[cfg(test)]
pub(crate) fn run_alone(name: &str, env: &str) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--include-ignored", "--nocapture", "--test-threads=1"])
        .env(env, "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{stderr}");
    assert!(out.status.success() && stdout.contains("1 passed"), "{name}: {stdout}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the processes the tests that fork run in (`run_alone`).
    const FORKS: &str = "TENANTLLM_TEST_FORKS_ALONE";

    #[test]
    fn the_tests_that_fork_run_alone() {
        run_alone("process::tests::a_forked_child_knows_its_own_pid", FORKS);
        run_alone("process::tests::a_fork_calls_the_hooks_while_it_waits_for_the_gate", FORKS);
    }

    #[test]
    fn builds_once_per_process_and_keeps_the_first_value() {
        let cell = PerProcess::empty();
        assert_eq!(*cell.get_or_try_init(|| Ok::<_, ()>(1)).unwrap(), 1);
        assert_eq!(*cell.get_or_try_init(|| Ok::<_, ()>(2)).unwrap(), 1);
        assert_eq!(PerProcess::<i32>::empty().get_or_try_init(|| Err("no")), Err("no"));
        assert_eq!(*PerProcess::new(3).get_or_try_init(|| Ok::<_, ()>(4)).unwrap(), 3);
    }

    #[test]
    #[ignore = "run in a process of its own by the_tests_that_fork_run_alone"]
    fn a_forked_child_knows_its_own_pid() {
        if std::env::var_os(FORKS).is_none() {
            return;
        }
        let parent = pid();
        assert_eq!(parent, std::process::id());
        // SAFETY: the child only reads atomics, asks for its pid and exits without unwinding.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork failed");
        if child == 0 {
            let ok = pid() == std::process::id() && pid() != parent;
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: our own child.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child saw its parent's pid");
        assert_eq!(pid(), parent);
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

    /// A fork calls the hooks while it waits for a thread inside the gate, which the hook lets
    /// go (without it the fork would wait `FORK_WAIT`, and the hook's count stay 0); a dropped
    /// hook is not called again.
    #[test]
    #[ignore = "run in a process of its own by the_tests_that_fork_run_alone"]
    fn a_fork_calls_the_hooks_while_it_waits_for_the_gate() {
        if std::env::var_os(FORKS).is_none() {
            return;
        }
        use std::sync::Arc;
        let (calls, release) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let hook = on_fork({
            let (calls, release) = (Arc::clone(&calls), Arc::clone(&release));
            move || {
                calls.fetch_add(1, Ordering::SeqCst);
                release.store(true, Ordering::SeqCst);
            }
        });
        let (entered, inside) = (Arc::new(AtomicBool::new(false)), Arc::clone(&release));
        let thread = std::thread::spawn({
            let entered = Arc::clone(&entered);
            move || {
                let _quiet = quiet();
                entered.store(true, Ordering::SeqCst);
                while !inside.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        });
        while !entered.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_micros(100));
        }
        fork_a_child_that_exits();
        thread.join().unwrap();
        let called = calls.load(Ordering::SeqCst);
        assert!(called >= 1, "the hook was not called");
        drop(hook);
        HOOKS.interrupt_all();
        assert_eq!(calls.load(Ordering::SeqCst), called, "a dropped hook was called");
    }
}
