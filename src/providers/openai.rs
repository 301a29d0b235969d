//! OpenAI chat completions, also spoken by DeepSeek, Mistral and OpenAI-compatible servers.

use serde::Deserialize;
use serde_json::json;

use super::http::{join, post_json, Caller};
use super::{Reply, Request};
use crate::error::ProviderFailure;
use crate::pricing::Usage;

#[derive(Deserialize)]
struct Response {
    model: Option<String>,
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<ApiUsage>,
}

#[derive(Deserialize)]
struct Choice {
    message: Option<Message>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    content: Option<String>,
}

#[derive(Deserialize)]
struct ApiUsage {
    prompt_tokens: i64,
    completion_tokens: i64,
    prompt_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<i64>,
}

/// OpenAI itself takes `max_completion_tokens` (required by its reasoning models); the
/// compatible servers take `max_tokens`.
pub fn body(model: &str, req: &Request, native_openai: bool) -> serde_json::Value {
    let mut messages = vec![];
    if let Some(s) = &req.system {
        messages.push(json!({"role": "system", "content": s}));
    }
    messages.push(json!({"role": "user", "content": req.user}));
    let mut b = json!({"model": model, "messages": messages});
    b[if native_openai { "max_completion_tokens" } else { "max_tokens" }] = json!(req.max_tokens);
    if let Some(t) = req.temperature {
        b["temperature"] = json!(t);
    }
    b
}

fn parse(caller: &Caller<'_>, r: Response) -> Result<Reply, ProviderFailure> {
    let choice = r.choices.into_iter().next().ok_or_else(|| caller.invalid("no choices"))?;
    let content = choice.message.and_then(|m| m.content).ok_or_else(|| caller.invalid("choice without message content"))?;
    let usage = r.usage.ok_or_else(|| caller.invalid("no usage"))?;
    Ok(Reply {
        content,
        model: r.model.unwrap_or_else(|| caller.model.to_string()),
        usage: Usage {
            input: usage.prompt_tokens,
            output: usage.completion_tokens,
            cached: usage.prompt_tokens_details.and_then(|d| d.cached_tokens).unwrap_or(0),
        },
        finish_reason: choice.finish_reason,
    })
}

pub async fn send(
    client: &reqwest::Client,
    caller: &Caller<'_>,
    base_url: &str,
    api_key: Option<&str>,
    req: &Request,
    native_openai: bool,
) -> Result<Reply, ProviderFailure> {
    let mut http = client.post(join(base_url, "chat/completions"));
    if let Some(k) = api_key {
        http = http.bearer_auth(k);
    }
    let r: Response = post_json(caller, http, &body(caller.model, req, native_openai)).await?;
    parse(caller, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: Caller<'static> = Caller { provider: "openai", model: "gpt-4o" };

    #[test]
    fn parses_usage_and_cached_tokens() {
        let r: Response = serde_json::from_str(
            r#"{"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],
               "usage":{"prompt_tokens":20,"completion_tokens":5,"total_tokens":25,"prompt_tokens_details":{"cached_tokens":8}}}"#,
        )
        .unwrap();
        let reply = parse(&C, r).unwrap();
        assert_eq!(reply.usage, Usage { input: 20, output: 5, cached: 8 });
        assert_eq!(reply.model, "gpt-4o-2024-08-06");
        assert_eq!(reply.finish_reason.as_deref(), Some("stop"));
    }

    #[test]
    fn empty_choices_are_invalid() {
        let r: Response = serde_json::from_str(r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":0}}"#).unwrap();
        assert!(parse(&C, r).unwrap_err().message.contains("no choices"));
    }
}
