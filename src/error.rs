//! The one error type of the core. `src/python/errors.rs` maps each variant to the Python
//! exception tree once, at the boundary.

use crate::money::Nanos;

/// What kind of provider failure happened; decides retry and the Python exception class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderErrorKind {
    Authentication,
    RateLimit,
    Timeout,
    InvalidResponse,
    /// 5xx, connection failures and other transport problems.
    Transport,
    /// 4xx other than auth/rate-limit: the request itself was refused.
    BadRequest,
}

impl ProviderErrorKind {
    /// The Python class name the error surfaces as (also stored in `executions.error_class`).
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Authentication => "AuthenticationError",
            Self::RateLimit => "RateLimitError",
            Self::Timeout => "ProviderTimeoutError",
            Self::InvalidResponse => "InvalidResponseError",
            Self::Transport | Self::BadRequest => "ProviderError",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProviderFailure {
    pub kind: ProviderErrorKind,
    pub provider: String,
    pub model: String,
    pub status: Option<u16>,
    pub message: String,
    pub retryable: bool,
    /// Seconds the provider asked us to wait (Retry-After), if any.
    pub retry_after: Option<f64>,
}

impl std::fmt::Display for ProviderFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => write!(f, "{} ({} HTTP {}): {}", self.provider, self.model, s, self.message),
            None => write!(f, "{} ({}): {}", self.provider, self.model, self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("budget exceeded{}: {}; resets at {}", tenant_suffix(&.0.tenant_id), .0.breach, iso_utc(.0.resets_at))]
    BudgetExceeded(Box<BudgetBlock>),
    #[error("rate limited: {}{}", .0.message, tenant_suffix(&.0.tenant_id))]
    RateLimited(Box<RateBlock>),
    #[error("circuit open for agent {}, model {}{}; retry at unix time {}", .0.agent, .0.model, tenant_suffix(&.0.tenant_id), .0.retry_at)]
    CircuitOpen(Box<CircuitBlock>),
    #[error("all models failed: {}", summarize(.errors))]
    AllModelsExhausted { errors: Vec<ProviderFailure> },
    #[error("{0}")]
    Provider(Box<ProviderFailure>),
    #[error("{0}")]
    Configuration(String),
    #[error("{0}")]
    InvalidTenant(String),
    #[error("{0}")]
    MissingParameter(String),
    #[error("storage error: {0}")]
    Store(String),
    /// A write found the database's timezone is not the one the engine keyed its counters
    /// by (another process changed it): the engine adopts the stored zone and runs the
    /// write again, so this reaches a caller only if the zone keeps changing.
    #[error("the database's timezone changed to {0:?} while this process was running")]
    TimezoneChanged(String),
    /// A bug: a panic caught at the Python boundary (`catch_panic`).
    #[error("internal error in tenantllm (please report it): {0}")]
    Internal(String),
}

/// Why a call was blocked by a budget.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetBlock {
    pub scope: String,
    pub limit: Amount,
    /// Spent plus reserved by calls in flight.
    pub current: Amount,
    /// `Breach::describe`: the limit, then spent, reserved in flight and this call's estimate.
    pub breach: String,
    /// Unix micros (UTC) when the limit's period ends.
    pub resets_at: i64,
    pub tenant_id: Option<String>,
    pub agent: String,
    pub tenant_budget: bool,
    pub execution_id: String,
}

/// Why a call was refused by open circuit breakers.
/// A call refused by a rate limit (`crate::ratelimit`).
#[derive(Debug, Clone, PartialEq)]
pub struct RateBlock {
    /// "tenant_rpm", "tenant_tpm", "tenant_concurrent", "global_rpm", "global_tpm".
    pub scope: String,
    pub limit: i64,
    pub current: i64,
    /// Seconds until the call would fit.
    pub retry_after: f64,
    pub tenant_id: Option<String>,
    pub agent: String,
    pub tenant_budget: bool,
    pub message: String,
    /// The `rate_limited` row, if one was written.
    pub execution_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CircuitBlock {
    pub agent: String,
    pub tenant_id: Option<String>,
    pub model: String,
    /// Unix seconds (UTC) when a probe will be admitted again.
    pub retry_at: f64,
    pub execution_id: String,
}

/// A budget quantity: money or a count (tokens, executions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    Usd(Nanos),
    Count(i64),
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Amount::Usd(n) => write!(f, "${}", n.to_decimal()),
            Amount::Count(c) => write!(f, "{c}"),
        }
    }
}

fn tenant_suffix(t: &Option<String>) -> String {
    t.as_ref().map(|t| format!(" for tenant {t}")).unwrap_or_default()
}

fn iso_utc(micros: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_micros(micros).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn summarize(errors: &[ProviderFailure]) -> String {
    errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Store(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Runs `f`, turning a panic into `Error::Internal`: the bindings' last line of defence, so
/// that no Rust panic reaches Python as a `PanicException` (which `except Exception` misses).
pub fn catch_panic<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| Err(panic_error(p)))
}

/// `catch_panic` for a future (a call awaited by `acall` or blocked on by `call`).
pub async fn catch_panic_async<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(f).catch_unwind().await.unwrap_or_else(|p| Err(panic_error(p)))
}

fn panic_error(payload: Box<dyn std::any::Any + Send>) -> Error {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    Error::Internal(msg)
}

/// Shorthand for a configuration error naming the offending field.
pub fn config_err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Configuration(msg.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_internal_errors() {
        let e = catch_panic::<()>(|| panic!("Multiplication overflowed")).unwrap_err();
        assert!(matches!(&e, Error::Internal(m) if m == "Multiplication overflowed"), "{e}");
        let e = catch_panic::<()>(|| panic!("{} of {}", 1, 2)).unwrap_err();
        assert!(e.to_string().contains("1 of 2"), "{e}");
        assert_eq!(catch_panic(|| Ok(7)).unwrap(), 7);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let e = rt.block_on(catch_panic_async::<()>(async { panic!("in a future") })).unwrap_err();
        assert!(e.to_string().contains("in a future"), "{e}");
    }
}
