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
}

fn parse(caller: &Caller<'_>, r: Response) -> Result<Reply, ProviderFailure> {
    let texts: Vec<String> = r.content.into_iter().filter(|b| b.kind == "text").filter_map(|b| b.text).collect();
    if texts.is_empty() {
        return Err(caller.invalid("no text content"));
    }
    let u = r.usage.ok_or_else(|| caller.invalid("no usage"))?;
    // Anthropic reports cache reads and writes apart from `input_tokens`; ours includes them.
    let cached = u.cache_read_input_tokens.unwrap_or(0);
    Ok(Reply {
        content: texts.concat(),
        model: r.model.unwrap_or_else(|| caller.model.to_string()),
        usage: Usage { input: u.input_tokens + cached + u.cache_creation_input_tokens.unwrap_or(0), output: u.output_tokens, cached },
        finish_reason: r.stop_reason,
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
        assert_eq!(reply.usage, Usage { input: 110, output: 3, cached: 100 });
        assert_eq!(reply.content, "Hi");
    }
}
