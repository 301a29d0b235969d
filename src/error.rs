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
    #[error("budget exceeded: {} limit {} reached (current {}){}", .0.scope, .0.limit, .0.current, tenant_suffix(&.0.tenant_id))]
    BudgetExceeded(Box<BudgetBlock>),
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
}

/// Why a call was blocked by a budget.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetBlock {
    pub scope: String,
    pub limit: Amount,
    pub current: Amount,
    pub tenant_id: Option<String>,
    pub agent: String,
    pub tenant_budget: bool,
    pub execution_id: String,
}

/// Why a call was refused by open circuit breakers.
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

fn summarize(errors: &[ProviderFailure]) -> String {
    errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Store(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for a configuration error naming the offending field.
pub fn config_err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Configuration(msg.into()))
}
