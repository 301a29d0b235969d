//! The `Engine` pyclass: one per `configure()`, holding the store and settings. Everything
//! that touches the database or the network runs with the GIL released.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::IntoPyObjectExt;
use pyo3::types::{PyDict, PyList, PyTuple};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::config::config_from_dict;
use super::convert::{budget_to_dict, cell_to_py, count, nanos_to_py, row_to_dict, string, string_map, tenant_budget, AnyInt};
use super::errors::{call_core, to_py, IntoPy};
use super::query::{parse_ops, Ops};
use super::runtime::{runtime, Tokio};
use crate::breaker;
use crate::budget::{self, tenant_scope};
use crate::clock::{now_micros, Period, MAX_DAYS};
use crate::config::Config;
use crate::engine::{AgentSpec, CallOutcome, CallRequest, Engine, Guard, MAX_TIMEOUT};
use crate::error::{catch_panic, catch_panic_async, Error, Result};
use crate::error::config_err;
use crate::execution::{Aggregate, Attempt, Cell, Field, GroupKey};
use crate::process::PerProcess;
use crate::providers::MAX_REPLY_TOKENS;
use crate::retry::{RetryPolicy, MAX_RETRIES};
use crate::store::{Alert, BreakerKey, BudgetWrite, TenantFilter, TenantListQuery, TenantListRow, TenantSort, MAX_TENANT_PAGE};
use crate::tenancy::{validate_tenant_id, validate_tenant_name, TenantContext};

/// An agent class's settings, built once per class by the Python layer.
#[pyclass(module = "tenantllm._core", name = "AgentSpec", frozen)]
pub struct PyAgentSpec {
    inner: Arc<AgentSpec>,
}

#[pymethods]
impl PyAgentSpec {
    #[new]
    #[pyo3(signature = (name, model, *, fallback_models=vec![], temperature=None, max_tokens=AnyInt::of(1024), timeout=30.0,
        retries=AnyInt::of(0), backoff="exponential".to_string(), base=0.4, max_delay=3.0, breaker=None, rate_limit_wait=0.0, downgrade=None,
        tools=None, schema=None, cache_ttl=0.0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        name: String,
        model: String,
        fallback_models: Vec<String>,
        temperature: Option<f64>,
        max_tokens: AnyInt,
        timeout: f64,
        retries: AnyInt,
        backoff: String,
        base: f64,
        max_delay: f64,
        breaker: Option<(AnyInt, f64, f64)>,
        rate_limit_wait: f64,
        downgrade: Option<(f64, String)>,
        tools: Option<String>,
        schema: Option<(String, String)>,
        cache_ttl: f64,
    ) -> PyResult<Self> {
        let build = || -> Result<AgentSpec> {
            // Checked before Duration::from_secs_f64, which panics past its range.
            if !(timeout > 0.0 && timeout <= MAX_TIMEOUT.as_secs_f64()) {
                return crate::error::config_err(format!(
                    "{name}.timeout must be more than 0 and at most {} seconds (got {timeout})",
                    MAX_TIMEOUT.as_secs()
                ));
            }
            // Checked before Duration::from_secs_f64 too.
            let max_wait = crate::engine::MAX_RATE_LIMIT_WAIT.as_secs_f64();
            if !(0.0..=max_wait).contains(&rate_limit_wait) {
                return crate::error::config_err(format!("{name}.rate_limit_wait must be from 0 to {max_wait} seconds (got {rate_limit_wait})"));
            }
            // Checked before Duration::from_secs_f64 too.
            let max_ttl = crate::cache::MAX_TTL.as_secs_f64();
            if !(0.0..=max_ttl).contains(&cache_ttl) {
                return crate::error::config_err(format!("{name}.cache_ttl must be from 0 to {max_ttl} seconds (got {cache_ttl})"));
            }
            let errors = |e: &AnyInt| e.within(&format!("{name}.circuit_breaker.errors"), 1, breaker::MAX_ERRORS as i64);
            let spec = AgentSpec {
                retries: RetryPolicy::new(retries.within(&format!("{name}.retries"), 0, MAX_RETRIES as i64)? as u32, &backoff, base, max_delay)?,
                breaker: breaker.map(|(e, w, c)| breaker::Policy::new(errors(&e)? as u32, w, c)).transpose()?,
                timeout: Duration::from_secs_f64(timeout),
                max_tokens: max_tokens.within(&format!("{name}.max_tokens"), 1, MAX_REPLY_TOKENS)? as u32,
                name: name.clone(),
                model,
                fallback_models,
                temperature,
                rate_limit_wait: Duration::from_secs_f64(rate_limit_wait),
                downgrade: downgrade.map(|(at, model)| crate::engine::Downgrade { at, model }),
                tools: tools.as_deref().map(crate::providers::parse_tools).transpose()?.unwrap_or_default(),
                schema: schema.map(|(n, s)| crate::providers::ResponseSchema::new(&n, &s)).transpose()?,
                cache_ttl: Duration::from_secs_f64(cache_ttl),
            };
            spec.validate()?;
            Ok(spec)
        };
        Ok(PyAgentSpec { inner: Arc::new(catch_panic(build).py_err(py)?) })
    }

    #[getter]
    fn name(&self) -> &str {
        &self.inner.name
    }

    #[getter]
    fn model(&self) -> &str {
        &self.inner.model
    }
}

/// Whether an `arun` call is over in the core, its row written. A cancelled `acall` is
/// recorded as the core drops it, on a runtime thread, just after Python sees the
/// cancellation: the Python layer waits for this so the row never reads `running` then.
#[pyclass(module = "tenantllm._core", name = "Settlement", frozen)]
pub struct PySettlement(Arc<AtomicBool>);

#[pymethods]
impl PySettlement {
    #[getter]
    fn done(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

struct SettleOnDrop(Arc<AtomicBool>);

impl Drop for SettleOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// What `Agent.call` returns.
#[pyclass(module = "tenantllm._core", name = "AgentResult", frozen, get_all)]
pub struct PyAgentResult {
    content: String,
    model_id: String,
    chosen_model_id: String,
    provider: String,
    input_tokens: i64,
    output_tokens: i64,
    cached_tokens: i64,
    total_tokens: i64,
    input_cost: Decimal,
    output_cost: Decimal,
    total_cost: Decimal,
    duration_ms: i64,
    attempts_count: usize,
    execution_id: String,
    tenant_id: Option<String>,
    /// stop, length, content_filter, refusal, tool_calls or None.
    finish_reason: Option<&'static str>,
    /// The provider's own finish reason ("end_turn", "MAX_TOKENS", ...).
    finish_reason_raw: Option<String>,
    refusal: Option<String>,
    cache_write_tokens: i64,
    cache_read_cost: Decimal,
    cache_write_cost: Decimal,
    budget_warnings: Vec<String>,
    /// Streams only: milliseconds from the call's start to its first piece of text.
    time_to_first_token_ms: Option<i64>,
    /// A tool loop's calls: dicts of name, arguments, result or error, duration_ms.
    tool_calls: Py<PyAny>,
    /// Structured output: the answer validated (a pydantic model instance or a dict).
    parsed: Py<PyAny>,
    /// Answered from the response cache (no provider request, cost 0).
    cached: bool,
    /// The calls the model asked for in this round: (id, name, arguments, signature).
    #[pyo3(name = "_tool_requests")]
    tool_requests: Vec<(String, String, String, Option<String>)>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    /// Each request sent, as stored in the execution's `attempts`.
    attempts: Attempts,
}

/// An execution's attempts, turned into a list of dicts only when Python asks for them.
#[derive(Clone)]
struct Attempts(Arc<Vec<Attempt>>);

impl<'py> IntoPyObject<'py> for Attempts {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;
    fn into_pyobject(self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let json = serde_json::to_string(&*self.0).map_err(|e| to_py(py, Error::Internal(e.to_string())))?;
        cell_to_py(py, Cell::Json(json)).map(|o| o.into_bound(py))
    }
}

#[pymethods]
impl PyAgentResult {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "AgentResult(model_id={}, chosen_model_id={}, tenant_id={}, total_tokens={}, total_cost={}, content={})",
            pyrepr(py, &self.model_id)?,
            pyrepr(py, &self.chosen_model_id)?,
            pyrepr(py, &self.tenant_id)?,
            self.total_tokens,
            pyrepr(py, self.total_cost)?,
            pyrepr(py, &self.content)?,
        ))
    }
    fn __str__(&self) -> &str {
        &self.content
    }

    /// The result as the Python layer completes it: this (last) round's answer with its
    /// `tool_calls` and `parsed` answer, and the tokens, costs and attempts of every round of
    /// a tool loop (`earlier` ones too) added up.
    fn _completed(&self, tool_calls: Py<PyAny>, parsed: Py<PyAny>, earlier: Vec<PyRef<'_, PyAgentResult>>, duration_ms: i64) -> PyAgentResult {
        let all = || earlier.iter().map(|r| &**r).chain(std::iter::once(self));
        let mut warnings: Vec<String> = vec![];
        for w in all().flat_map(|r| &r.budget_warnings) {
            if !warnings.contains(w) {
                warnings.push(w.clone());
            }
        }
        PyAgentResult {
            content: self.content.clone(),
            model_id: self.model_id.clone(),
            chosen_model_id: self.chosen_model_id.clone(),
            provider: self.provider.clone(),
            input_tokens: all().map(|r| r.input_tokens).sum(),
            output_tokens: all().map(|r| r.output_tokens).sum(),
            cached_tokens: all().map(|r| r.cached_tokens).sum(),
            total_tokens: all().map(|r| r.total_tokens).sum(),
            input_cost: all().map(|r| r.input_cost).sum(),
            output_cost: all().map(|r| r.output_cost).sum(),
            total_cost: all().map(|r| r.total_cost).sum(),
            duration_ms,
            attempts_count: all().map(|r| r.attempts_count).sum(),
            execution_id: self.execution_id.clone(),
            tenant_id: self.tenant_id.clone(),
            finish_reason: self.finish_reason,
            finish_reason_raw: self.finish_reason_raw.clone(),
            refusal: self.refusal.clone(),
            cache_write_tokens: all().map(|r| r.cache_write_tokens).sum(),
            cache_read_cost: all().map(|r| r.cache_read_cost).sum(),
            cache_write_cost: all().map(|r| r.cache_write_cost).sum(),
            budget_warnings: warnings,
            time_to_first_token_ms: self.time_to_first_token_ms,
            tool_calls,
            parsed,
            cached: self.cached,
            tool_requests: self.tool_requests.clone(),
            // From the first round's start to the last one's end, with every round's requests.
            started_at: all().next().and_then(|r| r.started_at),
            completed_at: self.completed_at,
            attempts: Attempts(Arc::new(all().flat_map(|r| r.attempts.0.iter().cloned()).collect())),
        }
    }
}

fn pyrepr<'py, T: IntoPyObject<'py>>(py: Python<'py>, v: T) -> PyResult<String> {
    let obj = v.into_bound_py_any(py)?;
    Ok(obj.repr()?.to_string())
}

impl From<CallOutcome> for PyAgentResult {
    fn from(o: CallOutcome) -> Self {
        let tool_requests = o.tool_calls.into_iter().map(|c| (c.id, c.name, c.arguments, c.signature)).collect();
        PyAgentResult {
            tool_calls: Python::attach(|py| PyList::empty(py).into_any().unbind()),
            parsed: Python::attach(|py| py.None()),
            tool_requests,
            content: o.content,
            model_id: o.model_id,
            chosen_model_id: o.chosen_model_id,
            provider: o.provider,
            input_tokens: o.usage.input,
            output_tokens: o.usage.output,
            cached_tokens: o.usage.cached,
            total_tokens: o.usage.input + o.usage.output,
            input_cost: o.cost.input.to_decimal(),
            output_cost: o.cost.output.to_decimal(),
            total_cost: o.cost.total().to_decimal(),
            duration_ms: o.duration_ms,
            attempts_count: o.attempts_count,
            execution_id: o.execution_id,
            tenant_id: o.tenant_id,
            finish_reason: o.finish_reason,
            finish_reason_raw: o.finish_reason_raw,
            refusal: o.refusal,
            cache_write_tokens: o.usage.cache_writes(),
            cache_read_cost: o.cost.cache_read.to_decimal(),
            cache_write_cost: o.cost.cache_write.to_decimal(),
            budget_warnings: o.budget_warnings,
            time_to_first_token_ms: o.time_to_first_token_ms,
            started_at: DateTime::from_timestamp_micros(o.started_at),
            completed_at: DateTime::from_timestamp_micros(o.completed_at),
            attempts: Attempts(Arc::new(o.attempts)),
            cached: o.cached,
        }
    }
}

/// A guarded block in flight (`tl.guard` / `tl.guarded`): finished once with `succeed` or
/// `fail`; garbage-collected unfinished, it is recorded as cancelled.
#[pyclass(module = "tenantllm._core", name = "Guard", frozen)]
pub struct PyGuard {
    inner: std::sync::Mutex<Option<Guard>>,
    execution_id: String,
    warnings: Vec<String>,
    /// The process that admitted it: its reservation and connections are that process's.
    pid: u32,
}

impl PyGuard {
    fn take(&self, py: Python<'_>) -> PyResult<Guard> {
        if self.pid != crate::process::pid() {
            return Err(to_py(py, Error::Configuration("this guarded block was started in another process (before a fork); finish it there".into())));
        }
        crate::process::unpoisoned(self.inner.lock()).take().ok_or_else(|| to_py(py, Error::Configuration("this guarded block is already finished".into())))
    }
}

impl Drop for PyGuard {
    fn drop(&mut self) {
        // In a forked child the block belongs to the parent: recording it as cancelled here
        // would write through the parent's connections. Leak it; the parent settles it.
        if self.pid != crate::process::pid() {
            std::mem::forget(crate::process::unpoisoned(self.inner.get_mut()).take());
        }
    }
}

#[pymethods]
impl PyGuard {
    #[getter]
    fn execution_id(&self) -> &str {
        &self.execution_id
    }

    #[getter]
    fn budget_warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    /// Usage out of range (negative, absurd: the core checks it as a provider's) is an
    /// `InvalidResponseError` and an error row; an int too large for i64 is out of range too.
    #[pyo3(signature = (input_tokens, output_tokens, cached_tokens=AnyInt::of(0), model=None,
        cache_write_tokens=AnyInt::of(0), cache_write_1h_tokens=AnyInt::of(0)))]
    #[allow(clippy::too_many_arguments)]
    fn succeed(
        &self,
        py: Python<'_>,
        input_tokens: AnyInt,
        output_tokens: AnyInt,
        cached_tokens: AnyInt,
        model: Option<String>,
        cache_write_tokens: AnyInt,
        cache_write_1h_tokens: AnyInt,
    ) -> PyResult<PyAgentResult> {
        let guard = self.take(py)?;
        let usage = crate::pricing::Usage {
            input: input_tokens.or_max(),
            output: output_tokens.or_max(),
            cached: cached_tokens.or_max(),
            cache_write: cache_write_tokens.or_max(),
            cache_write_1h: cache_write_1h_tokens.or_max(),
        };
        Ok(call_core(py, || guard.succeed(model.as_deref(), usage))?.into())
    }

    fn fail(&self, py: Python<'_>, error_class: String, message: String) -> PyResult<()> {
        let guard = self.take(py)?;
        call_core(py, || guard.fail(&error_class, &message))
    }

    /// The block was interrupted (KeyboardInterrupt, task cancelled): record it as cancelled.
    fn cancel(&self, py: Python<'_>) -> PyResult<()> {
        let guard = self.take(py)?;
        call_core(py, || {
            drop(guard);
            Ok(())
        })
    }
}

/// One `configure()`. The core engine (store, providers, lease renewer) is per process: a
/// forked child builds its own from the same settings on first use (`crate::process`).
#[pyclass(module = "tenantllm._core", name = "Engine", frozen)]
pub struct PyEngine {
    config: Config,
    inner: PerProcess<Arc<Engine>>,
}

/// How often a blocked sync call checks for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// The engine's call future, boxed where it is made. It is tens of kilobytes, and each move
/// by value copies all of it, whichever state it is in: moved into `catch_panic_async`'s
/// future, then into `block_interruptibly` and its box, it was the largest single cost of a
/// call in the core (memcpy, under callgrind). Boxed first, the moves after it move a pointer.
pub fn boxed<F: std::future::Future>(fut: F) -> std::pin::Pin<Box<F>> {
    Box::pin(fut)
}

/// Runs `fut` on the runtime with the GIL released, checking for Ctrl-C meanwhile: on a
/// signal `fut` is dropped and the signal's exception raised.
pub fn block_interruptibly<F: std::future::Future + Send>(py: Python<'_>, fut: F) -> PyResult<F::Output>
where
    F::Output: Send,
{
    let rt = runtime().py_err(py)?;
    // Boxed once here, so the moves below move a pointer (see `boxed`).
    let mut fut = Box::pin(fut);
    py.detach(move || {
        rt.tokio.block_on(async move {
            loop {
                tokio::select! {
                    biased;
                    r = &mut fut => return Ok(r),
                    _ = tokio::time::sleep(SIGNAL_POLL) => Python::attach(|py| py.check_signals())?,
                }
            }
        })
    })
}

/// One call's rendered prompts and resolved tenant, checked once when built (by the Python
/// layer), then handed to `Engine.run`, `arun`, `plan` or `begin_guard`.
#[pyclass(module = "tenantllm._core", name = "Call", frozen)]
pub struct PyCall {
    spec: Arc<AgentSpec>,
    // Shared, not copied, with each run of this call.
    req: Arc<CallRequest>,
}

#[pymethods]
impl PyCall {
    #[new]
    #[pyo3(signature = (spec, system, user, tenant_id=None, tenant_limits=None, api_keys=None, metadata="{}".to_string(),
        parent_execution_id=None, root_execution_id=None, history=None, rounds=None, tools_closed=false, tool_calls=None, tenant_name=None, validator=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        spec: &PyAgentSpec,
        system: Option<String>,
        user: String,
        tenant_id: Option<String>,
        tenant_limits: Option<&Bound<'_, PyDict>>,
        api_keys: Option<&Bound<'_, PyAny>>,
        metadata: String,
        parent_execution_id: Option<String>,
        root_execution_id: Option<String>,
        history: Option<&Bound<'_, PyAny>>,
        rounds: Option<String>,
        tools_closed: bool,
        tool_calls: Option<String>,
        tenant_name: Option<String>,
        validator: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let build = || -> Result<CallRequest> {
            if let Some(name) = &tenant_name {
                validate_tenant_name(name)?;
            }
            let limits = match (&tenant_id, tenant_limits) {
                (Some(t), Some(d)) => Some(tenant_budget(t, d)?),
                (None, Some(_)) => return Err(Error::InvalidTenant("tenant limits were given without a tenant id".into())),
                _ => None,
            };
            Ok(CallRequest {
                system,
                history: history.filter(|h| !h.is_none()).map(super::convert::history).transpose()?.unwrap_or_default(),
                user,
                tenant: TenantContext {
                    name: tenant_name.filter(|_| tenant_id.is_some()),
                    id: tenant_id,
                    limits,
                    api_keys: api_keys.map(|k| string_map("api_keys", k)).transpose()?.unwrap_or_default(),
                },
                metadata,
                root_execution_id,
                parent_execution_id,
                rounds: rounds.as_deref().map(crate::providers::parse_rounds).transpose()?.unwrap_or_default(),
                tools_closed,
                tool_calls,
                validator: validator.map(answer_validator),
            })
        };
        Ok(PyCall { spec: spec.inner.clone(), req: Arc::new(catch_panic(build).py_err(py)?) })
    }
}

/// A structured answer's check by the Python layer: `check(text)` returns None when the
/// answer follows the schema, else what is wrong (run on a runtime thread, with the GIL).
fn answer_validator(check: Py<PyAny>) -> crate::providers::Validator {
    crate::providers::Validator(Arc::new(move |text: &str| {
        Python::attach(|py| match check.call1(py, (text,)) {
            Ok(r) if r.is_none(py) => Ok(()),
            Ok(r) => Err(r.bind(py).str().map(|s| s.to_string()).unwrap_or_else(|_| "it does not follow the schema".into())),
            Err(e) => Err(e.to_string()),
        })
    }))
}

/// A breaker's key from `CircuitBreaker` arguments (None for the tenant: no tenant).
fn breaker_key(agent: &Bound<'_, PyAny>, model: &Bound<'_, PyAny>, tenant_id: Option<&Bound<'_, PyAny>>) -> Result<BreakerKey> {
    Ok(BreakerKey {
        agent: string("agent", agent)?,
        model: string("model", model)?,
        tenant_id: tenant_id.filter(|t| !t.is_none()).map(tenant_id_arg).transpose()?,
    })
}

fn breaker_state_dict<'py>(py: Python<'py>, key: &BreakerKey, s: &breaker::State) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("agent", &key.agent)?;
    d.set_item("model", &key.model)?;
    d.set_item("tenant_id", &key.tenant_id)?;
    d.set_item("state", s.phase.as_str())?;
    d.set_item("failures", s.failures.len())?;
    let retry_at = (s.phase != breaker::Phase::Closed).then(|| chrono::DateTime::<chrono::Utc>::from_timestamp_micros(s.retry_at)).flatten();
    d.set_item("retry_at", retry_at)?;
    Ok(d)
}

fn usage_dict<'py>(py: Python<'py>, u: &budget::Usage) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("cost", nanos_to_py(py, u.cost)?)?;
    d.set_item("tokens", u.tokens)?;
    d.set_item("executions", u.executions)?;
    Ok(d)
}

fn alert_dict<'py>(py: Python<'py>, a: &Alert) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    match a {
        Alert::Budget { check, threshold, current } => {
            d.set_item("kind", "budget_threshold")?;
            d.set_item("scope", &check.name)?;
            d.set_item("counter", &check.scope)?;
            d.set_item("period", &check.period_key)?;
            d.set_item("threshold", threshold)?;
            d.set_item("limit", super::convert::amount_to_py(py, check.limit)?)?;
            d.set_item("current", usage_dict(py, current)?)?;
            d.set_item("enforcement", check.enforcement.as_str())?;
        }
        Alert::BreakerOpened { key, retry_at } => {
            d.set_item("kind", "breaker_opened")?;
            d.set_item("agent", &key.agent)?;
            d.set_item("model", &key.model)?;
            d.set_item("tenant_id", &key.tenant_id)?;
            d.set_item("retry_at", chrono::DateTime::<chrono::Utc>::from_timestamp_micros(*retry_at))?;
        }
        Alert::BreakerClosed { key } => {
            d.set_item("kind", "breaker_closed")?;
            d.set_item("agent", &key.agent)?;
            d.set_item("model", &key.model)?;
            d.set_item("tenant_id", &key.tenant_id)?;
        }
    }
    Ok(d)
}

impl PyEngine {
    /// This process's engine: the one `configure()` built, or in a forked child a new one.
    fn engine(&self, py: Python<'_>) -> PyResult<&Arc<Engine>> {
        self.inner.get_or_try_init(|| call_core(py, || Engine::new(self.config.clone())).map(Arc::new))
    }

    /// Runs `f` on the core with the GIL released, converting its error.
    fn detached<T: Send>(&self, py: Python<'_>, f: impl FnOnce(&Engine) -> Result<T> + Send) -> PyResult<T> {
        let engine = self.engine(py)?;
        call_core(py, || f(engine))
    }

    /// A query's operations; calendar ranges (`today()`, ...) in the database's timezone.
    fn ops(&self, py: Python<'_>, ops: &Bound<'_, PyList>) -> PyResult<Ops> {
        let cal = self.detached(py, |e| e.current_calendar())?;
        parse_ops(ops, &cal, now_micros()).py_err(py)
    }
}

#[pymethods]
impl PyEngine {
    #[new]
    fn new(py: Python<'_>, config: &Bound<'_, PyDict>) -> PyResult<Self> {
        let config = catch_panic(|| config_from_dict(config)).py_err(py)?;
        let engine = call_core(py, || Engine::new(config.clone()))?;
        if engine.store().is_sqlite_file() {
            super::second_sqlite::warn_once(py)?;
        }
        Ok(PyEngine { config, inner: PerProcess::new(Arc::new(engine)) })
    }

    /// The database setting, with any password in a URL masked.
    #[getter]
    fn database(&self) -> String {
        self.config.database_display()
    }

    /// The database's timezone (read from it, so a change by another process shows).
    #[getter]
    fn timezone(&self, py: Python<'_>) -> PyResult<&'static str> {
        Ok(self.detached(py, |e| e.current_calendar())?.name())
    }

    /// Changes the database's timezone for every process and rebuilds the counters in it;
    /// returns how many counters were written.
    fn set_timezone(&self, py: Python<'_>, zone: &str) -> PyResult<usize> {
        self.detached(py, |e| e.set_timezone(zone))
    }

    #[getter]
    fn multi_tenancy_enabled(&self) -> bool {
        self.config.multi_tenancy_enabled
    }

    /// Runs one call to completion, blocking this thread (not the interpreter). Ctrl-C
    /// drops the call, which records it as cancelled, then KeyboardInterrupt propagates.
    fn run(&self, py: Python<'_>, call: &PyCall) -> PyResult<PyAgentResult> {
        let (engine, spec, req) = (self.engine(py)?.clone(), call.spec.clone(), call.req.clone());
        let outcome = block_interruptibly(py, catch_panic_async(boxed(engine.run(spec, req))))?;
        Ok(outcome.py_err(py)?.into())
    }

    /// The provider a model's requests go to, or None if no provider takes it.
    fn provider_of(&self, py: Python<'_>, model: &str) -> PyResult<Option<String>> {
        self.detached(py, |e| Ok(e.provider_of(model)))
    }

    /// Starts a streamed call; its pieces of text are read from the returned `Stream`.
    fn stream(&self, py: Python<'_>, call: &PyCall) -> PyResult<super::stream::PyStream> {
        let engine = self.engine(py)?.clone();
        super::stream::PyStream::start(py, engine, call.spec.clone(), call.req.clone())
    }

    /// The awaitable form of `run`, for `Agent.acall`, and its `Settlement`.
    fn arun<'py>(&self, py: Python<'py>, call: &PyCall) -> PyResult<(Bound<'py, PyAny>, PySettlement)> {
        let (engine, spec, req) = (self.engine(py)?.clone(), call.spec.clone(), call.req.clone());
        runtime().py_err(py)?;
        let settled = Arc::new(AtomicBool::new(false));
        let on_drop = SettleOnDrop(settled.clone());
        let awaitable = pyo3_async_runtimes::generic::future_into_py::<Tokio, _, _>(py, async move {
            // Declared first, so dropped last: after the call, whose drop records a cancellation.
            let _settled = on_drop;
            let call = catch_panic_async(boxed(engine.run(spec, req)));
            match call.await {
                Ok(o) => Ok(PyAgentResult::from(o)),
                Err(e) => Err(Python::attach(|py| to_py(py, e))),
            }
        })?;
        Ok((awaitable, PySettlement(settled)))
    }

    /// Admits a guarded block of user code (a `Call` with no prompts), reserving the
    /// spec's `max_tokens` plus `estimated_input_tokens`.
    #[pyo3(signature = (call, estimated_input_tokens=AnyInt::of(0)))]
    fn begin_guard(&self, py: Python<'_>, call: &PyCall, estimated_input_tokens: AnyInt) -> PyResult<PyGuard> {
        let estimated_input_tokens = estimated_input_tokens.within("input_tokens", 0, MAX_REPLY_TOKENS).py_err(py)?;
        let engine = self.engine(py)?.clone();
        let guard = call_core(py, || engine.begin_guard(&call.spec, &call.req, estimated_input_tokens))?;
        Ok(PyGuard {
            execution_id: guard.execution_id().to_string(),
            warnings: guard.warnings().to_vec(),
            inner: std::sync::Mutex::new(Some(guard)),
            pid: crate::process::pid(),
        })
    }

    /// What a call would send and reserve (`dry_run=True`).
    fn plan<'py>(&self, py: Python<'py>, call: &PyCall) -> PyResult<Bound<'py, PyDict>> {
        let (spec, req) = (&call.spec, &call.req);
        let (plan, cached) = self.detached(py, |e| Ok((e.plan(spec, req)?, e.cached_answer(spec, req)?.is_some())))?;
        let d = PyDict::new(py);
        let models = PyList::empty(py);
        for ((route, price), dropped) in plan.routes.iter().zip(&plan.prices).zip(&plan.dropped_params) {
            let m = PyDict::new(py);
            m.set_item("provider", &route.provider)?;
            m.set_item("model", &route.model)?;
            m.set_item("input_price", price.input)?;
            m.set_item("output_price", price.output)?;
            m.set_item("cached_input_price", price.cached_input)?;
            m.set_item("cache_write_price", price.cache_write)?;
            m.set_item("cache_write_1h_price", price.cache_write_1h)?;
            m.set_item("long_context", price.long_context.as_ref().map(|(above, p)| (*above, p.input, p.output)))?;
            m.set_item("dropped_params", dropped)?;
            models.append(m)?;
        }
        d.set_item("models", models)?;
        d.set_item("estimated_input_tokens", plan.estimated_input_tokens)?;
        d.set_item("estimated_tokens", plan.estimated_tokens)?;
        d.set_item("estimated_cost", nanos_to_py(py, plan.estimated_cost)?)?;
        d.set_item("cached", cached)?;
        Ok(d)
    }

    fn drain_alerts<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.engine(py)?.drain_alerts().iter().map(|a| alert_dict(py, a)).collect()
    }

    // ------------------------------------------------------------ executions

    fn query_rows<'py>(&self, py: Python<'py>, ops: &Bound<'py, PyList>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let ops = self.ops(py, ops)?;
        let rows = self.detached(py, |e| e.store().query_rows(&ops.query))?;
        rows.into_iter().map(|r| row_to_dict(py, r)).collect()
    }

    /// count() when `field` is None, else sum(field).
    #[pyo3(signature = (ops, field=None))]
    fn query_aggregate(&self, py: Python<'_>, ops: &Bound<'_, PyList>, field: Option<&Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
        let ops = self.ops(py, ops)?;
        let agg = aggregate(field).py_err(py)?;
        let cell = self.detached(py, |e| e.store().query_aggregate(&ops.query, &agg))?;
        cell_to_py(py, cell)
    }

    /// Totals per group: `by` is one key name (the dict's keys are its values) or a list of
    /// them (keys are tuples); the "day" key's values are dates.
    #[pyo3(signature = (ops, by, field=None))]
    fn query_grouped<'py>(&self, py: Python<'py>, ops: &Bound<'py, PyList>, by: &Bound<'py, PyAny>, field: Option<&Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyDict>> {
        let ops = self.ops(py, ops)?;
        let agg = aggregate(field).py_err(py)?;
        let single = !by.is_instance_of::<PyList>() && !by.is_instance_of::<PyTuple>();
        let keys = group_keys(by, single).py_err(py)?;
        let groups = self.detached(py, |e| e.store().query_grouped(&ops.query, &keys, &agg))?;
        let d = PyDict::new(py);
        for (values, v) in groups {
            let parts = keys
                .iter()
                .zip(values)
                .map(|(k, value)| match (k, value) {
                    (GroupKey::Day, Some(day)) => {
                        let date = chrono::NaiveDate::parse_from_str(&day, "%Y-%m-%d").map_err(|e| Error::Store(format!("day {day:?}: {e}"))).py_err(py)?;
                        Ok(date.into_pyobject(py)?.into_any())
                    }
                    (_, value) => Ok(value.into_pyobject(py)?.into_any()),
                })
                .collect::<PyResult<Vec<_>>>()?;
            let cell = cell_to_py(py, v)?;
            if single {
                d.set_item(&parts[0], cell)?;
            } else {
                d.set_item(PyTuple::new(py, parts)?, cell)?;
            }
        }
        Ok(d)
    }

    fn get_execution<'py>(&self, py: Python<'py>, id: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let id = string("execution id", id).py_err(py)?;
        let id = id.as_str();
        let found = self.detached(py, |e| e.store().execution(id))?;
        let Some((row, details)) = found else { return Ok(None) };
        let d = row_to_dict(py, row)?;
        if let Some(x) = details {
            d.set_item("system_prompt", x.system_prompt)?;
            d.set_item("user_prompt", x.user_prompt)?;
            d.set_item("response", x.response)?;
            d.set_item("tool_calls", x.tool_calls)?;
        }
        Ok(Some(d))
    }

    // ------------------------------------------------------------ budgets

    fn budget_get<'py>(&self, py: Python<'py>, tenant_id: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let tenant_id = tenant_id_arg(tenant_id).py_err(py)?;
        let tenant_id = tenant_id.as_str();
        let b = self.detached(py, |e| e.store().budget_get(tenant_id))?;
        b.map(|b| budget_to_dict(py, &b)).transpose()
    }

    /// Creates (`create_only`) a tenant's budget, or changes only the fields given; returns
    /// it as stored.
    fn budget_put<'py>(&self, py: Python<'py>, tenant_id: &Bound<'py, PyAny>, fields: &Bound<'py, PyDict>, create_only: bool) -> PyResult<Bound<'py, PyDict>> {
        let tenant_id = tenant_id_arg(tenant_id).py_err(py)?;
        let b = catch_panic(|| tenant_budget(&tenant_id, fields)).py_err(py)?;
        let named: Vec<String> = fields.keys().iter().map(|k| k.str().map(|s| s.to_string())).collect::<PyResult<_>>()?;
        let write = if create_only { BudgetWrite::Create } else { BudgetWrite::Update(&named) };
        let stored = self.detached(py, |e| e.store().budget_put(&b, write))?;
        budget_to_dict(py, &stored)
    }

    fn budget_delete(&self, py: Python<'_>, tenant_id: &Bound<'_, PyAny>) -> PyResult<bool> {
        let tenant_id = tenant_id_arg(tenant_id).py_err(py)?;
        let tenant_id = tenant_id.as_str();
        self.detached(py, |e| e.store().budget_delete(tenant_id))
    }

    fn budget_all<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let all = self.detached(py, |e| e.store().budget_all())?;
        all.iter().map(|b| budget_to_dict(py, b)).collect()
    }

    /// The tenant's recorded usage this day and month, and its use of its rate limits in
    /// the window ending now: {"daily": {...}, "monthly": {...}, "rate": {...}}.
    fn tenant_usage<'py>(&self, py: Python<'py>, tenant_id: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let tenant_id = tenant_id_arg(tenant_id).py_err(py)?;
        let tenant_id = tenant_id.as_str();
        let now = now_micros();
        let scope = tenant_scope(tenant_id);
        let (daily, monthly, rate) = self.detached(py, |e| {
            let cal = e.current_calendar()?;
            Ok((
                e.store().usage(&scope, &cal.period_key(Period::Daily, now))?,
                e.store().usage(&scope, &cal.period_key(Period::Monthly, now))?,
                e.rate_usage(tenant_id)?,
            ))
        })?;
        let d = PyDict::new(py);
        d.set_item("daily", usage_dict(py, &daily)?)?;
        d.set_item("monthly", usage_dict(py, &monthly)?)?;
        let r = PyDict::new(py);
        r.set_item("requests", rate.requests)?;
        r.set_item("tokens", rate.tokens)?;
        r.set_item("in_flight", rate.in_flight)?;
        d.set_item("rate", r)?;
        Ok(d)
    }

    /// The global limits (`budgets=`) a tenant inherits where its own are unset.
    fn global_limits<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let g = &self.config.budgets;
        let b = budget::TenantBudget { tenant_id: String::new(), name: None, limits: g.limits.clone(), enforcement: g.enforcement };
        budget_to_dict(py, &b)
    }

    /// Spend per tenant in the current "daily" or "monthly" period, from the counters.
    fn usage_by_tenant<'py>(&self, py: Python<'py>, period: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let period = string("period", period).py_err(py)?;
        let p = match period.as_str() {
            "daily" => Period::Daily,
            "monthly" => Period::Monthly,
            other => return Err(to_py(py, Error::Configuration(format!("period must be \"daily\" or \"monthly\", got {other:?}")))),
        };
        let rows = self.detached(py, |e| e.store().usage_by_scope("tenant:", &e.current_calendar()?.period_key(p, now_micros())))?;
        let d = PyDict::new(py);
        for (tenant, u) in rows {
            d.set_item(tenant, usage_dict(py, &u)?)?;
        }
        Ok(d)
    }

    /// Usage per day of a scope ("global", "tenant:<id>", "agent:<name>") over the last
    /// `days` days, from the counters: [(day, {"cost", "tokens", "executions"}), ...].
    fn usage_daily<'py>(&self, py: Python<'py>, scope: &Bound<'py, PyAny>, days: AnyInt) -> PyResult<Vec<(String, Bound<'py, PyDict>)>> {
        let scope = string("scope", scope).py_err(py)?;
        let days = days.within("days", 1, MAX_DAYS).py_err(py)? as u32;
        let now = now_micros();
        let rows = self.detached(py, |e| {
            let cal = e.current_calendar()?;
            let (first, _) = cal.last_n_days(now, days);
            e.store().usage_daily(&scope, &cal.period_key(Period::Daily, first))
        })?;
        rows.into_iter().map(|(d, u)| Ok((d, usage_dict(py, &u)?))).collect()
    }

    /// Applies a retention (`{"details_days": ..., "executions_days": ...}`, the configured
    /// one if None) now; with `dry_run`, counts what would go and changes nothing.
    #[pyo3(signature = (retention=None, dry_run=false))]
    fn purge<'py>(&self, py: Python<'py>, retention: Option<&Bound<'py, PyAny>>, dry_run: bool) -> PyResult<Bound<'py, PyDict>> {
        let r = retention.filter(|r| !r.is_none()).map(super::config::retention).transpose().py_err(py)?;
        let (done, (details_before, executions_before)) = self.detached(py, |e| e.purge(r, dry_run))?;
        let d = PyDict::new(py);
        d.set_item("details", done.details)?;
        d.set_item("executions", done.executions)?;
        d.set_item("details_before", details_before.and_then(DateTime::<Utc>::from_timestamp_micros))?;
        d.set_item("executions_before", executions_before.and_then(DateTime::<Utc>::from_timestamp_micros))?;
        d.set_item("dry_run", dry_run)?;
        Ok(d)
    }

    /// One page of the dashboard's list of tenants, sorted, searched and filtered: {"total":
    /// matches over all pages, "rows": [{"tenant_id", "name", "last_used_at" (aware datetime
    /// or None), "budget" (dict or None), "today", "month" (usage dicts), "errors_today",
    /// "blocked_today", "breakers_open", "share" (float or None), "projected_month" (Decimal),
    /// "runs_out" (date or None)}, ...]}.
    #[pyo3(signature = (*, sort="spend_today", descending=true, search=None, filters=Vec::new(), tenant_id=None, offset=0, limit=50))]
    #[allow(clippy::too_many_arguments)]
    fn tenant_list<'py>(
        &self,
        py: Python<'py>,
        sort: &str,
        descending: bool,
        search: Option<String>,
        filters: Vec<String>,
        tenant_id: Option<String>,
        offset: i64,
        limit: i64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let list = self.detached(py, |e| {
            let q = tenant_query(e, sort, descending, search.clone(), &filters, tenant_id.clone(), offset, limit)?;
            crate::store::tenant_list(e.store(), &q)
        })?;
        let rows = PyList::empty(py);
        for r in &list.rows {
            rows.append(tenant_row_dict(py, r)?)?;
        }
        let out = PyDict::new(py);
        out.set_item("total", list.total)?;
        out.set_item("rows", rows)?;
        Ok(out)
    }

    /// Every row of the list that the search and filters keep, in its order, read once: an
    /// iterator of lists of up to `chunk` rows (`tenant_list`'s dicts), for an export.
    #[pyo3(signature = (*, sort="spend_today", descending=true, search=None, filters=Vec::new(), tenant_id=None, chunk=1000))]
    #[allow(clippy::too_many_arguments)]
    fn tenant_rows(
        &self,
        py: Python<'_>,
        sort: &str,
        descending: bool,
        search: Option<String>,
        filters: Vec<String>,
        tenant_id: Option<String>,
        chunk: i64,
    ) -> PyResult<PyTenantRows> {
        if !(1..=MAX_TENANT_PAGE).contains(&chunk) {
            return Err(to_py(py, Error::Configuration(format!("chunk must be between 1 and {MAX_TENANT_PAGE} (got {chunk})"))));
        }
        let chunk = chunk as usize;
        let rows = self.detached(py, |e| {
            let q = tenant_query(e, sort, descending, search.clone(), &filters, tenant_id.clone(), 0, 1)?;
            crate::store::tenant_list_all(e.store(), &q)
        })?;
        Ok(PyTenantRows { rows: std::sync::Mutex::new(rows.into_iter()), chunk })
    }

    /// The `limit` (1 to 10,000) tenants that spent most in one period of the counters, most
    /// first: [(tenant_id, usage dict)]. `period`: "today", "month" (this month) or
    /// "last_month": each one range of the counters. Rolling windows of days and all time are
    /// refused: they sum a counter per tenant and period (seconds at 50,000 tenants).
    fn top_tenants<'py>(&self, py: Python<'py>, period: &Bound<'py, PyAny>, limit: AnyInt) -> PyResult<Vec<(String, Bound<'py, PyDict>)>> {
        let period = string("period", period).py_err(py)?;
        let limit = limit.within("limit", 1, MAX_TENANT_PAGE).py_err(py)?;
        if !["today", "month", "last_month"].contains(&period.as_str()) {
            return Err(to_py(py, Error::Configuration(format!("period must be \"today\", \"month\" or \"last_month\", got {period:?}"))));
        }
        let now = now_micros();
        let rows = self.detached(py, |e| {
            let cal = e.current_calendar()?;
            let key = match period.as_str() {
                "today" => cal.period_key(Period::Daily, now),
                "month" => cal.period_key(Period::Monthly, now),
                _ => cal.period_key(Period::Monthly, cal.last_month(now).0),
            };
            e.store().top_tenants(&key, limit)
        })?;
        rows.into_iter().map(|(t, u)| Ok((t, usage_dict(py, &u)?))).collect()
    }

    fn rebuild_counters(&self, py: Python<'_>) -> PyResult<usize> {
        self.detached(py, |e| e.rebuild_counters())
    }

    // ------------------------------------------------------------ API keys

    /// Stores encrypted provider keys (None removes one) for a tenant, or globally.
    #[pyo3(signature = (keys, tenant_id=None))]
    fn set_api_keys(&self, py: Python<'_>, keys: Vec<(String, Bound<'_, PyAny>)>, tenant_id: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let parse = || -> Result<_> {
            let tenant_id = match tenant_id {
                Some(t) => Some(string("tenant_id", t).map_err(|e| Error::InvalidTenant(e.to_string()))?),
                None => None,
            };
            let keys = keys
                .iter()
                .map(|(p, k)| Ok((p.clone(), if k.is_none() { None } else { Some(string(&format!("API key for {p:?}"), k)?) })))
                .collect::<Result<Vec<_>>>()?;
            Ok((tenant_id, keys))
        };
        let (tenant_id, keys) = parse().py_err(py)?;
        self.detached(py, |e| e.set_api_keys(tenant_id.as_deref(), &keys))
    }

    #[pyo3(signature = (tenant_id=None))]
    fn stored_key_providers(&self, py: Python<'_>, tenant_id: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
        let tenant_id = tenant_id.map(tenant_id_arg).transpose().py_err(py)?;
        self.detached(py, |e| e.stored_key_providers(tenant_id.as_deref()))
    }

    // ------------------------------------------------------------ breakers

    #[pyo3(signature = (agent, model, tenant_id=None))]
    fn breaker_status<'py>(&self, py: Python<'py>, agent: &Bound<'py, PyAny>, model: &Bound<'py, PyAny>, tenant_id: Option<&Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyDict>> {
        let key = breaker_key(agent, model, tenant_id).py_err(py)?;
        let s = self.detached(py, |e| e.store().breaker_status(&key))?;
        breaker_state_dict(py, &key, &s)
    }

    #[pyo3(signature = (agent, model, tenant_id=None))]
    fn breaker_reset(&self, py: Python<'_>, agent: &Bound<'_, PyAny>, model: &Bound<'_, PyAny>, tenant_id: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let key = breaker_key(agent, model, tenant_id).py_err(py)?;
        self.detached(py, |e| e.store().breaker_reset(&key))
    }

    /// The register of tenants seen: [{"id", "name", "first_used_at", "last_used_at"}], by id.
    fn tenants<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let all = self.detached(py, |e| e.store().tenants())?;
        all.iter()
            .map(|t| {
                let d = PyDict::new(py);
                d.set_item("id", &t.id)?;
                d.set_item("name", &t.name)?;
                d.set_item("first_used_at", chrono::DateTime::<chrono::Utc>::from_timestamp_micros(t.first_used_at))?;
                d.set_item("last_used_at", chrono::DateTime::<chrono::Utc>::from_timestamp_micros(t.last_used_at))?;
                Ok(d)
            })
            .collect()
    }

    fn breakers_not_closed<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let all = self.detached(py, |e| e.store().breakers_not_closed())?;
        all.iter().map(|b| breaker_state_dict(py, &b.key, &b.state)).collect()
    }

    fn __repr__(&self) -> String {
        format!("Engine(database={:?}, timezone={:?})", self.config.database_display(), self.config.timezone)
    }
}

/// A tenant id argument: a valid id (a NUL byte would even be a PostgreSQL error), else
/// `InvalidTenantError`.
fn tenant_id_arg(v: &Bound<'_, PyAny>) -> Result<String> {
    let id = string("tenant_id", v).map_err(|_| Error::InvalidTenant("tenant_id must be a non-empty string".into()))?;
    validate_tenant_id(&id)?;
    Ok(id)
}

/// Group keys from one name (`single`) or a list or tuple of one or more names.
fn group_keys(by: &Bound<'_, PyAny>, single: bool) -> Result<Vec<GroupKey>> {
    if single {
        return Ok(vec![GroupKey::parse(&string("group_by field", by)?)?]);
    }
    let names = by.try_iter().map_err(|_| Error::Configuration("group_by fields: expected a list of names".into()))?;
    let mut keys = Vec::new();
    for name in names {
        let name = name.map_err(|e| Error::Configuration(format!("group_by fields: {e}")))?;
        let key = GroupKey::parse(&string("group_by field", &name)?)?;
        if keys.contains(&key) {
            return config_err(format!("group_by field {name} named twice"));
        }
        keys.push(key);
    }
    if keys.is_empty() || keys.len() > MAX_GROUP_KEYS {
        return config_err(format!("group_by takes 1 to {MAX_GROUP_KEYS} fields, got {}", keys.len()));
    }
    Ok(keys)
}

/// The most fields one `group_by` may name (every groupable field and the day).
const MAX_GROUP_KEYS: usize = 16;

fn aggregate(field: Option<&Bound<'_, PyAny>>) -> Result<Aggregate> {
    Ok(match field {
        None => Aggregate::Count,
        Some(f) => Aggregate::Sum(Field::numeric(&string("sum field", f)?)?),
    })
}

/// Validates a positive count argument (`limit(n)`, `last_n_days(n)`).
pub fn positive(field: &str, v: &Bound<'_, PyAny>) -> Result<i64> {
    match count(field, v)? {
        0 => crate::error::config_err(format!("{field} must be at least 1")),
        n => Ok(n),
    }
}

pub fn tuple_item<'py>(t: &Bound<'py, PyTuple>, i: usize, what: &str) -> Result<Bound<'py, PyAny>> {
    t.get_item(i).map_err(|_| Error::Configuration(format!("query operation {what}: missing argument {i}")))
}

/// The tenants list's query for the arguments of `tenant_list` and `tenant_rows`, in the
/// database calendar's current periods.
#[allow(clippy::too_many_arguments)]
fn tenant_query(
    e: &Engine,
    sort: &str,
    descending: bool,
    search: Option<String>,
    filters: &[String],
    tenant_id: Option<String>,
    offset: i64,
    limit: i64,
) -> Result<TenantListQuery> {
    let now = now_micros();
    let cal = e.current_calendar()?;
    Ok(TenantListQuery {
        tenant_id,
        search,
        filters: filters.iter().map(|f| TenantFilter::parse(f)).collect::<Result<Vec<_>>>()?,
        sort: TenantSort::parse(sort)?,
        descending,
        offset,
        limit,
        global: e.config().budgets.limits.clone(),
        today: cal.local_date(now),
        day: cal.period_key(Period::Daily, now),
        month: cal.period_key(Period::Monthly, now),
    })
}

/// A row of the tenants list as `tenant_list` describes it.
fn tenant_row_dict<'py>(py: Python<'py>, r: &TenantListRow) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("tenant_id", &r.tenant_id)?;
    d.set_item("name", &r.name)?;
    d.set_item("last_used_at", r.last_used_at.and_then(chrono::DateTime::<chrono::Utc>::from_timestamp_micros))?;
    d.set_item("budget", r.budget.as_ref().map(|b| budget_to_dict(py, b)).transpose()?)?;
    d.set_item("projected_month", nanos_to_py(py, r.projection.month_end)?)?;
    d.set_item("runs_out", r.projection.runs_out)?;
    d.set_item("today", usage_dict(py, &r.today)?)?;
    d.set_item("month", usage_dict(py, &r.month)?)?;
    d.set_item("errors_today", r.errors_today)?;
    d.set_item("blocked_today", r.blocked_today)?;
    d.set_item("breakers_open", r.breakers_open)?;
    d.set_item("share", r.share)?;
    Ok(d)
}

/// The rows of the tenants list, handed out `chunk` at a time (`Engine.tenant_rows`): an
/// export never holds every row as Python objects at once.
#[pyclass(module = "tenantllm._core", name = "TenantRows", frozen)]
pub struct PyTenantRows {
    rows: std::sync::Mutex<std::vec::IntoIter<TenantListRow>>,
    chunk: usize,
}

#[pymethods]
impl PyTenantRows {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyList>>> {
        let chunk: Vec<TenantListRow> = crate::process::unpoisoned(self.rows.lock()).by_ref().take(self.chunk).collect();
        if chunk.is_empty() {
            return Ok(None);
        }
        let out = PyList::empty(py);
        for r in &chunk {
            out.append(tenant_row_dict(py, r)?)?;
        }
        Ok(Some(out))
    }
}
