//! Execution records (one per call) and the query language over them. Queries name fields
//! from a fixed list; the store turns them into SQL, so no user text reaches SQL as code.

use serde::Serialize;

use crate::clock::Micros;
use crate::error::{config_err, Result};
use crate::money::Nanos;
use crate::pricing::{Cost, Usage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Running,
    Success,
    Error,
    Timeout,
    Blocked,
    ShortCircuited,
    Cancelled,
    RateLimited,
}

impl Status {
    pub const ALL: [Status; 8] = [
        Status::Running,
        Status::Success,
        Status::Error,
        Status::Timeout,
        Status::Blocked,
        Status::ShortCircuited,
        Status::Cancelled,
        Status::RateLimited,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Success => "success",
            Status::Error => "error",
            Status::Timeout => "timeout",
            Status::Blocked => "blocked",
            Status::ShortCircuited => "short_circuited",
            Status::Cancelled => "cancelled",
            Status::RateLimited => "rate_limited",
        }
    }
    pub fn parse(s: &str) -> Result<Status> {
        match Status::ALL.iter().find(|x| x.as_str() == s) {
            Some(x) => Ok(*x),
            None => config_err(format!(
                "unknown status {s:?}; expected one of {}",
                Status::ALL.map(|x| x.as_str()).join(", ")
            )),
        }
    }
    /// Statuses of calls that were admitted and so count toward usage counters.
    pub fn counts_as_usage(self) -> bool {
        !matches!(self, Status::Blocked | Status::ShortCircuited | Status::RateLimited)
    }
}

/// One request to a provider, kept in the execution's `attempts` list.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Attempt {
    pub model: String,
    pub provider: String,
    pub status: &'static str,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    pub http_status: Option<u16>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_tokens: i64,
    pub cache_write_tokens: i64,
    pub cost_nanos: i64,
    /// The parts of `cost_nanos` spent on cache reads and cache writes.
    pub cache_read_cost_nanos: i64,
    pub cache_write_cost_nanos: i64,
    pub duration_ms: i64,
    /// When the request was sent (UTC micros; `duration_ms` later it ended), so tracing can
    /// place each attempt where it happened.
    pub started_at: Micros,
    /// The provider's own finish reason (the execution's `finish_reason` is normalised).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// The model's refusal message, when the provider sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// Parameters left out of the request because the model rejects them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dropped_params: Vec<&'static str>,
}

/// A new execution's id: a UUIDv7 whose millisecond is `started_at`'s and whose next 10 bits
/// (of rand_a) are the microsecond within it, random bits after. Ids then sort like start
/// times to the microsecond, and the SQLite store finds the admissions stamped in a time range
/// by a range of ids (store/sqlite.rs `LOG_RANGE`), which needs the id's millisecond to be
/// exactly the start's: an id minted by a later clock reading may be a millisecond or more
/// later.
pub fn new_id(started_at: Micros) -> String {
    use uuid::{Builder, NoContext, Timestamp, Uuid};
    let t = started_at.max(0) as u64;
    let (ms, us) = (t / 1000, (t % 1000) as u16);
    let mut b = match random_bytes() {
        Some(random) => *Builder::from_unix_timestamp_millis(ms, &random).as_uuid().as_bytes(),
        // The kernel refused random bytes: the uuid crate asks it again, as it always did.
        None => *Uuid::new_v7(Timestamp::from_unix(NoContext, ms / 1000, (ms % 1000) as u32 * 1_000_000)).as_bytes(),
    };
    b[6] = 0x70 | (us >> 8) as u8; // the version, then rand_a's top bits
    b[7] = us as u8;
    Uuid::from_bytes(b).to_string()
}

/// Random bytes for new ids, drawn from the kernel `POOL` bytes at a time: the uuid crate
/// asks for 16 at each id, a system call each, one a call. Per process (`PerProcess`): a
/// child made by `fork()` starts with a copy of its parent's bytes, and drawing from them
/// would give it ids its parent gives too; it draws its own instead.
struct RandomPool {
    bytes: [u8; POOL],
    used: usize,
}

/// 25 ids' worth (10 random bytes each); 256 bytes or fewer are never cut short by a signal.
const POOL: usize = 250;

static RANDOM: crate::process::PerProcess<std::sync::Mutex<RandomPool>> = crate::process::PerProcess::empty();

/// The next 10 random bytes of this process's pool; None if the kernel refuses to refill it.
fn random_bytes() -> Option<[u8; 10]> {
    let Ok(pool) = RANDOM.get_or_try_init(|| Ok::<_, std::convert::Infallible>(std::sync::Mutex::new(RandomPool { bytes: [0; POOL], used: POOL })));
    let mut pool = crate::process::unpoisoned(pool.lock());
    if pool.used == POOL {
        getrandom::fill(&mut pool.bytes).ok()?;
        pool.used = 0;
    }
    let at = pool.used;
    pool.used += 10;
    pool.bytes[at..at + 10].try_into().ok()
}

/// What is known when a call starts.
#[derive(Debug, Clone, Default)]
pub struct NewExecution {
    /// `new_id(started_at)` for a call that `Store::admit` admits.
    pub id: String,
    pub agent: String,
    pub model_id: String,
    pub provider: String,
    pub tenant_id: Option<String>,
    pub started_at: Micros,
    /// A JSON object.
    pub metadata: String,
    pub parent_execution_id: Option<String>,
    pub root_execution_id: Option<String>,
    /// Prompts, stored in the details table when prompt storage is on.
    pub system_prompt: Option<String>,
    pub user_prompt: Option<String>,
    /// A tool loop's calls before this round (a JSON list), stored with the prompts.
    pub tool_calls: Option<String>,
}

/// How a call ended.
#[derive(Debug, Clone)]
pub struct Completion {
    pub status: Status,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    pub chosen_model_id: Option<String>,
    pub provider: Option<String>,
    pub completed_at: Micros,
    pub duration_ms: i64,
    pub usage: Usage,
    pub cost: Cost,
    pub attempts: Vec<Attempt>,
    pub finish_reason: Option<String>,
    pub response: Option<String>,
    /// Streams only: from the call's start to its first piece of text.
    pub time_to_first_token_ms: Option<i64>,
    /// Answered from the response cache: no provider request, cost 0.
    pub cached: bool,
}

impl Completion {
    /// A call that ended before any provider request (blocked, short-circuited).
    pub fn refused(status: Status, error_class: &str, message: String, now: Micros) -> Completion {
        Completion {
            status,
            error_class: Some(error_class.into()),
            error_message: Some(message),
            chosen_model_id: None,
            provider: None,
            completed_at: now,
            duration_ms: 0,
            usage: Usage::default(),
            cost: Cost::default(),
            attempts: vec![],
            finish_reason: None,
            response: None,
            time_to_first_token_ms: None,
            cached: false,
        }
    }
}

/// Fields a query may name, with how each is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Int,
    /// Integer nano-USD, surfaced as Decimal USD.
    Money,
    /// Integer UTC micros, surfaced as datetime.
    Time,
    /// JSON text.
    Json,
}

/// (name, column kind, can filter/group/order/sum). Names are also the SQL column names.
pub const FIELDS: &[(&str, Kind)] = &[
    ("id", Kind::Text),
    ("agent", Kind::Text),
    ("model_id", Kind::Text),
    ("chosen_model_id", Kind::Text),
    ("provider", Kind::Text),
    ("tenant_id", Kind::Text),
    ("status", Kind::Text),
    ("error_class", Kind::Text),
    ("error_message", Kind::Text),
    ("started_at", Kind::Time),
    ("completed_at", Kind::Time),
    ("duration_ms", Kind::Int),
    ("input_tokens", Kind::Int),
    ("output_tokens", Kind::Int),
    ("cached_tokens", Kind::Int),
    ("total_tokens", Kind::Int),
    ("input_cost", Kind::Money),
    ("output_cost", Kind::Money),
    ("total_cost", Kind::Money),
    ("attempts_count", Kind::Int),
    ("attempts", Kind::Json),
    ("metadata", Kind::Json),
    ("finish_reason", Kind::Text),
    ("parent_execution_id", Kind::Text),
    ("root_execution_id", Kind::Text),
    ("cache_write_tokens", Kind::Int),
    ("cache_read_cost", Kind::Money),
    ("cache_write_cost", Kind::Money),
    ("time_to_first_token_ms", Kind::Int),
    // 1 for an answer from the response cache, else 0.
    ("cached", Kind::Int),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field(pub &'static str, pub Kind);

impl Field {
    pub fn parse(name: &str) -> Result<Field> {
        match FIELDS.iter().find(|(n, _)| *n == name) {
            Some((n, k)) => Ok(Field(n, *k)),
            None => config_err(format!(
                "unknown execution field {name:?}; expected one of {}",
                FIELDS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            )),
        }
    }
    pub fn numeric(name: &str) -> Result<Field> {
        let f = Field::parse(name)?;
        match f.1 {
            Kind::Int | Kind::Money => Ok(f),
            _ => config_err(format!("cannot sum {name:?}: it is not a numeric field")),
        }
    }
    pub fn groupable(name: &str) -> Result<Field> {
        let f = Field::parse(name)?;
        match f.1 {
            Kind::Text => Ok(f),
            _ => config_err(format!("cannot group by {name:?}: group by a text field such as tenant_id, agent, model_id or status, or by day")),
        }
    }
}

/// What a grouped query groups by: a text field, or the calendar day (in the database's
/// timezone) a call started on, as "2026-11-28".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKey {
    Field(Field),
    Day,
}

impl GroupKey {
    pub fn parse(name: &str) -> Result<GroupKey> {
        if name == "day" {
            return Ok(GroupKey::Day);
        }
        Field::groupable(name).map(GroupKey::Field)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Int(i64),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// field = value
    Eq(Field, Value),
    /// field IN (values)
    In(Field, Vec<Value>),
    IsNull(Field),
    NotNull(Field),
    /// lo <= field < hi (time or integer)
    Range(Field, Option<i64>, Option<i64>),
    /// Rows before this one (its started_at and id) in newest-first order, started_at then
    /// id: the bound of a keyset page, which reads no rows before it (OFFSET reads them all).
    Before(Micros, String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Aggregate {
    Count,
    Sum(Field),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Query {
    pub filters: Vec<Filter>,
    /// (field, descending)
    pub order: Vec<(Field, bool)>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

/// A value read back from the store, typed by the field's kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Text(String),
    Int(i64),
    Money(Nanos),
    Time(Micros),
    Json(String),
}

/// One execution row: (field name, value) in `FIELDS` order.
pub type Row = Vec<(&'static str, Cell)>;

#[derive(Debug, Clone, PartialEq)]
pub struct Details {
    pub system_prompt: Option<String>,
    pub user_prompt: Option<String>,
    pub response: Option<String>,
    pub tool_calls: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_a_forked_child_draws_its_own_random_bytes() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_id(1_700_000_000_000_000)).collect();
        assert_eq!(ids.len(), 1000, "ids of one microsecond repeated");
        random_bytes().unwrap(); // the parent's pool is drawn from: the child inherits a copy
        let mut pipe = [0; 2];
        // SAFETY: room for the two descriptors.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: the child draws bytes (a lock no other thread of the child holds, a
        // getrandom call), writes them and exits without unwinding.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork failed");
        if child == 0 {
            let drawn = random_bytes().unwrap_or_default();
            unsafe {
                libc::write(pipe[1], drawn.as_ptr().cast(), drawn.len());
                libc::_exit(0);
            }
        }
        let mut childs = [0u8; 10];
        // SAFETY: our pipe and a buffer of its length.
        assert_eq!(unsafe { libc::read(pipe[0], childs.as_mut_ptr().cast(), childs.len()) }, 10);
        unsafe { libc::waitpid(child, std::ptr::null_mut(), 0) };
        assert_ne!(random_bytes().unwrap(), childs, "the child drew its parent's next bytes");
    }

    #[test]
    fn fields_are_a_closed_set() {
        assert!(Field::parse("total_cost").is_ok());
        let e = Field::parse("total_cost; DROP TABLE executions").unwrap_err().to_string();
        assert!(e.contains("unknown execution field"));
        assert!(Field::numeric("agent").is_err());
        assert!(Field::groupable("total_cost").is_err());
        assert!(Status::parse("nope").unwrap_err().to_string().contains("short_circuited"));
    }

    #[test]
    fn ids_carry_the_start_to_the_microsecond_and_sort_like_it() {
        let t = 1_800_000_000_123_456;
        let id = new_id(t);
        let u = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(u.get_version_num(), 7);
        assert_eq!(u.get_timestamp().unwrap().to_unix(), (1_800_000_000, 123_000_000));
        assert_eq!(u16::from_be_bytes([u.as_bytes()[6], u.as_bytes()[7]]) & 0x0fff, 456);
        assert_ne!(new_id(t), id);
        let ids: Vec<String> = [t - 1000, t - 1, t, t + 1, t + 543].into_iter().map(new_id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    }
}
