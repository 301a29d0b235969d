//! Circuit breaker state machine (closed -> open -> half-open -> closed/open), pure.
//! The store keeps one row per key and applies these transitions inside a transaction, so
//! every process sees the same state and exactly one half-open probe is admitted.

use crate::clock::Micros;
use crate::error::{config_err, Result};

const MICROS: i64 = 1_000_000;

/// The most failures a policy may count before opening.
pub const MAX_ERRORS: u32 = 10_000;
/// The longest `within` and `cooldown` may be: 30 days, in seconds.
pub const MAX_WINDOW_S: f64 = 30.0 * 86_400.0;

/// `BreakerPolicy(errors, within, cooldown)`: open after `errors` failures within `within`
/// seconds, stay open `cooldown` seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub errors: u32,
    pub within_s: f64,
    pub cooldown_s: f64,
}

impl Policy {
    pub fn new(errors: u32, within_s: f64, cooldown_s: f64) -> Result<Policy> {
        if !(1..=MAX_ERRORS).contains(&errors) {
            return config_err(format!("circuit_breaker.errors must be between 1 and {MAX_ERRORS} (got {errors})"));
        }
        for (name, v) in [("within", within_s), ("cooldown", cooldown_s)] {
            // NaN fails both comparisons.
            if !(v > 0.0 && v <= MAX_WINDOW_S) {
                return config_err(format!(
                    "circuit_breaker.{name} must be more than 0 and at most {MAX_WINDOW_S} seconds (30 days) (got {v})"
                ));
            }
        }
        Ok(Policy { errors, within_s, cooldown_s })
    }
    fn within(&self) -> i64 {
        (self.within_s * MICROS as f64) as i64
    }
    fn cooldown(&self) -> i64 {
        (self.cooldown_s * MICROS as f64) as i64
    }
    /// The numbers `record` applies to an outcome at `now`.
    pub fn at(&self, now: Micros) -> Thresholds {
        Thresholds { since: now - self.within(), errors: self.errors, open_until: now + self.cooldown() }
    }
}

/// What `record` applies to an outcome at a given time besides the stored state: the
/// failures after `since` count, `errors` of them open the breaker, and an opened breaker
/// cools down until `open_until`. PostgreSQL's settlement passes them to the server, which
/// applies `record`'s rule on the locked row (store/postgres/server_side.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub since: Micros,
    pub errors: u32,
    pub open_until: Micros,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    #[default]
    Closed,
    Open,
    HalfOpen,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Closed => "closed",
            Phase::Open => "open",
            Phase::HalfOpen => "half_open",
        }
    }
    pub fn parse(s: &str) -> Option<Phase> {
        match s {
            "closed" => Some(Phase::Closed),
            "open" => Some(Phase::Open),
            "half_open" => Some(Phase::HalfOpen),
            _ => None,
        }
    }
}

/// The stored state of one breaker key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub phase: Phase,
    /// Recent failure times (closed phase), oldest first, at most `errors` of them.
    pub failures: Vec<Micros>,
    /// Open: when a probe may go. Half-open: when the in-flight probe's claim lapses.
    pub retry_at: Micros,
}

impl State {
    pub fn encode_failures(&self) -> String {
        self.failures.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(",")
    }
    pub fn decode_failures(s: &str) -> Vec<Micros> {
        s.split(',').filter_map(|x| x.parse().ok()).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    /// Closed: go ahead.
    Pass,
    /// Half-open: this call is the one probe.
    Probe,
    /// Open (or a probe is already in flight): skip until `retry_at`.
    Reject { retry_at: Micros },
}

/// How long a half-open probe's claim lasts if its process dies before reporting.
pub fn probe_lease(attempt_timeout_s: f64) -> i64 {
    ((attempt_timeout_s.max(1.0) + 5.0) * MICROS as f64) as i64
}

/// Decides admission; returns the new state to store when it changed.
pub fn admit(s: &State, now: Micros, probe_lease: i64) -> (Admission, Option<State>) {
    match s.phase {
        Phase::Closed => (Admission::Pass, None),
        Phase::Open | Phase::HalfOpen if now < s.retry_at => (Admission::Reject { retry_at: s.retry_at }, None),
        // Cooldown over (or the last probe's claim lapsed): this call claims the probe.
        Phase::Open | Phase::HalfOpen => {
            (Admission::Probe, Some(State { phase: Phase::HalfOpen, failures: vec![], retry_at: now + probe_lease }))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Opened,
    Closed,
}

/// Applies an outcome; returns the new state (when changed) and the event to alert on.
pub fn record(s: &State, p: &Policy, success: bool, was_probe: bool, now: Micros) -> (Option<State>, Option<Event>) {
    let t = p.at(now);
    let open = State { phase: Phase::Open, failures: vec![], retry_at: t.open_until };
    match (s.phase, success) {
        (Phase::HalfOpen, true) if was_probe => (Some(State::default()), Some(Event::Closed)),
        (Phase::HalfOpen, false) if was_probe => (Some(open), Some(Event::Opened)),
        (Phase::Closed, false) => {
            let mut failures: Vec<Micros> = s.failures.iter().copied().filter(|f| *f > t.since).collect();
            failures.push(now);
            if failures.len() >= t.errors as usize {
                (Some(open), Some(Event::Opened))
            } else {
                (Some(State { phase: Phase::Closed, failures, retry_at: 0 }), None)
            }
        }
        // Successes while closed change nothing (no write on the hot path); outcomes of
        // calls admitted before the breaker opened do not move an open breaker.
        _ => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = MICROS;

    #[test]
    fn opens_after_errors_within_window_then_probes_once() {
        let p = Policy::new(3, 60.0, 300.0).unwrap();
        let mut s = State::default();
        for t in [0, 10 * S] {
            let (n, e) = record(&s, &p, false, false, t);
            s = n.unwrap();
            assert!(e.is_none());
        }
        let (n, e) = record(&s, &p, false, false, 20 * S);
        s = n.unwrap();
        assert_eq!((s.phase, e), (Phase::Open, Some(Event::Opened)));
        assert_eq!(admit(&s, 100 * S, 35 * S).0, Admission::Reject { retry_at: 320 * S });
        let (a, n) = admit(&s, 320 * S, 35 * S);
        assert_eq!(a, Admission::Probe);
        let half = n.unwrap();
        // A second caller while the probe is in flight is rejected.
        assert!(matches!(admit(&half, 321 * S, 35 * S).0, Admission::Reject { .. }));
        let (closed, e) = record(&half, &p, true, true, 322 * S);
        assert_eq!((closed.unwrap().phase, e), (Phase::Closed, Some(Event::Closed)));
        let (reopened, e) = record(&half, &p, false, true, 322 * S);
        assert_eq!((reopened.unwrap().retry_at, e), (622 * S, Some(Event::Opened)));
    }

    #[test]
    fn old_failures_fall_out_of_the_window() {
        let p = Policy::new(2, 60.0, 300.0).unwrap();
        let (s, _) = record(&State::default(), &p, false, false, 0);
        let (s, e) = record(&s.unwrap(), &p, false, false, 61 * S);
        assert_eq!(s.unwrap().phase, Phase::Closed);
        assert!(e.is_none());
    }

    #[test]
    fn bad_policies() {
        assert!(Policy::new(0, 1.0, 1.0).is_err());
        assert!(Policy::new(1, f64::NAN, 1.0).unwrap_err().to_string().contains("within"));
        assert!(Policy::new(1, 1.0, -5.0).unwrap_err().to_string().contains("cooldown"));
    }
}
