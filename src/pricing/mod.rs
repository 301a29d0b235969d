//! Model prices: the built-in table (`prices.csv`, with its sources and date) plus the
//! user's `pricing=` overrides. USD per 1M tokens, exact decimals.

use std::collections::HashMap;
use std::str::FromStr;

use rust_decimal::Decimal;

use chrono::{Datelike, Timelike};

use crate::clock::Micros;
use crate::config::PriceOverride;
use crate::error::{config_err, Result};
use crate::money::{token_cost, Nanos};

const BUILT_IN: &str = include_str!("prices.csv");

#[derive(Debug, Clone, PartialEq)]
pub struct Price {
    pub input: Decimal,
    pub output: Decimal,
    /// Price of input tokens served from the provider's prompt cache; `input` when unset.
    pub cached_input: Option<Decimal>,
    /// Price of input tokens written to the prompt cache (Anthropic's 5-minute writes,
    /// OpenAI's cache writes); `input` when unset.
    pub cache_write: Option<Decimal>,
    /// Price of Anthropic's 1-hour cache writes; `cache_write` when unset.
    pub cache_write_1h: Option<Decimal>,
    /// Long-context tier: a prompt of more than `.0` input tokens is billed entirely at `.1`.
    pub long_context: Option<(i64, Box<Price>)>,
    /// Off-peak tier: a request sent outside `peak_hours` is billed at it (DeepSeek).
    pub off_peak: Option<Box<Price>>,
}

/// DeepSeek's peak hours, the only published time-window price (prices.csv): 01:00-04:00
/// and 06:00-10:00 UTC, Monday to Friday. Chinese public holidays are off-peak too; they are
/// not modelled, so a holiday request is billed at the peak price (an overestimate).
fn peak_hours(at: Micros) -> bool {
    let Some(t) = chrono::DateTime::<chrono::Utc>::from_timestamp_micros(at) else { return true };
    let weekday = t.weekday().num_days_from_monday() < 5;
    weekday && matches!(t.hour(), 1..=3 | 6..=9)
}

/// Token counts of one provider response. `input` includes `cached` and both kinds of
/// cache writes; every count is in 0..=i64::MAX as the provider reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: i64,
    pub output: i64,
    /// Input tokens read from the prompt cache.
    pub cached: i64,
    /// Input tokens written to the prompt cache at the `cache_write` price.
    pub cache_write: i64,
    /// Input tokens written to Anthropic's 1-hour cache at the `cache_write_1h` price.
    pub cache_write_1h: i64,
}

impl Usage {
    pub fn new(input: i64, output: i64, cached: i64) -> Usage {
        Usage { input, output, cached, ..Usage::default() }
    }

    /// All input tokens written to a cache, whatever their lifetime.
    pub fn cache_writes(&self) -> i64 {
        self.cache_write.saturating_add(self.cache_write_1h)
    }
}

/// What a response costs. `cache_read` and `cache_write` are the parts of `input` spent on
/// cached and cache-writing input tokens (a breakdown, not added to the total again).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    pub input: Nanos,
    pub output: Nanos,
    pub cache_read: Nanos,
    pub cache_write: Nanos,
}

impl Cost {
    pub fn total(&self) -> Nanos {
        self.input.saturating_add(self.output)
    }
}

impl Price {
    /// A flat price (no cache prices, no tiers).
    pub fn flat(input: Decimal, output: Decimal, cached_input: Option<Decimal>) -> Price {
        Price { input, output, cached_input, cache_write: None, cache_write_1h: None, long_context: None, off_peak: None }
    }

    /// The tier that bills a request of `input_tokens` prompt tokens.
    pub fn tier(&self, input_tokens: i64) -> &Price {
        match &self.long_context {
            Some((above, long)) if input_tokens > *above => long,
            _ => self,
        }
    }

    /// The most a request of `input` prompt tokens and `output` output tokens can cost:
    /// every input token at the dearest input rate (a cache write can cost more than a
    /// plain read), at the tier the prompt's size selects.
    pub fn upper_bound(&self, input: i64, output: i64) -> Nanos {
        let at = |usage: Usage| self.cost(usage).total();
        let plain = Usage::new(input, output, 0);
        at(plain).max(at(Usage { cache_write: input, ..plain })).max(at(Usage { cache_write_1h: input, ..plain }))
    }

    /// What `usage` costs in a request sent at `sent_at`.
    pub fn cost_at(&self, usage: Usage, sent_at: Micros) -> Cost {
        match &self.off_peak {
            Some(off) if !peak_hours(sent_at) => off.cost(usage),
            _ => self.cost(usage),
        }
    }

    /// What `usage` costs at the dearest time of day (the peak price).
    pub fn cost(&self, usage: Usage) -> Cost {
        let p = self.tier(usage.input);
        let input = usage.input.max(0);
        // Reads, then writes, are carved out of `input`; a provider reporting more than its
        // total is billed for no more than the total.
        let cached = usage.cached.clamp(0, input);
        let write_1h = usage.cache_write_1h.clamp(0, input - cached);
        let write = usage.cache_write.clamp(0, input - cached - write_1h);
        let plain = input - cached - write_1h - write;
        let write_price = p.cache_write.unwrap_or(p.input);
        let cache_read = token_cost(cached, p.cached_input.unwrap_or(p.input));
        let cache_write = token_cost(write, write_price).saturating_add(token_cost(write_1h, p.cache_write_1h.unwrap_or(write_price)));
        Cost {
            input: token_cost(plain, p.input).saturating_add(cache_read).saturating_add(cache_write),
            output: token_cost(usage.output, p.output),
            cache_read,
            cache_write,
        }
    }

}

/// Mock models cost something, so demos and budget tests see real numbers.
fn mock_price() -> Price {
    Price::flat(Decimal::new(15, 2), Decimal::new(60, 2), Some(Decimal::new(75, 3)))
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
        let mut tiers = vec![];
        for line in BUILT_IN.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with("provider,") {
                continue;
            }
            let f: Vec<&str> = line.split(',').collect();
            // The table ships with the crate and is checked by a test, so a bad row is a bug.
            let field = |i: usize| f.get(i).map(|s| s.trim()).filter(|s| !s.is_empty()).map(|s| parse_price("prices.csv", s).expect("built-in price"));
            let price = Price {
                input: field(2).expect("built-in input price"),
                output: field(3).expect("built-in output price"),
                cached_input: field(4),
                cache_write: field(5),
                cache_write_1h: field(6),
                long_context: None,
                off_peak: None,
            };
            // "model>N": the price for prompts of more than N input tokens; "model@offpeak":
            // the price outside peak hours.
            if let Some((model, above)) = f[1].split_once('>') {
                tiers.push((model.to_string(), Some(above.parse::<i64>().expect("built-in tier threshold")), price));
            } else if let Some(model) = f[1].strip_suffix("@offpeak") {
                tiers.push((model.to_string(), None, price));
            } else {
                entries.insert(f[1].to_string(), (f[0].to_string(), price));
            }
        }
        for (model, above, price) in tiers {
            let (_, base) = entries.get_mut(&model).expect("a tier row follows its model's row");
            match above {
                Some(above) => base.long_context = Some((above, Box::new(price))),
                None => base.off_peak = Some(Box::new(price)),
            }
        }
        PriceTable { entries }
    }

    /// Adds or replaces a model's price (`configure(pricing={model: {...}})`).
    pub fn set(&mut self, p: &PriceOverride) -> Result<()> {
        let model = p.model.as_str();
        if model.trim().is_empty() {
            return config_err("pricing: model name must not be empty");
        }
        let optional = |name: &str, v: &Option<String>| v.as_ref().map(|c| parse_price(&format!("pricing[{model:?}].{name}"), c)).transpose();
        // An override is one flat price: it replaces the built-in tiers too.
        let price = Price {
            input: parse_price(&format!("pricing[{model:?}].input"), &p.input)?,
            output: parse_price(&format!("pricing[{model:?}].output"), &p.output)?,
            cached_input: optional("cached_input", &p.cached_input)?,
            cache_write: optional("cache_write", &p.cache_write)?,
            cache_write_1h: optional("cache_write_1h", &p.cache_write_1h)?,
            long_context: None,
            off_peak: None,
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

    /// Every row says where its prices come from and when they were checked there, and which
    /// fields were not confirmed (prices.csv's header).
    #[test]
    fn every_row_names_its_source_and_check_date() {
        const FIELDS: [&str; 8] = ["model", "input", "output", "cached_input", "cache_write", "cache_write_1h", "all", ""];
        let mut header = None;
        let today = chrono::Utc::now().date_naive();
        for line in BUILT_IN.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let f: Vec<&str> = line.split(',').collect();
            let Some(columns) = header else {
                header = Some(f.len());
                assert_eq!(f[7..], ["source", "checked_on", "unverified"]);
                continue;
            };
            assert_eq!(f.len(), columns, "{line}");
            let (source, checked_on, unverified) = (f[7], f[8], f[9]);
            assert!(unverified.split(' ').all(|u| FIELDS.contains(&u)), "{line}");
            if source == "memory" {
                assert_eq!((checked_on, unverified), ("", "all"), "{line}");
                continue;
            }
            let page = source.strip_prefix("copy of ").unwrap_or(source);
            assert!(page.starts_with("https://") && !page.contains(' '), "{line}");
            let day = chrono::NaiveDate::parse_from_str(checked_on, "%Y-%m-%d").unwrap_or_else(|e| panic!("{line}: {e}"));
            assert!(day <= today && day.year() >= 2026, "{line}");
            assert_ne!(unverified, "all", "{line}");
        }
        assert_eq!(header, Some(10));
    }

    #[test]
    fn overrides_and_unknown_models() {
        let mut t = PriceTable::built_in();
        let e = t.price("my-model").unwrap_err().to_string();
        assert!(e.contains("my-model") && e.contains("pricing"));
        let over = |model: &str, input: &str| PriceOverride {
            model: model.into(),
            input: input.into(),
            output: "2.00".into(),
            cached_input: None,
            cache_write: None,
            cache_write_1h: None,
        };
        t.set(&over("my-model", "1.00")).unwrap();
        let c = t.price("my-model").unwrap().cost(Usage::new(1_000_000, 500_000, 0));
        assert_eq!(c.total(), Nanos(2_000_000_000));
        assert!(t.set(&over("bad", "-1")).is_err());
        assert!(t.set(&over("bad", "NaN")).is_err());
        let e = t.set(&PriceOverride { cache_write: Some("x".into()), ..over("bad", "1") }).unwrap_err().to_string();
        assert!(e.contains("pricing[\"bad\"].cache_write"), "{e}");
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
    fn tiers_by_prompt_size_and_time_of_day() {
        let t = PriceTable::built_in();
        let gpt = t.price("gpt-6-sol").unwrap();
        // 272,000 input tokens is still the base tier; one more bills the whole request at 2x / 1.5x.
        assert_eq!(gpt.cost(Usage::new(272_000, 0, 0)).total(), Nanos(544_000_000));
        assert_eq!(gpt.cost(Usage::new(272_001, 1000, 0)).total(), Nanos(1_088_004_000 + 15_000_000));
        let ds = t.price("deepseek-flash").unwrap();
        let usage = Usage::new(1_000_000, 1_000_000, 0);
        // 2026-12-01 was a Tuesday: 02:00 UTC is peak, 12:00 UTC off-peak; Saturdays are off-peak.
        let at = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp_micros();
        assert_eq!(ds.cost_at(usage, at("2026-12-01T02:30:00Z")).total(), Nanos(1_500_000_000));
        assert_eq!(ds.cost_at(usage, at("2026-12-01T12:00:00Z")).total(), Nanos(750_000_000));
        assert_eq!(ds.cost_at(usage, at("2026-12-05T02:30:00Z")).total(), Nanos(750_000_000));
        // Estimates use the peak price.
        assert_eq!(ds.upper_bound(1_000_000, 1_000_000), Nanos(1_500_000_000));
    }

    #[test]
    fn cache_writes_and_dated_prices() {
        let t = PriceTable::built_in();
        let haiku = t.price("claude-haiku-4-5").unwrap();
        let c = haiku.cost(Usage { input: 4850, output: 200, cached: 1800, cache_write: 2000, cache_write_1h: 1000 });
        assert_eq!((c.cache_read, c.cache_write), (Nanos(180_000), Nanos(2_500_000 + 2_000_000)));
        assert_eq!(c.input, Nanos(50_000 + 180_000 + 4_500_000));
        // Writes are the dearest input: the upper bound prices every input token as a 1-hour write.
        assert_eq!(haiku.upper_bound(1000, 0), Nanos(2_000_000));
        assert_eq!(t.price("gpt-4o-2024-05-13").unwrap().input, Decimal::new(5, 0));
        assert_eq!(t.price("claude-sonnet-4-20250514").unwrap(), t.price("claude-sonnet-4").unwrap());
        for m in ["o1", "o3-mini"] {
            assert!(t.price(m).is_ok(), "{m}");
        }
    }

    #[test]
    fn cached_tokens_use_the_cached_price() {
        let p = Price::flat(Decimal::new(250, 2), Decimal::new(10, 0), Some(Decimal::new(125, 2)));
        let c = p.cost(Usage::new(1000, 0, 400));
        // 600 * 2.5 * 1000 + 400 * 1.25 * 1000 nanos
        assert_eq!(c.input, Nanos(1_500_000 + 500_000));
    }
}
