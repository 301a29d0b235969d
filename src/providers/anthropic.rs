//! Anthropic messages API.

use serde::Deserialize;
use serde_json::json;

use super::http::{join, post_json, Caller};
use super::{Reply, Request};
use crate::error::ProviderFailure;
use crate::pricing::Usage;

const API_VERSION: &str = "2023-06-01";

#[derive(Deserialize)]
struct Response {
    model: Option<String>,
    #[serde(default)]
    content: Vec<Block>,
    stop_reason: Option<String>,
    usage: Option<ApiUsage>,
}

#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct ApiUsage {
    input_tokens: i64,
    output_tokens: i64,
    cache_read_input_tokens: Option<i64>,
    cache_creation_input_tokens: Option<i64>,
    /// The split of `cache_creation_input_tokens` by cache lifetime (priced apart).
    cache_creation: Option<CacheCreation>,
}

#[derive(Deserialize)]
struct CacheCreation {
    #[serde(default)]
    ephemeral_5m_input_tokens: i64,
    #[serde(default)]
    ephemeral_1h_input_tokens: i64,
}

fn normalise(stop_reason: &str) -> Option<&'static str> {
    match stop_reason {
        "end_turn" | "stop_sequence" => Some("stop"),
        "max_tokens" | "model_context_window_exceeded" => Some("length"),
        "tool_use" => Some("tool_calls"),
        "refusal" => Some("refusal"),
        _ => None,
    }
}

/// A reply with usage is a billed call even without text: a refusal (empty content,
/// `stop_reason: "refusal"`) or a reply that spent `max_tokens` thinking.
fn parse(caller: &Caller<'_>, r: Response) -> Result<Reply, ProviderFailure> {
    let u = r.usage.ok_or_else(|| caller.invalid("no usage"))?;
    let content: String = r.content.into_iter().filter(|b| b.kind == "text").filter_map(|b| b.text).collect();
    // Anthropic reports cache reads and writes apart from `input_tokens`; ours includes them.
    let cached = u.cache_read_input_tokens.unwrap_or(0);
    let writes = u.cache_creation_input_tokens.unwrap_or(0);
    let (cache_write, cache_write_1h) = match u.cache_creation {
        Some(c) => (c.ephemeral_5m_input_tokens, c.ephemeral_1h_input_tokens),
        None => (writes, 0),
    };
    Ok(Reply {
        content,
        model: r.model.unwrap_or_else(|| caller.model.to_string()),
        usage: Usage {
            input: u.input_tokens.saturating_add(cached).saturating_add(writes.max(cache_write.saturating_add(cache_write_1h))),
            output: u.output_tokens,
            cached,
            cache_write,
            cache_write_1h,
        },
        finish_reason: r.stop_reason.as_deref().and_then(normalise),
        finish_reason_raw: r.stop_reason,
        refusal: None,
    })
}

pub async fn send(
    client: &reqwest::Client,
    caller: &Caller<'_>,
    base_url: &str,
    api_key: Option<&str>,
    req: &Request,
) -> Result<Reply, ProviderFailure> {
    let mut body = json!({
        "model": caller.model,
        "max_tokens": req.max_tokens,
        "messages": [{"role": "user", "content": req.user}],
    });
    if let Some(s) = &req.system {
        body["system"] = json!(s);
    }
    if let Some(t) = req.temperature {
        body["temperature"] = json!(t);
    }
    let mut http = client.post(join(base_url, "v1/messages")).header("anthropic-version", API_VERSION);
    if let Some(k) = api_key {
        http = http.header("x-api-key", k);
    }
    let r: Response = post_json(caller, http, &body).await?;
    parse(caller, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_reads_count_as_cached_input() {
        let r: Response = serde_json::from_str(
            r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"Hi"}],
               "stop_reason":"end_turn","usage":{"input_tokens":10,"output_tokens":3,"cache_read_input_tokens":100,"cache_creation_input_tokens":0}}"#,
        )
        .unwrap();
        let reply = parse(&Caller { provider: "anthropic", model: "claude-sonnet-4-5" }, r).unwrap();
        assert_eq!(reply.usage, Usage::new(110, 3, 100));
        assert_eq!(reply.content, "Hi");
        assert_eq!(reply.finish_reason, Some("stop"));
    }

    #[test]
    fn refusals_thinking_only_and_cache_writes() {
        let c = Caller { provider: "anthropic", model: "claude-sonnet-4-5" };
        let refusal: Response = serde_json::from_str(
            r#"{"content":[],"stop_reason":"refusal","usage":{"input_tokens":10,"output_tokens":2,
               "cache_creation_input_tokens":300,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200}}}"#,
        )
        .unwrap();
        let reply = parse(&c, refusal).unwrap();
        assert_eq!((reply.content.as_str(), reply.finish_reason, reply.finish_reason_raw.as_deref()), ("", Some("refusal"), Some("refusal")));
        assert_eq!(reply.usage, Usage { input: 310, output: 2, cached: 0, cache_write: 100, cache_write_1h: 200 });
        let thinking: Response = serde_json::from_str(
            r#"{"content":[{"type":"thinking","thinking":"Let me","signature":"x"}],"stop_reason":"max_tokens","usage":{"input_tokens":10,"output_tokens":64}}"#,
        )
        .unwrap();
        let reply = parse(&c, thinking).unwrap();
        assert_eq!((reply.content.as_str(), reply.finish_reason, reply.usage.output), ("", Some("length"), 64));
        let no_usage: Response = serde_json::from_str(r#"{"content":[]}"#).unwrap();
        assert!(parse(&c, no_usage).is_err());
    }
}
