//! OpenAI chat completions, also spoken by DeepSeek, Mistral and OpenAI-compatible servers.

use serde::Deserialize;
use serde_json::json;

use super::http::{join, post, post_json, Caller};
use super::stream::{stream_error, Acc, ProviderStream, SseEvent};
use super::{Reply, Request, ToolCall, Wire};
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
    /// A string; `null` with a refusal, a content filter or tool calls; a list of chunks
    /// from Mistral's reasoning (Magistral) models.
    content: Option<serde_json::Value>,
    refusal: Option<String>,
    /// Absent, or `null` (Mistral) without calls.
    tool_calls: Option<Vec<ApiToolCall>>,
}

/// `{"id", "type": "function", "function": {"name", "arguments"}}`, arguments as JSON text.
#[derive(Deserialize)]
struct ApiToolCall {
    id: String,
    function: ApiFunction,
}

#[derive(Deserialize)]
struct ApiFunction {
    name: String,
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct ApiUsage {
    prompt_tokens: i64,
    completion_tokens: i64,
    prompt_tokens_details: Option<Details>,
    /// DeepSeek's documented name for cache hits (its `prompt_tokens` includes them).
    prompt_cache_hit_tokens: Option<i64>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<i64>,
    cache_write_tokens: Option<i64>,
}

/// The text of a message's content: the string, or the `text` chunks of a chunk list
/// (Magistral's `thinking` chunks are its reasoning, not the answer).
fn text_of(content: Option<serde_json::Value>) -> Result<String, &'static str> {
    match content {
        None | Some(serde_json::Value::Null) => Ok(String::new()),
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(serde_json::Value::Array(chunks)) => Ok(chunks
            .iter()
            .filter(|c| c.get("type").and_then(|t| t.as_str()) == Some("text"))
            .filter_map(|c| c.get("text").and_then(|t| t.as_str()))
            .collect()),
        Some(_) => Err("message content is neither a string nor a list of chunks"),
    }
}

/// OpenAI's finish reasons, and Mistral's `model_length`.
fn normalise(raw: &str, refused: bool) -> Option<&'static str> {
    match raw {
        _ if refused => Some("refusal"),
        "stop" => Some("stop"),
        "length" | "model_length" => Some("length"),
        "content_filter" => Some("content_filter"),
        "tool_calls" | "function_call" => Some("tool_calls"),
        _ => None,
    }
}

/// OpenAI itself takes `max_completion_tokens` (required by its reasoning models); the
/// compatible servers take `max_tokens`. A schema goes as a strict `json_schema` response
/// format (OpenAI, Mistral, most compatible servers), or as `json_object` and a description
/// where only that is taken (`json_object_only`).
pub fn body(model: &str, req: &Request, native_openai: bool, json_object_only: bool) -> serde_json::Value {
    let mut messages = vec![];
    if let Some(s) = &req.system {
        messages.push(json!({"role": "system", "content": s}));
    }
    messages.extend(req.history.iter().map(|t| json!({"role": t.role.as_str(), "content": t.content})));
    messages.push(json!({"role": "user", "content": req.user}));
    // Each earlier round: the assistant's calls, then one `tool` message per result.
    for round in &req.rounds {
        let calls: Vec<_> = round
            .answers
            .iter()
            .map(|a| json!({"id": a.call.id, "type": "function", "function": {"name": a.call.name, "arguments": a.call.arguments}}))
            .collect();
        let text = Some(&round.text).filter(|t| !t.is_empty());
        messages.push(json!({"role": "assistant", "content": text, "tool_calls": calls}));
        messages.extend(round.answers.iter().map(|a| json!({"role": "tool", "tool_call_id": a.call.id, "content": a.content})));
    }
    let mut b = json!({"model": model, "messages": messages});
    b[if native_openai { "max_completion_tokens" } else { "max_tokens" }] = json!(req.max_tokens);
    if let Some(t) = req.temperature {
        b["temperature"] = json!(t);
    }
    if let Some(schema) = &req.schema {
        if json_object_only {
            // DeepSeek takes only `json_object`, and wants the format described in the prompt
            // (https://api-docs.deepseek.com/guides/json_mode).
            b["response_format"] = json!({"type": "json_object"});
            let describe = format!("Answer with one JSON object that follows this JSON Schema: {}", schema.schema);
            if let Some(m) = b["messages"].as_array_mut() {
                m.insert(0, json!({"role": "system", "content": describe}));
            }
        } else {
            b["response_format"] = json!({"type": "json_schema", "json_schema": {"name": schema.name, "schema": schema.strict(), "strict": true}});
        }
    }
    if !req.tools.is_empty() {
        let tools: Vec<_> = req
            .tools
            .iter()
            .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}))
            .collect();
        b["tools"] = json!(tools);
        if req.tools_closed {
            b["tool_choice"] = json!("none");
        }
    }
    b
}

fn usage_of(usage: ApiUsage) -> Usage {
    let details = usage.prompt_tokens_details;
    let cached = details.as_ref().and_then(|d| d.cached_tokens).or(usage.prompt_cache_hit_tokens).unwrap_or(0);
    Usage {
        input: usage.prompt_tokens,
        output: usage.completion_tokens,
        cached,
        cache_write: details.and_then(|d| d.cache_write_tokens).unwrap_or(0),
        cache_write_1h: 0,
    }
}

/// A reply with usage is a billed call, whatever its content: a refusal (`content: null`,
/// `refusal: "..."`), a content filter or a reply cut off at the token limit are answers.
fn parse(caller: &Caller<'_>, r: Response) -> Result<Reply, ProviderFailure> {
    let choice = r.choices.into_iter().next().ok_or_else(|| caller.invalid("no choices"))?;
    let usage = r.usage.ok_or_else(|| caller.invalid("no usage"))?;
    let (content, refusal, tool_calls) = match choice.message {
        Some(m) => {
            let calls = m.tool_calls.unwrap_or_default().into_iter().map(|c| ToolCall { id: c.id, name: c.function.name, arguments: c.function.arguments.unwrap_or_default(), signature: None });
            (text_of(m.content).map_err(|e| caller.invalid(e))?, m.refusal.filter(|r| !r.is_empty()), calls.collect())
        }
        None => (String::new(), None, vec![]),
    };
    Ok(Reply {
        content,
        model: r.model.unwrap_or_else(|| caller.model.to_string()),
        usage: usage_of(usage),
        finish_reason: choice.finish_reason.as_deref().and_then(|f| normalise(f, refusal.is_some())).or(refusal.as_ref().map(|_| "refusal")),
        finish_reason_raw: choice.finish_reason,
        refusal,
        tool_calls,
    })
}

/// The request for a model: the reply whole, or streamed (`stream_options.include_usage`
/// makes OpenAI send the usage in a last chunk; Mistral sends it unasked and refuses
/// unknown fields).
fn request(
    client: &reqwest::Client,
    caller: &Caller<'_>,
    base_url: &str,
    api_key: Option<&str>,
    req: &Request,
    native_openai: bool,
    stream: bool,
) -> (reqwest::RequestBuilder, serde_json::Value) {
    let mut http = client.post(join(base_url, "chat/completions"));
    if let Some(k) = api_key {
        http = http.bearer_auth(k);
    }
    let mut b = body(caller.model, req, native_openai, caller.provider == "deepseek");
    if stream {
        b["stream"] = json!(true);
        if caller.provider != "mistral" {
            b["stream_options"] = json!({"include_usage": true});
        }
    }
    (http, b)
}

pub async fn send(
    client: &reqwest::Client,
    caller: &Caller<'_>,
    base_url: &str,
    api_key: Option<&str>,
    req: &Request,
    native_openai: bool,
) -> Result<Reply, ProviderFailure> {
    let (http, body) = request(client, caller, base_url, api_key, req, native_openai, false);
    let r: Response = post_json(caller, http, &body).await?;
    parse(caller, r)
}

pub async fn open(
    client: &reqwest::Client,
    caller: &Caller<'_>,
    base_url: &str,
    api_key: Option<&str>,
    req: &Request,
    native_openai: bool,
) -> Result<ProviderStream, ProviderFailure> {
    let (http, body) = request(client, caller, base_url, api_key, req, native_openai, true);
    let resp = post(caller, http, &body).await?;
    Ok(ProviderStream::http(resp, Wire::OpenAi { native: native_openai }, caller, super::prompt_tokens(req)))
}

#[derive(Deserialize)]
struct Chunk {
    model: Option<String>,
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<ApiUsage>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    delta: Option<Delta>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<serde_json::Value>,
    refusal: Option<String>,
    /// Fragments of the calls: the first of each has its id and name, the rest pieces of
    /// its arguments, found by `index`. Mistral and some compatible servers send each call
    /// whole in one fragment, and may give several the same index.
    tool_calls: Option<Vec<DeltaToolCall>>,
}

#[derive(Deserialize)]
struct DeltaToolCall {
    index: Option<i64>,
    id: Option<String>,
    function: Option<DeltaFunction>,
}

#[derive(Deserialize)]
struct DeltaFunction {
    name: Option<String>,
    arguments: Option<String>,
}

/// Adds a chunk's call fragments to the calls so far. A fragment with an id other than its
/// index's call starts a new call.
fn add_fragments(acc: &mut Acc, fragments: Vec<DeltaToolCall>) {
    for (i, f) in fragments.into_iter().enumerate() {
        let index = f.index.unwrap_or(i as i64);
        let id = f.id.filter(|id| !id.is_empty());
        let function = f.function.unwrap_or(DeltaFunction { name: None, arguments: None });
        let fresh = match acc.call_at(index) {
            Some(c) => id.as_ref().is_some_and(|id| !c.id.is_empty() && *id != c.id),
            None => true,
        };
        if fresh {
            acc.start_call(index, String::new(), String::new());
        }
        let Some(call) = acc.call_at(index) else { continue };
        if let (true, Some(id)) = (call.id.is_empty(), id) {
            call.id = id;
        }
        if let (true, Some(name)) = (call.name.is_empty(), function.name) {
            call.name = name;
        }
        call.arguments.push_str(function.arguments.as_deref().unwrap_or(""));
    }
}

/// One `chat.completion.chunk` (or the `[DONE]` that ends them); returns its text.
pub fn decode(caller: &Caller<'_>, acc: &mut Acc, ev: &SseEvent) -> Result<Option<String>, ProviderFailure> {
    if ev.data.trim() == "[DONE]" {
        acc.done = true;
        return Ok(None);
    }
    let c: Chunk = serde_json::from_str(&ev.data).map_err(|e| caller.invalid(&format!("stream chunk: {e}")))?;
    if c.error.is_some() {
        return Err(stream_error(caller, &ev.data));
    }
    if let Some(m) = c.model {
        acc.model = Some(m);
    }
    if let Some(u) = c.usage {
        acc.usage = Some(usage_of(u));
    }
    let Some(choice) = c.choices.into_iter().next() else { return Ok(None) };
    let mut text = None;
    if let Some(d) = choice.delta {
        text = Some(text_of(d.content).map_err(|e| caller.invalid(e))?);
        acc.refusal.push_str(d.refusal.as_deref().unwrap_or(""));
        add_fragments(acc, d.tool_calls.unwrap_or_default());
    }
    if let Some(f) = choice.finish_reason {
        acc.finish = normalise(&f, !acc.refusal.is_empty());
        acc.finish_raw = Some(f);
    }
    Ok(text)
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
        assert_eq!(reply.usage, Usage::new(20, 5, 8));
        assert_eq!(reply.model, "gpt-4o-2024-08-06");
        assert_eq!((reply.finish_reason, reply.finish_reason_raw.as_deref()), (Some("stop"), Some("stop")));
    }

    #[test]
    fn refusals_chunks_and_cache_fields() {
        let refusal: Response = serde_json::from_str(
            r#"{"choices":[{"message":{"role":"assistant","content":null,"refusal":"I can't help with that."},"finish_reason":"stop"}],
               "usage":{"prompt_tokens":20,"completion_tokens":9,"prompt_tokens_details":{"cached_tokens":0,"cache_write_tokens":16}}}"#,
        )
        .unwrap();
        let reply = parse(&C, refusal).unwrap();
        assert_eq!((reply.content.as_str(), reply.finish_reason, reply.refusal.as_deref()), ("", Some("refusal"), Some("I can't help with that.")));
        assert_eq!(reply.usage.cache_write, 16);
        let chunks: Response = serde_json::from_str(
            r#"{"choices":[{"message":{"role":"assistant","content":[{"type":"thinking","thinking":[{"type":"text","text":"hmm"}]},{"type":"text","text":"42"}]},"finish_reason":"stop"}],
               "usage":{"prompt_tokens":10,"completion_tokens":30}}"#,
        )
        .unwrap();
        assert_eq!(parse(&C, chunks).unwrap().content, "42");
        let deepseek: Response = serde_json::from_str(
            r#"{"choices":[{"message":{"content":"hi"},"finish_reason":"length"}],
               "usage":{"prompt_tokens":100,"completion_tokens":3,"prompt_cache_hit_tokens":64,"prompt_cache_miss_tokens":36}}"#,
        )
        .unwrap();
        let reply = parse(&C, deepseek).unwrap();
        assert_eq!((reply.usage.cached, reply.finish_reason), (64, Some("length")));
        let odd: Response = serde_json::from_str(r#"{"choices":[{"message":{"content":7}}],"usage":{"prompt_tokens":1,"completion_tokens":0}}"#).unwrap();
        assert!(parse(&C, odd).unwrap_err().message.contains("neither a string"));
    }

    #[test]
    fn tool_calls_absent_null_or_listed() {
        let none: Response = serde_json::from_str(r#"{"choices":[{"message":{"content":"hi","tool_calls":null}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#).unwrap();
        assert!(parse(&C, none).unwrap().tool_calls.is_empty());
        let some: Response = serde_json::from_str(
            r#"{"choices":[{"message":{"content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},"finish_reason":"tool_calls"}],
               "usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
        )
        .unwrap();
        let reply = parse(&C, some).unwrap();
        assert_eq!(reply.tool_calls, vec![ToolCall { id: "call_1".into(), name: "f".into(), arguments: r#"{"a":1}"#.into(), signature: None }]);
        assert_eq!(reply.finish_reason, Some("tool_calls"));
    }

    #[test]
    fn empty_choices_are_invalid() {
        let r: Response = serde_json::from_str(r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":0}}"#).unwrap();
        assert!(parse(&C, r).unwrap_err().message.contains("no choices"));
    }
}
