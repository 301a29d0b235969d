//! The built-in `mock` provider: deterministic answers with no network and no key, with
//! configurable latency and failure rate, for demos and users' own tests.
//!
//! Tool calls are scripted in the prompt: a line `@tool NAME {json arguments}` makes the
//! first round call NAME (any name, any text as arguments, so bad calls can be scripted);
//! `@loop NAME {...}` calls it in every round the tools are open. Once results have come
//! back, the answer quotes them. With a schema, a line `@json {...}` is the answer, verbatim.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{prompt_tokens, tokens_of, Reply, Request, ToolCall};
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
        let model = format!("mock/{model}");
        let tool_calls = scripted_calls(req);
        if !tool_calls.is_empty() {
            let usage = Usage::new(prompt_tokens(req), tool_calls.iter().map(|c| tokens_of(&c.name) + tokens_of(&c.arguments)).sum(), 0);
            return Ok(Reply { content: String::new(), model, usage, finish_reason: Some("tool_calls"), finish_reason_raw: Some("tool_calls".into()), refusal: None, tool_calls });
        }
        let scripted_json = req.schema.as_ref().and_then(|_| req.user.lines().find_map(|l| l.strip_prefix("@json ")));
        if let Some(json) = scripted_json {
            let content = json.trim().to_string();
            let usage = Usage::new(prompt_tokens(req), tokens_of(&content), 0);
            return Ok(Reply { content, model, usage, finish_reason: Some("stop"), finish_reason_raw: Some("stop".into()), refusal: None, tool_calls: vec![] });
        }
        let words: Vec<&str> = req.user.lines().filter(|l| !l.starts_with('@')).flat_map(str::split_whitespace).take(12).collect();
        let mut content = format!("[{model}] You asked: {}", words.join(" "));
        let results: Vec<String> = req.rounds.iter().flat_map(|r| &r.answers).map(|a| format!("{} -> {}", a.call.name, a.content)).collect();
        if !results.is_empty() {
            content.push_str(&format!(" | tool results: {}", results.join("; ")));
        }
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
            tool_calls: vec![],
        })
    }
}

/// The calls the prompt scripts for this round (see the module's comment).
fn scripted_calls(req: &Request) -> Vec<ToolCall> {
    if req.tools.is_empty() || req.tools_closed {
        return vec![];
    }
    let first = req.rounds.is_empty();
    let round = req.rounds.len();
    req.user
        .lines()
        .filter_map(|l| l.strip_prefix("@loop ").or_else(|| l.strip_prefix("@tool ").filter(|_| first)))
        .enumerate()
        .map(|(i, l)| {
            let (name, args) = l.trim().split_once(' ').unwrap_or((l.trim(), "{}"));
            ToolCall { id: format!("mock_{round}_{i}"), name: name.to_string(), arguments: args.trim().to_string(), signature: None }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(user: &str) -> Request {
        Request { system: Some("Be brief.".into()), history: vec![], user: user.into(), temperature: None, max_tokens: 100, timeout: Duration::from_secs(1), ..Request::default() }
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
