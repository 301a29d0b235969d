//! A composite value read in the binary format: what `SELECT f(...)` returns for a function
//! with OUT parameters, one column the server plans and sends for less than the columns of
//! `SELECT ... FROM f(...)` (a function scan: 27k fewer server instructions a call for a
//! function of 33 arguments prepared, 61k unprepared; callgrind).

use std::error::Error as StdError;

use postgres::types::{FromSql, Type};

use super::connect::PgResult;
use crate::error::Error;

/// The fields of a record, in the order of the function's OUT parameters: each one's type and
/// value (None: NULL).
pub(super) struct Record<'a>(Vec<(Type, Option<&'a [u8]>)>);

type Failed = Box<dyn StdError + Sync + Send>;

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], Failed> {
    if buf.len() < n {
        return Err("a record shorter than its fields".into());
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn int(buf: &mut &[u8]) -> Result<i32, Failed> {
    Ok(i32::from_be_bytes(take(buf, 4)?.try_into()?))
}

impl<'a> FromSql<'a> for Record<'a> {
    /// record_send's format: the number of fields, then each field's type oid, its length (-1:
    /// NULL) and its value.
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Record<'a>, Failed> {
        let mut buf = raw;
        let n = int(&mut buf)?;
        let mut fields = Vec::with_capacity(usize::try_from(n)?);
        for _ in 0..n {
            let oid = int(&mut buf)? as u32;
            let ty = Type::from_oid(oid).ok_or_else(|| format!("a record field of unknown type {oid}"))?;
            let len = int(&mut buf)?;
            let value = if len < 0 { None } else { Some(take(&mut buf, usize::try_from(len)?)?) };
            fields.push((ty, value));
        }
        Ok(Record(fields))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::RECORD
    }
}

impl<'a> Record<'a> {
    /// Field `i` (from 0).
    pub(super) fn get<T: FromSql<'a>>(&self, i: usize) -> PgResult<T> {
        let field = |e: Failed| Error::Store(format!("record field {i}: {e}"));
        let (ty, value) = self.0.get(i).ok_or_else(|| field("missing".into()))?;
        if !T::accepts(ty) {
            return Err(field(format!("not a {}", std::any::type_name::<T>()).into()).into());
        }
        Ok(match value {
            Some(raw) => T::from_sql(ty, raw),
            None => T::from_sql_null(ty),
        }
        .map_err(field)?)
    }
}
