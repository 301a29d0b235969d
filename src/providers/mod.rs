//! Providers: which one serves a model, and sending one request to it.

mod anthropic;
mod capabilities;
mod gemini;
mod http;
mod mock;
mod openai;
mod retry_hints;
mod schema;
mod stream;
mod tools;

use std::collections::HashMap;
use std::time::Duration;

pub use capabilities::unsupported_params;
pub use mock::MockSettings;
pub use schema::{check_answer, ResponseSchema, Validator};
pub use stream::ProviderStream;
pub use tools::{parse_rounds, parse_tools, ToolAnswer, ToolCall, ToolRound, ToolSpec, MAX_TOOLS};

use crate::error::{config_err, ProviderErrorKind, ProviderFailure, Result};
use crate::pricing::{PriceTable, Usage};

/// Who said a prior turn of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    pub fn parse(field: &str, role: &str) -> Result<Role> {
        match role {
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            "system" => config_err(format!("{field}: role \"system\" is not a turn; the agent's `system` prompt is sent first")),
            other => config_err(format!("{field}: role must be \"user\" or \"assistant\" (got {other:?})")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// A prior turn (`history=`), sent before the rendered prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: Role,
    pub content: String,
}

/// The most prior turns a call may send.
pub const MAX_HISTORY: usize = 10_000;

/// One request, already rendered.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub system: Option<String>,
    /// Prior turns, oldest first, sent between the system prompt and `user`.
    pub history: Vec<Turn>,
    pub user: String,
    pub temperature: Option<f64>,
    pub max_tokens: u32,
    pub timeout: Duration,
    /// Functions the model may call.
    pub tools: Vec<ToolSpec>,
    /// The tool loop's earlier rounds, sent after `user`.
    pub rounds: Vec<ToolRound>,
    /// The loop's last round: the tools are declared (earlier rounds name them) but the
    /// model is told to answer without calling one.
    pub tools_closed: bool,
    /// The schema the answer must follow (structured output).
    pub schema: Option<ResponseSchema>,
}

/// The most tokens a reply may report in each count (input, output, cache reads and writes): far beyond any
/// model's context window, far below what could overflow a cost or a counter.
pub const MAX_REPLY_TOKENS: i64 = 100_000_000;

/// Usage a provider (or a guarded block) reports, checked before it is billed: a negative
/// count would hand the tenant budget back, an absurd one would overflow the counters.
pub fn check_usage(u: &Usage) -> std::result::Result<(), String> {
    for (name, v) in [("input", u.input), ("output", u.output), ("cached", u.cached), ("cache_write", u.cache_write), ("cache_write_1h", u.cache_write_1h)] {
        if !(0..=MAX_REPLY_TOKENS).contains(&v) {
            return Err(format!("reported {name} token count {v} is outside 0..={MAX_REPLY_TOKENS}"));
        }
    }
    Ok(())
}

/// A billed answer. `content` may be empty: a refusal, a content filter or a reply cut off
/// while thinking is still a call the provider charges for.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub content: String,
    /// The model the provider says answered (may differ from the one requested).
    pub model: String,
    pub usage: Usage,
    /// Why the reply ended, normalised: one of `FINISH_REASONS`, or `None` when the
    /// provider gave none or a value outside them (`finish_reason_raw` keeps it).
    pub finish_reason: Option<&'static str>,
    /// The provider's own word for it ("end_turn", "MAX_TOKENS", "SAFETY", ...).
    pub finish_reason_raw: Option<String>,
    /// The model's refusal message, when the provider sends one apart from the content.
    pub refusal: Option<String>,
    /// The tools the model asked to call, in its order.
    pub tool_calls: Vec<ToolCall>,
}

pub const FINISH_REASONS: [&str; 5] = ["stop", "length", "content_filter", "refusal", "tool_calls"];

/// The wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Mock,
    /// Chat completions; `native` = OpenAI itself (uses `max_completion_tokens`).
    OpenAi { native: bool },
    Anthropic,
    Gemini,
}

/// Built-in providers (all need a key): name, wire, default base URL.
const BUILT_IN: &[(&str, Wire, &str)] = &[
    ("openai", Wire::OpenAi { native: true }, "https://api.openai.com/v1"),
    ("anthropic", Wire::Anthropic, "https://api.anthropic.com"),
    ("gemini", Wire::Gemini, "https://generativelanguage.googleapis.com"),
    ("deepseek", Wire::OpenAi { native: false }, "https://api.deepseek.com/v1"),
    ("mistral", Wire::OpenAi { native: false }, "https://api.mistral.ai/v1"),
];

/// Providers a key can be stored for: the built-in ones and any configured base URL's name.
pub fn known_names(base_urls: &HashMap<String, String>) -> Vec<String> {
    let mut names: Vec<String> = BUILT_IN.iter().map(|(n, _, _)| n.to_string()).collect();
    let mut extra: Vec<String> = base_urls.keys().filter(|k| !names.contains(k)).cloned().collect();
    extra.sort();
    names.extend(extra);
    names
}

/// Rejects per-call keys for providers that do not exist (a typo would otherwise fall
/// through to the global key silently).
pub fn check_key_names<'a>(names: impl Iterator<Item = &'a String>, base_urls: &HashMap<String, String>) -> Result<()> {
    for n in names {
        if !is_known(n, base_urls) {
            return config_err(format!("api_keys: unknown provider {n:?}; known: {}", known_names(base_urls).join(", ")));
        }
    }
    Ok(())
}

pub fn is_known(provider: &str, base_urls: &HashMap<String, String>) -> bool {
    BUILT_IN.iter().any(|(n, _, _)| *n == provider) || base_urls.contains_key(provider)
}

/// The environment variables a provider's key is read from, in order.
pub fn env_vars(provider: &str) -> Vec<String> {
    match provider {
        "gemini" => vec!["GEMINI_API_KEY".into(), "GOOGLE_API_KEY".into()],
        other => vec![format!("{}_API_KEY", other.to_uppercase().replace(['-', '.'], "_"))],
    }
}

/// Where a model's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Provider name: "openai", "anthropic", ..., "mock", or a configured compatible name.
    pub provider: String,
    pub wire: Wire,
    /// The model id the provider expects (without any "provider/" prefix).
    pub model: String,
    pub base_url: String,
    /// Built-in providers need a key; a self-hosted compatible server may not.
    pub needs_key: bool,
}

/// The provider of a bare model id, by the naming conventions of each vendor.
fn provider_by_name(model: &str) -> Option<&'static str> {
    const PREFIXES: &[(&str, &str)] = &[
        ("gpt-", "openai"),
        ("chatgpt-", "openai"),
        ("o1", "openai"),
        ("o3", "openai"),
        ("o4", "openai"),
        ("claude-", "anthropic"),
        ("gemini-", "gemini"),
        ("deepseek-", "deepseek"),
        ("mistral-", "mistral"),
        ("open-mistral", "mistral"),
        ("codestral", "mistral"),
        ("ministral", "mistral"),
        ("magistral", "mistral"),
        ("devstral", "mistral"),
        ("pixtral", "mistral"),
    ];
    PREFIXES.iter().find(|(p, _)| model.starts_with(p)).map(|(_, v)| *v)
}

pub fn route(model: &str, prices: &PriceTable, base_urls: &HashMap<String, String>) -> Result<Route> {
    let (provider, bare) = match model.split_once('/') {
        Some((p, m)) if !p.is_empty() && !m.is_empty() => (p.to_string(), m.to_string()),
        _ => match prices.provider_of(model).or_else(|| provider_by_name(model)) {
            Some(p) => (p.to_string(), model.to_string()),
            None => {
                return config_err(format!(
                    "unknown model {model:?}: cannot tell its provider; write it as \"provider/model\" (e.g. \"openai/{model}\")"
                ))
            }
        },
    };
    let configured = base_urls.get(&provider).cloned();
    let (wire, base_url, needs_key) = match (provider.as_str(), BUILT_IN.iter().find(|(n, _, _)| *n == provider)) {
        ("mock", _) => (Wire::Mock, String::new(), false),
        (_, Some((_, wire, default))) => (*wire, configured.unwrap_or_else(|| default.to_string()), true),
        // Any other name with a base URL is an OpenAI-compatible server.
        (_, None) => match configured {
            Some(url) => (Wire::OpenAi { native: false }, url, false),
            None => {
                return config_err(format!(
                    "unknown provider {provider:?} for model {model:?}; known: mock, {}, or any name given in base_urls",
                    BUILT_IN.iter().map(|(n, _, _)| *n).collect::<Vec<_>>().join(", ")
                ))
            }
        },
    };
    Ok(Route { provider, wire, model: bare, base_url, needs_key })
}

/// Everything a provider call needs besides the request.
pub struct Target<'a> {
    pub route: &'a Route,
    pub api_key: Option<&'a str>,
}

pub struct Providers {
    mock: mock::Mock,
    client: reqwest::Client,
}

impl Providers {
    pub fn new(mock: MockSettings) -> Providers {
        Providers { mock: mock::Mock::new(mock), client: http::client() }
    }

    pub async fn send(&self, target: &Target<'_>, req: &Request) -> std::result::Result<Reply, ProviderFailure> {
        let r = target.route;
        let caller = http::Caller { provider: &r.provider, model: &r.model };
        let result = match r.wire {
            Wire::Mock => self.mock.send(&r.model, req).await,
            Wire::OpenAi { native } => openai::send(&self.client, &caller, &r.base_url, target.api_key, req, native).await,
            Wire::Anthropic => anthropic::send(&self.client, &caller, &r.base_url, target.api_key, req).await,
            Wire::Gemini => gemini::send(&self.client, &caller, &r.base_url, target.api_key, req).await,
        };
        // Every provider's answer passes here: its usage is checked once, for all of them.
        let result = result.and_then(|reply| check_reply(r, reply));
        result.map_err(|f| redact(f, target.api_key))
    }

    /// Sends a request for a streamed reply; the stream's own failures go through `redact`.
    pub async fn open(&self, target: &Target<'_>, req: &Request) -> std::result::Result<ProviderStream, ProviderFailure> {
        let r = target.route;
        let caller = http::Caller { provider: &r.provider, model: &r.model };
        let result = match r.wire {
            Wire::Mock => self.mock.send(&r.model, req).await.map(|reply| {
                // Word by word, as a model streams.
                let pieces = reply.content.split_inclusive(' ').map(String::from).collect();
                ProviderStream::pieces(reply, "mock", pieces)
            }),
            Wire::OpenAi { native } => openai::open(&self.client, &caller, &r.base_url, target.api_key, req, native).await,
            Wire::Anthropic => anthropic::open(&self.client, &caller, &r.base_url, target.api_key, req).await,
            Wire::Gemini => gemini::open(&self.client, &caller, &r.base_url, target.api_key, req).await,
        };
        result.map_err(|f| redact(f, target.api_key))
    }
}

/// A reply's usage, checked before it is billed (a streamed reply's at its end).
pub fn check_reply(route: &Route, reply: Reply) -> std::result::Result<Reply, ProviderFailure> {
    match check_usage(&reply.usage) {
        Ok(()) => Ok(reply),
        Err(why) => Err(ProviderFailure {
            kind: ProviderErrorKind::InvalidResponse,
            provider: route.provider.clone(),
            model: route.model.clone(),
            status: None,
            message: format!("invalid usage: {why}"),
            // The same server would answer the same way; fallbacks may still be tried.
            retryable: false,
            retry_after: None,
        }),
    }
}

/// Some servers and proxies quote the key back in their error text; it must not reach
/// exceptions, logs or execution rows. Redacted before it is cut short, so no part of a key
/// survives the cut.
pub fn redact(mut f: ProviderFailure, api_key: Option<&str>) -> ProviderFailure {
    if let Some(key) = api_key.filter(|k| !k.is_empty()) {
        f.message = f.message.replace(key, "[redacted]");
    }
    f.message = http::shorten(&f.message);
    f
}

/// Roughly what BPE tokenizers give for English: one token per four bytes. Bills a streamed
/// reply whose provider never reported usage (the stream broke or was cancelled).
pub fn tokens_of(text: &str) -> i64 {
    (text.len() as i64 + 3) / 4
}

/// The prompt's tokens as `tokens_of` counts them, with the framing of its messages.
pub fn prompt_tokens(req: &Request) -> i64 {
    let history: i64 = req.history.iter().map(|t| tokens_of(&t.content) + 3).sum();
    let tools = (extra_bytes(req) as i64 + 3) / 4;
    tokens_of(req.system.as_deref().unwrap_or("")) + history + tokens_of(&req.user) + tools + 3
}

/// What tools, earlier rounds and a schema add to a prompt.
fn extra_bytes(req: &Request) -> usize {
    tools::bytes(&req.tools, &req.rounds) + req.schema.as_ref().map_or(0, |s| s.schema.to_string().len() + s.name.len() + 16)
}

/// An upper bound of the prompt's tokens: no tokenizer maps fewer than one byte to a token,
/// plus a few tokens of per-message framing.
pub fn prompt_token_bound(req: &Request) -> i64 {
    let history: usize = req.history.iter().map(|t| t.content.len() + 8).sum();
    let bytes = req.system.as_ref().map_or(0, |s| s.len()) + req.user.len() + history + extra_bytes(req);
    bytes as i64 + 16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_name_prefix_and_explicit_provider() {
        let prices = PriceTable::built_in();
        let mut urls = HashMap::new();
        let r = route("gpt-4o", &prices, &urls).unwrap();
        assert_eq!((r.provider.as_str(), r.wire, r.base_url.as_str()), ("openai", Wire::OpenAi { native: true }, "https://api.openai.com/v1"));
        assert_eq!(route("claude-sonnet-4-5", &prices, &urls).unwrap().wire, Wire::Anthropic);
        assert_eq!(route("gemini/gemini-2.5-pro", &prices, &urls).unwrap().model, "gemini-2.5-pro");
        assert!(route("llama-3", &prices, &urls).unwrap_err().to_string().contains("provider/model"));
        assert!(route("ollama/llama3", &prices, &urls).is_err());
        urls.insert("ollama".to_string(), "http://127.0.0.1:11434/v1".to_string());
        let r = route("ollama/llama3", &prices, &urls).unwrap();
        assert_eq!((r.wire, r.needs_key), (Wire::OpenAi { native: false }, false));
        assert_eq!(env_vars("gemini")[0], "GEMINI_API_KEY");
    }

    #[test]
    fn usage_outside_its_range_is_refused() {
        let ok = Usage { input: MAX_REPLY_TOKENS, output: 0, cached: MAX_REPLY_TOKENS, cache_write: MAX_REPLY_TOKENS, cache_write_1h: 0 };
        assert!(check_usage(&ok).is_ok());
        for bad in [Usage { input: -1, ..ok }, Usage { output: MAX_REPLY_TOKENS + 1, ..ok }, Usage { cached: i64::MIN, ..ok }, Usage { cache_write: -5, ..ok }, Usage { cache_write_1h: MAX_REPLY_TOKENS + 1, ..ok }] {
            assert!(check_usage(&bad).unwrap_err().contains("outside"), "{bad:?}");
        }
    }
}
