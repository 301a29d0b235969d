//! Providers: which one serves a model, and sending one request to it.

mod mock;

use std::collections::HashMap;
use std::time::Duration;

pub use mock::MockSettings;

use crate::error::{config_err, ProviderFailure, Result};
use crate::pricing::{PriceTable, Usage};

/// One request, already rendered.
#[derive(Debug, Clone)]
pub struct Request {
    pub system: Option<String>,
    pub user: String,
    pub temperature: Option<f64>,
    pub max_tokens: u32,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub content: String,
    /// The model the provider says answered (may differ from the one requested).
    pub model: String,
    pub usage: Usage,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Mock,
}

/// Where a model's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Provider name: "openai", "anthropic", ..., "mock", or a configured compatible name.
    pub provider: String,
    pub wire: Wire,
    /// The model id the provider expects (without any "provider/" prefix).
    pub model: String,
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
    let wire = match provider.as_str() {
        "mock" => Wire::Mock,
        other if base_urls.contains_key(other) => {
            return config_err(format!("provider {other:?} is not supported yet (model {model:?})"))
        }
        other => return config_err(format!("unknown provider {other:?} for model {model:?}")),
    };
    Ok(Route { provider, wire, model: bare })
}

/// Everything a provider call needs besides the request.
pub struct Target<'a> {
    pub route: &'a Route,
    pub api_key: Option<&'a str>,
    pub base_url: Option<&'a str>,
}

pub struct Providers {
    mock: mock::Mock,
}

impl Providers {
    pub fn new(mock: MockSettings) -> Providers {
        Providers { mock: mock::Mock::new(mock) }
    }

    pub async fn send(&self, target: &Target<'_>, req: &Request) -> std::result::Result<Reply, ProviderFailure> {
        match target.route.wire {
            Wire::Mock => self.mock.send(&target.route.model, req).await,
        }
    }
}

/// An upper bound of the prompt's tokens: no tokenizer maps fewer than one byte to a token,
/// plus a few tokens of per-message framing.
pub fn prompt_token_bound(req: &Request) -> i64 {
    let bytes = req.system.as_ref().map_or(0, |s| s.len()) + req.user.len();
    bytes as i64 + 16
}
