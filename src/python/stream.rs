//! `Stream`: a streamed call in flight. The call runs as a task on the runtime and hands
//! each piece of text over a channel; `next` (sync, GIL released) and `anext` (awaitable)
//! read it. Closing the stream, or dropping it unread, drops the channel's receiver: the
//! task sees that, abandons the request and records the row as cancelled.

use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio::sync::Mutex as AsyncMutex;
use tokio::task::JoinHandle;

use super::engine::{block_interruptibly, boxed, PyAgentResult};
use super::errors::{to_py, IntoPy};
use super::runtime::{runtime, spawn, Tokio};
use crate::engine::{AgentSpec, CallOutcome, CallRequest, Engine};
use crate::error::{catch_panic_async, Error, Result};
use crate::process::unpoisoned;

type Task = JoinHandle<Result<CallOutcome>>;

/// The parts readers share (the sync and async forms, and pending awaitables).
struct Shared {
    /// `None` once closed.
    rx: AsyncMutex<Option<UnboundedReceiver<String>>>,
    /// Taken by whoever sees the end first.
    task: AsyncMutex<Option<Task>>,
    result: Mutex<Option<CallOutcome>>,
}

enum Next {
    Piece(String),
    /// The stream ended now: the call's error, if it failed (else its result is stored).
    End(Result<()>),
    /// It had already ended, or was closed.
    Over,
}

impl Shared {
    async fn next(&self) -> Next {
        let mut rx = self.rx.lock().await;
        if let Some(piece) = match rx.as_mut() {
            Some(r) => r.recv().await,
            None => return Next::Over,
        } {
            return Next::Piece(piece);
        }
        // The task dropped its sender: it has settled the row.
        match self.task.lock().await.take() {
            Some(task) => Next::End(self.join(task).await.map(drop)),
            None => Next::Over,
        }
    }

    async fn join(&self, task: Task) -> Result<CallOutcome> {
        let outcome = task.await.unwrap_or_else(|e| Err(Error::Internal(format!("the stream's task failed: {e}"))));
        if let Ok(o) = &outcome {
            *unpoisoned(self.result.lock()) = Some(o.clone());
        }
        outcome
    }

    /// Stops reading: the task records the row (cancelled, unless it had already ended) and
    /// is waited for, so the row is settled when this returns.
    async fn close(&self) {
        self.rx.lock().await.take();
        if let Some(task) = self.task.lock().await.take() {
            // Whatever the outcome: nobody is reading any more.
            let _ = self.join(task).await;
        }
    }
}

#[pyclass(module = "tenantllm._core", name = "Stream", frozen)]
pub struct PyStream {
    shared: Arc<Shared>,
    /// The process that started it: its task runs on that process's runtime.
    pid: u32,
}

impl PyStream {
    pub fn start(py: Python<'_>, engine: Arc<Engine>, spec: Arc<AgentSpec>, req: Arc<CallRequest>) -> PyResult<PyStream> {
        let rt = runtime().py_err(py)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let task = spawn(rt, async move { catch_panic_async(boxed(engine.run_stream(spec, req, &tx))).await });
        let shared = Shared { rx: AsyncMutex::new(Some(rx)), task: AsyncMutex::new(Some(task)), result: Mutex::new(None) };
        Ok(PyStream { shared: Arc::new(shared), pid: crate::process::pid() })
    }

    fn check_process(&self, py: Python<'_>) -> PyResult<()> {
        if self.pid != crate::process::pid() {
            return Err(to_py(py, Error::Configuration("this stream was started in another process (before a fork); read it there".into())));
        }
        Ok(())
    }
}

impl Drop for PyStream {
    fn drop(&mut self) {
        // In a forked child the task and channel are the parent's: leave them alone.
        if self.pid != crate::process::pid() {
            std::mem::forget(self.shared.clone());
        }
    }
}

/// A piece as Python sees it: the text, `None` at the end, or the call's error.
fn piece(py: Python<'_>, next: Next) -> PyResult<Option<String>> {
    match next {
        Next::Piece(p) => Ok(Some(p)),
        Next::End(Ok(_)) | Next::Over => Ok(None),
        Next::End(Err(e)) => Err(to_py(py, e)),
    }
}

#[pymethods]
impl PyStream {
    /// The next piece of text, waiting for it with the GIL released; `None` at the end.
    /// Errors before the first piece (budget, breaker, every attempt failed) and after it
    /// (the stream broke) are raised here.
    fn next(&self, py: Python<'_>) -> PyResult<Option<String>> {
        self.check_process(py)?;
        let shared = self.shared.clone();
        let next = block_interruptibly(py, async move { shared.next().await })?;
        piece(py, next)
    }

    /// The awaitable form of `next`.
    fn anext<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.check_process(py)?;
        let shared = self.shared.clone();
        pyo3_async_runtimes::generic::future_into_py::<Tokio, _, _>(py, async move {
            let next = shared.next().await;
            Python::attach(|py| piece(py, next))
        })
    }

    /// Stops the stream; returns once its row is settled.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.check_process(py)?;
        let shared = self.shared.clone();
        block_interruptibly(py, async move { shared.close().await })
    }

    /// Stops the stream without waiting: its row settles in the background.
    fn cancel(&self, py: Python<'_>) -> PyResult<()> {
        self.check_process(py)?;
        let shared = self.shared.clone();
        spawn(runtime().py_err(py)?, async move { shared.close().await });
        Ok(())
    }

    /// The awaitable form of `close`.
    fn aclose<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.check_process(py)?;
        let shared = self.shared.clone();
        pyo3_async_runtimes::generic::future_into_py::<Tokio, _, _>(py, async move {
            shared.close().await;
            Ok(())
        })
    }

    /// The result once the stream has ended complete; `None` before, or if it was closed
    /// early or failed.
    #[getter]
    fn result(&self) -> Option<PyAgentResult> {
        unpoisoned(self.shared.result.lock()).clone().map(PyAgentResult::from)
    }
}
