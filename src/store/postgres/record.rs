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
        // Each field takes 8 bytes at least: a count the bytes cannot hold (a corrupt answer)
        // is refused below, not allocated for here.
        let mut fields = Vec::with_capacity(usize::try_from(n)?.min(buf.len() / 8));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_read_field_by_field_and_a_corrupt_one_refused() {
        // Two fields: int8 7, then a NULL text.
        let mut raw = 2i32.to_be_bytes().to_vec();
        raw.extend(Type::INT8.oid().to_be_bytes());
        raw.extend(8i32.to_be_bytes());
        raw.extend(7i64.to_be_bytes());
        raw.extend(Type::TEXT.oid().to_be_bytes());
        raw.extend((-1i32).to_be_bytes());
        let r = Record::from_sql(&Type::RECORD, &raw).unwrap();
        assert_eq!(r.get::<i64>(0).ok(), Some(7));
        assert_eq!(r.get::<Option<String>>(1).ok(), Some(None));
        assert!(r.get::<String>(0).is_err());
        assert!(r.get::<i64>(2).is_err());
        // A count of fields the bytes cannot hold, and a field cut short.
        let huge = [i32::MAX.to_be_bytes().as_slice(), &raw[4..]].concat();
        assert!(Record::from_sql(&Type::RECORD, &huge).is_err());
        assert!(Record::from_sql(&Type::RECORD, &raw[..raw.len() - 5]).is_err());
    }
}
