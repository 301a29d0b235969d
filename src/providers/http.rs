//! What every HTTP provider shares: sending JSON, reading the body, and turning statuses,
//! transport failures and bad bodies into `ProviderFailure`s.

use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::error::{ProviderErrorKind, ProviderFailure};

/// Who is being called, for error messages.
pub struct Caller<'a> {
    pub provider: &'a str,
    pub model: &'a str,
}

impl Caller<'_> {
    pub fn failure(&self, kind: ProviderErrorKind, status: Option<u16>, message: String) -> ProviderFailure {
        let retryable = match kind {
            ProviderErrorKind::Authentication | ProviderErrorKind::BadRequest => false,
            ProviderErrorKind::RateLimit
            | ProviderErrorKind::Timeout
            | ProviderErrorKind::Transport
            | ProviderErrorKind::InvalidResponse => true,
        };
        ProviderFailure {
            kind,
            provider: self.provider.to_string(),
            model: self.model.to_string(),
            status,
            message,
            retryable,
            retry_after: None,
        }
    }

    pub fn invalid(&self, what: &str) -> ProviderFailure {
        self.failure(ProviderErrorKind::InvalidResponse, Some(200), format!("malformed response: {what}"))
    }
}

/// Builds the shared client: connection pooling across calls, no global timeout (each
/// attempt has its own). Redirects are never followed: a provider API does not redirect a
/// POST, and following one would send the key headers (`x-api-key`, `x-goog-api-key`, which
/// reqwest does not strip) to wherever it points; the 3xx is an error naming its target.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("tenantllm/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default()
}

/// The provider's own error message (`{"error": {"message": ...}}` in all three formats),
/// else the body's text, whole: `Providers::send` redacts the key, then `shorten`s it.
pub fn error_message(body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let msg = parsed.as_ref().and_then(|v| v.pointer("/error/message")).and_then(|m| m.as_str());
    match msg {
        Some(m) => m.to_string(),
        None if body.is_empty() => "(empty body)".into(),
        None => String::from_utf8_lossy(body).into_owned(),
    }
}

/// The longest provider message kept in exceptions and rows, in characters.
pub const MAX_MESSAGE_CHARS: usize = 500;

/// Cuts a provider's message (an HTML error page, say) to `MAX_MESSAGE_CHARS`.
pub fn shorten(message: &str) -> String {
    match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}...", &message[..cut]),
        None => message.to_string(),
    }
}

fn transport(caller: &Caller<'_>, e: reqwest::Error) -> ProviderFailure {
    // Drop the URL: it may carry credentials for some deployments.
    let e = e.without_url();
    let kind = if e.is_timeout() {
        ProviderErrorKind::Timeout
    } else if e.is_body() || e.is_decode() {
        ProviderErrorKind::InvalidResponse
    } else {
        ProviderErrorKind::Transport
    };
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    caller.failure(kind, None, msg)
}

/// POSTs `body` and parses a 2xx answer as `T`; everything else becomes a failure.
pub async fn post_json<T: DeserializeOwned>(
    caller: &Caller<'_>,
    req: reqwest::RequestBuilder,
    body: &serde_json::Value,
) -> Result<T, ProviderFailure> {
    let resp = post(caller, req, body).await?;
    let bytes = resp.bytes().await.map_err(|e| transport(caller, e))?;
    serde_json::from_slice(&bytes).map_err(|e| caller.invalid(&e.to_string()))
}

/// POSTs `body` and hands back a 2xx response unread (a stream's body arrives as it is
/// generated); any other status becomes a failure.
pub async fn post(caller: &Caller<'_>, req: reqwest::RequestBuilder, body: &serde_json::Value) -> Result<reqwest::Response, ProviderFailure> {
    let resp = req.json(body).send().await.map_err(|e| transport(caller, e))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.map_err(|e| transport(caller, e))?;
    let code = status.as_u16();
    if status.is_redirection() {
        let to = headers.get(reqwest::header::LOCATION).and_then(|l| l.to_str().ok()).unwrap_or("(no Location)");
        let to = crate::config::mask_password(to);
        let msg = format!("the provider redirected the request to {to}; redirects are not followed (set its base URL to the final address)");
        return Err(caller.failure(ProviderErrorKind::BadRequest, Some(code), msg));
    }
    let hints = super::retry_hints::read(&headers, &bytes);
    let kind = match code {
        _ if hints.invalid_key => ProviderErrorKind::Authentication,
        401 | 403 => ProviderErrorKind::Authentication,
        429 => ProviderErrorKind::RateLimit,
        408 => ProviderErrorKind::Timeout,
        500..=599 => ProviderErrorKind::Transport,
        _ => ProviderErrorKind::BadRequest,
    };
    let mut f = caller.failure(kind, Some(code), error_message(&bytes));
    f.retry_after = hints.retry_after;
    if let Some(verdict) = hints.should_retry {
        f.retryable = verdict;
    }
    Err(f)
}

/// Appends the next piece of a response body, as it arrives, to `buf`; false at its end.
pub async fn read_more(caller: &Caller<'_>, resp: &mut reqwest::Response, buf: &mut Vec<u8>) -> Result<bool, ProviderFailure> {
    match resp.chunk().await.map_err(|e| transport(caller, e))? {
        Some(piece) => {
            buf.extend_from_slice(&piece);
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Joins a base URL and a path without doubling or dropping the slash.
pub fn join(base: &str, path: &str) -> String {
    format!("{}/{}", base.trim_end_matches('/'), path.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_and_urls() {
        assert_eq!(error_message(br#"{"error": {"message": "bad key", "type": "x"}}"#), "bad key");
        assert_eq!(error_message(b"<html>oops</html>"), "<html>oops</html>");
        assert_eq!(shorten(&"é".repeat(MAX_MESSAGE_CHARS)), "é".repeat(MAX_MESSAGE_CHARS));
        assert_eq!(shorten(&"é".repeat(MAX_MESSAGE_CHARS + 1)), format!("{}...", "é".repeat(MAX_MESSAGE_CHARS)));
        assert_eq!(join("http://h/v1/", "/chat/completions"), "http://h/v1/chat/completions");
    }
}
