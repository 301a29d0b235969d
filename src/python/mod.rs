//! The Python bindings (`tenantllm._core`): the only module that uses pyo3.

mod config;
mod convert;
mod engine;
mod errors;
mod query;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<engine::PyAgentSpec>()?;
    m.add_class::<engine::PyAgentResult>()?;
    m.add_class::<engine::PyGuard>()?;
    m.add_class::<engine::PyCall>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // The fields of a tenant budget / tenant limits dict, for the Python layer's checks.
    m.add("TENANT_LIMIT_KEYS", convert::TENANT_LIMIT_KEYS.to_vec())?;
    Ok(())
}
