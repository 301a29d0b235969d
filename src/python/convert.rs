//! Conversions between Python objects and core types. Every user-supplied value is checked
//! here with an error that names the field.

use std::collections::HashMap;
use std::str::FromStr;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString};
use rust_decimal::Decimal;

use crate::budget::{Enforcement, Limits, TenantBudget, MAX_COUNT};
use crate::error::{config_err, Amount, Error, ProviderFailure, Result};
use crate::execution::{Cell, Row};
use crate::money::Nanos;

/// A USD amount: int, Decimal, float or numeric string; finite and not negative.
pub fn usd(field: &str, v: &Bound<'_, PyAny>) -> Result<Nanos> {
    let text = if v.is_instance_of::<PyBool>() {
        None
    } else if v.is_instance_of::<PyInt>() || v.is_instance_of::<PyFloat>() || v.is_instance_of::<PyString>() {
        v.str().ok().map(|s| s.to_string())
    } else if v.get_type().name().is_ok_and(|n| n == "Decimal") {
        v.str().ok().map(|s| s.to_string())
    } else {
        None
    };
    let Some(text) = text else {
        return config_err(format!("{field} must be a number of US dollars, got {}", type_name(v)));
    };
    // Floats print in scientific notation for small values (1e-05).
    match Decimal::from_str(text.trim()).or_else(|_| Decimal::from_scientific(text.trim())) {
        Ok(d) => Nanos::from_usd(field, d),
        Err(_) => config_err(format!("{field} must be a finite number of US dollars, got {text}")),
    }
}

/// A count (tokens, executions): an int from 0 to `MAX_COUNT`.
pub fn count(field: &str, v: &Bound<'_, PyAny>) -> Result<i64> {
    if v.is_instance_of::<PyBool>() || !v.is_instance_of::<PyInt>() {
        return config_err(format!("{field} must be a whole number, got {}", type_name(v)));
    }
    match v.extract::<i64>() {
        Ok(n) if n < 0 => config_err(format!("{field} must not be negative (got {n})")),
        Ok(n) if n <= MAX_COUNT => Ok(n),
        _ => config_err(format!("{field} must be at most {MAX_COUNT} (got {})", v.str().map(|s| s.to_string()).unwrap_or_default())),
    }
}

/// A Python int of any size, for an argument with a range: its value when it fits an i64,
/// else `None` (outside every range), so a huge int is a `ConfigurationError` from
/// `within`, never an `OverflowError`.
pub struct AnyInt(Option<i64>);

impl<'a, 'py> FromPyObject<'a, 'py> for AnyInt {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if obj.is_instance_of::<PyBool>() || !obj.is_instance_of::<PyInt>() {
            let msg = format!("expected a whole number, got {}", type_name(&obj));
            return Err(super::errors::ConfigurationError::new_err(msg));
        }
        Ok(AnyInt(obj.extract::<i64>().ok()))
    }
}

impl AnyInt {
    pub const fn of(n: i64) -> AnyInt {
        AnyInt(Some(n))
    }

    /// The value, or i64::MAX for one too large (for counts checked by the core).
    pub fn or_max(&self) -> i64 {
        self.0.unwrap_or(i64::MAX)
    }

    pub fn within(&self, field: &str, min: i64, max: i64) -> Result<i64> {
        match self.0 {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            Some(n) => config_err(format!("{field} must be between {min} and {max} (got {n})")),
            None => config_err(format!("{field} must be between {min} and {max} (got a larger number)")),
        }
    }
}

pub fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "object".into())
}

pub fn string(field: &str, v: &Bound<'_, PyAny>) -> Result<String> {
    v.extract::<String>().or_else(|_| config_err(format!("{field} must be a string, got {}", type_name(v))))
}

fn opt<T>(d: &Bound<'_, PyDict>, key: &str, f: impl Fn(&str, &Bound<'_, PyAny>) -> Result<T>) -> Result<Option<T>> {
    match d.get_item(key).map_err(|e| Error::Configuration(e.to_string()))? {
        Some(v) if !v.is_none() => f(key, &v).map(Some),
        _ => Ok(None),
    }
}

/// Rejects keys other than `allowed`, naming the first unknown one.
pub fn only_keys(what: &str, d: &Bound<'_, PyDict>, allowed: &[&str]) -> Result<()> {
    for k in d.keys() {
        let k = k.str().map(|s| s.to_string()).unwrap_or_default();
        if !allowed.contains(&k.as_str()) {
            return config_err(format!("{what}: unknown key {k:?}; expected one of {}", allowed.join(", ")));
        }
    }
    Ok(())
}

pub const TENANT_LIMIT_KEYS: &[&str] = crate::budget::BUDGET_FIELDS;

/// A tenant budget from a dict of limits (TenantBudget fields, runtime tenant dicts,
/// `tenant_config_resolver` results).
pub fn tenant_budget(tenant_id: &str, d: &Bound<'_, PyDict>) -> Result<TenantBudget> {
    only_keys("tenant limits", d, TENANT_LIMIT_KEYS)?;
    let b = TenantBudget {
        tenant_id: tenant_id.to_string(),
        name: opt(d, "name", string)?,
        limits: Limits {
            daily_cost: opt(d, "daily_limit", usd)?,
            monthly_cost: opt(d, "monthly_limit", usd)?,
            daily_tokens: opt(d, "daily_token_limit", count)?,
            monthly_tokens: opt(d, "monthly_token_limit", count)?,
            daily_executions: opt(d, "daily_execution_limit", count)?,
            monthly_executions: opt(d, "monthly_execution_limit", count)?,
            rpm: opt(d, "rpm_limit", count)?,
            tpm: opt(d, "tpm_limit", count)?,
            max_concurrent: opt(d, "max_concurrent", count)?,
        },
        enforcement: opt(d, "enforcement", |f, v| string(f, v).and_then(|s| Enforcement::parse(&s)))?.unwrap_or_default(),
    };
    b.validate()?;
    Ok(b)
}

pub fn nanos_to_py(py: Python<'_>, n: Nanos) -> PyResult<Bound<'_, PyAny>> {
    n.to_decimal().into_pyobject(py)
}

pub fn opt_nanos(py: Python<'_>, n: Option<Nanos>) -> PyResult<Py<PyAny>> {
    Ok(match n {
        Some(n) => nanos_to_py(py, n)?.unbind(),
        None => py.None(),
    })
}

pub fn budget_to_dict<'py>(py: Python<'py>, b: &TenantBudget) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let l = &b.limits;
    d.set_item("tenant_id", &b.tenant_id)?;
    d.set_item("name", &b.name)?;
    d.set_item("daily_limit", opt_nanos(py, l.daily_cost)?)?;
    d.set_item("monthly_limit", opt_nanos(py, l.monthly_cost)?)?;
    d.set_item("daily_token_limit", l.daily_tokens)?;
    d.set_item("monthly_token_limit", l.monthly_tokens)?;
    d.set_item("daily_execution_limit", l.daily_executions)?;
    d.set_item("monthly_execution_limit", l.monthly_executions)?;
    d.set_item("rpm_limit", l.rpm)?;
    d.set_item("tpm_limit", l.tpm)?;
    d.set_item("max_concurrent", l.max_concurrent)?;
    d.set_item("enforcement", b.enforcement.as_str())?;
    Ok(d)
}

pub fn amount_to_py(py: Python<'_>, a: Amount) -> PyResult<Py<PyAny>> {
    Ok(match a {
        Amount::Usd(n) => nanos_to_py(py, n)?.unbind(),
        Amount::Count(c) => c.into_pyobject(py)?.into_any().unbind(),
    })
}

pub fn failure_to_py<'py>(py: Python<'py>, f: &ProviderFailure) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("provider", &f.provider)?;
    d.set_item("model", &f.model)?;
    d.set_item("status", f.status)?;
    d.set_item("error_class", f.kind.class_name())?;
    d.set_item("message", &f.message)?;
    d.set_item("retryable", f.retryable)?;
    d.set_item("retry_after", f.retry_after)?;
    Ok(d)
}

fn json_loads<'py>(py: Python<'py>, s: &str) -> PyResult<Bound<'py, PyAny>> {
    static LOADS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    LOADS.import(py, "json", "loads")?.call1((s,))
}

pub fn cell_to_py(py: Python<'_>, c: Cell) -> PyResult<Py<PyAny>> {
    Ok(match c {
        Cell::Null => py.None(),
        Cell::Text(s) => s.into_pyobject(py)?.into_any().unbind(),
        Cell::Int(i) => i.into_pyobject(py)?.into_any().unbind(),
        Cell::Money(n) => nanos_to_py(py, n)?.unbind(),
        Cell::Time(t) => chrono::DateTime::<chrono::Utc>::from_timestamp_micros(t).into_pyobject(py)?.into_any().unbind(),
        Cell::Json(s) => json_loads(py, &s)?.unbind(),
    })
}

pub fn row_to_dict(py: Python<'_>, row: Row) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in row {
        match (k, v) {
            // Stored as 0 or 1 (both stores); a flag in Python.
            ("cached", v) => d.set_item(k, matches!(v, Cell::Int(1)))?,
            (k, v) => d.set_item(k, cell_to_py(py, v)?)?,
        }
    }
    Ok(d)
}

/// provider -> key/url maps; values must be strings.
pub fn string_map(field: &str, v: &Bound<'_, PyAny>) -> Result<HashMap<String, String>> {
    let d = v.cast::<PyDict>().map_err(|_| Error::Configuration(format!("{field} must be a dict of provider name to string")))?;
    let mut out = HashMap::new();
    for (k, v) in d.iter() {
        let k = string(&format!("{field} key"), &k)?;
        let v = string(&format!("{field}[{k:?}]"), &v)?;
        out.insert(k, v);
    }
    Ok(out)
}

/// `history=`: a list of `{"role": "user" | "assistant", "content": str}` dicts, oldest first.
pub fn history(v: &Bound<'_, PyAny>) -> Result<Vec<crate::providers::Turn>> {
    use crate::providers::{Role, Turn, MAX_HISTORY};
    // A sequence (list, tuple); pyo3 refuses to take a str or a dict as one.
    let list: Vec<Bound<'_, PyAny>> = v.extract().map_err(|_| Error::Configuration(format!("history must be a list of {{\"role\": ..., \"content\": ...}} dicts, got {}", type_name(v))))?;
    if list.len() > MAX_HISTORY {
        return Err(Error::Configuration(format!("history may hold at most {MAX_HISTORY} turns (got {})", list.len())));
    }
    list.iter()
        .enumerate()
        .map(|(i, turn)| {
            let field = format!("history[{i}]");
            let d = turn.cast::<PyDict>().map_err(|_| Error::Configuration(format!("{field} must be a dict with \"role\" and \"content\"")))?;
            for k in d.keys() {
                let k = k.str().map(|s| s.to_string()).unwrap_or_default();
                if k != "role" && k != "content" {
                    return Err(Error::Configuration(format!("{field}: unknown key {k:?}; a turn has \"role\" and \"content\"")));
                }
            }
            let item = |key: &str| -> Result<String> {
                let value = d.get_item(key).ok().flatten().ok_or_else(|| Error::Configuration(format!("{field} has no {key:?}")))?;
                string(&format!("{field}.{key}"), &value)
            };
            Ok(Turn { role: Role::parse(&field, &item("role")?)?, content: item("content")? })
        })
        .collect()
}
