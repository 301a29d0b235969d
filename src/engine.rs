//! The call flow: admit (budgets, breakers) -> provider attempts (retries, fallbacks) ->
//! settle (execution row, counters, breaker outcomes), as DESIGN §2 describes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::breaker;
use crate::budget::{self, Check};
use crate::cache;
use crate::clock::{now_micros, Calendar, Micros, DEFAULT_TIMEZONE};
use crate::config::Config;
use crate::error::{config_err, BudgetBlock, CircuitBlock, Error, ProviderErrorKind, ProviderFailure, RateBlock, Result};
use crate::execution::{Attempt, Completion, NewExecution, Status};
use crate::lease::Leases;
use crate::money::Nanos;
use crate::pricing::{Cost, Price, PriceTable, Usage};
use crate::process::unpoisoned;
use crate::providers::{self, ProviderStream, Providers, Reply, Request, Route, Target, MAX_REPLY_TOKENS};
use crate::retention::{Cutoffs, Retention};
use crate::retry::{RetryPolicy, MAX_RETRY_AFTER_S};
use crate::secrets::{Sealer, SECRET_ENV};
use crate::store::{self, AdmitRequest, Admitted, Alert, BreakerKey, BreakerOutcome, FinishRequest, Store};
use crate::tenancy::{SeenCache, TenantContext};

/// An agent class's settings, validated once per class.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub name: String,
    pub model: String,
    pub fallback_models: Vec<String>,
    pub temperature: Option<f64>,
    pub max_tokens: u32,
    pub timeout: Duration,
    pub retries: RetryPolicy,
    pub breaker: Option<breaker::Policy>,
    /// How long a call refused by a rate limit waits for a slot before it raises.
    pub rate_limit_wait: Duration,
    /// A cheaper model past a share of the tenant's cost limits (`tl.Downgrade`).
    pub downgrade: Option<Downgrade>,
    /// Functions the model may call (checked by `providers::parse_tools`).
    pub tools: Vec<providers::ToolSpec>,
    /// The schema answers must follow (structured output).
    pub schema: Option<providers::ResponseSchema>,
    /// How long an answer is kept in the response cache (zero: not cached), at most
    /// `cache::MAX_TTL`.
    pub cache_ttl: Duration,
}

/// `budget_fallback = tl.Downgrade(at=0.8, model=...)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Downgrade {
    /// Share of a cost limit (more than 0, at most 1) from which calls use `model`.
    pub at: f64,
    pub model: String,
}

/// The longest `rate_limit_wait`: ten minutes (a caller holding a web request longer is
/// better told to come back).
pub const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(600);

impl AgentSpec {
    pub fn validate(&self) -> Result<()> {
        crate::tenancy::validate_agent_name(&self.name)?;
        if self.model.trim().is_empty() {
            return config_err(format!("{}.model must be set", self.name));
        }
        if let Some(t) = self.temperature {
            if !t.is_finite() || !(0.0..=2.0).contains(&t) {
                return config_err(format!("{}.temperature must be between 0 and 2 (got {t})", self.name));
            }
        }
        if !(1..=MAX_REPLY_TOKENS).contains(&(self.max_tokens as i64)) {
            return config_err(format!("{}.max_tokens must be between 1 and {MAX_REPLY_TOKENS}", self.name));
        }
        if self.timeout.is_zero() || self.timeout > MAX_TIMEOUT {
            return config_err(format!("{}.timeout must be more than 0 and at most {} seconds", self.name, MAX_TIMEOUT.as_secs()));
        }
        if self.rate_limit_wait > MAX_RATE_LIMIT_WAIT {
            return config_err(format!("{}.rate_limit_wait must be from 0 to {} seconds", self.name, MAX_RATE_LIMIT_WAIT.as_secs()));
        }
        if self.cache_ttl > cache::MAX_TTL {
            return config_err(format!("{}.cache_ttl must be from 0 to {} seconds", self.name, cache::MAX_TTL.as_secs()));
        }
        if let Some(d) = &self.downgrade {
            if !(d.at > 0.0 && d.at <= 1.0) {
                return config_err(format!("{}.budget_fallback.at must be more than 0 and at most 1 (got {})", self.name, d.at));
            }
            if d.model.trim().is_empty() {
                return config_err(format!("{}.budget_fallback.model must be a model name", self.name));
            }
        }
        Ok(())
    }

    fn chain(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.model).chain(self.fallback_models.iter())
    }
}

/// How often a call waiting for a `max_concurrent` slot looks again.
const CONCURRENCY_POLL: Duration = Duration::from_millis(20);

/// The longest per-attempt timeout an agent may set: one day.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

/// One call's rendered prompts and context.
#[derive(Debug, Clone, Default)]
pub struct CallRequest {
    pub system: Option<String>,
    /// Prior turns (`history=`), checked when the call was built.
    pub history: Vec<providers::Turn>,
    pub user: String,
    pub tenant: TenantContext,
    /// A JSON object.
    pub metadata: String,
    pub parent_execution_id: Option<String>,
    pub root_execution_id: Option<String>,
    /// A tool loop's earlier rounds, and whether this is its last.
    pub rounds: Vec<providers::ToolRound>,
    pub tools_closed: bool,
    /// The tool loop's calls so far (a JSON list), kept in the execution's details.
    pub tool_calls: Option<String>,
    /// Checks a structured answer beyond its JSON syntax (the Python layer's schema).
    pub validator: Option<providers::Validator>,
}

#[derive(Debug, Clone)]
pub struct CallOutcome {
    pub execution_id: String,
    pub tenant_id: Option<String>,
    pub content: String,
    pub model_id: String,
    pub chosen_model_id: String,
    pub provider: String,
    pub usage: Usage,
    pub cost: Cost,
    pub duration_ms: i64,
    pub attempts_count: usize,
    /// Normalised (one of `providers::FINISH_REASONS`), with the provider's own word beside it.
    pub finish_reason: Option<&'static str>,
    pub finish_reason_raw: Option<String>,
    pub refusal: Option<String>,
    pub budget_warnings: Vec<String>,
    pub time_to_first_token_ms: Option<i64>,
    /// The tools the model asked to call.
    pub tool_calls: Vec<providers::ToolCall>,
    /// When the call started and was settled (UTC micros), and each request it sent.
    pub started_at: Micros,
    pub completed_at: Micros,
    pub attempts: Vec<Attempt>,
    /// Answered from the response cache.
    pub cached: bool,
}

/// What a call would do, without doing it (`dry_run=True`).
#[derive(Debug, Clone)]
pub struct CallPlan {
    pub routes: Vec<Route>,
    pub prices: Vec<Price>,
    /// Per route: the parameters left out because its model rejects them.
    pub dropped_params: Vec<Vec<&'static str>>,
    pub estimated_input_tokens: i64,
    pub estimated_cost: Nanos,
    pub estimated_tokens: i64,
}

pub struct Engine {
    config: Config,
    /// Encrypts and decrypts stored API keys; `None` without TENANTLLM_SECRET_KEY.
    sealer: Option<Sealer>,
    store: Arc<dyn Store>,
    /// This engine's in-flight reservations, renewed while they run.
    leases: Leases,
    prices: PriceTable,
    /// The database's timezone as last read; writes check it (`keyed`), reads refresh it
    /// (`current_calendar`), so another process's `set_timezone` is followed.
    calendar: RwLock<Calendar>,
    providers: Providers,
    alerts: Mutex<Vec<Alert>>,
    rate_window: Duration,
    /// Per tenant, the calls of this process waiting for a rate-limit slot, in arrival
    /// order (tokio's mutex is fair).
    rate_queues: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Tenants this process wrote to the register lately (admissions write it only then).
    seen: SeenCache,
    /// Dropping it (with the engine) stops the background retention thread, if configured.
    _retention: Option<std::sync::mpsc::Sender<()>>,
}

impl Engine {
    pub fn new(config: Config) -> Result<Engine> {
        let named = config.timezone.as_deref().map(Calendar::new).transpose()?;
        let mut prices = PriceTable::built_in();
        for p in &config.pricing {
            prices.set(p)?;
        }
        config.budgets.limits.validate()?;
        crate::ratelimit::validate(&config.budgets.limits, false)?;
        providers::check_key_names(config.api_keys.keys(), &config.base_urls)?;
        let sealer = Sealer::from_env()?;
        let leases = Leases::from_env()?;
        let rate_window = crate::ratelimit::window_from_env()?;
        let retention_every = crate::retention::interval_from_env()?;
        // A new database takes this process's zone; an existing one keeps its own.
        let store: Arc<dyn Store> = store::open(&config.database, named.map_or(DEFAULT_TIMEZONE, |c| c.name()))?.into();
        let calendar = Calendar::new(&store.timezone()?)?;
        if let Some(named) = named.filter(|n| n.name() != calendar.name()) {
            return config_err(format!(
                "timezone: this process is configured with {:?} but the database {} keeps its budget days in {:?}; \
                 leave timezone unset to use the database's, or change it for every process with \
                 `tenantllm timezone set {}` (tl.set_timezone), which rebuilds the counters",
                named.name(),
                config.database_display(),
                calendar.name(),
                named.name()
            ));
        }
        let retention = config.retention;
        let _retention = retention.is_set().then(|| crate::retention::start(store.clone(), retention, retention_every)).flatten();
        Ok(Engine {
            _retention,
            sealer,
            providers: Providers::new(config.mock),
            config,
            store,
            leases,
            prices,
            calendar: RwLock::new(calendar),
            alerts: Mutex::new(vec![]),
            rate_window,
            rate_queues: Mutex::default(),
            seen: SeenCache::default(),
        })
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// Applies `retention` (the configured one if `None`) now, in batches; with `dry_run`,
    /// only counts what would go. Returns the counts and the cutoffs (details, executions).
    pub fn purge(&self, retention: Option<Retention>, dry_run: bool) -> Result<(store::Purged, Cutoffs)> {
        let r = retention.unwrap_or(self.config.retention);
        if !r.is_set() {
            return config_err("purge: no retention given or configured; name details_days and/or executions_days");
        }
        let cutoffs = r.cutoffs(now_micros(), &self.current_calendar()?);
        let done = if dry_run {
            self.store.purge_preview(cutoffs.0, cutoffs.1)?
        } else {
            crate::retention::purge(self.store.as_ref(), cutoffs, Duration::ZERO, || true)?
        };
        Ok((done, cutoffs))
    }
    /// The database's calendar as last seen (no database read).
    pub fn calendar(&self) -> Calendar {
        *unpoisoned(self.calendar.read())
    }

    /// The database's calendar, read from it now.
    pub fn current_calendar(&self) -> Result<Calendar> {
        self.adopt(&self.store.timezone()?)
    }

    fn adopt(&self, zone: &str) -> Result<Calendar> {
        let seen = self.calendar();
        if seen.name() == zone {
            return Ok(seen);
        }
        let cal = Calendar::new(zone)?;
        *unpoisoned(self.calendar.write()) = cal;
        Ok(cal)
    }

    /// Runs a write that keys counters by the calendar; if another process changed the
    /// database's timezone, adopts the new one and runs it again.
    fn keyed<T>(&self, mut write: impl FnMut(&Calendar) -> Result<T>) -> Result<T> {
        let mut last = None;
        for _ in 0..3 {
            match write(&self.calendar()) {
                Err(Error::TimezoneChanged(zone)) => {
                    self.adopt(&zone)?;
                    last = Some(zone);
                }
                other => return other,
            }
        }
        Err(Error::TimezoneChanged(last.unwrap_or_default()))
    }

    /// Changes the database's timezone (for every process) and rebuilds its counters in it.
    pub fn set_timezone(&self, zone: &str) -> Result<usize> {
        let cal = Calendar::new(zone)?;
        let written = self.store.set_timezone(&cal)?;
        self.adopt(cal.name())?;
        Ok(written)
    }

    /// Recomputes the counters from the executions, in the database's timezone.
    pub fn rebuild_counters(&self) -> Result<usize> {
        let written = self.store.rebuild_counters()?;
        self.current_calendar()?;
        Ok(written)
    }
    /// A tenant's use of its rate limits now (see `Store::rate_usage`).
    pub fn rate_usage(&self, tenant_id: &str) -> Result<crate::ratelimit::RateUsage> {
        self.store.rate_usage(&budget::tenant_scope(tenant_id), now_micros() - self.rate_window.as_micros() as i64)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Alerts raised since the last call (budget thresholds, breakers opened/closed).
    pub fn drain_alerts(&self) -> Vec<Alert> {
        std::mem::take(&mut *unpoisoned(self.alerts.lock()))
    }

    fn request(spec: &AgentSpec, req: &CallRequest) -> Request {
        Request {
            system: req.system.clone(),
            history: req.history.clone(),
            user: req.user.clone(),
            temperature: spec.temperature,
            max_tokens: spec.max_tokens,
            timeout: spec.timeout,
            tools: spec.tools.clone(),
            rounds: req.rounds.clone(),
            tools_closed: req.tools_closed,
            schema: spec.schema.clone(),
        }
    }

    /// The provider a model's requests go to ("openai", "mock", a configured compatible
    /// name), as a call routes them; None for a model no provider takes (the call will say
    /// why). Telemetry names an agent run's provider before any round has answered.
    pub fn provider_of(&self, model: &str) -> Option<String> {
        providers::route(model, &self.prices, &self.config.base_urls).ok().map(|r| r.provider)
    }

    /// Validates a call and works out what it would send and reserve; `run` starts here too,
    /// so a dry run refuses exactly what a real call refuses.
    pub fn plan(&self, spec: &AgentSpec, req: &CallRequest) -> Result<CallPlan> {
        spec.validate()?;
        if let Some(t) = &req.tenant.id {
            crate::tenancy::validate_tenant_id(t)?;
        }
        providers::check_key_names(req.tenant.api_keys.keys(), &self.config.base_urls)?;
        let routes = spec.chain().map(|m| providers::route(m, &self.prices, &self.config.base_urls)).collect::<Result<Vec<_>>>()?;
        let prices = spec.chain().map(|m| self.prices.price(m)).collect::<Result<Vec<_>>>()?;
        let request = Self::request(spec, req);
        let dropped_params = routes.iter().map(|r| providers::unsupported_params(&r.model, &request).1).collect();
        let input = providers::prompt_token_bound(&request);
        let output = spec.max_tokens as i64;
        // The most expensive model of the chain bounds what the call can cost.
        let estimated_cost = prices.iter().map(|p| p.upper_bound(input, output)).max().unwrap_or_default();
        Ok(CallPlan { routes, prices, dropped_params, estimated_input_tokens: input, estimated_cost, estimated_tokens: input + output })
    }

    /// How long a call can run: every attempt of every model timing out, with the longest
    /// waits between. A guarded block (one attempt, no fallbacks) runs up to its timeout.
    /// Its reservation's lease is renewed that long and no longer, so a block stuck
    /// forever still frees its reservation.
    fn worst_case(spec: &AgentSpec) -> Duration {
        // Each wait between attempts is at most max_delay, or an honoured Retry-After.
        let per_wait = spec.retries.max_delay_s.max(MAX_RETRY_AFTER_S);
        let per_model = spec.timeout.as_secs_f64() * (spec.retries.max + 1) as f64 + spec.retries.max as f64 * per_wait;
        Duration::from_secs_f64(per_model * (1 + spec.fallback_models.len()) as f64)
    }

    fn breaker_keys(&self, spec: &AgentSpec, tenant: Option<&str>) -> Vec<BreakerKey> {
        if spec.breaker.is_none() {
            return vec![];
        }
        let tenant_id = tenant.filter(|_| self.config.multi_tenancy_enabled).map(str::to_string);
        spec.chain().map(|m| BreakerKey { agent: spec.name.clone(), model: m.clone(), tenant_id: tenant_id.clone() }).collect()
    }

    /// Admission (DESIGN §2): budgets and breakers checked, the estimate reserved and a
    /// `running` row written in one transaction, or a `blocked` / `short_circuited` row and
    /// the matching error.
    fn admit(self: &Arc<Self>, spec: &AgentSpec, req: &CallRequest, provider: &str, estimate: budget::Usage, record_rate_limited: bool) -> Result<Admission> {
        let tenant_id = req.tenant.id.as_deref();
        let now = now_micros();
        let id = crate::execution::new_id(now);
        let execution = NewExecution {
            id: id.clone(),
            agent: spec.name.clone(),
            model_id: spec.model.clone(),
            provider: provider.to_string(),
            tenant_id: req.tenant.id.clone(),
            started_at: now,
            metadata: req.metadata.clone(),
            root_execution_id: req.root_execution_id.clone().or_else(|| req.parent_execution_id.clone()),
            parent_execution_id: req.parent_execution_id.clone(),
            system_prompt: req.system.clone(),
            user_prompt: Some(req.user.clone()),
            tool_calls: req.tool_calls.clone(),
        };
        let breaker_keys = self.breaker_keys(spec, tenant_id);
        let tenant_name = req.tenant.name.as_deref();
        let remember_tenant = tenant_id.is_some_and(|t| self.seen.due(t, tenant_name, now));
        let admitted = self.keyed(|calendar| {
            self.store.admit(&AdmitRequest {
                execution: &execution,
                plan: budget::Plan { global: &self.config.budgets, agent: &spec.name, tenant_id, tenant_override: req.tenant.limits.as_ref() },
                estimate,
                reservation_expires_at: self.leases.expires_at(now),
                breaker_keys: &breaker_keys,
                probe_lease: breaker::probe_lease(spec.timeout.as_secs_f64()),
                calendar,
                now,
                rate_window: self.rate_window.as_micros() as i64,
                record_rate_limited,
                remember_tenant,
                tenant_name,
            })
        })?;
        if let (true, Some(t)) = (remember_tenant, tenant_id) {
            self.seen.written(t, tenant_name, now);
        }
        match admitted {
            Admitted::Go { model_index, probe, checks, warnings, rate_scopes, reserved } => Ok(Admission {
                call: InFlight {
                    engine: self.clone(),
                    reserved: {
                        // Every call's lease is renewed, budget or none: a call without one is
                        // found running for ever once its process dies (a SQLite store gives
                        // it an empty reservation to expire; renewing a call with no row there
                        // changes nothing).
                        self.leases.hold(&self.store, &id, Instant::now() + Self::worst_case(spec));
                        reserved
                    },
                    execution,
                    checks,
                    rate_scopes,
                    logged_tokens: estimate.tokens,
                    attempts: vec![],
                    outcomes: vec![],
                    started: Instant::now(),
                    time_to_first_token_ms: None,
                    cached: false,
                    done: false,
                },
                first: model_index,
                probe,
                breaker_keys,
                warnings: warnings.iter().map(|w| w.describe()).collect(),
            }),
            Admitted::Blocked(b) => Err(Error::BudgetExceeded(Box::new(BudgetBlock {
                scope: b.check.name.clone(),
                limit: b.check.limit,
                current: b.current(),
                breach: b.describe(),
                resets_at: b.check.resets_at,
                tenant_id: req.tenant.id.clone(),
                agent: spec.name.clone(),
                tenant_budget: b.check.tenant_budget,
                execution_id: id,
            }))),
            Admitted::RateLimited(b) => Err(Error::RateLimited(Box::new(RateBlock {
                scope: b.check.name.to_string(),
                limit: b.check.limit,
                current: b.current,
                retry_after: b.retry_after,
                tenant_id: req.tenant.id.clone(),
                agent: spec.name.clone(),
                tenant_budget: b.check.tenant_budget,
                message: b.describe(),
                execution_id: record_rate_limited.then_some(id),
            }))),
            Admitted::ShortCircuited { retry_at } => Err(Error::CircuitOpen(Box::new(CircuitBlock {
                agent: spec.name.clone(),
                tenant_id: req.tenant.id.clone(),
                model: spec.model.clone(),
                retry_at: retry_at as f64 / 1e6,
                execution_id: id,
            }))),
        }
    }

    /// Admission that, for an agent with a `rate_limit_wait`, waits for a rate-limit slot:
    /// the process's waiters for a tenant take turns in arrival order, each sleeping (no
    /// thread held) until the refusal's `retry_after`, and the one that gives up writes the
    /// `rate_limited` row.
    async fn admit_waiting(self: &Arc<Self>, spec: &AgentSpec, req: &CallRequest, provider: &str, estimate: budget::Usage) -> Result<Admission> {
        if spec.rate_limit_wait.is_zero() {
            return self.admit(spec, req, provider, estimate, true);
        }
        let key = req.tenant.id.clone().unwrap_or_default();
        let queue = unpoisoned(self.rate_queues.lock()).entry(key.clone()).or_default().clone();
        let admitted = self.wait_in(&queue, spec, req, provider, estimate).await;
        // The last one out removes the tenant's queue, so tenants seen once leave nothing.
        let mut queues = unpoisoned(self.rate_queues.lock());
        if Arc::strong_count(&queue) == 2 {
            queues.remove(&key);
        }
        admitted
    }

    async fn wait_in(
        self: &Arc<Self>,
        queue: &Arc<tokio::sync::Mutex<()>>,
        spec: &AgentSpec,
        req: &CallRequest,
        provider: &str,
        estimate: budget::Usage,
    ) -> Result<Admission> {
        let deadline = tokio::time::Instant::now() + spec.rate_limit_wait;
        let Ok(_turn) = tokio::time::timeout_at(deadline, queue.lock()).await else {
            return self.admit(spec, req, provider, estimate, true);
        };
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.admit(spec, req, provider, estimate, left.is_zero()) {
                Err(Error::RateLimited(b)) if !left.is_zero() => {
                    // A slot of `max_concurrent` frees when a call ends, which no one can
                    // tell in advance: look again soon. A window frees at a known time.
                    let concurrent = b.scope.ends_with("_concurrent");
                    if !concurrent && b.retry_after > left.as_secs_f64() {
                        return self.admit(spec, req, provider, estimate, true);
                    }
                    let pause = if concurrent { CONCURRENCY_POLL } else { Duration::from_secs_f64(b.retry_after.max(0.001)) };
                    tokio::time::sleep(pause.min(left)).await;
                }
                other => return other,
            }
        }
    }

    /// `spec`, or for a tenant past `budget_fallback.at` of one of its cost limits, `spec`
    /// on the cheaper model, with the request's metadata saying so.
    /// The request is shared with its Python `Call` (which may be run again), so it is
    /// copied only when the downgrade changes its metadata.
    fn downgraded(&self, spec: &Arc<AgentSpec>, req: Arc<CallRequest>) -> Result<(Arc<AgentSpec>, Arc<CallRequest>)> {
        let (Some(d), Some(tid)) = (&spec.downgrade, req.tenant.id.as_deref()) else { return Ok((spec.clone(), req)) };
        let stored;
        let limits = match &req.tenant.limits {
            Some(over) => &over.limits,
            None => {
                stored = self.store.budget_get(tid)?;
                match &stored {
                    Some(b) => &b.limits,
                    None => return Ok((spec.clone(), req)),
                }
            }
        };
        let cal = self.calendar();
        let now = now_micros();
        let scope = budget::tenant_scope(tid);
        let mut past = false;
        for (period, limit) in [(crate::clock::Period::Daily, limits.daily_cost), (crate::clock::Period::Monthly, limits.monthly_cost)] {
            let Some(limit) = limit else { continue };
            let used = self.store.usage(&scope, &cal.period_key(period, now))?.cost;
            past |= used.0 as f64 >= d.at * limit.0 as f64;
        }
        if !past {
            return Ok((spec.clone(), req));
        }
        let cheap = AgentSpec {
            model: d.model.clone(),
            fallback_models: spec.fallback_models.iter().filter(|m| **m != d.model).cloned().collect(),
            downgrade: None,
            ..(**spec).clone()
        };
        let metadata = with_metadata(&req.metadata, "downgraded_from", &spec.model);
        Ok((Arc::new(cheap), Arc::new(CallRequest { metadata, ..(*req).clone() })))
    }

    /// A call: from the response cache when the agent has one and it holds this call's
    /// answer, else from the provider. A structured answer off its schema is asked for once
    /// more, as a call of its own (admitted, recorded and billed again, its metadata's
    /// `retry_of` naming the first); a second one off its schema is the error.
    pub async fn run(self: Arc<Self>, spec: Arc<AgentSpec>, req: Arc<CallRequest>) -> Result<CallOutcome> {
        let (spec, req) = self.downgraded(&spec, req)?;
        let key = Self::cache_key(&spec, &req);
        if let Some(hit) = self.from_cache(&spec, &req, key.as_deref()).await? {
            return Ok(hit);
        }
        let outcome = match self.answer(&spec, &req).await? {
            Answered::Valid(o) => *o,
            Answered::Invalid { execution_id, .. } => self.answer(&spec, &retry_of(&req, &execution_id)).await?.outcome()?,
        };
        self.remember(&spec, &req, key, &outcome);
        Ok(outcome)
    }

    /// The response cache's key for a call, when its agent caches answers.
    fn cache_key(spec: &AgentSpec, req: &CallRequest) -> Option<String> {
        let models: Vec<&String> = spec.chain().collect();
        (!spec.cache_ttl.is_zero()).then(|| cache::key(req.tenant.id.as_deref(), &models, &Self::request(spec, req)))
    }

    /// The cached answer a call would get now, if any (for a call `plan` has validated).
    pub fn cached_answer(&self, spec: &AgentSpec, req: &CallRequest) -> Result<Option<cache::Entry>> {
        match Self::cache_key(spec, req) {
            Some(key) => self.store.cache_get(req.tenant.id.as_deref(), &key, now_micros()),
            None => Ok(None),
        }
    }

    /// A call answered from the cache, if it holds the answer. It is admitted like a call
    /// that costs nothing and sends no request: no breaker is asked, cost and token limits
    /// refuse it only when already passed (it needs $0 and 0 tokens), execution-count and
    /// rate limits count it like any call. Its row is `success` with `cached` set, cost 0,
    /// no attempts, and `cached_from` (the execution that paid for the answer) in its metadata.
    async fn from_cache(self: &Arc<Self>, spec: &AgentSpec, req: &CallRequest, key: Option<&str>) -> Result<Option<CallOutcome>> {
        let Some(key) = key else { return Ok(None) };
        let Some(entry) = self.store.cache_get(req.tenant.id.as_deref(), key, now_micros())? else { return Ok(None) };
        // Only a call that would be sent gets an answer; a miss is validated by `start`.
        self.plan(spec, req)?;
        let free = AgentSpec { breaker: None, ..spec.clone() };
        let req = CallRequest { metadata: with_metadata(&req.metadata, "cached_from", &entry.execution_id), ..req.clone() };
        let Admission { mut call, warnings, .. } = self.admit_waiting(&free, &req, &entry.provider, budget::estimate(Nanos(0), 0)).await?;
        call.cached = true;
        let finish_reason = entry.finish_reason.as_deref().and_then(|f| providers::FINISH_REASONS.iter().find(|r| **r == f).copied());
        let reply = Reply { content: entry.content, model: entry.model, usage: Usage::default(), finish_reason, finish_reason_raw: None, refusal: None, tool_calls: vec![] };
        call.succeed(spec, &entry.provider, reply, Cost::default(), warnings).map(Some)
    }

    /// Keeps a call's answer for its agent's `cache_ttl`: only a whole answer in text (not
    /// one cut off, refused or asking for tools).
    fn remember(&self, spec: &AgentSpec, req: &CallRequest, key: Option<String>, o: &CallOutcome) {
        let Some(key) = key else { return };
        if !o.tool_calls.is_empty() || !matches!(o.finish_reason, None | Some("stop")) {
            return;
        }
        let now = now_micros();
        let entry = cache::Entry {
            content: o.content.clone(),
            model: o.chosen_model_id.clone(),
            provider: o.provider.clone(),
            finish_reason: o.finish_reason.map(String::from),
            execution_id: o.execution_id.clone(),
            created_at: now,
            expires_at: now.saturating_add(spec.cache_ttl.as_micros() as i64),
        };
        // The call succeeded and is billed: a failed cache write must not turn it into an
        // error. The next call misses and writes again.
        let _ = self.store.cache_put(req.tenant.id.as_deref(), &key, &entry);
    }

    /// One provider call, admitted and recorded; a structured answer off its schema closes
    /// its row as an error (billed) and comes back as `Invalid`.
    async fn answer(self: &Arc<Self>, spec: &AgentSpec, req: &CallRequest) -> Result<Answered> {
        let mut started = self.start(spec, req).await?;
        let chosen = self.attempts(spec, &mut started, false).await?;
        let Opened::Reply(reply) = chosen.opened else { return Err(Error::Internal("a call's attempt opened a stream".into())) };
        let Started { mut call, plan, warnings, .. } = started;
        let cost = plan.prices[chosen.index].cost_at(reply.usage, chosen.sent_at);
        let elapsed = chosen.at.elapsed().as_millis() as i64;
        call.answered(spec, req, &chosen.attempt, reply, cost, elapsed, warnings)
    }

    /// A streamed call: each piece of text goes to `out` as it arrives. Retries and
    /// fallbacks apply until the first piece, not after. When `out`'s receiver is dropped
    /// (the consumer stopped), the request is abandoned and the row is `cancelled`, billing
    /// what was received; a stream that breaks or times out after the first piece is an
    /// error (or timeout) row billing what was received. The reservation is held throughout.
    /// An answer from the response cache comes as one piece. A structured answer off its
    /// schema is asked for once more, as `run` does, and that answer streams too: its pieces
    /// follow the first one's.
    pub async fn run_stream(self: Arc<Self>, spec: Arc<AgentSpec>, req: Arc<CallRequest>, out: &UnboundedSender<String>) -> Result<CallOutcome> {
        let (spec, req) = self.downgraded(&spec, req)?;
        let key = Self::cache_key(&spec, &req);
        if let Some(hit) = self.from_cache(&spec, &req, key.as_deref()).await? {
            // A consumer already gone still has its (free) call recorded.
            let _ = out.send(hit.content.clone());
            return Ok(hit);
        }
        let outcome = match self.stream_answer(&spec, &req, out).await? {
            Answered::Valid(o) => *o,
            // Nobody reads on: no second request.
            Answered::Invalid { error, .. } if out.is_closed() => return Err(error),
            Answered::Invalid { execution_id, .. } => self.stream_answer(&spec, &retry_of(&req, &execution_id), out).await?.outcome()?,
        };
        self.remember(&spec, &req, key, &outcome);
        Ok(outcome)
    }

    /// One streamed provider call, admitted and recorded (see `run_stream`); a structured
    /// answer off its schema closes its row as an error and comes back as `Invalid`.
    async fn stream_answer(self: &Arc<Self>, spec: &AgentSpec, req: &CallRequest, out: &UnboundedSender<String>) -> Result<Answered> {
        let mut started = self.start(spec, req).await?;
        let chosen = tokio::select! {
            biased;
            _ = out.closed() => return Err(Error::Internal("cancelled".into())),
            c = self.attempts(spec, &mut started, true) => c?,
        };
        let Opened::Stream(mut stream, first) = chosen.opened else { return Err(Error::Internal("a stream's attempt did not open a stream".into())) };
        let Started { mut call, plan, warnings, .. } = started;
        call.time_to_first_token_ms = first.as_ref().map(|_| call.started.elapsed().as_millis() as i64);
        let deadline = tokio::time::Instant::from_std(chosen.at + spec.timeout);
        let broken = 'read: {
            let Some(mut piece) = first else { break 'read None };
            loop {
                if out.send(piece).is_err() {
                    break 'read Some(StreamEnd::Cancelled);
                }
                let next = tokio::select! {
                    biased;
                    _ = out.closed() => break 'read Some(StreamEnd::Cancelled),
                    n = tokio::time::timeout_at(deadline, stream.next()) => n,
                };
                piece = match next {
                    Ok(Ok(Some(p))) => p,
                    Ok(Ok(None)) => break 'read None,
                    Ok(Err(f)) => break 'read Some(StreamEnd::Broken(providers::redact(f, chosen.api_key.as_deref()))),
                    Err(_) => break 'read Some(StreamEnd::Broken(timeout_failure(&chosen.attempt.provider, spec.timeout))),
                };
                if call.time_to_first_token_ms.is_none() {
                    call.time_to_first_token_ms = Some(call.started.elapsed().as_millis() as i64);
                }
            }
        };
        let elapsed = chosen.at.elapsed().as_millis() as i64;
        let reply = stream.reply();
        let cost = plan.prices[chosen.index].cost_at(reply.usage, chosen.sent_at);
        match broken {
            None => match providers::check_reply(&plan.routes[chosen.index], reply) {
                Ok(reply) => call.answered(spec, req, &chosen.attempt, reply, cost, elapsed, warnings),
                Err(f) => {
                    let f = ProviderFailure { model: chosen.attempt.model.clone(), ..f };
                    call.record(&chosen.attempt, Err(&f), elapsed);
                    Err(call.fail(vec![f], false)?)
                }
            },
            Some(end) => call.end_partial(&chosen.attempt, reply, cost, elapsed, end).map(|o| Answered::Valid(Box::new(o))),
        }
    }

    /// Validation, keys and admission, shared by calls and streams.
    async fn start(self: &Arc<Self>, spec: &AgentSpec, req: &CallRequest) -> Result<Started> {
        let plan = self.plan(spec, req)?;
        let api_keys = self.keys_for(&req.tenant, &plan.routes)?;
        let estimate = budget::estimate(plan.estimated_cost, plan.estimated_tokens);
        let Admission { call, first, probe, breaker_keys, warnings } = self.admit_waiting(spec, req, &plan.routes[0].provider, estimate).await?;
        Ok(Started { call, first, probe, breaker_keys, warnings, request: Self::request(spec, req), api_keys, plan })
    }

    /// Tries the chain's models in turn, each with its retries, until one answers (for a
    /// stream: until it sends its first piece of text, or ends without any). Every failed
    /// attempt is recorded; when all fail, the call's row is closed and its error returned.
    async fn attempts(&self, spec: &AgentSpec, s: &mut Started, streaming: bool) -> Result<Chosen> {
        let lease = breaker::probe_lease(spec.timeout.as_secs_f64());
        let mut errors: Vec<ProviderFailure> = vec![];
        // Attempts and errors name models as the agent does ("mock/x", "openai/gpt-4o"),
        // like the execution's model_id, not the provider's bare id.
        let models: Vec<&String> = spec.chain().collect();
        let mut probe = s.probe;
        for (i, route) in s.plan.routes.iter().enumerate().skip(s.first) {
            let key = s.breaker_keys.get(i);
            if let (true, Some(key)) = (i != s.first, key) {
                match self.store.breaker_admit(key, lease, now_micros())? {
                    breaker::Admission::Reject { .. } => continue,
                    breaker::Admission::Probe => probe = true,
                    breaker::Admission::Pass => probe = false,
                }
            }
            let target = Target { route, api_key: s.api_keys[i].as_deref() };
            let (sent, dropped) = providers::unsupported_params(&route.model, &s.request);
            for retry in 0..=spec.retries.max {
                let t0 = Instant::now();
                let sent_at = now_micros();
                let opening = async {
                    if !streaming {
                        return self.providers.send(&target, &sent).await.map(Opened::Reply);
                    }
                    let mut stream = self.providers.open(&target, &sent).await?;
                    let first = stream.next().await.map_err(|f| providers::redact(f, target.api_key))?;
                    Ok(Opened::Stream(Box::new(stream), first))
                };
                let result = match tokio::time::timeout(spec.timeout, opening).await {
                    Ok(r) => r,
                    Err(_) => Err(timeout_failure(&route.provider, spec.timeout)),
                }
                .map_err(|f| ProviderFailure { model: models[i].clone(), ..f });
                let attempt = AttemptOf {
                    key: key.cloned(),
                    policy: spec.breaker,
                    probe,
                    model: models[i].clone(),
                    provider: route.provider.clone(),
                    dropped: dropped.clone(),
                };
                match result {
                    Ok(opened) => return Ok(Chosen { index: i, attempt, opened, at: t0, sent_at, api_key: s.api_keys[i].clone() }),
                    Err(f) => {
                        s.call.record(&attempt, Err(&f), t0.elapsed().as_millis() as i64);
                        probe = false;
                        let wait_too_long = f.retry_after.is_some_and(|s| s > MAX_RETRY_AFTER_S);
                        let retry_after = f.retry_after;
                        let retryable = f.retryable;
                        errors.push(f);
                        if !retryable || retry == spec.retries.max || wait_too_long {
                            break;
                        }
                        tokio::time::sleep(spec.retries.delay(retry, fastrand::f64(), retry_after)).await;
                    }
                }
            }
        }
        Err(s.call.fail(errors, s.plan.routes.len() > 1)?)
    }

    /// Starts a guarded block of the user's own code (`tl.guard`/`tl.guarded`): the same
    /// admission as a call, reserving `max_tokens` plus the declared input estimate.
    pub fn begin_guard(self: &Arc<Self>, spec: &AgentSpec, req: &CallRequest, estimated_input_tokens: i64) -> Result<Guard> {
        spec.validate()?;
        if let Some(t) = &req.tenant.id {
            crate::tenancy::validate_tenant_id(t)?;
        }
        let price = self.prices.price(&spec.model)?;
        let provider = providers::route(&spec.model, &self.prices, &self.config.base_urls)
            .map(|r| r.provider)
            .unwrap_or_else(|_| "external".into());
        let output = spec.max_tokens as i64;
        let cost = price.upper_bound(estimated_input_tokens, output);
        let admission = self.admit(spec, req, &provider, budget::estimate(cost, estimated_input_tokens + output), true)?;
        Ok(Guard { admission, spec: spec.clone(), provider })
    }

    /// The key for a route's provider, highest first: this call's tenant keys (tenant object
    /// or runtime dict), the tenant's stored key, the stored global key, `configure(api_keys=)`,
    /// the environment. Blank values fall through; surrounding whitespace is never part of a key.
    fn api_key(&self, tenant: &TenantContext, route: &Route) -> Result<Option<String>> {
        let usable = |k: &str| Some(k.trim().to_string()).filter(|k| !k.is_empty());
        if let Some(k) = tenant.api_keys.get(&route.provider).and_then(|k| usable(k)) {
            return Ok(Some(k));
        }
        let scopes = tenant.id.as_deref().map(key_scope).into_iter().chain(std::iter::once(GLOBAL_KEYS.to_string()));
        for scope in scopes {
            if let Some(k) = self.stored_key(&scope, &route.provider)?.and_then(|k| usable(&k)) {
                return Ok(Some(k));
            }
        }
        let configured = self.config.api_keys.get(&route.provider).and_then(|k| usable(k));
        Ok(configured.or_else(|| providers::env_vars(&route.provider).into_iter().find_map(|v| std::env::var(v).ok().and_then(|k| usable(&k)))))
    }

    fn stored_key(&self, scope: &str, provider: &str) -> Result<Option<String>> {
        match (self.store.api_key_get(scope, provider)?, &self.sealer) {
            (None, _) => Ok(None),
            (Some(sealed), Some(sealer)) => sealer.open(scope, provider, &sealed).map(Some),
            (Some(_), None) => config_err(format!(
                "a {provider} API key is stored ({scope}) but {SECRET_ENV} is not set, so it cannot be decrypted"
            )),
        }
    }

    /// Every route's key, resolved before anything is recorded; refuses a call whose
    /// provider needs a key it lacks.
    fn keys_for(&self, tenant: &TenantContext, routes: &[Route]) -> Result<Vec<Option<String>>> {
        let mut keys = Vec::with_capacity(routes.len());
        for r in routes {
            let key = if r.wire == providers::Wire::Mock { None } else { self.api_key(tenant, r)? };
            if r.needs_key && key.is_none() {
                return config_err(format!(
                    "no API key for provider {:?}: pass api_keys={{{:?}: ...}} to configure(), store one with ApiConfiguration, give the tenant one, or set {}",
                    r.provider,
                    r.provider,
                    providers::env_vars(&r.provider).join(" or ")
                ));
            }
            keys.push(key);
        }
        Ok(keys)
    }

    /// Stores encrypted keys (a `None` or blank value removes that provider's key), for a
    /// tenant or globally. Everything is checked before anything is written.
    pub fn set_api_keys(&self, tenant_id: Option<&str>, keys: &[(String, Option<String>)]) -> Result<()> {
        if let Some(t) = tenant_id {
            crate::tenancy::validate_tenant_id(t)?;
        }
        let scope = tenant_id.map(key_scope).unwrap_or_else(|| GLOBAL_KEYS.to_string());
        let mut sealed = Vec::with_capacity(keys.len());
        for (provider, key) in keys {
            if !providers::is_known(provider, &self.config.base_urls) {
                return config_err(format!(
                    "unknown provider {provider:?} for an API key; known: {}",
                    providers::known_names(&self.config.base_urls).join(", ")
                ));
            }
            let value = match key.as_deref().map(str::trim).filter(|k| !k.is_empty()) {
                None => None,
                Some(k) => {
                    let Some(sealer) = &self.sealer else {
                        return config_err(format!(
                            "refusing to store an API key unencrypted: set {SECRET_ENV} (at least 16 characters)"
                        ));
                    };
                    Some(sealer.seal(&scope, provider, k)?)
                }
            };
            sealed.push((provider, value));
        }
        for (provider, value) in sealed {
            self.store.api_key_put(&scope, provider, value.as_ref())?;
        }
        Ok(())
    }

    /// Providers with a stored key for the tenant (or globally), never the keys.
    pub fn stored_key_providers(&self, tenant_id: Option<&str>) -> Result<Vec<String>> {
        self.store.api_key_providers(&tenant_id.map(key_scope).unwrap_or_else(|| GLOBAL_KEYS.to_string()))
    }
}

const GLOBAL_KEYS: &str = "global";

/// A call's metadata (a JSON object, checked when the call was built) with one more entry.
fn with_metadata(metadata: &str, name: &str, value: &str) -> String {
    let mut meta: serde_json::Map<String, serde_json::Value> = serde_json::from_str(metadata).unwrap_or_default();
    meta.insert(name.into(), value.into());
    serde_json::Value::Object(meta).to_string()
}

/// The request again, for a structured answer off its schema: its metadata's `retry_of`
/// names the execution of the first answer.
fn retry_of(req: &CallRequest, execution_id: &str) -> CallRequest {
    CallRequest { metadata: with_metadata(&req.metadata, "retry_of", execution_id), ..req.clone() }
}

fn key_scope(tenant_id: &str) -> String {
    format!("tenant:{tenant_id}")
}

/// What admission hands to the call (or guard) it admitted.
struct Admission {
    call: InFlight,
    /// Index of the first model whose breaker let the call through.
    first: usize,
    probe: bool,
    breaker_keys: Vec<BreakerKey>,
    warnings: Vec<String>,
}

/// A call admitted and ready for its attempts.
struct Started {
    call: InFlight,
    first: usize,
    probe: bool,
    breaker_keys: Vec<BreakerKey>,
    warnings: Vec<String>,
    request: Request,
    api_keys: Vec<Option<String>>,
    plan: CallPlan,
}

/// What a successful attempt opened: a whole reply, or a stream with its first piece of
/// text (`None`: it ended without any).
enum Opened {
    Reply(Reply),
    Stream(Box<ProviderStream>, Option<String>),
}

/// The attempt that answered.
struct Chosen {
    index: usize,
    attempt: AttemptOf,
    opened: Opened,
    /// When the attempt started (its timeout runs from here).
    at: Instant,
    sent_at: crate::clock::Micros,
    api_key: Option<String>,
}

/// How a call's answer turned out.
enum Answered {
    Valid(Box<CallOutcome>),
    /// A structured answer off its schema: its row (`execution_id`) is closed as an error.
    Invalid { execution_id: String, error: Error },
}

impl Answered {
    /// The answer asked for again: off its schema a second time, it is the error.
    fn outcome(self) -> Result<CallOutcome> {
        match self {
            Answered::Valid(o) => Ok(*o),
            Answered::Invalid { error, .. } => Err(error),
        }
    }
}

/// How a stream ended before its reply was complete.
enum StreamEnd {
    /// The consumer stopped reading.
    Cancelled,
    /// The provider's stream failed or timed out after its first piece of text.
    Broken(ProviderFailure),
}

fn timeout_failure(provider: &str, timeout: Duration) -> ProviderFailure {
    ProviderFailure {
        kind: ProviderErrorKind::Timeout,
        provider: provider.to_string(),
        model: String::new(),
        status: None,
        message: format!("no answer within {timeout:?}"),
        retryable: true,
        retry_after: None,
    }
}

/// Who one attempt went to, for its record and its breaker outcome.
struct AttemptOf {
    key: Option<BreakerKey>,
    policy: Option<breaker::Policy>,
    probe: bool,
    model: String,
    provider: String,
    /// Parameters left out of the request because the model rejects them.
    dropped: Vec<&'static str>,
}

/// An admitted call. Dropping it unfinished (the awaiting task was cancelled, or a guarded
/// block was abandoned) records the execution as cancelled and releases its reservation, so
/// no call is lost.
struct InFlight {
    engine: Arc<Engine>,
    execution: NewExecution,
    reserved: bool,
    checks: Vec<Check>,
    rate_scopes: Vec<String>,
    /// The tokens `rate_scopes`' logs hold for the call until it settles: its estimate.
    logged_tokens: i64,
    attempts: Vec<Attempt>,
    outcomes: Vec<BreakerOutcome>,
    started: Instant,
    /// Streams: when the first piece of text reached the consumer.
    time_to_first_token_ms: Option<i64>,
    /// Answered from the response cache.
    cached: bool,
    done: bool,
}

impl InFlight {
    fn record(&mut self, to: &AttemptOf, result: std::result::Result<(&Reply, Cost), &ProviderFailure>, duration_ms: i64) {
        if let (Some(key), Some(policy)) = (&to.key, to.policy) {
            self.outcomes.push(BreakerOutcome { key: key.clone(), policy, success: result.is_ok(), probe: to.probe });
        }
        let reply = result.as_ref().ok().map(|(r, _)| *r);
        let usage = reply.map(|r| r.usage).unwrap_or_default();
        let cost = result.as_ref().map(|(_, c)| *c).unwrap_or_default();
        let failure = result.err();
        self.attempts.push(Attempt {
            model: to.model.clone(),
            provider: to.provider.clone(),
            status: if failure.is_none() { "success" } else { "error" },
            error_class: failure.map(|f| f.kind.class_name().to_string()),
            error_message: failure.map(|f| f.message.clone()),
            http_status: failure.and_then(|f| f.status),
            input_tokens: usage.input,
            output_tokens: usage.output,
            cached_tokens: usage.cached,
            cache_write_tokens: usage.cache_writes(),
            cost_nanos: cost.total().0,
            cache_read_cost_nanos: cost.cache_read.0,
            cache_write_cost_nanos: cost.cache_write.0,
            duration_ms,
            started_at: now_micros() - duration_ms * 1000,
            finish_reason: reply.and_then(|r| r.finish_reason_raw.clone()),
            refusal: reply.and_then(|r| r.refusal.clone()),
            dropped_params: to.dropped.clone(),
        });
    }

    fn finish(&mut self, completion: &Completion) -> Result<()> {
        self.done = true;
        let e = &self.engine;
        e.leases.release(&self.execution.id);
        let alerts = e.keyed(|calendar| {
            e.store.finish(&FinishRequest {
                execution: &self.execution,
                completion,
                reserved: self.reserved,
                checks: &self.checks,
                rate_scopes: &self.rate_scopes,
                logged_tokens: self.logged_tokens,
                breakers: &self.outcomes,
                calendar,
                store_details: e.config.store_prompts,
            })
        })?;
        if !alerts.is_empty() {
            unpoisoned(e.alerts.lock()).extend(alerts);
        }
        Ok(())
    }

    fn completion(&mut self, status: Status) -> Completion {
        Completion {
            status,
            error_class: None,
            error_message: None,
            chosen_model_id: None,
            provider: None,
            completed_at: now_micros(),
            duration_ms: self.started.elapsed().as_millis() as i64,
            usage: Usage::default(),
            cost: Cost::default(),
            attempts: std::mem::take(&mut self.attempts),
            finish_reason: None,
            response: None,
            time_to_first_token_ms: self.time_to_first_token_ms,
            cached: self.cached,
        }
    }

    fn succeed(&mut self, spec: &AgentSpec, provider: &str, reply: Reply, cost: Cost, warnings: Vec<String>) -> Result<CallOutcome> {
        let mut c = self.completion(Status::Success);
        c.chosen_model_id = Some(reply.model.clone());
        c.provider = Some(provider.to_string());
        c.usage = reply.usage;
        c.cost = cost;
        c.finish_reason = reply.finish_reason.map(String::from);
        c.response = Some(reply.content.clone());
        let attempts_count = c.attempts.len();
        self.finish(&c)?;
        let started_at = self.execution.started_at;
        Ok(CallOutcome {
            execution_id: self.execution.id.clone(),
            tenant_id: self.execution.tenant_id.clone(),
            content: reply.content,
            model_id: spec.model.clone(),
            chosen_model_id: reply.model,
            provider: provider.to_string(),
            usage: reply.usage,
            cost,
            duration_ms: c.duration_ms,
            attempts_count,
            finish_reason: reply.finish_reason,
            finish_reason_raw: reply.finish_reason_raw,
            refusal: reply.refusal,
            budget_warnings: warnings,
            time_to_first_token_ms: c.time_to_first_token_ms,
            tool_calls: reply.tool_calls,
            started_at,
            completed_at: c.completed_at,
            attempts: c.attempts,
            cached: c.cached,
        })
    }

    /// Settles a call whose reply came whole: a success, or for a structured answer that
    /// does not follow the schema an error row that still bills it, and `Invalid`. A reply
    /// asking for tools is not the answer yet only when its tools will run (the agent has
    /// tools, and this is not the last round, told to answer); else it is the answer, checked
    /// like any other, so a structured call does not succeed with text its schema refuses.
    #[allow(clippy::too_many_arguments)]
    fn answered(&mut self, spec: &AgentSpec, req: &CallRequest, to: &AttemptOf, reply: Reply, cost: Cost, elapsed: i64, warnings: Vec<String>) -> Result<Answered> {
        let tools_run = !reply.tool_calls.is_empty() && !spec.tools.is_empty() && !req.tools_closed;
        if let Some(why) = spec.schema.as_ref().filter(|_| !tools_run).and_then(|_| providers::check_answer(&reply.content, req.validator.as_ref()).err()) {
            let f = ProviderFailure {
                kind: ProviderErrorKind::InvalidResponse,
                provider: to.provider.clone(),
                model: to.model.clone(),
                status: None,
                message: format!("structured output: {why}"),
                retryable: false,
                retry_after: None,
            };
            let execution_id = self.execution.id.clone();
            return match self.end_partial(to, reply, cost, elapsed, StreamEnd::Broken(f)) {
                Err(error @ Error::Provider(_)) => Ok(Answered::Invalid { execution_id, error }),
                other => other.map(|o| Answered::Valid(Box::new(o))),
            };
        }
        self.record(to, Ok((&reply, cost)), elapsed);
        self.succeed(spec, &to.provider, reply, cost, warnings).map(|o| Answered::Valid(Box::new(o)))
    }

    /// Closes a call whose answer came but cannot be used (a stream that ended early, a
    /// structured answer off its schema), billing what was received: `cancelled` when the
    /// consumer stopped (nothing is raised), else an error or timeout row and its error.
    fn end_partial(&mut self, to: &AttemptOf, reply: Reply, cost: Cost, elapsed: i64, end: StreamEnd) -> Result<CallOutcome> {
        let (status, failure) = match &end {
            StreamEnd::Cancelled => (Status::Cancelled, None),
            StreamEnd::Broken(f) if f.kind == ProviderErrorKind::Timeout => (Status::Timeout, Some(f)),
            StreamEnd::Broken(f) => (Status::Error, Some(f)),
        };
        self.record(to, Ok((&reply, cost)), elapsed);
        if let (Some(a), Some(f)) = (self.attempts.last_mut(), failure) {
            a.status = "error";
            a.error_class = Some(f.kind.class_name().to_string());
            a.error_message = Some(f.message.clone());
        }
        let mut c = self.completion(status);
        c.chosen_model_id = Some(reply.model.clone());
        c.provider = Some(to.provider.clone());
        c.usage = reply.usage;
        c.cost = cost;
        c.finish_reason = reply.finish_reason.map(String::from);
        c.response = Some(reply.content.clone());
        let err = match failure {
            None => Error::Internal("cancelled".into()),
            Some(f) => Error::Provider(Box::new(ProviderFailure { model: to.model.clone(), ..f.clone() })),
        };
        c.error_class = Some(if failure.is_some() { error_class(&err) } else { "CancelledError" }.into());
        c.error_message = Some(if failure.is_some() { err.to_string() } else { "the consumer stopped reading the stream".into() });
        self.finish(&c)?;
        Err(err)
    }

    /// Records a call whose every attempt failed; returns the error to raise.
    fn fail(&mut self, errors: Vec<ProviderFailure>, had_fallbacks: bool) -> Result<Error> {
        let last = errors.last().cloned();
        let timed_out = last.as_ref().is_some_and(|f| f.kind == ProviderErrorKind::Timeout);
        let mut c = self.completion(if timed_out { Status::Timeout } else { Status::Error });
        let err = match last {
            Some(f) if !had_fallbacks => Error::Provider(Box::new(f)),
            Some(_) => Error::AllModelsExhausted { errors },
            // Every model was skipped by its breaker after the first attempts.
            None => Error::AllModelsExhausted { errors: vec![] },
        };
        c.error_class = Some(error_class(&err).into());
        c.error_message = Some(err.to_string());
        self.finish(&c)?;
        Ok(err)
    }
}

/// A guarded block of user code in flight: finish it with `succeed` or `fail`; dropping it
/// unfinished records it as cancelled.
pub struct Guard {
    admission: Admission,
    spec: AgentSpec,
    provider: String,
}

impl Guard {
    pub fn execution_id(&self) -> &str {
        &self.admission.call.execution.id
    }

    pub fn warnings(&self) -> &[String] {
        &self.admission.warnings
    }

    /// The guarded block, as the one attempt of its execution.
    fn attempt(&self, model: &str) -> AttemptOf {
        AttemptOf {
            key: self.admission.breaker_keys.first().cloned(),
            policy: self.spec.breaker,
            probe: self.admission.probe,
            model: model.to_string(),
            provider: self.provider.clone(),
            dropped: vec![],
        }
    }

    /// The block finished; `model` is the one that answered, if the body said so. It is
    /// priced as that model when its price is known, else as the declared one.
    /// Usage outside the range a provider may report is an `InvalidResponseError` and an
    /// error row, as it is for a call.
    pub fn succeed(mut self, model: Option<&str>, usage: Usage) -> Result<CallOutcome> {
        if let Err(why) = providers::check_usage(&usage) {
            let failure = self.failure(ProviderErrorKind::InvalidResponse, format!("invalid usage: {why}"));
            self.finish_failed(&failure, failure.kind.class_name())?;
            return Err(Error::Provider(Box::new(failure)));
        }
        let model = model.unwrap_or(&self.spec.model).to_string();
        let prices = &self.admission.call.engine.prices;
        let cost = prices.price(&model).or_else(|_| prices.price(&self.spec.model))?.cost_at(usage, self.admission.call.execution.started_at);
        let elapsed = self.admission.call.started.elapsed().as_millis() as i64;
        let to = self.attempt(&model);
        let reply = Reply { content: String::new(), model, usage, finish_reason: None, finish_reason_raw: None, refusal: None, tool_calls: vec![] };
        self.admission.call.record(&to, Ok((&reply, cost)), elapsed);
        let warnings = std::mem::take(&mut self.admission.warnings);
        self.admission.call.succeed(&self.spec, &self.provider, reply, cost, warnings)
    }

    /// The block raised: an error row, and a failure for the breaker.
    pub fn fail(mut self, error_class: &str, message: &str) -> Result<()> {
        let failure = self.failure(ProviderErrorKind::Transport, message.to_string());
        self.finish_failed(&failure, error_class)
    }

    fn failure(&self, kind: ProviderErrorKind, message: String) -> ProviderFailure {
        ProviderFailure {
            kind,
            provider: self.provider.clone(),
            model: self.spec.model.clone(),
            status: None,
            message,
            retryable: false,
            retry_after: None,
        }
    }

    fn finish_failed(&mut self, failure: &ProviderFailure, error_class: &str) -> Result<()> {
        let elapsed = self.admission.call.started.elapsed().as_millis() as i64;
        let to = self.attempt(&self.spec.model);
        self.admission.call.record(&to, Err(failure), elapsed);
        if let Some(a) = self.admission.call.attempts.last_mut() {
            a.error_class = Some(error_class.to_string());
        }
        let mut c = self.admission.call.completion(Status::Error);
        c.error_class = Some(error_class.to_string());
        c.error_message = Some(failure.message.clone());
        self.admission.call.finish(&c)
    }
}

pub fn error_class(e: &Error) -> &'static str {
    match e {
        Error::BudgetExceeded(_) => "BudgetExceededError",
        Error::CircuitOpen(_) => "CircuitOpenError",
        Error::RateLimited(_) => "RateLimitedError",
        Error::AllModelsExhausted { .. } => "AllModelsExhaustedError",
        Error::Provider(f) => f.kind.class_name(),
        Error::Configuration(_) | Error::TimezoneChanged(_) => "ConfigurationError",
        Error::InvalidTenant(_) => "InvalidTenantError",
        Error::MissingParameter(_) => "MissingParameterError",
        Error::Store(_) => "StoreError",
        Error::Internal(_) => "InternalError",
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            let mut c = self.completion(Status::Cancelled);
            c.error_class = Some("CancelledError".into());
            c.error_message = Some("the caller cancelled the call".into());
            // Nothing can be raised from a destructor; a failed write leaves the row
            // `running` and the reservation to expire with its lease.
            let _ = self.finish(&c);
        }
    }
}
