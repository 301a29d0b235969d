//! The Python exception tree, and the one place core errors become Python exceptions.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::convert::{amount_to_py, failure_to_py};
use crate::error::{catch_panic, Error, ProviderErrorKind, ProviderFailure};

create_exception!(tenantllm, TenantLLMError, PyException, "Base class of every tenantllm error.");
create_exception!(tenantllm, BudgetExceededError, TenantLLMError, "A hard budget would be exceeded; no request was sent.");
create_exception!(tenantllm, RateLimitedError, TenantLLMError, "A rate limit (requests or tokens per minute, concurrent calls) refused the call; no request was sent.");
create_exception!(tenantllm, CircuitOpenError, TenantLLMError, "The circuit breaker is open for every model of the agent.");
create_exception!(tenantllm, AllModelsExhaustedError, TenantLLMError, "The primary and every fallback model failed.");
create_exception!(tenantllm, ProviderError, TenantLLMError, "The provider failed or refused the request.");
create_exception!(tenantllm, AuthenticationError, ProviderError, "The provider rejected the API key (401/403).");
create_exception!(tenantllm, RateLimitError, ProviderError, "The provider is rate limiting (429).");
create_exception!(tenantllm, ProviderTimeoutError, ProviderError, "The provider did not answer within the timeout.");
create_exception!(tenantllm, InvalidResponseError, ProviderError, "The provider's answer was malformed or truncated.");
create_exception!(tenantllm, ConfigurationError, TenantLLMError, "A setting or argument is invalid.");
create_exception!(tenantllm, InvalidTenantError, TenantLLMError, "The tenant could not be resolved or is invalid.");
create_exception!(tenantllm, MissingParameterError, TenantLLMError, "A prompt parameter was not given.");
create_exception!(tenantllm, StoreError, TenantLLMError, "The database could not be opened, read or written.");
create_exception!(tenantllm, InternalError, TenantLLMError, "A bug in tenantllm (a Rust panic caught at the boundary); please report it.");

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("TenantLLMError", py.get_type::<TenantLLMError>())?;
    m.add("BudgetExceededError", py.get_type::<BudgetExceededError>())?;
    m.add("RateLimitedError", py.get_type::<RateLimitedError>())?;
    m.add("CircuitOpenError", py.get_type::<CircuitOpenError>())?;
    m.add("AllModelsExhaustedError", py.get_type::<AllModelsExhaustedError>())?;
    m.add("ProviderError", py.get_type::<ProviderError>())?;
    m.add("AuthenticationError", py.get_type::<AuthenticationError>())?;
    m.add("RateLimitError", py.get_type::<RateLimitError>())?;
    m.add("ProviderTimeoutError", py.get_type::<ProviderTimeoutError>())?;
    m.add("InvalidResponseError", py.get_type::<InvalidResponseError>())?;
    m.add("ConfigurationError", py.get_type::<ConfigurationError>())?;
    m.add("InvalidTenantError", py.get_type::<InvalidTenantError>())?;
    m.add("MissingParameterError", py.get_type::<MissingParameterError>())?;
    m.add("StoreError", py.get_type::<StoreError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    Ok(())
}

fn with_attrs(py: Python<'_>, err: PyErr, attrs: &Bound<'_, PyDict>) -> PyErr {
    let value = err.value(py);
    for (k, v) in attrs.iter() {
        if let Ok(k) = k.extract::<String>() {
            let _ = value.setattr(k.as_str(), v);
        }
    }
    err
}

fn provider_err(py: Python<'_>, f: &ProviderFailure) -> PyResult<PyErr> {
    let msg = f.to_string();
    let err = match f.kind {
        ProviderErrorKind::Authentication => AuthenticationError::new_err(msg),
        ProviderErrorKind::RateLimit => RateLimitError::new_err(msg),
        ProviderErrorKind::Timeout => ProviderTimeoutError::new_err(msg),
        ProviderErrorKind::InvalidResponse => InvalidResponseError::new_err(msg),
        ProviderErrorKind::Transport | ProviderErrorKind::BadRequest => ProviderError::new_err(msg),
    };
    let attrs = failure_to_py(py, f)?;
    Ok(with_attrs(py, err, &attrs))
}

fn build(py: Python<'_>, e: Error) -> PyResult<PyErr> {
    let msg = e.to_string();
    Ok(match e {
        Error::BudgetExceeded(b) => {
            let a = PyDict::new(py);
            a.set_item("scope", &b.scope)?;
            a.set_item("limit", amount_to_py(py, b.limit)?)?;
            a.set_item("current", amount_to_py(py, b.current)?)?;
            a.set_item("resets_at", chrono::DateTime::<chrono::Utc>::from_timestamp_micros(b.resets_at))?;
            // Seconds until then, as of now (the error may be raised a little after the check).
            let wait = b.resets_at.saturating_sub(crate::clock::now_micros()).max(0);
            a.set_item("retry_after", wait as f64 / 1e6)?;
            a.set_item("tenant_id", &b.tenant_id)?;
            a.set_item("agent", &b.agent)?;
            a.set_item("tenant_budget", b.tenant_budget)?;
            a.set_item("execution_id", &b.execution_id)?;
            with_attrs(py, BudgetExceededError::new_err(msg), &a)
        }
        Error::RateLimited(r) => {
            let a = PyDict::new(py);
            a.set_item("scope", &r.scope)?;
            a.set_item("limit", r.limit)?;
            a.set_item("current", r.current)?;
            a.set_item("retry_after", r.retry_after)?;
            a.set_item("tenant_id", &r.tenant_id)?;
            a.set_item("agent", &r.agent)?;
            a.set_item("tenant_budget", r.tenant_budget)?;
            a.set_item("execution_id", &r.execution_id)?;
            with_attrs(py, RateLimitedError::new_err(msg), &a)
        }
        Error::CircuitOpen(c) => {
            let a = PyDict::new(py);
            a.set_item("agent", &c.agent)?;
            a.set_item("tenant_id", &c.tenant_id)?;
            a.set_item("model", &c.model)?;
            let retry_at = chrono::DateTime::<chrono::Utc>::from_timestamp_micros((c.retry_at * 1e6) as i64);
            a.set_item("retry_at", retry_at)?;
            a.set_item("execution_id", &c.execution_id)?;
            with_attrs(py, CircuitOpenError::new_err(msg), &a)
        }
        Error::AllModelsExhausted { errors } => {
            let a = PyDict::new(py);
            let list = errors.iter().map(|f| failure_to_py(py, f)).collect::<PyResult<Vec<_>>>()?;
            a.set_item("errors", list)?;
            with_attrs(py, AllModelsExhaustedError::new_err(msg), &a)
        }
        Error::Provider(f) => provider_err(py, &f)?,
        Error::Configuration(m) => ConfigurationError::new_err(m),
        Error::TimezoneChanged(_) => ConfigurationError::new_err(msg),
        Error::InvalidTenant(m) => InvalidTenantError::new_err(m),
        Error::MissingParameter(m) => MissingParameterError::new_err(m),
        Error::Store(m) => StoreError::new_err(m),
        Error::Internal(_) => InternalError::new_err(msg),
    })
}

/// Converts a core error into the Python exception users catch.
pub fn to_py(py: Python<'_>, e: Error) -> PyErr {
    build(py, e).unwrap_or_else(|conversion_failure| conversion_failure)
}

/// For `?` on core results where the GIL is held.
pub trait IntoPy<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPy<T> for crate::error::Result<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}

/// Runs core code `f` with the GIL released, as every entry point that does work in the core
/// does: its error becomes the Python exception, and a panic in it `InternalError` (the last
/// line of defence, `catch_panic`), never a `PanicException` that `except Exception` misses.
pub fn call_core<T: Send>(py: Python<'_>, f: impl FnOnce() -> crate::error::Result<T> + Send) -> PyResult<T> {
    py.detach(|| catch_panic(f)).py_err(py)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_the_core_is_an_internal_error_and_an_error_its_exception() {
        Python::initialize();
        Python::attach(|py| {
            let e = call_core::<()>(py, || panic!("index out of bounds")).unwrap_err();
            assert!(e.is_instance_of::<InternalError>(py), "{e}");
            assert!(e.is_instance_of::<TenantLLMError>(py), "{e}");
            assert!(e.value(py).to_string().contains("index out of bounds"), "{e}");
            let e = call_core::<()>(py, || Err(Error::Configuration("timeout must be from 0 to 60".into()))).unwrap_err();
            assert!(e.is_instance_of::<ConfigurationError>(py), "{e}");
            assert_eq!(call_core(py, || Ok(7)).unwrap(), 7);
        });
    }
}
