//! What each model accepts. A parameter a model rejects is left out of its requests (the
//! attempt record and the dry run say so) instead of failing every call with a 400.

use super::Request;

/// Whether `model` rejects `temperature`:
/// - OpenAI's o-series reasoning models (o1, o3, o4-mini, ... and their dated snapshots) and
///   the GPT-5 reasoning models answer 400 `unsupported_parameter`
///   (https://platform.openai.com/docs/guides/reasoning, "unsupported parameters");
/// - Claude models from generation 5 on, and Claude Opus 4.7 and later, no longer take sampling
///   parameters (Anthropic's migration guides, https://platform.claude.com/docs/en/about-claude/models/migrating-to-claude-4,
///   and https://openrouter.ai/docs/cookbook/evaluate-and-optimize/model-migrations/claude-5-sonnet).
fn rejects_temperature(model: &str) -> bool {
    let family = |name: &str| model == name || model.strip_prefix(name).is_some_and(|rest| rest.starts_with('-'));
    if ["o1", "o3", "o4", "gpt-5", "gpt-5-mini", "gpt-5-nano"].iter().any(|n| family(n)) {
        // gpt-5-chat-latest is the non-reasoning chat model and takes a temperature.
        return !model.starts_with("gpt-5-chat");
    }
    // claude-<family>-<generation>[-<minor>][-<date>]; the older names are
    // claude-<generation>[-<minor>]-<family>[-<date>].
    let mut parts = model.split('-');
    match (parts.next(), parts.next(), parts.next().and_then(|g| g.parse::<u32>().ok())) {
        (Some("claude"), Some("opus"), Some(4)) => parts.next().and_then(|m| m.parse::<u32>().ok()).is_some_and(|minor| (7..100).contains(&minor)),
        (Some("claude"), Some(family), Some(generation)) => family.bytes().all(|b| b.is_ascii_alphabetic()) && generation >= 5,
        _ => false,
    }
}

/// The request as `model` accepts it, and the names of the parameters left out.
pub fn unsupported_params(model: &str, req: &Request) -> (Request, Vec<&'static str>) {
    let mut sent = req.clone();
    let mut dropped = vec![];
    if sent.temperature.is_some() && rejects_temperature(model) {
        sent.temperature = None;
        dropped.push("temperature");
    }
    (sent, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasoning_models_and_claude_5_reject_temperature() {
        for m in ["o1", "o3-mini", "o3-2025-04-16", "o4-mini", "gpt-5", "gpt-5-mini-2025-08-07", "claude-sonnet-5", "claude-opus-5-5", "claude-fable-5-1", "claude-opus-4-8"] {
            assert!(rejects_temperature(m), "{m}");
        }
        for m in ["gpt-4o", "gpt-5.4", "gpt-5-chat-latest", "claude-sonnet-4-5", "claude-opus-4-6", "claude-opus-4-20250514", "claude-3-5-haiku-20241022", "gemini-2.5-pro", "o1x"] {
            assert!(!rejects_temperature(m), "{m}");
        }
        let req = Request { system: None, history: vec![], user: "hi".into(), temperature: Some(0.2), max_tokens: 5, timeout: std::time::Duration::from_secs(1), ..Request::default() };
        let (sent, dropped) = unsupported_params("o3", &req);
        assert_eq!((sent.temperature, dropped), (None, vec!["temperature"]));
        let (sent, dropped) = unsupported_params("gpt-4o", &req);
        assert_eq!((sent.temperature, dropped.len()), (Some(0.2), 0));
    }
}
