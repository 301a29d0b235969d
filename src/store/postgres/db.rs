//! Statements and transactions: typed parameters sent with unnamed statements (or, where
//! the URL allows, prepared ones kept per connection), the `Db` and `Tx` handles the store's
//! operations run on, and `transact`.

use std::collections::HashMap;

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{ToSql, Type};
use postgres::{Client, Row as PgRow, RowIter, Statement};

use super::connect::PgResult;
use super::connect::{connection_lost, Conn, Failure};
use crate::error::Error;

/// A statement parameter and the type it is sent as. By default statements are unnamed, sent
/// with their parameter types and run in one round trip (`query_typed`), so nothing prepared
/// outlives its statement: PgBouncer in transaction pooling mode may run the next one on
/// another server connection, where a named statement would not exist or, named alike by
/// another client, be another statement (Debian 12's PgBouncer 1.18 cannot track them; 1.21's
/// max_prepared_statements can). On a direct connection the URL may allow prepared ones
/// (`Statements`).
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
       Vec<String> => TEXT_ARRAY, [String] => TEXT_ARRAY, Vec<&str> => TEXT_ARRAY, Vec<Option<&str>> => TEXT_ARRAY, Vec<i64> => INT8_ARRAY, Vec<i32> => INT4_ARRAY,
       Vec<bool> => BOOL_ARRAY);

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

/// The URL's `?statement_cache_size=N`: statements prepared on one connection, by their text,
/// so the server parses and plans each once per connection instead of at every run (the
/// `SELECT ... FROM tenantllm_admit($1 .. $29)` of every call, ~17 % of the server's work
/// per call). A statement is prepared by a round trip of its own the first time. More than N
/// and the connection starts again (the dropped statements are closed on the server). 0, the
/// default: none, every statement unnamed, as PgBouncer in transaction mode needs.
pub(super) struct Statements {
    size: usize,
    prepared: HashMap<String, Statement>,
}

impl Statements {
    pub(super) fn new(size: usize) -> Statements {
        Statements { size, prepared: HashMap::new() }
    }

    /// The statement prepared for `sql` with these parameters' types; None when nothing is
    /// prepared (the cache's size is 0).
    fn get(&mut self, c: &mut Client, sql: &str, params: &Params<'_>) -> PgResult<Option<Statement>> {
        if self.size == 0 {
            return Ok(None);
        }
        let same_types = |st: &&Statement| st.params().len() == params.len() && st.params().iter().zip(params).all(|(t, p)| *t == p.pg_type());
        if let Some(st) = self.prepared.get(sql).filter(same_types) {
            return Ok(Some(st.clone()));
        }
        let types: Vec<Type> = params.iter().map(|p| p.pg_type()).collect();
        round_trips::add(1);
        let st = c.prepare_typed(sql, &types)?;
        if self.prepared.len() >= self.size && !self.prepared.contains_key(sql) {
            self.prepared.clear();
        }
        self.prepared.insert(sql.to_string(), st.clone());
        Ok(Some(st))
    }
}

/// Round trips to the server on this thread (a sync call's database work runs on the calling
/// thread), counted in tests: a statement, a statement's preparation, BEGIN, COMMIT, ROLLBACK.
pub(super) mod round_trips {
    #[cfg(test)]
    thread_local! {
        static COUNT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    #[inline]
    pub(in super::super) fn add(n: u64) {
        #[cfg(test)]
        COUNT.with(|c| c.set(c.get() + n));
        #[cfg(not(test))]
        let _ = n;
    }

    /// The round trips since the last call.
    #[cfg(test)]
    pub(in super::super) fn taken() -> u64 {
        COUNT.with(|c| c.replace(0))
    }
}

/// Outside a transaction: each statement commits on its own.
pub(super) struct Autocommit;
/// Inside one (`transact`).
pub(super) struct InTransaction;

/// A connection, in a transaction (`Tx`) or not.
pub(super) struct Db<'a, Scope> {
    pub(super) c: &'a mut Client,
    pub(super) statements: &'a mut Statements,
    pub(super) scope: std::marker::PhantomData<Scope>,
}

impl<'a, S> Db<'a, S> {
    pub(super) fn new(c: &'a mut Client, statements: &'a mut Statements) -> Db<'a, S> {
        Db { c, statements, scope: std::marker::PhantomData }
    }
    /// `sql`'s rows, as the statement prepared for it or, with none, unnamed with its
    /// parameters' types: one round trip either way (after the first, which prepares).
    fn rows(&mut self, sql: &str, params: &Params<'_>) -> PgResult<RowIter<'_>> {
        let prepared = self.statements.get(self.c, sql, params)?;
        round_trips::add(1);
        Ok(match prepared {
            Some(st) => self.c.query_raw(&st, params.iter().map(|p| p.as_sql()))?,
            None => self.c.query_typed_raw(sql, params.iter().map(|p| (p.as_sql(), p.pg_type())))?,
        })
    }
    pub(super) fn query(&mut self, sql: &str, params: &Params<'_>) -> PgResult<Vec<PgRow>> {
        Ok(self.rows(sql, params)?.collect()?)
    }
    pub(super) fn query_opt(&mut self, sql: &str, params: &Params<'_>) -> PgResult<Option<PgRow>> {
        let mut rows = self.rows(sql, params)?;
        // Not polled again once it has ended (the stream would report the connection closed).
        let Some(first) = rows.next()? else { return Ok(None) };
        match rows.next()? {
            None => Ok(Some(first)),
            Some(_) => Err(Error::Store(format!("more than one row from: {sql}")).into()),
        }
    }
    pub(super) fn query_one(&mut self, sql: &str, params: &Params<'_>) -> PgResult<PgRow> {
        self.query_opt(sql, params)?.ok_or_else(|| Error::Store(format!("no row from: {sql}")).into())
    }
    pub(super) fn execute(&mut self, sql: &str, params: &Params<'_>) -> PgResult<u64> {
        let mut rows = self.rows(sql, params)?;
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
        round_trips::add(1);
        tx.client.batch_execute(begin)?;
        Ok(tx)
    }
    pub(super) fn commit(mut self) -> std::result::Result<(), postgres::Error> {
        self.open = false;
        round_trips::add(1);
        self.client.batch_execute("COMMIT")
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if self.open && !self.client.is_closed() {
            round_trips::add(1);
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
    let out = body(&mut Db::new(&mut *tx.client, &mut conn.statements)).map_err(TxFailure::Failed)?;
    match tx.commit() {
        Ok(()) => Ok(out),
        Err(e) if connection_lost(&e, conn.client.is_closed()) => Err(TxFailure::CommitLost(e, out)),
        // The server refused the commit: it rolled back.
        Err(e) => Err(TxFailure::Failed(e.into())),
    }
}
