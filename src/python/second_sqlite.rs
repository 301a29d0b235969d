//! Outside Linux our SQLite's locks are POSIX locks, which Python's `sqlite3` (another SQLite
//! copy in the process) drops when it closes the same file: the first SQLite file configured
//! warns once, naming what to do. On Linux they are open file description locks
//! (`store::sqlite`'s `ofd_locks`) and the two copies share a file safely.

#[cfg(not(target_os = "linux"))]
pub fn warn_once(py: pyo3::Python<'_>) -> pyo3::PyResult<()> {
    use pyo3::exceptions::PyRuntimeWarning;
    use pyo3::prelude::*;

    static WARNED: std::sync::Once = std::sync::Once::new();
    let mut outcome = Ok(());
    WARNED.call_once(|| {
        let message = c"tenantllm carries its own SQLite, and outside Linux its file locks and those of Python's sqlite3 \
            module do not exclude each other in one process: opening a tenantllm database file with sqlite3 (pandas, \
            Django, a notebook) in this process can lose rows and break budgets. Keep sqlite3 off this file; see \
            README, \"Python's sqlite3 on the same file\".";
        outcome = PyErr::warn(py, py.get_type::<PyRuntimeWarning>().as_any(), message, 1);
    });
    outcome
}

#[cfg(target_os = "linux")]
pub fn warn_once(_py: pyo3::Python<'_>) -> pyo3::PyResult<()> {
    Ok(())
}
