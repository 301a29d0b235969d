//! Keeping in-flight reservations alive.
//!
//! A reservation is a lease: admission writes `expires_at = now + length`, and a process
//! that dies mid-call leaves its reservation to run out, so another process's admission
//! frees it (the row is closed as `Abandoned`). A live process renews the leases of all its
//! reservations from one background thread, in one write per renewal, so a call, stream or
//! guarded block keeps its reservation however long it runs, and a crashed process's
//! reservations free within `length` whatever the call's length.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::clock::{now_micros, Micros};
use crate::error::{config_err, Result};
use crate::process::unpoisoned;
use crate::store::Store;

/// Shortens (or lengthens) the lease, e.g. for tests; seconds, from 1 to 3600.
pub const LEASE_ENV: &str = "TENANTLLM_LEASE_SECONDS";
/// A reservation's lease unless `LEASE_ENV` says otherwise.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(120);
/// Renewals per lease: three renewals may fail (a busy database) before a lease runs out.
const RENEWALS_PER_LEASE: u32 = 4;

/// This process's in-flight reservations and the thread that renews them.
pub struct Leases {
    length: Duration,
    /// Execution id -> until when its lease is renewed (the call's worst-case end, or a
    /// guarded block's timeout), so a block stuck forever still frees its reservation.
    held: Arc<Mutex<HashMap<String, Instant>>>,
    /// Dropping the sender (with the engine) stops the renewer; started on first use.
    renewer: OnceLock<mpsc::Sender<()>>,
}

impl Leases {
    /// Reads `LEASE_ENV`.
    pub fn from_env() -> Result<Leases> {
        let length = match std::env::var(LEASE_ENV) {
            Err(_) => DEFAULT_LEASE,
            Ok(v) => match v.trim().parse::<f64>() {
                Ok(s) if (1.0..=3600.0).contains(&s) => Duration::from_secs_f64(s),
                _ => return config_err(format!("{LEASE_ENV} must be a number of seconds from 1 to 3600 (got {v:?})")),
            },
        };
        Ok(Leases { length, held: Arc::default(), renewer: OnceLock::new() })
    }

    pub fn length(&self) -> Duration {
        self.length
    }

    /// When a reservation admitted at `now` expires unless renewed.
    pub fn expires_at(&self, now: Micros) -> Micros {
        now + self.length.as_micros() as Micros
    }

    /// Renews `execution_id`'s lease until `until` or until `release`. Should the renewer
    /// thread fail to start (no threads left), the lease simply runs out as before renewal
    /// existed; the call itself goes on.
    pub fn hold(&self, store: &Arc<dyn Store>, execution_id: &str, until: Instant) {
        self.start_renewer(store);
        unpoisoned(self.held.lock()).insert(execution_id.to_string(), until);
    }

    pub fn release(&self, execution_id: &str) {
        unpoisoned(self.held.lock()).remove(execution_id);
    }

    fn start_renewer(&self, store: &Arc<dyn Store>) {
        if self.renewer.get().is_some() {
            return;
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let (store, held, length) = (store.clone(), self.held.clone(), self.length);
        let every = length / RENEWALS_PER_LEASE;
        // Two threads may race here; the loser's thread stops at once (its sender is dropped).
        let started = std::thread::Builder::new()
            .name("tenantllm-lease".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    let now = Instant::now();
                    let ids: Vec<String> = {
                        let mut held = unpoisoned(held.lock());
                        held.retain(|_, until| *until > now);
                        held.keys().cloned().collect()
                    };
                    if !ids.is_empty() {
                        // A failed renewal is retried at the next tick, well before the lease ends.
                        let _ = store.renew_leases(&ids, now_micros() + length.as_micros() as Micros);
                    }
                }
            });
        if started.is_ok() {
            let _ = self.renewer.set(stop);
        }
    }
}
