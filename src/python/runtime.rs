//! The tokio runtime that sync calls block on and `acall`s run on: one per process, built on
//! first use and again in a forked child (`crate::process`), which is why it is ours and not
//! pyo3-async-runtimes' global one (a global runtime cannot be rebuilt after fork). `Tokio`
//! plugs it into pyo3-async-runtimes' generic awaitables.
//!
//! Tasks are counted so that interpreter exit can wait for them (`drain`): a task still
//! running then (an `acall` cancelled as the event loop closed) would otherwise finish after
//! the interpreter is gone, leave its row `running`, and print "Python interpreter is not
//! initialized" from a worker thread.

use std::cell::OnceCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pyo3_async_runtimes::generic::{ContextExt, Runtime};
use pyo3_async_runtimes::TaskLocals;

use crate::error::{Error, Result};
use crate::process::PerProcess;

pub struct ProcessRuntime {
    pub tokio: tokio::runtime::Runtime,
    /// Tasks spawned through `Tokio` and not yet finished or dropped.
    tasks: AtomicUsize,
}

static RUNTIME: PerProcess<ProcessRuntime> = PerProcess::empty();

/// This process's runtime, built on first use.
pub fn runtime() -> Result<&'static ProcessRuntime> {
    RUNTIME.get_or_try_init(|| {
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("tenantllm-tokio")
            .build()
            .map_err(|e| Error::Configuration(format!("cannot start the async runtime: {e}")))?;
        Ok(ProcessRuntime { tokio, tasks: AtomicUsize::new(0) })
    })
}

/// Waits (up to `timeout`) until every task spawned through `Tokio` in this process is done.
pub fn drain(timeout: Duration) {
    let Ok(rt) = runtime() else { return };
    let deadline = Instant::now() + timeout;
    while rt.tasks.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Counts a task from its spawn until it finishes or is dropped.
struct Counted(&'static ProcessRuntime);

impl Counted {
    fn new(rt: &'static ProcessRuntime) -> Counted {
        rt.tasks.fetch_add(1, Ordering::AcqRel);
        Counted(rt)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.tasks.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Spawns a task that interpreter exit waits for (`drain`).
pub fn spawn<F>(rt: &'static ProcessRuntime, fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let counted = Counted::new(rt);
    rt.tokio.spawn(async move {
        let _counted = counted;
        fut.await
    })
}

/// pyo3-async-runtimes' view of `runtime()`.
pub struct Tokio;

tokio::task_local! {
    static TASK_LOCALS: OnceCell<TaskLocals>;
}

/// The runtime for pyo3-async-runtimes' spawns, which cannot fail: `Engine.arun` builds it
/// (and raises if it cannot) before handing any future over.
fn built() -> &'static ProcessRuntime {
    runtime().expect("Engine.arun builds the runtime before spawning on it")
}

impl Runtime for Tokio {
    type JoinError = tokio::task::JoinError;
    type JoinHandle = tokio::task::JoinHandle<()>;

    fn spawn<F>(fut: F) -> Self::JoinHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        spawn(built(), fut)
    }

    fn spawn_blocking<F>(f: F) -> Self::JoinHandle
    where
        F: FnOnce() + Send + 'static,
    {
        let rt = built();
        let counted = Counted::new(rt);
        rt.tokio.spawn_blocking(move || {
            let _counted = counted;
            f()
        })
    }
}

impl ContextExt for Tokio {
    fn scope<F, R>(locals: TaskLocals, fut: F) -> Pin<Box<dyn Future<Output = R> + Send>>
    where
        F: Future<Output = R> + Send + 'static,
    {
        let cell = OnceCell::new();
        let _ = cell.set(locals);
        Box::pin(TASK_LOCALS.scope(cell, fut))
    }

    fn get_task_locals() -> Option<TaskLocals> {
        TASK_LOCALS.try_with(|c| c.get().cloned()).unwrap_or_default()
    }
}
