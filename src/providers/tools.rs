//! Tools the model may call and the rounds of a tool loop, as every wire format needs them.
//! The loop itself (running the functions) is the Python layer's; each round is one call.

use serde::{Deserialize, Serialize};

use crate::error::{config_err, Result};

/// A function the model may call, described by a JSON Schema of its arguments.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub parameters: serde_json::Value,
}

/// A call the model asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    /// The provider's id of the call, echoed with its result (Gemini may give none).
    pub id: String,
    pub name: String,
    /// The arguments as the model wrote them: JSON text, not necessarily valid.
    pub arguments: String,
    /// Gemini's `thoughtSignature`, which must be sent back with the call.
    #[serde(default)]
    pub signature: Option<String>,
}

/// One call of an earlier round and what it returned (or why it failed).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolAnswer {
    pub call: ToolCall,
    pub content: String,
    #[serde(default)]
    pub is_error: bool,
}

/// An earlier round of the loop: the reply's text, its calls and their results.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolRound {
    #[serde(default)]
    pub text: String,
    pub answers: Vec<ToolAnswer>,
}

/// The most tools an agent may declare (OpenAI's documented limit is 128).
pub const MAX_TOOLS: usize = 128;

/// The arguments as a JSON object, for the wires that send them as one (Anthropic, Gemini);
/// text that is not an object (the model wrote invalid JSON) is sent as `{}`: its error
/// result already tells the model what went wrong.
pub fn arguments_object(call: &ToolCall) -> serde_json::Value {
    match serde_json::from_str::<serde_json::Value>(&call.arguments) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        _ => serde_json::json!({}),
    }
}

/// Tools from their JSON form (`[{"name", "description", "parameters"}]`), checked: names
/// as every provider accepts them (letters, digits, `_` and `-`, 1 to 64), unique, with an
/// object schema.
pub fn parse_tools(json: &str) -> Result<Vec<ToolSpec>> {
    let tools: Vec<ToolSpec> = serde_json::from_str(json).or_else(|e| config_err(format!("tools: {e}")))?;
    if tools.len() > MAX_TOOLS {
        return config_err(format!("tools: at most {MAX_TOOLS} tools (got {})", tools.len()));
    }
    for (i, t) in tools.iter().enumerate() {
        let ok = (1..=64).contains(&t.name.len()) && t.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return config_err(format!("tools[{i}]: name {:?} must be 1 to 64 letters, digits, '_' or '-'", t.name));
        }
        if tools[..i].iter().any(|o| o.name == t.name) {
            return config_err(format!("tools[{i}]: two tools are named {:?}", t.name));
        }
        if t.parameters.get("type").and_then(|v| v.as_str()) != Some("object") {
            return config_err(format!("tools[{i}] ({}): parameters must be a JSON Schema of type \"object\"", t.name));
        }
    }
    Ok(tools)
}

/// Earlier rounds from their JSON form (a list of `ToolRound`).
pub fn parse_rounds(json: &str) -> Result<Vec<ToolRound>> {
    serde_json::from_str(json).or_else(|e| config_err(format!("tool rounds: {e}")))
}

/// The bytes the tools and earlier rounds add to a prompt (for its token estimates).
pub fn bytes(tools: &[ToolSpec], rounds: &[ToolRound]) -> usize {
    let declared: usize = tools.iter().map(|t| t.name.len() + t.description.len() + t.parameters.to_string().len() + 16).sum();
    let earlier: usize = rounds
        .iter()
        .map(|r| r.text.len() + r.answers.iter().map(|a| a.call.id.len() + a.call.name.len() + a.call.arguments.len() + a.content.len() + 24).sum::<usize>())
        .sum();
    declared + earlier
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_are_checked() {
        let ok = parse_tools(r#"[{"name":"get_weather","description":"d","parameters":{"type":"object","properties":{}}}]"#).unwrap();
        assert_eq!(ok[0].name, "get_weather");
        for (bad, why) in [
            (r#"[{"name":"a b","parameters":{"type":"object"}}]"#, "letters"),
            (r#"[{"name":"a","parameters":{"type":"string"}}]"#, "object"),
            (r#"[{"name":"a","parameters":{"type":"object"}},{"name":"a","parameters":{"type":"object"}}]"#, "two tools"),
            (r#"[{"name":"a","params":{}}]"#, "unknown field"),
        ] {
            assert!(parse_tools(bad).unwrap_err().to_string().contains(why), "{bad}");
        }
        let call = ToolCall { id: "1".into(), name: "a".into(), arguments: "{not json".into(), signature: None };
        assert_eq!(arguments_object(&call), serde_json::json!({}));
    }
}
