//! Grouped aggregates computed in Rust, shared by both stores: rows (or partial totals from
//! rollups) stream in with their group's key parts and a value, and come out as one total
//! per group, sorted by key (no key part first), as both stores return them.

use std::collections::HashMap;

use crate::clock::{Calendar, Micros, Period};
use crate::error::{Error, Result};
use crate::execution::{Aggregate, Cell, GroupKey, Kind};
use crate::money::Nanos;

/// One group's key: a value (None for NULL) per `GroupKey`, in the order asked.
pub type GroupValues = Vec<Option<String>>;

/// Totals per group. Keys are packed into one byte string (a tag, a length and the bytes per
/// part) in a reused buffer and looked up by slice, so a row allocates only when its group
/// is new.
pub struct Groups {
    /// Per key: the total, and the calls counted in it (a group whose calls net to none, all
    /// of them in parts of rollups taken away again, is not in the answer).
    totals: HashMap<Vec<u8>, (i64, i64), foldhash::fast::RandomState>,
    key: Vec<u8>,
    kind: Kind,
}

impl Groups {
    pub fn new(agg: &Aggregate) -> Groups {
        let kind = match agg {
            Aggregate::Count => Kind::Int,
            Aggregate::Sum(f) => f.1,
        };
        Groups { totals: HashMap::default(), key: Vec::new(), kind }
    }

    /// Starts the next row's key.
    pub fn begin(&mut self) {
        self.key.clear();
    }

    /// Appends one key part (None: NULL).
    pub fn part(&mut self, v: Option<&[u8]>) {
        match v {
            None => self.key.push(0),
            Some(b) => {
                self.key.push(1);
                self.key.extend_from_slice(&(b.len() as u64).to_le_bytes());
                self.key.extend_from_slice(b);
            }
        }
    }

    /// Appends the day (in `cal`'s timezone) a call started at `at`.
    pub fn day(&mut self, cal: &Calendar, at: Micros) {
        self.part(Some(cal.period_key(Period::Daily, at).as_bytes()));
    }

    /// Adds `v`, one execution row's value, to the group of the key just built (a rollup row,
    /// which stands for several calls, goes through `add_calls`).
    pub fn add(&mut self, v: i64) {
        self.add_calls(v, 1);
    }

    /// Adds `v`, the total of `calls` calls (negative: a part of rollups taken away).
    pub fn add_calls(&mut self, v: i64, calls: i64) {
        match self.totals.get_mut(self.key.as_slice()) {
            Some((total, n)) => {
                *total = total.saturating_add(v);
                *n += calls;
            }
            None => {
                self.totals.insert(self.key.clone(), (v, calls));
            }
        }
    }

    /// The groups, sorted by key.
    pub fn finish(self) -> Result<Vec<(GroupValues, Cell)>> {
        let kind = self.kind;
        let mut out = Vec::with_capacity(self.totals.len());
        for (k, (v, calls)) in self.totals {
            if calls == 0 {
                continue;
            }
            let cell = if kind == Kind::Money { Cell::Money(Nanos(v)) } else { Cell::Int(v) };
            out.push((unpack(&k)?, cell));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

fn unpack(mut k: &[u8]) -> Result<GroupValues> {
    let mut out = Vec::new();
    while let Some((&tag, rest)) = k.split_first() {
        if tag == 0 {
            out.push(None);
            k = rest;
            continue;
        }
        let (len, rest) = rest.split_at(8);
        let len = u64::from_le_bytes(len.try_into().unwrap_or_default()) as usize;
        let (text, rest) = rest.split_at(len);
        out.push(Some(String::from_utf8(text.to_vec()).map_err(|e| Error::Store(format!("group key: {e}")))?));
        k = rest;
    }
    Ok(out)
}

/// The calls still running, looked up by id from their reservations, which every call in
/// flight has (SQLite's migration 18, PostgreSQL's 19), whatever the other filters are: no
/// index on `status` (SQLite's migration 18, PostgreSQL's 20 dropped the partial ones).
pub const RUNNING: &str = "status = 'running' AND id IN (SELECT execution_id FROM reservations)";

/// Which of the matching rows a scan reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    All,
    /// Calls still running (which rollups leave out).
    Running,
    /// Settled calls (the ones rollups hold), for the parts of days at a range's ends.
    Settled,
}

impl Rows {
    /// `w` (a WHERE clause or nothing) narrowed to these rows.
    pub fn narrow(self, w: String) -> String {
        let only = match self {
            Rows::All => return w,
            Rows::Running => RUNNING,
            Rows::Settled => "status <> 'running'",
        };
        format!("{w}{} {only}", if w.is_empty() { " WHERE" } else { " AND" })
    }
}

/// The columns a row-path grouped query selects before its value: the key fields, and
/// `started_at` when grouping by day (the day is computed here, in the database's timezone).
pub fn key_columns(by: &[GroupKey]) -> Vec<&'static str> {
    let mut cols: Vec<&'static str> = by
        .iter()
        .filter_map(|k| match k {
            GroupKey::Field(f) => Some(f.0),
            GroupKey::Day => None,
        })
        .collect();
    if by.contains(&GroupKey::Day) {
        cols.push("started_at");
    }
    cols
}

/// The value a row adds to its group's total.
pub fn row_value(agg: &Aggregate) -> String {
    match agg {
        Aggregate::Count => "CAST(1 AS BIGINT)".to_string(),
        Aggregate::Sum(f) => format!("COALESCE({}, 0)", f.0),
    }
}

/// Builds a row's key: `field(groups, i)` appends the i-th selected key field's value (see
/// `key_columns`); the day part comes from the row's `started_at`.
pub fn row_key<E>(
    groups: &mut Groups,
    by: &[GroupKey],
    cal: &Calendar,
    started_at: Micros,
    mut field: impl FnMut(&mut Groups, usize) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    groups.begin();
    let mut i = 0;
    for k in by {
        match k {
            GroupKey::Field(_) => {
                field(groups, i)?;
                i += 1;
            }
            GroupKey::Day => groups.day(cal, started_at),
        }
    }
    Ok(())
}

/// The zero of an aggregate, for a query that matched nothing.
pub fn zero(agg: &Aggregate) -> Cell {
    match agg {
        Aggregate::Sum(f) if f.1 == Kind::Money => Cell::Money(Nanos(0)),
        _ => Cell::Int(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::execution::Field;

    #[test]
    fn keys_round_trip_and_sort_with_null_first() {
        let mut g = Groups::new(&Aggregate::Sum(Field::parse("total_cost").unwrap()));
        for (a, b, v) in [(Some("t2"), Some("x"), 5), (None, Some("x"), 1), (Some("t2"), Some("x"), 2), (Some("t1"), None, 3), (Some(""), Some(""), 4)] {
            g.begin();
            g.part(a.map(str::as_bytes));
            g.part(b.map(str::as_bytes));
            g.add(v);
        }
        let s = |x: &str| Some(x.to_string());
        assert_eq!(
            g.finish().unwrap(),
            vec![
                (vec![None, s("x")], Cell::Money(Nanos(1))),
                (vec![s(""), s("")], Cell::Money(Nanos(4))),
                (vec![s("t1"), None], Cell::Money(Nanos(3))),
                (vec![s("t2"), s("x")], Cell::Money(Nanos(7))),
            ]
        );
    }
}
