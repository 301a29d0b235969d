//! Turns the Python query builder's operation list into a core `Query`. Field names are
//! checked against the fixed list in `execution::FIELDS`.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt, PyList, PyTuple};

use super::convert::{string, type_name};
use super::engine::{positive, tuple_item};
use crate::clock::{Calendar, Micros, MAX_DAYS};
use crate::error::{config_err, Error, Result};
use crate::execution::{Field, Filter, Kind, Query, Status, Value};

pub struct Ops {
    pub query: Query,
}

fn value(field: &Field, v: &Bound<'_, PyAny>) -> Result<Value> {
    // A text column compared with a number matches nothing: say so instead.
    let out = if field.1 == Kind::Text {
        Value::Text(string(field.0, v)?)
    } else if v.is_instance_of::<PyInt>() && !v.is_instance_of::<PyBool>() {
        Value::Int(v.extract().map_err(|_| Error::Configuration(format!("{} value out of range", field.0)))?)
    } else {
        Value::Text(string(field.0, v)?)
    };
    if field.0 == "status" {
        if let Value::Text(s) = &out {
            Status::parse(s)?;
        }
    }
    Ok(out)
}

/// A bound of `between()`: the Python layer passes datetimes in UTC; a date means the start
/// of that calendar day in the configured timezone.
fn micros(field: &str, v: &Bound<'_, PyAny>, cal: &Calendar) -> Result<Option<Micros>> {
    if v.is_none() {
        return Ok(None);
    }
    if let Ok(t) = v.extract::<chrono::DateTime<chrono::Utc>>() {
        return Ok(Some(t.timestamp_micros()));
    }
    if let Ok(d) = v.extract::<chrono::NaiveDate>() {
        return Ok(Some(cal.start_of(d)));
    }
    config_err(format!("{field} must be a datetime or date, got {}", type_name(v)))
}

pub fn parse_ops(ops: &Bound<'_, PyList>, cal: &Calendar, now: Micros) -> Result<Ops> {
    let mut q = Query::default();
    for op in ops.iter() {
        let t = op.cast::<PyTuple>().map_err(|_| Error::Configuration("query operations must be tuples".into()))?;
        let name = string("query operation", &tuple_item(t, 0, "name")?)?;
        let field = || Field::parse(&string("field", &tuple_item(t, 1, &name)?)?);
        match name.as_str() {
            "eq" => {
                let f = field()?;
                q.filters.push(Filter::Eq(f, value(&f, &tuple_item(t, 2, &name)?)?));
            }
            "in" => {
                let f = field()?;
                let list = tuple_item(t, 2, &name)?;
                let vals = list.try_iter().map_err(|_| Error::Configuration(format!("{}: expected a list", f.0)))?;
                let vals = vals.map(|v| v.map_err(|e| Error::Configuration(e.to_string())).and_then(|v| value(&f, &v))).collect::<Result<_>>()?;
                q.filters.push(Filter::In(f, vals));
            }
            "null" => q.filters.push(Filter::IsNull(field()?)),
            "notnull" => q.filters.push(Filter::NotNull(field()?)),
            "between" => {
                let lo = micros("start", &tuple_item(t, 1, &name)?, cal)?;
                let hi = micros("end", &tuple_item(t, 2, &name)?, cal)?;
                q.filters.push(Filter::Range(Field::parse("started_at")?, lo, hi));
            }
            "before" => {
                let at = micros("started_at", &tuple_item(t, 1, &name)?, cal)?
                    .ok_or_else(|| Error::Configuration("before: started_at must be a datetime".into()))?;
                q.filters.push(Filter::Before(at, string("id", &tuple_item(t, 2, &name)?)?));
            }
            "period" => {
                let which = string("period", &tuple_item(t, 1, &name)?)?;
                let (lo, hi) = match which.as_str() {
                    "today" => cal.today(now),
                    "this_week" => cal.this_week(now),
                    "this_month" => cal.this_month(now),
                    "last_month" => cal.last_month(now),
                    "last_n_days" => {
                        let n = positive("last_n_days", &tuple_item(t, 2, &name)?)?;
                        if n > MAX_DAYS {
                            return config_err(format!("last_n_days must be at most {MAX_DAYS} (got {n})"));
                        }
                        cal.last_n_days(now, n as u32)
                    }
                    other => return config_err(format!("unknown period {other:?}")),
                };
                q.filters.push(Filter::Range(Field::parse("started_at")?, Some(lo), Some(hi)));
            }
            "order" => {
                let desc = tuple_item(t, 2, &name)?.is_truthy().unwrap_or(false);
                q.order.push((field()?, desc));
            }
            "limit" => q.limit = Some(positive("limit", &tuple_item(t, 1, &name)?)?),
            "offset" => q.offset = Some(super::convert::count("offset", &tuple_item(t, 1, &name)?)?),
            other => return config_err(format!("unknown query operation {other:?}")),
        }
    }
    Ok(Ops { query: q })
}
