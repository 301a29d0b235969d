//! Google Gemini generateContent.

use serde::Deserialize;
use serde_json::json;

use super::http::{join, post_json, Caller};
use super::{Reply, Request};
use crate::error::ProviderFailure;
use crate::pricing::Usage;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    #[serde(default)]
    candidates: Vec<Candidate>,
    usage_metadata: Option<ApiUsage>,
    model_version: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    content: Option<Content>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Content {
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Deserialize)]
struct Part {
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiUsage {
    #[serde(default)]
    prompt_token_count: i64,
    #[serde(default)]
    candidates_token_count: i64,
    /// Thinking tokens are billed as output.
    #[serde(default)]
    thoughts_token_count: i64,
    #[serde(default)]
    cached_content_token_count: i64,
}

fn parse(caller: &Caller<'_>, r: Response) -> Result<Reply, ProviderFailure> {
    let cand = r.candidates.into_iter().next().ok_or_else(|| caller.invalid("no candidates"))?;
    let texts: Vec<String> = cand.content.map(|c| c.parts.into_iter().filter_map(|p| p.text).collect()).unwrap_or_default();
    if texts.is_empty() {
        return Err(caller.invalid("candidate without text"));
    }
    let u = r.usage_metadata.ok_or_else(|| caller.invalid("no usageMetadata"))?;
    Ok(Reply {
        content: texts.concat(),
        model: r.model_version.unwrap_or_else(|| caller.model.to_string()),
        usage: Usage {
            input: u.prompt_token_count,
            output: u.candidates_token_count + u.thoughts_token_count,
            cached: u.cached_content_token_count,
        },
        finish_reason: cand.finish_reason,
    })
}

pub async fn send(
    client: &reqwest::Client,
    caller: &Caller<'_>,
    base_url: &str,
    api_key: Option<&str>,
    req: &Request,
) -> Result<Reply, ProviderFailure> {
    let mut config = json!({"maxOutputTokens": req.max_tokens});
    if let Some(t) = req.temperature {
        config["temperature"] = json!(t);
    }
    let mut body = json!({
        "contents": [{"role": "user", "parts": [{"text": req.user}]}],
        "generationConfig": config,
    });
    if let Some(s) = &req.system {
        body["systemInstruction"] = json!({"parts": [{"text": s}]});
    }
    // The key goes in a header, never in the URL (URLs end up in logs and error messages).
    let mut http = client.post(join(base_url, &format!("v1beta/models/{}:generateContent", caller.model)));
    if let Some(k) = api_key {
        http = http.header("x-goog-api-key", k);
    }
    let r: Response = post_json(caller, http, &body).await?;
    parse(caller, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinking_tokens_are_output() {
        let r: Response = serde_json::from_str(
            r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"Hi"},{"text":"!"}]},"finishReason":"STOP"}],
               "usageMetadata":{"promptTokenCount":12,"candidatesTokenCount":4,"thoughtsTokenCount":6,"totalTokenCount":22},"modelVersion":"gemini-2.5-flash"}"#,
        )
        .unwrap();
        let reply = parse(&Caller { provider: "gemini", model: "gemini-2.5-flash" }, r).unwrap();
        assert_eq!(reply.usage, Usage { input: 12, output: 10, cached: 0 });
        assert_eq!(reply.content, "Hi!");
    }
}
