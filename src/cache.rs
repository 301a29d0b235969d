//! The response cache (`cache_ttl`): which calls share an answer. Pure; the store keeps the
//! entries (`Store::cache_get`, `Store::cache_put`) and the engine decides when to use them.

use std::time::Duration;

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::clock::Micros;
use crate::providers::Request;

/// The longest `cache_ttl`: 30 days. Zero turns the cache off.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 86_400);

/// How many expired entries one write removes at most, so cleaning up never makes a call
/// slow, yet removes expired entries faster than writes add new ones.
pub const SWEEP: i64 = 100;

/// Bumped when what the key covers changes, so old entries are never read as new ones.
const VERSION: &str = "tenantllm-cache-1";

/// A cached answer as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub content: String,
    /// The model that answered, as the provider named it, and its provider.
    pub model: String,
    pub provider: String,
    /// Normalised (`providers::FINISH_REASONS`).
    pub finish_reason: Option<String>,
    /// The execution whose answer this is.
    pub execution_id: String,
    pub created_at: Micros,
    pub expires_at: Micros,
}

/// The key of a call: a SHA-256 (hex) of a canonical JSON of everything that shapes its
/// answer: the tenant, the model chain, the prompts, the history, the parameters, the tools,
/// a tool loop's earlier rounds and the schema. Call ids the provider made up are left out
/// (they differ on every run); object keys are sorted, so the order a schema or a tool's
/// parameters were written in does not matter.
pub fn key(tenant_id: Option<&str>, models: &[&String], r: &Request) -> String {
    let history: Vec<Value> = r.history.iter().map(|t| json!([t.role.as_str(), t.content])).collect();
    let tools: Vec<Value> = r.tools.iter().map(|t| json!([t.name, t.description, t.parameters])).collect();
    let rounds: Vec<Value> = r
        .rounds
        .iter()
        .map(|round| {
            let answers: Vec<Value> = round.answers.iter().map(|a| json!([a.call.name, a.call.arguments, a.content, a.is_error])).collect();
            json!([round.text, answers])
        })
        .collect();
    let schema = r.schema.as_ref().map(|s| json!([s.name, s.schema]));
    let all = json!([VERSION, tenant_id, models, r.system, history, r.user, r.temperature, r.max_tokens, tools, rounds, r.tools_closed, schema]);
    let digest = Sha256::digest(canonical(&all).to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// `v` with every object's keys in sorted order.
fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(keys.into_iter().map(|k| (k.clone(), canonical(&m[k]))).collect::<Map<_, _>>())
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::{ResponseSchema, Role, Turn};

    fn request() -> Request {
        Request { system: Some("s".into()), user: "u".into(), max_tokens: 100, ..Default::default() }
    }

    #[test]
    fn everything_that_shapes_the_answer_changes_the_key() {
        let (a, b) = ("m".to_string(), "n".to_string());
        let base = key(Some("t1"), &[&a], &request());
        assert_eq!(base.len(), 64);
        assert_eq!(base, key(Some("t1"), &[&a], &request()), "stable");
        let changed = [
            key(Some("t2"), &[&a], &request()),
            key(None, &[&a], &request()),
            key(Some("t1"), &[&b], &request()),
            key(Some("t1"), &[&a, &b], &request()),
            key(Some("t1"), &[&a], &Request { system: None, ..request() }),
            key(Some("t1"), &[&a], &Request { user: "v".into(), ..request() }),
            key(Some("t1"), &[&a], &Request { temperature: Some(0.5), ..request() }),
            key(Some("t1"), &[&a], &Request { max_tokens: 101, ..request() }),
            key(Some("t1"), &[&a], &Request { history: vec![Turn { role: Role::User, content: "h".into() }], ..request() }),
            key(Some("t1"), &[&a], &Request { tools_closed: true, ..request() }),
            key(Some("t1"), &[&a], &Request { schema: Some(ResponseSchema::new("x", r#"{"type":"object"}"#).unwrap()), ..request() }),
        ];
        for (i, k) in changed.iter().enumerate() {
            assert_ne!(&base, k, "change {i}");
        }
        // A user prompt that only moves text between fields is another request.
        let moved = key(Some("t1"), &[&a], &Request { system: Some("su".into()), user: String::new(), ..request() });
        assert_ne!(base, moved);
    }

    #[test]
    fn object_key_order_does_not_matter() {
        let a = "m".to_string();
        let one = ResponseSchema::new("x", r#"{"type":"object","properties":{"a":{"type":"string"},"b":{"type":"integer"}}}"#).unwrap();
        let two = ResponseSchema::new("x", r#"{"properties":{"b":{"type":"integer"},"a":{"type":"string"}},"type":"object"}"#).unwrap();
        assert_eq!(
            key(None, &[&a], &Request { schema: Some(one), ..request() }),
            key(None, &[&a], &Request { schema: Some(two), ..request() })
        );
    }
}
