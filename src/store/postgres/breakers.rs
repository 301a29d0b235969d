//! Circuit breakers: read without a lock, locked only when a call would change one.

use super::connect::PgResult;
use super::db::{Db, OnCommitLoss, Tx};
use super::PostgresStore;
use crate::breaker::{self, Admission, Phase};
use crate::clock::Micros;
use crate::error::{Error, Result};
use crate::store::{Alert, BreakerKey, BreakerOutcome, BreakerStatus};

/// A breaker's stored state (`None`: no row, which reads as closed); with `lock`, the row is
/// locked until the transaction ends.
pub(super) fn breaker_row(db: &mut Db<'_, impl Sized>, key: &BreakerKey, lock: bool) -> PgResult<Option<breaker::State>> {
    let sql = if lock {
        "SELECT phase, failures, retry_at FROM breakers WHERE key = $1 FOR UPDATE"
    } else {
        "SELECT phase, failures, retry_at FROM breakers WHERE key = $1"
    };
    let Some(r) = db.query_opt(sql, &[&key.id()])? else { return Ok(None) };
    let phase: String = r.try_get(0)?;
    let failures: String = r.try_get(1)?;
    Ok(Some(breaker::State {
        phase: Phase::parse(&phase).ok_or_else(|| Error::Store(format!("breaker {}: corrupt phase {phase:?}", key.id())))?,
        failures: breaker::State::decode_failures(&failures),
        retry_at: r.try_get(2)?,
    }))
}

pub(super) fn breaker_put(db: &mut Tx<'_>, key: &BreakerKey, s: &breaker::State, now: Micros) -> PgResult<()> {
    db.execute(
        "INSERT INTO breakers (key, agent, model, tenant_id, phase, failures, retry_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (key) DO UPDATE SET phase = EXCLUDED.phase, failures = EXCLUDED.failures,
             retry_at = EXCLUDED.retry_at, updated_at = EXCLUDED.updated_at",
        &[&key.id(), &key.agent, &key.model, &key.tenant_id, &s.phase.as_str(), &s.encode_failures(), &s.retry_at, &now],
    )?;
    Ok(())
}

/// The breaker row, locked; created (closed) first if there is none, so there is a row to lock.
pub(super) fn breaker_locked(db: &mut Tx<'_>, key: &BreakerKey, now: Micros) -> PgResult<breaker::State> {
    if let Some(s) = breaker_row(db, key, true)? {
        return Ok(s);
    }
    db.execute(
        "INSERT INTO breakers (key, agent, model, tenant_id, phase, failures, retry_at, updated_at)
         VALUES ($1, $2, $3, $4, 'closed', '', 0, $5) ON CONFLICT (key) DO NOTHING",
        &[&key.id(), &key.agent, &key.model, &key.tenant_id, &now],
    )?;
    Ok(breaker_row(db, key, true)?.unwrap_or_default())
}

pub(super) fn breaker_admit_tx(db: &mut Tx<'_>, key: &BreakerKey, lease: i64, now: Micros) -> PgResult<Admission> {
    let state = breaker_row(db, key, false)?.unwrap_or_default();
    if let (admission, None) = breaker::admit(&state, now, lease) {
        // Closed, or open and cooling down: nothing to write, no lock needed.
        return Ok(admission);
    }
    // This call would claim the half-open probe: decide again on the locked row, so that of
    // racing processes exactly one claims it and the others see its claim.
    let state = breaker_locked(db, key, now)?;
    let (admission, new) = breaker::admit(&state, now, lease);
    if let Some(new) = new {
        breaker_put(db, key, &new, now)?;
    }
    Ok(admission)
}

/// Applies one call's outcome to its breaker; returns the alert it raises, if any.
pub(super) fn breaker_record(db: &mut Tx<'_>, o: &BreakerOutcome, now: Micros) -> PgResult<Option<Alert>> {
    let state = breaker_row(db, &o.key, false)?.unwrap_or_default();
    if breaker::record(&state, &o.policy, o.success, o.probe, now).0.is_none() {
        // The common case (a success while closed): nothing changes, nothing is locked.
        return Ok(None);
    }
    let state = breaker_locked(db, &o.key, now)?;
    let (new, event) = breaker::record(&state, &o.policy, o.success, o.probe, now);
    if let Some(new) = &new {
        breaker_put(db, &o.key, new, now)?;
    }
    Ok(match (event, new) {
        (Some(breaker::Event::Opened), Some(s)) => Some(Alert::BreakerOpened { key: o.key.clone(), retry_at: s.retry_at }),
        (Some(breaker::Event::Closed), _) => Some(Alert::BreakerClosed { key: o.key.clone() }),
        _ => None,
    })
}

pub(super) fn breaker_admit(store: &PostgresStore, key: &BreakerKey, lease: i64, now: Micros) -> Result<Admission> {
    // Only a claimed probe writes; it is there if the row holds exactly that claim.
    let check = |db: &mut Tx<'_>, a: &Admission| -> PgResult<bool> {
        Ok(match a {
            Admission::Probe => breaker_row(db, key, true)?.is_some_and(|s| s.phase == Phase::HalfOpen && s.retry_at == now + lease),
            _ => true,
        })
    };
    store.write(OnCommitLoss::Check(&check), |db| breaker_admit_tx(db, key, lease, now))
}

pub(super) fn breaker_status(store: &PostgresStore, key: &BreakerKey) -> Result<breaker::State> {
    store.read(|db| Ok(breaker_row(db, key, false)?.unwrap_or_default()))
}

pub(super) fn breaker_reset(store: &PostgresStore, key: &BreakerKey) -> Result<()> {
    store.write(OnCommitLoss::Rerun, |db| db.execute("DELETE FROM breakers WHERE key = $1", &[&key.id()]).map(|_| ()))
}

pub(super) fn breakers_not_closed(store: &PostgresStore) -> Result<Vec<BreakerStatus>> {
    store.read(|db| {
        let rows = db.query("SELECT agent, model, tenant_id, phase, failures, retry_at FROM breakers WHERE phase <> 'closed' ORDER BY retry_at", &[])?;
        rows.iter()
            .map(|r| {
                let phase: String = r.try_get(3)?;
                let failures: String = r.try_get(4)?;
                Ok(BreakerStatus {
                    key: BreakerKey { agent: r.try_get(0)?, model: r.try_get(1)?, tenant_id: r.try_get(2)? },
                    state: breaker::State {
                        phase: Phase::parse(&phase).unwrap_or(Phase::Open),
                        failures: breaker::State::decode_failures(&failures),
                        retry_at: r.try_get(5)?,
                    },
                })
            })
            .collect()
    })
}
