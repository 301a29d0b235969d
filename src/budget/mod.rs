//! Budget policy: which limits apply to a call, and whether usage plus an estimate fits.
//! Pure functions; the store supplies counters inside its transaction and calls these.

pub mod projection;

use std::collections::HashMap;

use crate::clock::{Calendar, Micros, Period};
use crate::error::{config_err, Amount, Result};
use crate::execution::Completion;
use crate::money::Nanos;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Enforcement {
    #[default]
    Hard,
    Soft,
}

impl Enforcement {
    pub fn parse(s: &str) -> Result<Enforcement> {
        match s {
            "hard" => Ok(Enforcement::Hard),
            "soft" => Ok(Enforcement::Soft),
            other => config_err(format!("enforcement must be \"hard\" or \"soft\", got {other:?}")),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::Hard => "hard",
            Enforcement::Soft => "soft",
        }
    }
}

/// The limits of one level (global or one tenant). `None` = no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub daily_cost: Option<Nanos>,
    pub monthly_cost: Option<Nanos>,
    pub daily_tokens: Option<i64>,
    pub monthly_tokens: Option<i64>,
    pub daily_executions: Option<i64>,
    pub monthly_executions: Option<i64>,
    /// Rate limits (`crate::ratelimit`): requests and tokens per minute, calls in flight
    /// (tenants only).
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub max_concurrent: Option<i64>,
}

/// A tenant budget's fields, as `TenantBudget` keywords and as `tenant_budgets` columns.
pub const BUDGET_FIELDS: &[&str] = &[
    "daily_limit",
    "monthly_limit",
    "daily_token_limit",
    "monthly_token_limit",
    "daily_execution_limit",
    "monthly_execution_limit",
    "rpm_limit",
    "tpm_limit",
    "max_concurrent",
    "enforcement",
    "name",
];

/// The largest token or execution limit: 10^15.
pub const MAX_COUNT: i64 = 1_000_000_000_000_000;

impl Limits {
    /// Counts must be in 0..=MAX_COUNT (money is validated when parsed into `Nanos`).
    pub fn validate(&self) -> Result<()> {
        let counts = [
            ("daily_token_limit", self.daily_tokens),
            ("monthly_token_limit", self.monthly_tokens),
            ("daily_execution_limit", self.daily_executions),
            ("monthly_execution_limit", self.monthly_executions),
        ];
        for (name, v) in counts {
            if let Some(v) = v.filter(|v| *v < 0) {
                return config_err(format!("{name} must not be negative (got {v})"));
            }
            if let Some(v) = v.filter(|v| *v > MAX_COUNT) {
                return config_err(format!("{name} must be at most {MAX_COUNT} (got {v})"));
            }
        }
        Ok(())
    }

    /// Each set limit as (period, metric, limit).
    fn each(&self) -> impl Iterator<Item = (Period, Metric, Amount)> + '_ {
        [
            (Period::Daily, Metric::Cost, self.daily_cost.map(Amount::Usd)),
            (Period::Monthly, Metric::Cost, self.monthly_cost.map(Amount::Usd)),
            (Period::Daily, Metric::Tokens, self.daily_tokens.map(Amount::Count)),
            (Period::Monthly, Metric::Tokens, self.monthly_tokens.map(Amount::Count)),
            (Period::Daily, Metric::Executions, self.daily_executions.map(Amount::Count)),
            (Period::Monthly, Metric::Executions, self.monthly_executions.map(Amount::Count)),
        ]
        .into_iter()
        .filter_map(|(p, m, l)| l.map(|l| (p, m, l)))
    }
}

/// A tenant's own budget, as stored (`TenantBudget`) or given at run time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantBudget {
    pub tenant_id: String,
    pub name: Option<String>,
    pub limits: Limits,
    pub enforcement: Enforcement,
}

impl TenantBudget {
    pub fn validate(&self) -> Result<()> {
        crate::tenancy::validate_tenant_id(&self.tenant_id)?;
        self.limits.validate()?;
        crate::ratelimit::validate(&self.limits, true)
    }
}

/// `configure(budgets=...)`.
#[derive(Debug, Clone, Default)]
pub struct GlobalBudgets {
    pub limits: Limits,
    pub per_agent_daily: HashMap<String, Nanos>,
    pub per_agent_monthly: HashMap<String, Nanos>,
    pub enforcement: Enforcement,
}

impl GlobalBudgets {
    pub fn is_empty(&self) -> bool {
        self.limits == Limits::default() && self.per_agent_daily.is_empty() && self.per_agent_monthly.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Cost,
    Tokens,
    Executions,
}

/// The counter scopes every admitted call is added to.
pub fn scopes_of(tenant_id: Option<&str>, agent: &str) -> Vec<String> {
    let mut s = vec!["global".to_string(), format!("agent:{agent}")];
    if let Some(t) = tenant_id {
        s.push(format!("tenant:{t}"));
    }
    s
}

pub fn tenant_scope(tenant_id: &str) -> String {
    format!("tenant:{tenant_id}")
}

/// One limit that applies to a call.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// Public name: "tenant_daily", "global_monthly_tokens", "agent_daily_executions", ...
    pub name: String,
    pub scope: String,
    pub period_key: String,
    pub metric: Metric,
    pub limit: Amount,
    pub enforcement: Enforcement,
    pub tenant_budget: bool,
    /// When the period ends and the limit starts again from zero (UTC micros).
    pub resets_at: Micros,
}

/// Running totals of one (scope, period): recorded plus in-flight reservations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cost: Nanos,
    pub tokens: i64,
    pub executions: i64,
}

impl Usage {
    fn of(&self, m: Metric) -> Amount {
        match m {
            Metric::Cost => Amount::Usd(self.cost),
            Metric::Tokens => Amount::Count(self.tokens),
            Metric::Executions => Amount::Count(self.executions),
        }
    }
    pub fn negated(&self) -> Usage {
        Usage { cost: Nanos(self.cost.0.saturating_neg()), tokens: self.tokens.saturating_neg(), executions: self.executions.saturating_neg() }
    }
    pub fn plus(&self, o: &Usage) -> Usage {
        Usage {
            cost: self.cost.saturating_add(o.cost),
            tokens: self.tokens.saturating_add(o.tokens),
            executions: self.executions.saturating_add(o.executions),
        }
    }
}

/// Everything needed to decide which limits apply to one call.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    pub global: &'a GlobalBudgets,
    pub agent: &'a str,
    pub tenant_id: Option<&'a str>,
    /// Limits from the runtime tenant dict or `tenant_config_resolver`; when set the stored
    /// budget is not consulted.
    pub tenant_override: Option<&'a TenantBudget>,
}

fn check_name(level: &str, period: Period, metric: Metric) -> String {
    let suffix = match metric {
        Metric::Cost => "",
        Metric::Tokens => "_tokens",
        Metric::Executions => "_executions",
    };
    format!("{level}_{}{suffix}", period.name())
}

/// The checks for a call at `now`, given the tenant's stored budget (if the plan has no override).
pub fn checks(plan: &Plan<'_>, stored: Option<&TenantBudget>, cal: &Calendar, now: Micros) -> Vec<Check> {
    let day = cal.period_key(Period::Daily, now);
    let month = cal.period_key(Period::Monthly, now);
    let key = |p: Period| if p == Period::Daily { day.clone() } else { month.clone() };
    let (day_end, month_end) = (cal.today(now).1, cal.this_month(now).1);
    let resets_at = |p: Period| if p == Period::Daily { day_end } else { month_end };
    let mut out = Vec::new();
    for (period, metric, limit) in plan.global.limits.each() {
        out.push(Check {
            name: check_name("global", period, metric),
            scope: "global".into(),
            period_key: key(period),
            metric,
            limit,
            enforcement: plan.global.enforcement,
            tenant_budget: false,
            resets_at: resets_at(period),
        });
    }
    for (period, map) in [(Period::Daily, &plan.global.per_agent_daily), (Period::Monthly, &plan.global.per_agent_monthly)] {
        if let Some(l) = map.get(plan.agent) {
            out.push(Check {
                name: check_name("agent", period, Metric::Cost),
                scope: format!("agent:{}", plan.agent),
                period_key: key(period),
                metric: Metric::Cost,
                limit: Amount::Usd(*l),
                enforcement: plan.global.enforcement,
                tenant_budget: false,
                resets_at: resets_at(period),
            });
        }
    }
    if let (Some(tid), Some(tb)) = (plan.tenant_id, plan.tenant_override.or(stored)) {
        for (period, metric, limit) in tb.limits.each() {
            out.push(Check {
                name: check_name("tenant", period, metric),
                scope: tenant_scope(tid),
                period_key: key(period),
                metric,
                limit,
                enforcement: tb.enforcement,
                tenant_budget: true,
                resets_at: resets_at(period),
            });
        }
    }
    out
}

/// The estimate a call reserves: its upper-bound cost and tokens, and one execution.
pub fn estimate(cost: Nanos, tokens: i64) -> Usage {
    Usage { cost, tokens, executions: 1 }
}

/// What a settled call adds to its counters: its real cost and tokens and one execution, if
/// it was admitted (a blocked or short-circuited call used nothing).
pub fn recorded(c: &Completion) -> Usage {
    if c.status.counts_as_usage() {
        estimate(c.cost.total(), c.usage.input.saturating_add(c.usage.output))
    } else {
        Usage::default()
    }
}

/// What a call settling now adds: `recorded`, less the execution when its reservation was
/// taken over (the lease ran out), since closing its row as `Abandoned` counted it.
pub fn settled(c: &Completion, taken_over: bool) -> Usage {
    let used = recorded(c);
    if taken_over {
        Usage { executions: 0, ..used }
    } else {
        used
    }
}

/// A limit that `spent + reserved + needed` would pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Breach {
    pub check: Check,
    /// Recorded by calls that have finished.
    pub spent: Amount,
    /// Held by calls still in flight.
    pub reserved: Amount,
    /// This call's upper-bound estimate.
    pub needed: Amount,
}

impl Breach {
    /// `spent + reserved`: what the limit was already carrying when this call asked.
    pub fn current(&self) -> Amount {
        match (self.spent, self.reserved) {
            (Amount::Usd(a), Amount::Usd(b)) => Amount::Usd(a.saturating_add(b)),
            (Amount::Count(a), Amount::Count(b)) => Amount::Count(a.saturating_add(b)),
            (a, _) => a,
        }
    }

    /// "tenant_daily limit $5 reached: spent $4.10, reserved in flight $0.80, this call needs
    /// up to $0.20": shown in errors, warnings and execution rows.
    pub fn describe(&self) -> String {
        format!(
            "{} limit {} reached: spent {}, reserved in flight {}, this call needs up to {}",
            self.check.name, self.check.limit, self.spent, self.reserved, self.needed
        )
    }
}

/// Splits breaches into the first hard one (blocks the call) and soft ones (warnings).
/// `usage_of` gives a check's counter as (recorded, reserved by calls in flight).
pub fn evaluate(checks: &[Check], usage_of: impl Fn(&Check) -> (Usage, Usage), est: &Usage) -> (Option<Breach>, Vec<Breach>) {
    let mut soft = Vec::new();
    for c in checks {
        let (spent, reserved) = usage_of(c);
        if exceeds(c.limit, spent.plus(&reserved).plus(est).of(c.metric)) {
            let b = Breach { check: c.clone(), spent: spent.of(c.metric), reserved: reserved.of(c.metric), needed: est.of(c.metric) };
            if c.enforcement == Enforcement::Hard {
                return (Some(b), soft);
            }
            soft.push(b);
        }
    }
    (None, soft)
}

fn exceeds(limit: Amount, value: Amount) -> bool {
    match (limit, value) {
        (Amount::Usd(l), Amount::Usd(v)) => v > l,
        (Amount::Count(l), Amount::Count(v)) => v > l,
        _ => false,
    }
}

/// Utilisation thresholds (percent) that alert once per scope and period.
pub const ALERT_THRESHOLDS: [i64; 2] = [80, 100];

/// Thresholds of `check` reached by `usage` (the recorded total after a call settled).
pub fn thresholds_reached(check: &Check, usage: &Usage) -> Vec<i64> {
    let value = match (usage.of(check.metric), check.limit) {
        (Amount::Usd(v), Amount::Usd(_)) => v.0,
        (Amount::Count(v), Amount::Count(_)) => v,
        _ => return vec![],
    };
    ALERT_THRESHOLDS.iter().copied().filter(|t| threshold_at(check, *t).is_some_and(|at| value >= at)).collect()
}

/// The least recorded amount of `check`'s metric that reaches threshold `t` (percent of its
/// limit: `amount * 100 >= limit * t`); None when no 64-bit amount does.
pub fn threshold_at(check: &Check, t: i64) -> Option<i64> {
    let limit = match check.limit {
        Amount::Usd(l) => l.0,
        Amount::Count(l) => l,
    };
    // The ceiling of limit * t / 100.
    i64::try_from(-(-(limit as i128 * t as i128)).div_euclid(100)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn global(daily_usd: i64) -> GlobalBudgets {
        GlobalBudgets {
            limits: Limits { daily_cost: Some(Nanos(daily_usd * 1_000_000_000)), ..Default::default() },
            ..Default::default()
        }
    }

    #[test]
    fn tenant_override_wins_over_stored() {
        let g = GlobalBudgets::default();
        let over = TenantBudget { tenant_id: "t".into(), limits: Limits { daily_tokens: Some(5), ..Default::default() }, ..Default::default() };
        let stored = TenantBudget { tenant_id: "t".into(), limits: Limits { daily_tokens: Some(99), ..Default::default() }, ..Default::default() };
        let cal = Calendar::new("UTC").unwrap();
        let plan = Plan { global: &g, agent: "A", tenant_id: Some("t"), tenant_override: Some(&over) };
        let c = checks(&plan, Some(&stored), &cal, 0);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].name, "tenant_daily_tokens");
        assert_eq!(c[0].limit, Amount::Count(5));
    }

    #[test]
    fn hard_blocks_soft_warns() {
        let g = global(1);
        let cal = Calendar::new("UTC").unwrap();
        let plan = Plan { global: &g, agent: "A", tenant_id: None, tenant_override: None };
        let cs = checks(&plan, None, &cal, 0);
        let used = Usage { cost: Nanos(900_000_000), ..Default::default() };
        let est = estimate(Nanos(200_000_000), 10);
        let in_flight = Usage { cost: Nanos(50_000_000), ..Default::default() };
        let (hard, _) = evaluate(&cs, |_| (used, Usage::default()), &est);
        let b = hard.unwrap();
        assert_eq!(b.check.name, "global_daily");
        assert_eq!(b.current(), Amount::Usd(Nanos(900_000_000)));
        // exactly at the limit is allowed
        assert!(evaluate(&cs, |_| (used, Usage::default()), &estimate(Nanos(100_000_000), 1)).0.is_none());
        // ... and calls in flight count
        let b = evaluate(&cs, |_| (used, in_flight), &estimate(Nanos(100_000_000), 1)).0.unwrap();
        assert_eq!(
            b.describe(),
            "global_daily limit $1 reached: spent $0.9, reserved in flight $0.05, this call needs up to $0.1"
        );
        assert_eq!(b.current(), Amount::Usd(Nanos(950_000_000)));
        // the day ends at the next local midnight
        assert_eq!(b.check.resets_at, 86_400_000_000);
        let mut soft = g.clone();
        soft.enforcement = Enforcement::Soft;
        let plan = Plan { global: &soft, ..plan };
        let (hard, warn) = evaluate(&checks(&plan, None, &cal, 0), |_| (used, Usage::default()), &est);
        assert!(hard.is_none());
        assert_eq!(warn.len(), 1);
    }

    #[test]
    fn thresholds() {
        let c = Check {
            name: "x".into(),
            scope: "global".into(),
            period_key: "2026-11".into(),
            metric: Metric::Tokens,
            limit: Amount::Count(100),
            enforcement: Enforcement::Soft,
            tenant_budget: false,
            resets_at: 0,
        };
        assert!(thresholds_reached(&c, &Usage { tokens: 79, ..Default::default() }).is_empty());
        assert_eq!(thresholds_reached(&c, &Usage { tokens: 80, ..Default::default() }), vec![80]);
        assert_eq!(thresholds_reached(&c, &Usage { tokens: 150, ..Default::default() }), vec![80, 100]);
    }

    #[test]
    fn negative_counts_are_refused() {
        let l = Limits { monthly_tokens: Some(-1), ..Default::default() };
        assert!(l.validate().unwrap_err().to_string().contains("monthly_token_limit"));
    }
}
