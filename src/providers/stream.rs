//! Streamed replies: server-sent events read as they arrive, decoded per wire format into
//! text deltas, and the final reply (usage from the provider's last events, or counted from
//! the text when the provider never sent it).

use std::collections::VecDeque;

use super::http::{self, Caller};
use super::{anthropic, gemini, openai, tokens_of, Reply, ToolCall, Wire};
use crate::error::{ProviderErrorKind, ProviderFailure};
use crate::pricing::Usage;

/// One server-sent event (https://html.spec.whatwg.org/multipage/server-sent-events.html).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// The longest event accepted: far beyond any real one, small enough that a server sending
/// no event boundary cannot exhaust memory.
const MAX_EVENT_BYTES: usize = 16 << 20;

/// Takes the first complete event out of `buf` (events end with a blank line; lines end with
/// LF, CRLF or CR); `None` until one is complete. Comments and events without data are skipped.
pub fn next_event(buf: &mut Vec<u8>) -> Option<SseEvent> {
    loop {
        let mut ev = SseEvent::default();
        let mut has_data = false;
        let mut pos = 0;
        let end = loop {
            let rest = &buf[pos..];
            let nl = rest.iter().position(|b| *b == b'\n' || *b == b'\r')?;
            let line = String::from_utf8_lossy(&rest[..nl]).into_owned();
            let mut next = pos + nl + 1;
            if rest[nl] == b'\r' {
                // A CR at the very end may be half of a CRLF still in flight.
                match rest.get(nl + 1) {
                    None => return None,
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                }
            }
            pos = next;
            if line.is_empty() {
                break pos;
            }
            let (field, value) = line.split_once(':').map_or((line.as_str(), ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
            match field {
                "event" => ev.event = value.to_string(),
                "data" => {
                    if has_data {
                        ev.data.push('\n');
                    }
                    ev.data.push_str(value);
                    has_data = true;
                }
                _ => {}
            }
        };
        buf.drain(..end);
        if has_data {
            return Some(ev);
        }
    }
}

/// What the events of one reply said so far.
#[derive(Debug, Default)]
pub struct Acc {
    pub text: String,
    pub model: Option<String>,
    /// The provider's usage, once it sent it (OpenAI's last chunk, Anthropic's message_delta,
    /// Gemini's usageMetadata).
    pub usage: Option<Usage>,
    /// Input tokens the provider reported before the end (Anthropic's message_start).
    pub input: Option<i64>,
    pub finish: Option<&'static str>,
    pub finish_raw: Option<String>,
    pub refusal: String,
    /// The provider marked the end ([DONE], message_stop).
    pub done: bool,
    /// Anthropic's usage object as merged so far (message_start, then message_delta).
    pub raw_usage: Option<serde_json::Value>,
    /// The tools the model asked to call so far, each with the index its wire format gives
    /// it (OpenAI's `tool_calls[].index`, Anthropic's content block), so that the fragments
    /// of its arguments find it.
    pub calls: Vec<(i64, ToolCall)>,
    /// Anthropic with a schema: the tool whose input is the answer, the content block it is
    /// in once started, and the text before it (the model's preamble, not the answer).
    pub answer_tool: Option<String>,
    pub answer_block: Option<i64>,
    pub preamble: String,
}

impl Acc {
    /// The call the latest fragment at `index` belongs to.
    pub fn call_at(&mut self, index: i64) -> Option<&mut ToolCall> {
        self.calls.iter_mut().rev().find(|(i, _)| *i == index).map(|(_, c)| c)
    }

    /// A new call at `index`.
    pub fn start_call(&mut self, index: i64, id: String, name: String) {
        self.calls.push((index, ToolCall { id, name, arguments: String::new(), signature: None }));
    }

    /// Calls that came whole (Gemini's, the mock's), numbered in order.
    pub fn add_calls(&mut self, calls: Vec<ToolCall>) {
        for c in calls {
            self.calls.push((self.calls.len() as i64, c));
        }
    }

    /// The end of a reply: every call it asked for must have been named.
    fn end(&mut self, caller: &Caller<'_>) -> Result<Option<String>, ProviderFailure> {
        self.done = true;
        if self.calls.iter().any(|(_, c)| c.name.is_empty()) {
            return Err(caller.invalid("a streamed tool call without a name"));
        }
        Ok(None)
    }
}

/// A provider's error sent inside a stream (`{"error": {...}}` or Anthropic's `error` event).
pub fn stream_error(caller: &Caller<'_>, data: &str) -> ProviderFailure {
    let v: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
    let kind_of = |s: &str| match s {
        "rate_limit_error" | "rate_limit_exceeded" | "RESOURCE_EXHAUSTED" => ProviderErrorKind::RateLimit,
        "authentication_error" | "permission_error" | "UNAUTHENTICATED" | "PERMISSION_DENIED" => ProviderErrorKind::Authentication,
        "invalid_request_error" | "INVALID_ARGUMENT" => ProviderErrorKind::BadRequest,
        _ => ProviderErrorKind::Transport,
    };
    let kind = ["/error/type", "/error/status", "/error/code"].iter().find_map(|p| v.pointer(p).and_then(|t| t.as_str())).map_or(ProviderErrorKind::Transport, kind_of);
    caller.failure(kind, None, format!("error in the stream: {}", http::error_message(data.as_bytes())))
}

enum Source {
    Http { resp: reqwest::Response, buf: Vec<u8>, wire: Wire },
    /// The mock's reply, cut into pieces.
    Pieces(VecDeque<String>),
}

/// A reply being received. `next` gives its text as it arrives; `reply` what it came to.
pub struct ProviderStream {
    source: Source,
    acc: Acc,
    provider: String,
    model: String,
    /// The prompt's tokens as counted from its text, for a stream that ends without usage.
    prompt_tokens: i64,
}

impl ProviderStream {
    pub fn http(resp: reqwest::Response, wire: Wire, caller: &Caller<'_>, prompt_tokens: i64) -> ProviderStream {
        ProviderStream {
            source: Source::Http { resp, buf: vec![], wire },
            acc: Acc::default(),
            provider: caller.provider.to_string(),
            model: caller.model.to_string(),
            prompt_tokens,
        }
    }

    /// A whole reply delivered in pieces (the mock provider).
    pub fn pieces(reply: Reply, provider: &str, pieces: VecDeque<String>) -> ProviderStream {
        let mut acc = Acc {
            model: Some(reply.model),
            usage: Some(reply.usage),
            finish: reply.finish_reason,
            finish_raw: reply.finish_reason_raw,
            done: true,
            ..Acc::default()
        };
        acc.add_calls(reply.tool_calls);
        ProviderStream { source: Source::Pieces(pieces), acc, provider: provider.to_string(), model: String::new(), prompt_tokens: 0 }
    }

    /// With a schema, Anthropic's answer comes as the input of the tool named so: that
    /// input's JSON is the text streamed.
    pub fn answering(mut self, tool: Option<&str>) -> ProviderStream {
        self.acc.answer_tool = tool.map(String::from);
        self
    }

    /// The next piece of text; `None` once the reply is complete. A stream that stops
    /// before the provider marked its end is a failure (retryable while nothing was shown).
    pub async fn next(&mut self) -> Result<Option<String>, ProviderFailure> {
        let caller = Caller { provider: &self.provider, model: &self.model };
        let (resp, buf, wire) = match &mut self.source {
            Source::Pieces(p) => {
                let piece = p.pop_front();
                if let Some(t) = &piece {
                    self.acc.text.push_str(t);
                }
                return Ok(piece);
            }
            Source::Http { resp, buf, wire } => (resp, buf, *wire),
        };
        loop {
            while let Some(ev) = next_event(buf) {
                let delta = match wire {
                    Wire::OpenAi { .. } => openai::decode(&caller, &mut self.acc, &ev)?,
                    Wire::Anthropic => anthropic::decode(&caller, &mut self.acc, &ev)?,
                    Wire::Gemini => gemini::decode(&caller, &mut self.acc, &ev)?,
                    Wire::Mock => None,
                };
                if let Some(t) = delta.filter(|t| !t.is_empty()) {
                    self.acc.text.push_str(&t);
                    return Ok(Some(t));
                }
            }
            if self.acc.done {
                return self.acc.end(&caller);
            }
            if buf.len() > MAX_EVENT_BYTES {
                return Err(caller.invalid(&format!("a stream event longer than {MAX_EVENT_BYTES} bytes")));
            }
            if !http::read_more(&caller, resp, buf).await? {
                // Gemini marks no end but its last event's finishReason; other servers may omit
                // the [DONE] after a finished reply.
                if self.acc.finish_raw.is_some() && (wire == Wire::Gemini || matches!(wire, Wire::OpenAi { .. })) {
                    return self.acc.end(&caller);
                }
                let mut f = caller.invalid("the stream ended before the reply was complete");
                f.status = None;
                return Err(f);
            }
        }
    }

    /// The text received so far.
    pub fn text(&self) -> &str {
        &self.acc.text
    }

    /// What the reply came to: the provider's usage, or where it sent none (the stream broke,
    /// was cancelled, or the server does not report usage in streams) the tokens counted from
    /// the prompt and the text received. A reply cut short is billed at least the output
    /// counted from its text (Gemini's running totals lag behind the text). Its tool calls
    /// are those complete so far (a reply cut short may hold a call whose arguments were cut).
    pub fn reply(&self) -> Reply {
        let a = &self.acc;
        let tool_calls: Vec<ToolCall> = a.calls.iter().map(|(_, c)| c.clone()).collect();
        // Gemini ends a reply of function calls with STOP; a reply whose only "call" was
        // Anthropic's answer tool is an answer.
        let finish = match a.finish {
            Some("stop") if !tool_calls.is_empty() => Some("tool_calls"),
            Some("tool_calls") if tool_calls.is_empty() && a.answer_block.is_some() => Some("stop"),
            other => other,
        };
        let content = match (&a.answer_tool, a.answer_block) {
            // The answer tool was never called: the text is what the model said instead.
            (Some(_), None) => a.preamble.clone(),
            // Its input had no fragments: an empty object.
            (Some(_), Some(_)) if a.text.is_empty() => "{}".to_string(),
            _ => a.text.clone(),
        };
        let counted = Usage::new(a.input.unwrap_or(self.prompt_tokens), tokens_of(&a.text), 0);
        let usage = match a.usage {
            Some(u) if a.done => u,
            Some(u) => Usage { output: u.output.max(counted.output), ..u },
            None => counted,
        };
        Reply {
            content,
            model: a.model.clone().unwrap_or_else(|| self.model.clone()),
            usage,
            finish_reason: finish,
            finish_reason_raw: a.finish_raw.clone(),
            refusal: Some(a.refusal.clone()).filter(|r| !r.is_empty()),
            tool_calls,
        }
    }

}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(mut raw: &[u8], step: usize) -> Vec<SseEvent> {
        // Fed a few bytes at a time, as a network would.
        let mut buf = vec![];
        let mut out = vec![];
        while !raw.is_empty() {
            let n = step.min(raw.len());
            buf.extend_from_slice(&raw[..n]);
            raw = &raw[n..];
            while let Some(ev) = next_event(&mut buf) {
                out.push(ev);
            }
        }
        out
    }

    /// Decodes a recorded stream (tests/fixtures/streams) as it would arrive.
    fn replay(wire: Wire, raw: &str) -> (Acc, Vec<String>) {
        let caller = Caller { provider: "p", model: "m" };
        let mut acc = Acc::default();
        let mut pieces = vec![];
        for ev in events(raw.as_bytes(), 5) {
            let piece = match wire {
                Wire::OpenAi { .. } => openai::decode(&caller, &mut acc, &ev),
                Wire::Anthropic => anthropic::decode(&caller, &mut acc, &ev),
                _ => gemini::decode(&caller, &mut acc, &ev),
            };
            pieces.extend(piece.unwrap().filter(|p| !p.is_empty()));
        }
        (acc, pieces)
    }

    #[test]
    fn decodes_recorded_streams() {
        let (acc, pieces) = replay(Wire::OpenAi { native: true }, include_str!("../../tests/fixtures/streams/openai_chat_include_usage.sse"));
        assert!(acc.done && pieces.len() > 10 && pieces[0] == "I'm");
        assert_eq!((acc.usage.unwrap().input, acc.usage.unwrap().output, acc.finish), (14, 30, Some("stop")));
        let (acc, pieces) = replay(Wire::OpenAi { native: true }, include_str!("../../tests/fixtures/streams/openai_chat_refusal.sse"));
        assert!(pieces.is_empty() && acc.refusal.starts_with("I'm") && acc.finish == Some("refusal"));
        let (acc, pieces) = replay(Wire::Anthropic, include_str!("../../tests/fixtures/streams/anthropic_basic.sse"));
        assert_eq!(pieces, ["Hello", " there", "!"]);
        assert_eq!((acc.usage.unwrap().input, acc.usage.unwrap().output, acc.model.as_deref()), (11, 6, Some("claude-3-opus-latest")));
        let (acc, pieces) = replay(Wire::Gemini, include_str!("../../tests/fixtures/streams/gemini_stream.sse"));
        assert_eq!((pieces.len(), acc.usage.unwrap().output, acc.finish_raw.as_deref()), (3, 27, Some("STOP")));
    }

    fn call(id: &str, name: &str, arguments: &str) -> ToolCall {
        ToolCall { id: id.into(), name: name.into(), arguments: arguments.into(), signature: None }
    }

    /// What a decoded stream came to, as `ProviderStream::reply` makes it.
    fn replied(acc: Acc) -> Reply {
        ProviderStream { source: Source::Pieces(VecDeque::new()), acc, provider: "p".into(), model: "m".into(), prompt_tokens: 0 }.reply()
    }

    #[test]
    fn assembles_recorded_tool_call_streams() {
        let (acc, pieces) = replay(Wire::OpenAi { native: true }, include_str!("../../tests/fixtures/streams/openai_chat_parallel_tool_calls.sse"));
        assert!(pieces.is_empty());
        let r = replied(acc);
        assert_eq!(
            r.tool_calls,
            [
                call("call_JMW1whyEaYG438VE1OIflxA2", "GetWeatherArgs", r#"{"city": "Edinburgh", "country": "GB", "units": "c"}"#),
                call("call_DNYTawLBoN8fj3KN6qU9N1Ou", "get_stock_price", r#"{"ticker": "AAPL", "exchange": "NASDAQ"}"#),
            ]
        );
        assert_eq!((r.finish_reason, r.usage.input, r.usage.output), (Some("tool_calls"), 149, 60));

        let (acc, pieces) = replay(Wire::OpenAi { native: false }, include_str!("../../tests/fixtures/streams/mistral_tool_calls.sse"));
        assert!(pieces.is_empty());
        let r = replied(acc);
        assert_eq!(r.tool_calls, [call("D681PevKs", "get_weather", r#"{"location": "Paris"}"#), call("Kq2ZxbLmT", "get_time", r#"{"zone": "CET"}"#)]);

        let (acc, pieces) = replay(Wire::Anthropic, include_str!("../../tests/fixtures/streams/anthropic_tool_use.sse"));
        assert_eq!(pieces.concat(), "I'll check the current weather in Paris for you.");
        let r = replied(acc);
        assert_eq!(r.tool_calls, [call("toolu_01NRLabsLyVHZPKxbKvkfSMn", "get_weather", r#"{"location": "Paris"}"#)]);
        assert_eq!((r.finish_reason, r.usage.input, r.usage.output), (Some("tool_calls"), 377, 65));

        let (acc, pieces) = replay(Wire::Gemini, include_str!("../../tests/fixtures/streams/gemini_function_calls.sse"));
        assert!(pieces.is_empty());
        let r = replied(acc);
        let ids: Vec<&str> = r.tool_calls.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["tenantllm-unnamed-0", "tenantllm-unnamed-1"], "numbered across chunks");
        assert_eq!((r.tool_calls[0].arguments.as_str(), r.tool_calls[1].name.as_str()), (r#"{"location":"Paris"}"#, "get_time"));
        assert!(r.tool_calls[0].signature.is_some() && r.tool_calls[1].signature.is_none());
        assert_eq!((r.finish_reason, r.finish_reason_raw.as_deref(), r.usage.output), (Some("tool_calls"), Some("STOP"), 24 + 45));
    }

    #[test]
    fn anthropic_streams_a_schema_answer_as_its_tool_input() {
        let caller = Caller { provider: "anthropic", model: "m" };
        let mut acc = Acc { answer_tool: Some("Invoice".into()), ..Acc::default() };
        let raw = concat!(
            "data: {\"type\":\"message_start\",\"message\":{\"model\":\"claude\",\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\n",
            "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"Invoice\",\"input\":{}}}\n\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"number\\\": \"}}\n\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"42}\"}}\n\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":12}}\n\n",
            "data: {\"type\":\"message_stop\"}\n\n",
        );
        let mut pieces = vec![];
        for ev in events(raw.as_bytes(), 7) {
            if let Some(p) = anthropic::decode(&caller, &mut acc, &ev).unwrap().filter(|p| !p.is_empty()) {
                acc.text.push_str(&p);
                pieces.push(p);
            }
        }
        assert_eq!(pieces, ["{\"number\": ", "42}"]);
        let r = replied(acc);
        assert_eq!((r.content.as_str(), r.finish_reason, r.tool_calls.len()), ("{\"number\": 42}", Some("stop"), 0));
    }

    #[test]
    fn fragments_with_a_new_id_start_a_new_call() {
        // Servers that send each call whole may give them all one index (or none).
        let caller = Caller { provider: "local", model: "m" };
        let mut acc = Acc::default();
        for data in [
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"a","function":{"name":"f","arguments":"{}"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"b","function":{"name":"g","arguments":"{\"x\":"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"id":"c","function":{"name":"h"}}]},"finish_reason":"tool_calls"}]}"#,
        ] {
            openai::decode(&caller, &mut acc, &SseEvent { event: String::new(), data: data.into() }).unwrap();
        }
        assert_eq!(replied(acc).tool_calls, [call("a", "f", "{}"), call("b", "g", r#"{"x":1}"#), call("c", "h", "")]);
        let mut unnamed = Acc::default();
        openai::decode(&caller, &mut unnamed, &SseEvent { event: String::new(), data: r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}]}"#.into() }).unwrap();
        assert!(unnamed.end(&caller).unwrap_err().message.contains("without a name"));
    }

    #[test]
    fn errors_inside_a_stream() {
        let caller = Caller { provider: "anthropic", model: "m" };
        let f = stream_error(&caller, r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#);
        assert!(f.retryable && f.message.contains("Overloaded"));
        let f = stream_error(&caller, r#"{"error":{"code":429,"message":"slow down","status":"RESOURCE_EXHAUSTED"}}"#);
        assert_eq!(f.kind, ProviderErrorKind::RateLimit);
        let mut buf = b"data: ".to_vec();
        buf.resize(MAX_EVENT_BYTES + 10, b'x');
        assert!(next_event(&mut buf).is_none(), "no event without its blank line");
    }

    #[test]
    fn parses_events_split_anywhere() {
        let raw = b": comment\r\n\r\nevent: message_start\r\ndata: {\"a\":1}\r\n\r\ndata: x\ndata: y\n\ndata:[DONE]\n\n";
        for step in [1, 2, 3, 7, raw.len()] {
            let got = events(raw, step);
            assert_eq!(got.len(), 3, "step {step}");
            assert_eq!((got[0].event.as_str(), got[0].data.as_str()), ("message_start", "{\"a\":1}"));
            assert_eq!(got[1].data, "x\ny");
            assert_eq!(got[2].data, "[DONE]");
        }
    }
}
