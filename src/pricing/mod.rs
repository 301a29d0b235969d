//! Model prices: the built-in table (`prices.csv`, with its sources and date) plus the
//! user's `pricing=` overrides. USD per 1M tokens, exact decimals.

use std::collections::HashMap;
use std::str::FromStr;

use rust_decimal::Decimal;

use crate::error::{config_err, Result};
use crate::money::{token_cost, Nanos};

const BUILT_IN: &str = include_str!("prices.csv");

#[derive(Debug, Clone, PartialEq)]
pub struct Price {
    pub input: Decimal,
    pub output: Decimal,
    /// Price of input tokens served from the provider's prompt cache; `input` when unset.
    pub cached_input: Option<Decimal>,
}

/// Token counts of one provider response. `input` includes `cached`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: i64,
    pub output: i64,
    pub cached: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    pub input: Nanos,
    pub output: Nanos,
}

impl Cost {
    pub fn total(&self) -> Nanos {
        self.input.saturating_add(self.output)
    }
}

impl Price {
    pub fn cost(&self, usage: Usage) -> Cost {
        let cached = usage.cached.clamp(0, usage.input.max(0));
        let cached_price = self.cached_input.unwrap_or(self.input);
        Cost {
            input: token_cost(usage.input - cached, self.input).saturating_add(token_cost(cached, cached_price)),
            output: token_cost(usage.output, self.output),
        }
    }
}

/// Mock models cost something, so demos and budget tests see real numbers.
fn mock_price() -> Price {
    Price { input: Decimal::new(15, 2), output: Decimal::new(60, 2), cached_input: Some(Decimal::new(75, 3)) }
}

/// "gpt-4o-2024-08-06" -> "gpt-4o", "claude-3-5-haiku-20241022" -> "claude-3-5-haiku":
/// providers report dated snapshots of the models they price under the undated name.
fn undated(model: &str) -> Option<&str> {
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = model.rsplitn(4, '-').collect();
    match parts.as_slice() {
        [ymd, ..] if digits(ymd, 8) => Some(&model[..model.len() - 9]),
        [d, m, y, _] if digits(d, 2) && digits(m, 2) && digits(y, 4) => Some(&model[..model.len() - 11]),
        _ => None,
    }
}

#[derive(Debug, Clone)]
pub struct PriceTable {
    /// model id -> (provider, price)
    entries: HashMap<String, (String, Price)>,
}

fn parse_price(field: &str, s: &str) -> Result<Decimal> {
    match Decimal::from_str(s.trim()) {
        Ok(d) if !d.is_sign_negative() => Ok(d),
        _ => config_err(format!("{field}: expected a non-negative decimal USD price per 1M tokens, got {s:?}")),
    }
}

impl PriceTable {
    pub fn built_in() -> PriceTable {
        let mut entries = HashMap::new();
        for line in BUILT_IN.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with("provider,") {
                continue;
            }
            let f: Vec<&str> = line.split(',').collect();
            // The table ships with the crate and is checked by a test, so a bad row is a bug.
            let price = Price {
                input: parse_price("prices.csv", f[2]).expect("built-in price"),
                output: parse_price("prices.csv", f[3]).expect("built-in price"),
                cached_input: f.get(4).filter(|s| !s.trim().is_empty()).map(|s| parse_price("prices.csv", s).expect("built-in price")),
            };
            entries.insert(f[1].to_string(), (f[0].to_string(), price));
        }
        PriceTable { entries }
    }

    /// Adds or replaces a model's price (`configure(pricing={model: {...}})`).
    pub fn set(&mut self, model: &str, input: &str, output: &str, cached_input: Option<&str>) -> Result<()> {
        if model.trim().is_empty() {
            return config_err("pricing: model name must not be empty");
        }
        let price = Price {
            input: parse_price(&format!("pricing[{model:?}].input"), input)?,
            output: parse_price(&format!("pricing[{model:?}].output"), output)?,
            cached_input: cached_input.map(|c| parse_price(&format!("pricing[{model:?}].cached_input"), c)).transpose()?,
        };
        let provider = self.entries.get(model).map(|(p, _)| p.clone()).unwrap_or_default();
        self.entries.insert(model.to_string(), (provider, price));
        Ok(())
    }

    /// The price of `model` (as the agent names it, "provider/model" or bare).
    pub fn price(&self, model: &str) -> Result<Price> {
        if let Some((_, p)) = self.entries.get(model) {
            return Ok(p.clone());
        }
        if let Some((_, bare)) = model.split_once('/') {
            if let Some((_, p)) = self.entries.get(bare) {
                return Ok(p.clone());
            }
        }
        if let Some(base) = undated(model) {
            if let Ok(p) = self.price(base) {
                return Ok(p);
            }
        }
        if model.starts_with("mock/") {
            return Ok(mock_price());
        }
        config_err(format!(
            "unknown model {model:?}: no price is known for it; add it with configure(pricing={{{model:?}: {{\"input\": ..., \"output\": ...}}}})"
        ))
    }

    /// The provider the built-in table lists for a bare model id.
    pub fn provider_of(&self, model: &str) -> Option<&str> {
        self.entries.get(model).map(|(p, _)| p.as_str()).filter(|p| !p.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_table_parses_and_covers_every_provider() {
        let t = PriceTable::built_in();
        for provider in ["openai", "anthropic", "gemini", "deepseek", "mistral"] {
            assert!(t.entries.values().any(|(p, _)| p == provider), "no {provider} prices");
        }
        assert!(t.price("gpt-4o").is_ok());
        assert!(t.price("openai/gpt-4o").is_ok());
    }

    #[test]
    fn overrides_and_unknown_models() {
        let mut t = PriceTable::built_in();
        let e = t.price("my-model").unwrap_err().to_string();
        assert!(e.contains("my-model") && e.contains("pricing"));
        t.set("my-model", "1.00", "2.00", None).unwrap();
        let c = t.price("my-model").unwrap().cost(Usage { input: 1_000_000, output: 500_000, cached: 0 });
        assert_eq!(c.total(), Nanos(2_000_000_000));
        assert!(t.set("bad", "-1", "2", None).is_err());
        assert!(t.set("bad", "NaN", "2", None).is_err());
    }

    #[test]
    fn dated_snapshots_use_the_undated_price() {
        let t = PriceTable::built_in();
        assert_eq!(t.price("gpt-4o-2024-08-06").unwrap(), t.price("gpt-4o").unwrap());
        assert_eq!(undated("claude-haiku-4-5-20251001"), Some("claude-haiku-4-5"));
        assert_eq!(undated("gpt-4o"), None);
        assert!(t.price("nonsense-2024-08-06").is_err());
    }

    #[test]
    fn cached_tokens_use_the_cached_price() {
        let p = Price { input: Decimal::new(250, 2), output: Decimal::new(10, 0), cached_input: Some(Decimal::new(125, 2)) };
        let c = p.cost(Usage { input: 1000, output: 0, cached: 400 });
        // 600 * 2.5 * 1000 + 400 * 1.25 * 1000 nanos
        assert_eq!(c.input, Nanos(1_500_000 + 500_000));
    }
}
