//! `Retries(max, backoff, base, max_delay)`: how long to wait before retrying a model.

use std::time::Duration;

use crate::error::{config_err, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    Exponential,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub max: u32,
    pub backoff: Backoff,
    pub base_s: f64,
    pub max_delay_s: f64,
}

/// The longest `base` and `max_delay` may be (seconds).
pub const MAX_DELAY_S: f64 = 600.0;
/// The most retries per model.
pub const MAX_RETRIES: u32 = 20;

/// A Retry-After longer than this is not waited for: the model is given up (fallbacks next).
pub const MAX_RETRY_AFTER_S: f64 = 60.0;

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max: 0, backoff: Backoff::Exponential, base_s: 0.4, max_delay_s: 3.0 }
    }
}

impl RetryPolicy {
    pub fn new(max: u32, backoff: &str, base_s: f64, max_delay_s: f64) -> Result<RetryPolicy> {
        let backoff = match backoff {
            "exponential" => Backoff::Exponential,
            "linear" => Backoff::Linear,
            "constant" => Backoff::Constant,
            other => return config_err(format!("retries.backoff must be exponential, linear or constant (got {other:?})")),
        };
        for (name, v) in [("base", base_s), ("max_delay", max_delay_s)] {
            if !(0.0..=MAX_DELAY_S).contains(&v) {
                return config_err(format!("retries.{name} must be between 0 and {MAX_DELAY_S} seconds (got {v})"));
            }
        }
        if max > MAX_RETRIES {
            return config_err(format!("retries.max must be between 0 and {MAX_RETRIES} (got {max})"));
        }
        Ok(RetryPolicy { max, backoff, base_s, max_delay_s })
    }

    /// Delay before retry number `retry` (0 = first retry). `jitter` in [0, 1) spreads
    /// callers apart ("equal jitter": half fixed, half random). A Retry-After from the
    /// provider is honoured as a floor.
    pub fn delay(&self, retry: u32, jitter: f64, retry_after: Option<f64>) -> Duration {
        let raw = match self.backoff {
            Backoff::Exponential => self.base_s * 2f64.powi(retry.min(30) as i32),
            Backoff::Linear => self.base_s * (retry + 1) as f64,
            Backoff::Constant => self.base_s,
        };
        let capped = raw.min(self.max_delay_s);
        let jittered = capped / 2.0 + capped / 2.0 * jitter.clamp(0.0, 1.0);
        Duration::from_secs_f64(jittered.max(retry_after.unwrap_or(0.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_capped_with_jitter_and_retry_after() {
        let p = RetryPolicy::new(5, "exponential", 0.4, 3.0).unwrap();
        assert_eq!(p.delay(0, 1.0, None), Duration::from_secs_f64(0.4));
        assert_eq!(p.delay(0, 0.0, None), Duration::from_secs_f64(0.2));
        assert_eq!(p.delay(10, 1.0, None), Duration::from_secs_f64(3.0));
        assert_eq!(p.delay(0, 0.0, Some(2.0)), Duration::from_secs_f64(2.0));
        assert!(RetryPolicy::new(1, "fibonacci", 0.1, 1.0).unwrap_err().to_string().contains("backoff"));
        assert!(RetryPolicy::new(1, "constant", f64::NAN, 1.0).is_err());
        assert!(RetryPolicy::new(1, "constant", 0.1, 1e300).unwrap_err().to_string().contains("max_delay"));
        assert!(RetryPolicy::new(21, "constant", 0.1, 1.0).is_err());
    }
}
