//! The Python bindings (`tenantllm._core`): the only module that uses pyo3.

mod config;
mod convert;
mod engine;
mod errors;
mod query;
mod runtime;
mod second_sqlite;
mod stream;

use pyo3::prelude::*;

use errors::IntoPy;

/// Waits up to `timeout` seconds (0 to 60) for this process's async calls to finish or
/// settle as cancelled; `tenantllm` registers it with `atexit`, so none is cut off by
/// interpreter shutdown.
#[pyfunction]
fn drain_tasks(py: Python<'_>, timeout: f64) -> PyResult<()> {
    if !(0.0..=60.0).contains(&timeout) {
        return Err(crate::error::Error::Configuration(format!("timeout must be from 0 to 60 seconds (got {timeout})"))).py_err(py);
    }
    errors::call_core(py, || {
        runtime::drain(std::time::Duration::from_secs_f64(timeout));
        // No retention batch starts after this; one under way gets a second to commit.
        crate::retention::stop(std::time::Duration::from_secs(1));
        Ok(())
    })
}

/// How many times this thread's database calls waited for a lock another connection or
/// thread held, and how long in all (seconds), since the thread began: benchmarks tell calls
/// that waited on the database from calls the machine slowed down.
#[pyfunction]
fn lock_waits() -> (u64, f64) {
    let (waits, waited) = crate::store::lock_waits();
    (waits, waited.as_secs_f64())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<engine::PyAgentSpec>()?;
    m.add_class::<engine::PyAgentResult>()?;
    m.add_class::<engine::PyGuard>()?;
    m.add_class::<engine::PyCall>()?;
    m.add_class::<stream::PyStream>()?;
    m.add_class::<engine::PySettlement>()?;
    m.add_class::<engine::PyTenantRows>()?;
    m.add_function(wrap_pyfunction!(drain_tasks, m)?)?;
    m.add_function(wrap_pyfunction!(lock_waits, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // The fields of a tenant budget / tenant limits dict, for the Python layer's checks.
    m.add("TENANT_LIMIT_KEYS", convert::TENANT_LIMIT_KEYS.to_vec())?;
    Ok(())
}
