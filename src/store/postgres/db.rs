//! Statements and transactions: typed parameters sent with unnamed statements, the `Db`
//! and `Tx` handles the store's operations run on, and `transact`.

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{ToSql, Type};
use postgres::{Client, Row as PgRow};

use super::connect::PgResult;
use super::connect::{connection_lost, Conn, Failure};

/// A statement parameter and the type it is sent as. Statements are unnamed, sent with their
/// parameter types and run in one round trip (`query_typed`), so nothing prepared outlives its
/// statement: PgBouncer in transaction pooling mode may run the next one on another server
/// connection, where a named statement would not exist (Debian 12's PgBouncer 1.18 cannot
/// track them; 1.21's max_prepared_statements can).
pub(super) trait Param: ToSql + Sync {
    fn pg_type(&self) -> Type;
    fn as_sql(&self) -> &(dyn ToSql + Sync);
}

/// The PostgreSQL type a Rust value is sent as.
pub(super) trait Typed {
    const TYPE: Type;
}

impl<T: Typed + ToSql + Sync> Param for T {
    fn pg_type(&self) -> Type {
        T::TYPE
    }
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        self
    }
}

macro_rules! typed {
    ($($t:ty => $pg:ident),* $(,)?) => { $(impl Typed for $t { const TYPE: Type = Type::$pg; })* };
}
typed!(i64 => INT8, i32 => INT4, bool => BOOL, f64 => FLOAT8, String => TEXT, str => TEXT, Vec<u8> => BYTEA, [u8] => BYTEA,
       Vec<String> => TEXT_ARRAY, [String] => TEXT_ARRAY, Vec<&str> => TEXT_ARRAY, Vec<i64> => INT8_ARRAY, Vec<i32> => INT4_ARRAY);

impl<T: Typed> Typed for Option<T> {
    const TYPE: Type = T::TYPE;
}

impl<T: Typed + ?Sized> Typed for &T {
    const TYPE: Type = T::TYPE;
}

pub(super) type Params<'a> = [&'a dyn Param];

pub(super) fn typed<'a>(params: &'a Params<'_>) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params.iter().map(|p| (p.as_sql(), p.pg_type())).collect()
}

/// Outside a transaction: each statement commits on its own.
pub(super) struct Autocommit;
/// Inside one (`transact`).
pub(super) struct InTransaction;

/// A connection, in a transaction (`Tx`) or not.
pub(super) struct Db<'a, Scope> {
    pub(super) c: &'a mut Client,
    pub(super) scope: std::marker::PhantomData<Scope>,
}

impl<S> Db<'_, S> {
    pub(super) fn query(&mut self, sql: &str, params: &Params<'_>) -> PgResult<Vec<PgRow>> {
        Ok(self.c.query_typed(sql, &typed(params))?)
    }
    pub(super) fn query_opt(&mut self, sql: &str, params: &Params<'_>) -> PgResult<Option<PgRow>> {
        Ok(self.c.query_typed_opt(sql, &typed(params))?)
    }
    pub(super) fn query_one(&mut self, sql: &str, params: &Params<'_>) -> PgResult<PgRow> {
        Ok(self.c.query_typed_one(sql, &typed(params))?)
    }
    pub(super) fn execute(&mut self, sql: &str, params: &Params<'_>) -> PgResult<u64> {
        let mut rows = self.c.query_typed_raw(sql, typed(params))?;
        while rows.next()?.is_some() {}
        Ok(rows.rows_affected().unwrap_or(0))
    }
}

pub(super) type Tx<'a> = Db<'a, InTransaction>;

/// An open transaction: rolled back when dropped before `commit` (a failed body, a panic).
pub(super) struct Open<'a> {
    pub(super) client: &'a mut Client,
    pub(super) open: bool,
}

impl<'a> Open<'a> {
    pub(super) fn begin(client: &'a mut Client, begin: &str) -> std::result::Result<Open<'a>, postgres::Error> {
        let tx = Open { client, open: true };
        tx.client.batch_execute(begin)?;
        Ok(tx)
    }
    pub(super) fn commit(mut self) -> std::result::Result<(), postgres::Error> {
        self.open = false;
        self.client.batch_execute("COMMIT")
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if self.open && !self.client.is_closed() {
            let _ = self.client.batch_execute("ROLLBACK");
        }
    }
}

/// What to do when the connection is lost while a transaction commits, so that whether it
/// took effect is unknown.
pub(super) enum OnCommitLoss<'a, T> {
    /// Running it again gives the same result (it sets values rather than adding to them).
    Rerun,
    /// Ask the database whether the transaction (which produced `T`) took effect; if it did,
    /// its result stands, otherwise it runs again.
    Check(&'a (dyn Fn(&mut Tx<'_>, &T) -> PgResult<bool> + Sync)),
}

pub(super) enum TxFailure<T> {
    /// Nothing was committed.
    Failed(Failure),
    /// The connection broke during COMMIT: the transaction may or may not have committed.
    CommitLost(postgres::Error, T),
}

pub(super) fn transact<T>(conn: &mut Conn, body: &mut impl FnMut(&mut Tx<'_>) -> PgResult<T>) -> std::result::Result<T, TxFailure<T>> {
    let tx = Open::begin(&mut conn.client, &conn.begin).map_err(|e| TxFailure::Failed(e.into()))?;
    let out = body(&mut Db { c: &mut *tx.client, scope: std::marker::PhantomData }).map_err(TxFailure::Failed)?;
    match tx.commit() {
        Ok(()) => Ok(out),
        Err(e) if connection_lost(&e, conn.client.is_closed()) => Err(TxFailure::CommitLost(e, out)),
        // The server refused the commit: it rolled back.
        Err(e) => Err(TxFailure::Failed(e.into())),
    }
}
