//! The built-in `mock` provider: deterministic answers with no network and no key, with
//! configurable latency and failure rate, for demos and users' own tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{prompt_tokens, tokens_of, Reply, Request};
use crate::error::{config_err, ProviderErrorKind, ProviderFailure, Result};
use crate::pricing::Usage;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MockSettings {
    pub latency: Duration,
    /// Probability in [0, 1] that a request fails with a retryable 503.
    pub failure_rate: f64,
    /// Seeds the failure sequence, so a run's failures repeat exactly.
    pub seed: u64,
}

impl Default for MockSettings {
    fn default() -> Self {
        MockSettings { latency: Duration::ZERO, failure_rate: 0.0, seed: 0 }
    }
}

/// The longest simulated latency: one hour, in milliseconds.
pub const MAX_LATENCY_MS: f64 = 3_600_000.0;

impl MockSettings {
    pub fn new(latency_ms: f64, failure_rate: f64, seed: u64) -> Result<MockSettings> {
        if !(0.0..=MAX_LATENCY_MS).contains(&latency_ms) {
            return config_err(format!("mock.latency_ms must be between 0 and {MAX_LATENCY_MS} (one hour) (got {latency_ms})"));
        }
        if !(0.0..=1.0).contains(&failure_rate) {
            return config_err(format!("mock.failure_rate must be between 0 and 1 (got {failure_rate})"));
        }
        Ok(MockSettings { latency: Duration::from_secs_f64(latency_ms / 1000.0), failure_rate, seed })
    }
}

pub struct Mock {
    settings: MockSettings,
    counter: AtomicU64,
}

/// splitmix64: a tiny, well-distributed hash for the deterministic failure sequence.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Mock {
    pub fn new(settings: MockSettings) -> Mock {
        Mock { settings, counter: AtomicU64::new(0) }
    }

    pub async fn send(&self, model: &str, req: &Request) -> std::result::Result<Reply, ProviderFailure> {
        if !self.settings.latency.is_zero() {
            tokio::time::sleep(self.settings.latency).await;
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let roll = (mix(self.settings.seed ^ mix(n)) >> 11) as f64 / (1u64 << 53) as f64;
        if roll < self.settings.failure_rate {
            return Err(ProviderFailure {
                kind: ProviderErrorKind::Transport,
                provider: "mock".into(),
                model: model.into(),
                status: Some(503),
                message: "mock provider: simulated failure".into(),
                retryable: true,
                retry_after: None,
            });
        }
        let words: Vec<&str> = req.user.split_whitespace().take(12).collect();
        let model = format!("mock/{model}");
        let mut content = format!("[{model}] You asked: {}", words.join(" "));
        let budget = req.max_tokens as usize * 4;
        let (finish, cut) = if content.len() > budget { ("length", true) } else { ("stop", false) };
        if cut {
            let mut end = budget;
            while !content.is_char_boundary(end) {
                end -= 1;
            }
            content.truncate(end);
        }
        Ok(Reply {
            usage: Usage::new(prompt_tokens(req), tokens_of(&content), 0),
            content,
            model,
            finish_reason: Some(finish),
            finish_reason_raw: Some(finish.into()),
            refusal: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(user: &str) -> Request {
        Request { system: Some("Be brief.".into()), history: vec![], user: user.into(), temperature: None, max_tokens: 100, timeout: Duration::from_secs(1) }
    }

    #[tokio::test]
    async fn deterministic_and_token_counts_from_text() {
        let m = Mock::new(MockSettings::default());
        let a = m.send("fast", &req("Where is my order?")).await.unwrap();
        let b = m.send("fast", &req("Where is my order?")).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(a.content, "[mock/fast] You asked: Where is my order?");
        assert_eq!(a.usage.output, tokens_of(&a.content));
        assert!(a.usage.input > 0);
    }

    #[tokio::test]
    async fn failure_rate_is_seeded() {
        let run = |seed| async move {
            let m = Mock::new(MockSettings::new(0.0, 0.5, seed).unwrap());
            let mut out = vec![];
            for _ in 0..64 {
                out.push(m.send("mock/x", &req("hi")).await.is_err());
            }
            out
        };
        let a = run(7).await;
        assert_eq!(a, run(7).await);
        let fails = a.iter().filter(|f| **f).count();
        assert!((16..=48).contains(&fails), "{fails} failures of 64 at rate 0.5");
        assert!(MockSettings::new(0.0, 1.5, 0).is_err());
        assert!(MockSettings::new(-1.0, 0.0, 0).is_err());
        assert!(MockSettings::new(1e300, 0.0, 0).is_err());
        assert!(MockSettings::new(f64::NAN, 0.0, 0).is_err());
    }
}
