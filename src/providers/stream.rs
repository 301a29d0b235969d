//! Streamed replies: server-sent events read as they arrive, decoded per wire format into
//! text deltas, and the final reply (usage from the provider's last events, or counted from
//! the text when the provider never sent it).

use std::collections::VecDeque;

use super::http::{self, Caller};
use super::{anthropic, gemini, openai, tokens_of, Reply, Wire};
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
        let acc = Acc {
            model: Some(reply.model),
            usage: Some(reply.usage),
            finish: reply.finish_reason,
            finish_raw: reply.finish_reason_raw,
            done: true,
            ..Acc::default()
        };
        ProviderStream { source: Source::Pieces(pieces), acc, provider: provider.to_string(), model: String::new(), prompt_tokens: 0 }
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
                return Ok(None);
            }
            if buf.len() > MAX_EVENT_BYTES {
                return Err(caller.invalid(&format!("a stream event longer than {MAX_EVENT_BYTES} bytes")));
            }
            if !http::read_more(&caller, resp, buf).await? {
                // Gemini marks no end but its last event's finishReason; other servers may omit
                // the [DONE] after a finished reply.
                if self.acc.finish_raw.is_some() && (wire == Wire::Gemini || matches!(wire, Wire::OpenAi { .. })) {
                    self.acc.done = true;
                    return Ok(None);
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
    /// counted from its text (Gemini's running totals lag behind the text).
    pub fn reply(&self) -> Reply {
        let a = &self.acc;
        let counted = Usage::new(a.input.unwrap_or(self.prompt_tokens), tokens_of(&a.text), 0);
        let usage = match a.usage {
            Some(u) if a.done => u,
            Some(u) => Usage { output: u.output.max(counted.output), ..u },
            None => counted,
        };
        Reply {
            content: a.text.clone(),
            model: a.model.clone().unwrap_or_else(|| self.model.clone()),
            usage,
            finish_reason: a.finish,
            finish_reason_raw: a.finish_raw.clone(),
            refusal: Some(a.refusal.clone()).filter(|r| !r.is_empty()),
            tool_calls: vec![],
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
