//! Structured output: the JSON Schema an answer must follow, and the forms providers take it in.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::error::{config_err, Result};

/// Checks an answer beyond JSON syntax (the Python layer's pydantic model or JSON Schema):
/// `Err` says what is wrong with it.
#[derive(Clone)]
pub struct Validator(pub Arc<CheckFn>);

pub type CheckFn = dyn Fn(&str) -> std::result::Result<(), String> + Send + Sync;

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Validator")
    }
}

/// `schema = ...` on an agent: a name (OpenAI's `json_schema.name`, Anthropic's answer tool)
/// and the schema of the whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseSchema {
    pub name: String,
    pub schema: Value,
}

impl ResponseSchema {
    pub fn new(name: &str, schema_json: &str) -> Result<ResponseSchema> {
        let ok = (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return config_err(format!("schema: name {name:?} must be 1 to 64 letters, digits, '_' or '-'"));
        }
        let schema: Value = serde_json::from_str(schema_json).or_else(|e| config_err(format!("schema: {e}")))?;
        if schema.get("type").and_then(Value::as_str) != Some("object") {
            return config_err("schema: the answer's schema must be of type \"object\"".to_string());
        }
        Ok(ResponseSchema { name: name.to_string(), schema })
    }

    /// The schema as OpenAI's strict mode takes it (as its SDK's `to_strict_json_schema`
    /// makes it): every object closed (`additionalProperties: false`) with all its
    /// properties required, and `default: null` dropped.
    pub fn strict(&self) -> Value {
        let mut s = self.schema.clone();
        close(&mut s);
        s
    }
}

fn close(v: &mut Value) {
    match v {
        Value::Object(o) => {
            if o.get("default") == Some(&Value::Null) {
                o.remove("default");
            }
            if o.get("type").and_then(Value::as_str) == Some("object") {
                o.insert("additionalProperties".into(), json!(false));
                if let Some(Value::Object(props)) = o.get("properties") {
                    let names: Vec<Value> = props.keys().map(|k| json!(k)).collect();
                    o.insert("required".into(), Value::Array(names));
                }
            }
            o.values_mut().for_each(close);
        }
        Value::Array(items) => items.iter_mut().for_each(close),
        _ => {}
    }
}

/// Checks an answer against the call's schema: JSON text of an object, then the validator.
pub fn check_answer(content: &str, validator: Option<&Validator>) -> std::result::Result<(), String> {
    match serde_json::from_str::<Value>(content) {
        Ok(Value::Object(_)) => validator.map_or(Ok(()), |v| (v.0)(content)),
        Ok(_) => Err("the answer is JSON but not an object".into()),
        Err(e) => Err(format!("the answer is not valid JSON ({e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_closes_every_object() {
        let s = ResponseSchema::new(
            "Invoice",
            r##"{"type":"object","properties":{"n":{"type":"integer","default":null},"lines":{"type":"array","items":{"$ref":"#/$defs/Line"}}},
                "$defs":{"Line":{"type":"object","properties":{"sku":{"type":"string"}}}}}"##,
        )
        .unwrap();
        let strict = s.strict();
        assert_eq!(strict["required"], json!(["n", "lines"]));
        assert_eq!(strict["additionalProperties"], json!(false));
        assert_eq!(strict["$defs"]["Line"]["required"], json!(["sku"]));
        assert!(strict["properties"]["n"].get("default").is_none());
        assert!(ResponseSchema::new("a b", "{}").is_err());
        assert!(ResponseSchema::new("A", r#"{"type":"array"}"#).unwrap_err().to_string().contains("object"));
        assert!(check_answer(r#"{"a":1}"#, None).is_ok());
        assert!(check_answer(r#"{"a":"#, None).unwrap_err().contains("not valid JSON"));
        assert!(check_answer("[1]", None).unwrap_err().contains("not an object"));
    }
}
