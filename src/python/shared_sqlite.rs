//! Python's `sqlite3` must run on the same SQLite library as the store: a second copy in the
//! process drops our locks and deletes our WAL when its connections to the same file close.
//! Where the interpreter carries its own SQLite (python-build-standalone, uv-managed and some
//! conda Pythons), the first SQLite file configured warns once, naming what to do.

use std::ffi::CString;
use std::sync::Once;

use pyo3::exceptions::{PyImportError, PyRuntimeWarning};
use pyo3::prelude::*;

use super::errors::IntoPy;
use crate::store::{shares_sqlite_library, sqlite_library_version};

static CHECKED: Once = Once::new();

/// Warns (a `RuntimeWarning`, once per process) if Python's sqlite3 is another SQLite copy.
pub fn warn_if_separate(py: Python<'_>) -> PyResult<()> {
    let mut outcome = Ok(());
    CHECKED.call_once(|| outcome = check(py));
    outcome
}

fn check(py: Python<'_>) -> PyResult<()> {
    let sqlite3 = match py.import("sqlite3") {
        Ok(m) => m,
        // An interpreter without sqlite3 has no second SQLite to clash with.
        Err(e) if e.is_instance_of::<PyImportError>(py) => return Ok(()),
        Err(e) => return Err(e),
    };
    let conn = sqlite3.call_method1("connect", (":memory:",))?;
    let read = || -> PyResult<i64> { conn.call_method1("execute", ("PRAGMA soft_heap_limit",))?.call_method0("fetchone")?.get_item(0)?.extract() };
    let shared = shares_sqlite_library(|| read().ok()).py_err(py);
    conn.call_method0("close")?;
    if shared? != Some(false) {
        return Ok(());
    }
    let theirs: String = sqlite3.getattr("sqlite_version")?.extract()?;
    let message = format!(
        "Python's sqlite3 module runs on its own copy of SQLite ({theirs}), not the one tenantllm uses ({}): \
         opening a tenantllm database file with sqlite3 (pandas, Django, a notebook) in this process can lose \
         rows and break budgets. Use a Python that links the system libsqlite3 or keep sqlite3 off this file; see \
         README, \"Python's sqlite3 on the same file\".",
        sqlite_library_version()
    );
    let message = CString::new(message.replace('\0', "")).map_err(|e| PyRuntimeWarning::new_err(e.to_string()))?;
    PyErr::warn(py, py.get_type::<PyRuntimeWarning>().as_any(), &message, 1)
}
