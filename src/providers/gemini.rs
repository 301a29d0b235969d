//! Google Gemini generateContent.

use serde::Deserialize;
use serde_json::json;

use super::http::{join, post, post_json, Caller};
use super::stream::{stream_error, Acc, ProviderStream, SseEvent};
use super::tools::arguments_object;
use super::{Reply, Request, Role, ToolCall, Wire};
use crate::error::ProviderFailure;
use crate::pricing::Usage;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    #[serde(default)]
    candidates: Vec<Candidate>,
    usage_metadata: Option<ApiUsage>,
    model_version: Option<String>,
    prompt_feedback: Option<PromptFeedback>,
}

/// Present when the prompt itself was blocked (then there are no candidates).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    block_reason: Option<String>,
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
#[serde(rename_all = "camelCase")]
struct Part {
    text: Option<String>,
    /// A thought summary, not part of the answer.
    #[serde(default)]
    thought: bool,
    function_call: Option<FunctionCall>,
    /// Sent back with the part it came with (Gemini 3 refuses a function call without it).
    thought_signature: Option<String>,
}

#[derive(Deserialize)]
struct FunctionCall {
    id: Option<String>,
    name: String,
    #[serde(default)]
    args: Option<serde_json::Value>,
}

/// The id prefix of calls Gemini gave no id; such ids are ours and are not sent back.
const UNNAMED: &str = "tenantllm-unnamed-";

/// The answer's text (thoughts left out) and its function calls; calls without an id get
/// their position (counting `before` calls of earlier chunks of a stream), so each result
/// can name its call.
fn split(parts: Vec<Part>, before: usize) -> (String, Vec<ToolCall>) {
    let mut text = String::new();
    let mut calls = vec![];
    for p in parts.into_iter().filter(|p| !p.thought) {
        if let Some(t) = &p.text {
            text.push_str(t);
        }
        if let Some(f) = p.function_call {
            let id = f.id.unwrap_or_else(|| format!("{UNNAMED}{}", before + calls.len()));
            let arguments = f.args.unwrap_or_else(|| json!({})).to_string();
            calls.push(ToolCall { id, name: f.name, arguments, signature: p.thought_signature });
        }
    }
    (text, calls)
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
    /// Tool-use prompt tokens are billed as input.
    #[serde(default)]
    tool_use_prompt_token_count: i64,
}

fn normalise(finish_reason: &str) -> Option<&'static str> {
    match finish_reason {
        "STOP" => Some("stop"),
        "MAX_TOKENS" => Some("length"),
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => Some("content_filter"),
        _ => None,
    }
}

fn usage_of(u: &ApiUsage) -> Usage {
    Usage {
        input: u.prompt_token_count.saturating_add(u.tool_use_prompt_token_count),
        output: u.candidates_token_count.saturating_add(u.thoughts_token_count),
        cached: u.cached_content_token_count,
        ..Usage::default()
    }
}

/// A reply with usage is a billed call even without text: a candidate stopped for SAFETY,
/// one that spent MAX_TOKENS on thoughts, or a prompt blocked by `promptFeedback`.
fn parse(caller: &Caller<'_>, r: Response) -> Result<Reply, ProviderFailure> {
    let u = r.usage_metadata.ok_or_else(|| caller.invalid("no usageMetadata"))?;
    let (content, tool_calls, finish_reason_raw, blocked) = match r.candidates.into_iter().next() {
        Some(cand) => {
            let (text, calls) = split(cand.content.map(|c| c.parts).unwrap_or_default(), 0);
            (text, calls, cand.finish_reason, false)
        }
        None => match r.prompt_feedback.and_then(|f| f.block_reason) {
            Some(reason) => (String::new(), vec![], Some(reason), true),
            None => return Err(caller.invalid("no candidates")),
        },
    };
    let finish_reason = match finish_reason_raw.as_deref() {
        // Every block reason (SAFETY, BLOCKLIST, PROHIBITED_CONTENT, OTHER, ...) is a filter.
        _ if blocked => Some("content_filter"),
        // Gemini ends a reply of function calls with STOP.
        Some("STOP") if !tool_calls.is_empty() => Some("tool_calls"),
        raw => raw.and_then(normalise),
    };
    Ok(Reply {
        content,
        model: r.model_version.unwrap_or_else(|| caller.model.to_string()),
        usage: usage_of(&u),
        finish_reason,
        finish_reason_raw,
        refusal: None,
        tool_calls,
    })
}

fn request(client: &reqwest::Client, caller: &Caller<'_>, base_url: &str, api_key: Option<&str>, req: &Request, stream: bool) -> (reqwest::RequestBuilder, serde_json::Value) {
    let mut config = json!({"maxOutputTokens": req.max_tokens});
    if let Some(t) = req.temperature {
        config["temperature"] = json!(t);
    }
    // Structured output as JSON Schema (https://ai.google.dev/gemini-api/docs/structured-output);
    // `responseSchema` takes only an OpenAPI subset without $defs/$ref, which models have.
    if let Some(schema) = &req.schema {
        config["responseMimeType"] = json!("application/json");
        config["responseJsonSchema"] = schema.schema.clone();
    }
    // Gemini calls the assistant "model".
    let role = |r: Role| if r == Role::User { "user" } else { "model" };
    let mut contents: Vec<serde_json::Value> = req.history.iter().map(|t| json!({"role": role(t.role), "parts": [{"text": t.content}]})).collect();
    contents.push(json!({"role": "user", "parts": [{"text": req.user}]}));
    // Each earlier round: the model's text and functionCall parts (with their signatures),
    // then a user turn of functionResponse parts ("output" or "error", as the API documents).
    for round in &req.rounds {
        let mut parts: Vec<serde_json::Value> = vec![];
        if !round.text.is_empty() {
            parts.push(json!({"text": round.text}));
        }
        for a in &round.answers {
            let mut part = json!({"functionCall": {"name": a.call.name, "args": arguments_object(&a.call)}});
            if !a.call.id.starts_with(UNNAMED) {
                part["functionCall"]["id"] = json!(a.call.id);
            }
            if let Some(sig) = &a.call.signature {
                part["thoughtSignature"] = json!(sig);
            }
            parts.push(part);
        }
        contents.push(json!({"role": "model", "parts": parts}));
        let responses: Vec<_> = round
            .answers
            .iter()
            .map(|a| {
                let mut r = json!({"functionResponse": {"name": a.call.name, "response": {(if a.is_error { "error" } else { "output" }): a.content}}});
                if !a.call.id.starts_with(UNNAMED) {
                    r["functionResponse"]["id"] = json!(a.call.id);
                }
                r
            })
            .collect();
        contents.push(json!({"role": "user", "parts": responses}));
    }
    let mut body = json!({"contents": contents, "generationConfig": config});
    if !req.tools.is_empty() {
        let declarations: Vec<_> = req.tools.iter().map(|t| json!({"name": t.name, "description": t.description, "parametersJsonSchema": t.parameters})).collect();
        body["tools"] = json!([{"functionDeclarations": declarations}]);
        if req.tools_closed {
            body["toolConfig"] = json!({"functionCallingConfig": {"mode": "NONE"}});
        }
    }
    if let Some(s) = &req.system {
        body["systemInstruction"] = json!({"parts": [{"text": s}]});
    }
    // The key goes in a header, never in the URL (URLs end up in logs and error messages).
    let method = if stream { "streamGenerateContent?alt=sse" } else { "generateContent" };
    let mut http = client.post(join(base_url, &format!("v1beta/models/{}:{method}", caller.model)));
    if let Some(k) = api_key {
        http = http.header("x-goog-api-key", k);
    }
    (http, body)
}

pub async fn send(
    client: &reqwest::Client,
    caller: &Caller<'_>,
    base_url: &str,
    api_key: Option<&str>,
    req: &Request,
) -> Result<Reply, ProviderFailure> {
    let (http, body) = request(client, caller, base_url, api_key, req, false);
    let r: Response = post_json(caller, http, &body).await?;
    parse(caller, r)
}

pub async fn open(client: &reqwest::Client, caller: &Caller<'_>, base_url: &str, api_key: Option<&str>, req: &Request) -> Result<ProviderStream, ProviderFailure> {
    let (http, body) = request(client, caller, base_url, api_key, req, true);
    let resp = post(caller, http, &body).await?;
    Ok(ProviderStream::http(resp, Wire::Gemini, caller, super::prompt_tokens(req)))
}

#[derive(Deserialize)]
struct StreamError {
    error: Option<serde_json::Value>,
}

/// One streamed `GenerateContentResponse`: its text, and usage so far (each event carries
/// the running totals; the last one's are final).
pub fn decode(caller: &Caller<'_>, acc: &mut Acc, ev: &SseEvent) -> Result<Option<String>, ProviderFailure> {
    if serde_json::from_str::<StreamError>(&ev.data).is_ok_and(|e| e.error.is_some()) {
        return Err(stream_error(caller, &ev.data));
    }
    let r: Response = serde_json::from_str(&ev.data).map_err(|e| caller.invalid(&format!("stream chunk: {e}")))?;
    if let Some(m) = r.model_version {
        acc.model = Some(m);
    }
    if let Some(u) = &r.usage_metadata {
        acc.usage = Some(usage_of(u));
        acc.input = Some(usage_of(u).input);
    }
    if let Some(reason) = r.prompt_feedback.and_then(|f| f.block_reason) {
        acc.finish = Some("content_filter");
        acc.finish_raw = Some(reason);
    }
    let Some(cand) = r.candidates.into_iter().next() else { return Ok(None) };
    if let Some(f) = cand.finish_reason {
        acc.finish = normalise(&f);
        acc.finish_raw = Some(f);
    }
    // Function calls come whole, each in the chunk that names it.
    let (text, calls) = split(cand.content.map(|c| c.parts).unwrap_or_default(), acc.calls.len());
    acc.add_calls(calls);
    Ok(Some(text))
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
        assert_eq!(reply.usage, Usage::new(12, 10, 0));
        assert_eq!(reply.content, "Hi!");
    }

    #[test]
    fn empty_answers_are_billed() {
        let c = Caller { provider: "gemini", model: "gemini-2.5-pro" };
        let thoughts: Response = serde_json::from_str(
            r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"thinking...","thought":true}]},"finishReason":"MAX_TOKENS"}],
               "usageMetadata":{"promptTokenCount":12,"thoughtsTokenCount":64,"totalTokenCount":76}}"#,
        )
        .unwrap();
        let reply = parse(&c, thoughts).unwrap();
        assert_eq!((reply.content.as_str(), reply.finish_reason, reply.usage.output), ("", Some("length"), 64));
        let blocked: Response = serde_json::from_str(r#"{"promptFeedback":{"blockReason":"SAFETY"},"usageMetadata":{"promptTokenCount":9,"totalTokenCount":9}}"#).unwrap();
        let reply = parse(&c, blocked).unwrap();
        assert_eq!((reply.finish_reason, reply.finish_reason_raw.as_deref(), reply.usage.input), (Some("content_filter"), Some("SAFETY"), 9));
        let nothing: Response = serde_json::from_str(r#"{"usageMetadata":{"promptTokenCount":9}}"#).unwrap();
        assert!(parse(&c, nothing).unwrap_err().message.contains("no candidates"));
    }
}
