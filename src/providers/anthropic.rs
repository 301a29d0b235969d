//! Anthropic messages API.

use serde::Deserialize;
use serde_json::json;

use super::http::{join, post, post_json, Caller};
use super::stream::{stream_error, Acc, ProviderStream, SseEvent};
use super::tools::arguments_object;
use super::{Reply, Request, ToolCall, Wire};
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
    /// `tool_use` blocks: the call's id, the tool and its arguments (an object).
    id: Option<String>,
    name: Option<String>,
    input: Option<serde_json::Value>,
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

fn usage_of(u: &ApiUsage) -> Usage {
    // Anthropic reports cache reads and writes apart from `input_tokens`; ours includes them.
    let cached = u.cache_read_input_tokens.unwrap_or(0);
    let writes = u.cache_creation_input_tokens.unwrap_or(0);
    let (cache_write, cache_write_1h) = match &u.cache_creation {
        Some(c) => (c.ephemeral_5m_input_tokens, c.ephemeral_1h_input_tokens),
        None => (writes, 0),
    };
    Usage {
        input: u.input_tokens.saturating_add(cached).saturating_add(writes.max(cache_write.saturating_add(cache_write_1h))),
        output: u.output_tokens,
        cached,
        cache_write,
        cache_write_1h,
    }
}

/// A reply with usage is a billed call even without text: a refusal (empty content,
/// `stop_reason: "refusal"`) or a reply that spent `max_tokens` thinking. A call of the
/// `answer_tool` (structured output) is the answer, not a tool call.
fn parse(caller: &Caller<'_>, r: Response, answer_tool: Option<&str>) -> Result<Reply, ProviderFailure> {
    let u = r.usage.ok_or_else(|| caller.invalid("no usage"))?;
    let mut content = String::new();
    let mut tool_calls = vec![];
    let mut answered = false;
    for b in r.content {
        match b.kind.as_str() {
            "text" => content.push_str(b.text.as_deref().unwrap_or("")),
            "tool_use" if b.name.is_some() && b.name.as_deref() == answer_tool => {
                // The answer alone: any text before it is the model's preamble.
                content = b.input.unwrap_or_else(|| json!({})).to_string();
                answered = true;
            }
            "tool_use" => tool_calls.push(ToolCall {
                id: b.id.ok_or_else(|| caller.invalid("tool_use block without an id"))?,
                name: b.name.ok_or_else(|| caller.invalid("tool_use block without a name"))?,
                arguments: b.input.unwrap_or_else(|| json!({})).to_string(),
                signature: None,
            }),
            _ => {}
        }
    }
    Ok(Reply {
        content,
        model: r.model.unwrap_or_else(|| caller.model.to_string()),
        usage: usage_of(&u),
        finish_reason: match r.stop_reason.as_deref() {
            Some("tool_use") if answered && tool_calls.is_empty() => Some("stop"),
            other => other.and_then(normalise),
        },
        finish_reason_raw: r.stop_reason,
        refusal: None,
        tool_calls,
    })
}

fn request(client: &reqwest::Client, caller: &Caller<'_>, base_url: &str, api_key: Option<&str>, req: &Request, stream: bool) -> (reqwest::RequestBuilder, serde_json::Value) {
    let mut messages: Vec<serde_json::Value> = req.history.iter().map(|t| json!({"role": t.role.as_str(), "content": t.content})).collect();
    messages.push(json!({"role": "user", "content": req.user}));
    // Each earlier round: the assistant's text and `tool_use` blocks, then a user turn of
    // `tool_result` blocks.
    for round in &req.rounds {
        let mut blocks: Vec<serde_json::Value> = vec![];
        if !round.text.is_empty() {
            blocks.push(json!({"type": "text", "text": round.text}));
        }
        blocks.extend(round.answers.iter().map(|a| json!({"type": "tool_use", "id": a.call.id, "name": a.call.name, "input": arguments_object(&a.call)})));
        messages.push(json!({"role": "assistant", "content": blocks}));
        let results: Vec<_> = round
            .answers
            .iter()
            .map(|a| json!({"type": "tool_result", "tool_use_id": a.call.id, "content": a.content, "is_error": a.is_error}))
            .collect();
        messages.push(json!({"role": "user", "content": results}));
    }
    let mut body = json!({"model": caller.model, "max_tokens": req.max_tokens, "messages": messages});
    if !req.tools.is_empty() {
        let tools: Vec<_> = req.tools.iter().map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.parameters})).collect();
        body["tools"] = json!(tools);
        if req.tools_closed {
            body["tool_choice"] = json!({"type": "none"});
        }
    }
    // Structured output: a tool whose input is the answer, which the model must call (or,
    // with tools of the agent's own, call some tool), as Anthropic's tool-use guide shows
    // for JSON output (https://docs.anthropic.com/en/docs/build-with-claude/tool-use).
    if let Some(schema) = &req.schema {
        let answer = json!({"name": schema.name, "description": "Give the answer: this tool's input is the whole answer.", "input_schema": schema.schema});
        match body["tools"].as_array_mut() {
            Some(tools) => tools.push(answer),
            None => body["tools"] = json!([answer]),
        }
        body["tool_choice"] = if req.tools.is_empty() || req.tools_closed { json!({"type": "tool", "name": schema.name}) } else { json!({"type": "any"}) };
    }
    if let Some(s) = &req.system {
        body["system"] = json!(s);
    }
    if let Some(t) = req.temperature {
        body["temperature"] = json!(t);
    }
    if stream {
        body["stream"] = json!(true);
    }
    let mut http = client.post(join(base_url, "v1/messages")).header("anthropic-version", API_VERSION);
    if let Some(k) = api_key {
        http = http.header("x-api-key", k);
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
    parse(caller, r, req.schema.as_ref().map(|s| s.name.as_str()))
}

pub async fn open(client: &reqwest::Client, caller: &Caller<'_>, base_url: &str, api_key: Option<&str>, req: &Request) -> Result<ProviderStream, ProviderFailure> {
    let (http, body) = request(client, caller, base_url, api_key, req, true);
    let resp = post(caller, http, &body).await?;
    let answer_tool = req.schema.as_ref().map(|s| s.name.as_str());
    Ok(ProviderStream::http(resp, Wire::Anthropic, caller, super::prompt_tokens(req)).answering(answer_tool))
}

/// The usage so far: message_start's, with each message_delta's fields laid over it
/// (message_delta carries the final output count, and on newer API versions the rest).
fn merge_usage(acc: &mut Acc, caller: &Caller<'_>, seen: Option<&serde_json::Value>, fresh: &serde_json::Value) -> Result<(), ProviderFailure> {
    let mut merged = seen.cloned().unwrap_or_else(|| json!({}));
    if let (Some(m), Some(f)) = (merged.as_object_mut(), fresh.as_object()) {
        for (k, v) in f {
            if !v.is_null() {
                m.insert(k.clone(), v.clone());
            }
        }
    }
    let parsed: ApiUsage = serde_json::from_value(merged.clone()).map_err(|e| caller.invalid(&format!("stream usage: {e}")))?;
    acc.input = Some(usage_of(&parsed).input);
    acc.usage = Some(usage_of(&parsed));
    acc.raw_usage = Some(merged);
    Ok(())
}

/// One event of a streamed message; returns its text.
pub fn decode(caller: &Caller<'_>, acc: &mut Acc, ev: &SseEvent) -> Result<Option<String>, ProviderFailure> {
    let v: serde_json::Value = serde_json::from_str(&ev.data).map_err(|e| caller.invalid(&format!("stream event: {e}")))?;
    let kind = v.get("type").and_then(|t| t.as_str()).unwrap_or(ev.event.as_str());
    match kind {
        "message_start" => {
            let m = v.get("message").cloned().unwrap_or_default();
            acc.model = m.get("model").and_then(|x| x.as_str()).map(String::from).or(acc.model.take());
            if let Some(u) = m.get("usage") {
                merge_usage(acc, caller, None, u)?;
                // Only the input is final here; the output comes with message_delta.
                acc.usage = None;
            }
        }
        "content_block_start" => {
            let block = v.get("content_block").cloned().unwrap_or_default();
            if block.get("type").and_then(|t| t.as_str()) == Some("tool_use") {
                let index = v.get("index").and_then(|i| i.as_i64()).unwrap_or(acc.calls.len() as i64);
                let text = |k: &str| block.get(k).and_then(|x| x.as_str()).map(String::from);
                let (Some(id), Some(name)) = (text("id"), text("name")) else {
                    return Err(caller.invalid("tool_use block without an id or a name"));
                };
                if acc.answer_tool.as_deref() == Some(name.as_str()) {
                    acc.answer_block = Some(index);
                } else {
                    acc.start_call(index, id, name);
                }
            }
        }
        "content_block_delta" => {
            let d = v.get("delta").cloned().unwrap_or_default();
            let index = v.get("index").and_then(|i| i.as_i64());
            let piece = |k: &str| d.get(k).and_then(|t| t.as_str()).unwrap_or("").to_string();
            match d.get("type").and_then(|t| t.as_str()) {
                // With a schema, text before the answer tool is the model's preamble.
                Some("text_delta") if acc.answer_tool.is_some() => acc.preamble.push_str(&piece("text")),
                Some("text_delta") => return Ok(Some(piece("text"))),
                // The answer's JSON, as it is written: the text streamed.
                Some("input_json_delta") if index.is_some() && index == acc.answer_block => return Ok(Some(piece("partial_json"))),
                Some("input_json_delta") => {
                    if let Some(call) = index.and_then(|i| acc.call_at(i)) {
                        call.arguments.push_str(&piece("partial_json"));
                    }
                }
                _ => {}
            }
        }
        "message_delta" => {
            if let Some(r) = v.pointer("/delta/stop_reason").and_then(|r| r.as_str()) {
                acc.finish = normalise(r);
                acc.finish_raw = Some(r.to_string());
            }
            if let Some(u) = v.get("usage") {
                let seen = acc.raw_usage.take();
                merge_usage(acc, caller, seen.as_ref(), u)?;
            }
        }
        "message_stop" => acc.done = true,
        "error" => return Err(stream_error(caller, &ev.data)),
        _ => {}
    }
    Ok(None)
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
        let reply = parse(&Caller { provider: "anthropic", model: "claude-sonnet-4-5" }, r, None).unwrap();
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
        let reply = parse(&c, refusal, None).unwrap();
        assert_eq!((reply.content.as_str(), reply.finish_reason, reply.finish_reason_raw.as_deref()), ("", Some("refusal"), Some("refusal")));
        assert_eq!(reply.usage, Usage { input: 310, output: 2, cached: 0, cache_write: 100, cache_write_1h: 200 });
        let thinking: Response = serde_json::from_str(
            r#"{"content":[{"type":"thinking","thinking":"Let me","signature":"x"}],"stop_reason":"max_tokens","usage":{"input_tokens":10,"output_tokens":64}}"#,
        )
        .unwrap();
        let reply = parse(&c, thinking, None).unwrap();
        assert_eq!((reply.content.as_str(), reply.finish_reason, reply.usage.output), ("", Some("length"), 64));
        let no_usage: Response = serde_json::from_str(r#"{"content":[]}"#).unwrap();
        assert!(parse(&c, no_usage, None).is_err());
    }
}
