//! What a failed answer says about retrying: how long to wait and whether to retry at all,
//! from the headers and the error body the providers document.

use reqwest::header::HeaderMap;

/// Hints read from one error answer.
#[derive(Debug, Default, PartialEq)]
pub struct Hints {
    /// Seconds to wait before retrying, in 0..=f64::MAX (finite).
    pub retry_after: Option<f64>,
    /// `x-should-retry: true|false` (OpenAI and Anthropic): the server's own verdict, which
    /// wins over the status code's.
    pub should_retry: Option<bool>,
    /// Gemini's `ErrorInfo.reason` API_KEY_INVALID: a bad key, though the status is 400.
    pub invalid_key: bool,
}

fn seconds(s: f64) -> Option<f64> {
    (s.is_finite() && s >= 0.0).then_some(s)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

/// `retry-after-ms` (milliseconds, more precise, so it wins), else `Retry-After`:
/// delta-seconds or an HTTP date.
fn from_headers(headers: &HeaderMap) -> Option<f64> {
    if let Some(ms) = header(headers, "retry-after-ms").and_then(|v| v.parse::<f64>().ok()).and_then(seconds) {
        return Some(ms / 1000.0);
    }
    let v = header(headers, "retry-after")?;
    if let Ok(s) = v.parse::<f64>() {
        return seconds(s);
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    Some(((when.timestamp_millis() - chrono::Utc::now().timestamp_millis()) as f64 / 1000.0).max(0.0))
}

/// Gemini's `error.details`: `google.rpc.RetryInfo` with `retryDelay` ("37s", "0.5s") and
/// `google.rpc.ErrorInfo` with `reason`.
fn gemini_details(body: &serde_json::Value, hints: &mut Hints) {
    let Some(details) = body.pointer("/error/details").and_then(|d| d.as_array()) else { return };
    for d in details {
        let kind = d.get("@type").and_then(|t| t.as_str()).unwrap_or_default();
        if kind.ends_with("google.rpc.RetryInfo") && hints.retry_after.is_none() {
            hints.retry_after = d.get("retryDelay").and_then(|v| v.as_str()).and_then(|v| v.strip_suffix('s')).and_then(|v| v.parse().ok()).and_then(seconds);
        }
        if kind.ends_with("google.rpc.ErrorInfo") && d.get("reason").and_then(|r| r.as_str()) == Some("API_KEY_INVALID") {
            hints.invalid_key = true;
        }
    }
}

pub fn read(headers: &HeaderMap, body: &[u8]) -> Hints {
    let mut hints = Hints {
        retry_after: from_headers(headers),
        should_retry: match header(headers, "x-should-retry") {
            Some("true") => Some(true),
            Some("false") => Some(false),
            _ => None,
        },
        invalid_key: false,
    };
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        gemini_details(&v, &mut hints);
    }
    hints
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn headers_give_the_wait_and_the_verdict() {
        assert_eq!(read(&headers(&[("retry-after", "2")]), b"").retry_after, Some(2.0));
        assert_eq!(read(&headers(&[("retry-after", "2"), ("retry-after-ms", "1500")]), b"").retry_after, Some(1.5));
        assert_eq!(read(&headers(&[("retry-after", "-1")]), b"").retry_after, None);
        assert_eq!(read(&headers(&[("x-should-retry", "false")]), b"").should_retry, Some(false));
        assert_eq!(read(&headers(&[("x-should-retry", "true")]), b"").should_retry, Some(true));
        assert_eq!(read(&HeaderMap::new(), b"").should_retry, None);
    }

    #[test]
    fn gemini_error_details() {
        // Shape from https://ai.google.dev/gemini-api/docs/troubleshooting (429 RESOURCE_EXHAUSTED).
        let body = br#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"quota","details":[
            {"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[]},
            {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"37s"}]}}"#;
        assert_eq!(read(&HeaderMap::new(), body).retry_after, Some(37.0));
        let body = br#"{"error":{"code":400,"status":"INVALID_ARGUMENT","message":"API key not valid. Please pass a valid API key.","details":[
            {"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com"}]}}"#;
        assert!(read(&HeaderMap::new(), body).invalid_key);
        assert!(!read(&HeaderMap::new(), b"<html>").invalid_key);
    }
}
