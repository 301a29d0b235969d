//! `configure(...)` options that the core owns, from the dict the Python layer passes.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyInt};

use super::convert::{count, only_keys, string, string_map, type_name, usd};
use crate::budget::{Enforcement, GlobalBudgets, Limits};
use crate::config::{Config, PriceOverride};
use crate::error::{config_err, Error, Result};
use crate::providers::MockSettings;
use crate::retention::{Retention, MAX_DAYS};

const CONFIG_KEYS: &[&str] = &["database", "timezone", "multi_tenancy_enabled", "budgets", "api_keys", "base_urls", "pricing", "mock", "store_prompts", "retention"];
const BUDGET_KEYS: &[&str] = &[
    "global_daily",
    "global_monthly",
    "global_daily_tokens",
    "global_monthly_tokens",
    "global_daily_executions",
    "global_monthly_executions",
    "global_rpm",
    "global_tpm",
    "per_agent_daily",
    "per_agent_monthly",
    "enforcement",
];

fn dict<'a, 'py>(field: &str, v: &'a Bound<'py, PyAny>) -> Result<&'a Bound<'py, PyDict>> {
    v.cast::<PyDict>().map_err(|_| Error::Configuration(format!("{field} must be a dict, got {}", type_name(v))))
}

fn boolean(field: &str, v: &Bound<'_, PyAny>) -> Result<bool> {
    if !v.is_instance_of::<PyBool>() {
        return config_err(format!("{field} must be True or False, got {}", type_name(v)));
    }
    Ok(v.is_truthy().unwrap_or(false))
}

fn number(field: &str, v: &Bound<'_, PyAny>) -> Result<f64> {
    if v.is_instance_of::<PyBool>() {
        return config_err(format!("{field} must be a number, got bool"));
    }
    v.extract::<f64>().or_else(|_| config_err(format!("{field} must be a number, got {}", type_name(v))))
}

fn get<'py>(d: &Bound<'py, PyDict>, k: &str) -> Option<Bound<'py, PyAny>> {
    d.get_item(k).ok().flatten().filter(|v| !v.is_none())
}

fn budgets(v: &Bound<'_, PyAny>) -> Result<GlobalBudgets> {
    let d = dict("budgets", v)?;
    only_keys("budgets", d, BUDGET_KEYS)?;
    let money = |k: &str| get(d, k).map(|v| usd(&format!("budgets[{k:?}]"), &v)).transpose();
    let n = |k: &str| get(d, k).map(|v| count(&format!("budgets[{k:?}]"), &v)).transpose();
    let per_agent = |k: &str| -> Result<std::collections::HashMap<String, crate::money::Nanos>> {
        let mut out = std::collections::HashMap::new();
        if let Some(v) = get(d, k) {
            for (agent, limit) in dict(&format!("budgets[{k:?}]"), &v)?.iter() {
                let agent = string(&format!("budgets[{k:?}] key"), &agent)?;
                crate::tenancy::validate_agent_name(&agent)?;
                let limit = usd(&format!("budgets[{k:?}][{agent:?}]"), &limit)?;
                out.insert(agent, limit);
            }
        }
        Ok(out)
    };
    Ok(GlobalBudgets {
        limits: Limits {
            daily_cost: money("global_daily")?,
            monthly_cost: money("global_monthly")?,
            daily_tokens: n("global_daily_tokens")?,
            monthly_tokens: n("global_monthly_tokens")?,
            daily_executions: n("global_daily_executions")?,
            monthly_executions: n("global_monthly_executions")?,
            rpm: n("global_rpm")?,
            tpm: n("global_tpm")?,
            max_concurrent: None,
        },
        per_agent_daily: per_agent("per_agent_daily")?,
        per_agent_monthly: per_agent("per_agent_monthly")?,
        enforcement: match get(d, "enforcement") {
            Some(v) => Enforcement::parse(&string("budgets[\"enforcement\"]", &v)?)?,
            None => Enforcement::Hard,
        },
    })
}

fn pricing(v: &Bound<'_, PyAny>) -> Result<Vec<PriceOverride>> {
    let mut out = vec![];
    for (model, p) in dict("pricing", v)?.iter() {
        let model = string("pricing key", &model)?;
        let p = dict(&format!("pricing[{model:?}]"), &p)?;
        only_keys(&format!("pricing[{model:?}]"), p, &["input", "output", "cached_input", "cache_write", "cache_write_1h"])?;
        let field = |k: &str| -> Result<Option<String>> {
            match get(p, k) {
                // str() of int/Decimal/float; the price table parses and validates it.
                Some(v) => Ok(Some(v.str().map_err(|e| Error::Configuration(e.to_string()))?.to_string())),
                None => Ok(None),
            }
        };
        let (Some(input), Some(output)) = (field("input")?, field("output")?) else {
            return config_err(format!("pricing[{model:?}] needs both \"input\" and \"output\" (USD per 1M tokens)"));
        };
        out.push(PriceOverride {
            model,
            input,
            output,
            cached_input: field("cached_input")?,
            cache_write: field("cache_write")?,
            cache_write_1h: field("cache_write_1h")?,
        });
    }
    Ok(out)
}

fn mock(v: &Bound<'_, PyAny>) -> Result<MockSettings> {
    let d = dict("mock", v)?;
    only_keys("mock", d, &["latency_ms", "failure_rate", "seed"])?;
    let latency = get(d, "latency_ms").map(|v| number("mock[\"latency_ms\"]", &v)).transpose()?.unwrap_or(0.0);
    let rate = get(d, "failure_rate").map(|v| number("mock[\"failure_rate\"]", &v)).transpose()?.unwrap_or(0.0);
    let seed = get(d, "seed").map(|v| count("mock[\"seed\"]", &v)).transpose()?.unwrap_or(0);
    MockSettings::new(latency, rate, seed as u64)
}

/// `retention={"details_days": 30, "executions_days": 400}`: whole days, each optional.
pub fn retention(v: &Bound<'_, PyAny>) -> Result<Retention> {
    let d = dict("retention", v)?;
    only_keys("retention", d, &["details_days", "executions_days"])?;
    let days = |k: &str| -> Result<Option<i64>> {
        let Some(v) = get(d, k) else { return Ok(None) };
        if v.is_instance_of::<PyBool>() || !v.is_instance_of::<PyInt>() {
            return config_err(format!("retention[{k:?}] must be a whole number of days from 1 to {MAX_DAYS}, got {}", type_name(&v)));
        }
        // Too large for i64 is out of range too.
        Ok(Some(v.extract::<i64>().unwrap_or(i64::MAX)))
    };
    Retention::new(days("details_days")?, days("executions_days")?)
}

pub fn config_from_dict(d: &Bound<'_, PyDict>) -> Result<Config> {
    only_keys("configure", d, CONFIG_KEYS)?;
    let mut c = Config::default();
    if let Some(v) = get(d, "database") {
        c.database = string("database", &v)?;
    }
    if let Some(v) = get(d, "timezone") {
        c.timezone = Some(string("timezone", &v)?);
    }
    if let Some(v) = get(d, "multi_tenancy_enabled") {
        c.multi_tenancy_enabled = boolean("multi_tenancy_enabled", &v)?;
    }
    if let Some(v) = get(d, "store_prompts") {
        c.store_prompts = boolean("store_prompts", &v)?;
    }
    if let Some(v) = get(d, "retention") {
        c.retention = retention(&v)?;
    }
    if let Some(v) = get(d, "budgets") {
        c.budgets = budgets(&v)?;
    }
    if let Some(v) = get(d, "pricing") {
        c.pricing = pricing(&v)?;
    }
    if let Some(v) = get(d, "mock") {
        c.mock = mock(&v)?;
    }
    if let Some(v) = get(d, "api_keys") {
        c.api_keys = string_map("api_keys", &v)?;
    }
    if let Some(v) = get(d, "base_urls") {
        c.base_urls = string_map("base_urls", &v)?;
    }
    Ok(c)
}
