//! The tenant a call runs for, as resolved by the Python layer (ids, limits, keys: plain data).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::budget::TenantBudget;
use crate::clock::Micros;
use crate::error::{Error, Result};
use crate::process::unpoisoned;

#[derive(Clone, Default)]
pub struct TenantContext {
    pub id: Option<String>,
    /// What the app calls the tenant (`@llm_tenant(name=...)`, a tenant dict's "name"), kept
    /// in the register of tenants seen.
    pub name: Option<String>,
    /// Limits given at run time or by `tenant_config_resolver`; replaces the stored budget.
    pub limits: Option<TenantBudget>,
    /// Per-call provider keys (already resolved by precedence); never stored or logged.
    pub api_keys: HashMap<String, String>,
}

// Keys must never leak through Debug output.
impl std::fmt::Debug for TenantContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantContext")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("limits", &self.limits)
            .field("api_keys", &self.api_keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

pub const MAX_TENANT_ID_LEN: usize = 255;

/// What tenant ids and agent names must be: they become counter scopes ("tenant:<id>",
/// "agent:<name>") and reservations keep their counters as "scope<TAB>period" lines, so a
/// control character would corrupt what a reservation releases.
fn check_name(what: &str, s: &str) -> std::result::Result<(), String> {
    if s.trim().is_empty() {
        return Err(format!("{what} must be a non-empty string"));
    }
    if s.len() > MAX_TENANT_ID_LEN {
        return Err(format!("{what} is longer than {MAX_TENANT_ID_LEN} bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{what} {s:?} contains control characters"));
    }
    Ok(())
}

pub fn validate_tenant_id(id: &str) -> Result<()> {
    check_name("tenant_id", id).map_err(Error::InvalidTenant)
}

/// A tenant's name (`@llm_tenant(name=...)`, a tenant dict's "name"): the same rules as ids.
pub fn validate_tenant_name(name: &str) -> Result<()> {
    check_name("tenant name", name).map_err(Error::InvalidTenant)
}

/// A tenant the register remembers (DESIGN §1b): every tenant a call ran for, budget or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenTenant {
    pub id: String,
    /// The latest name a call gave; a call that gave none leaves it.
    pub name: Option<String>,
    pub first_used_at: Micros,
    /// Accurate to `SEEN_REFRESH`: later calls of a process within it write nothing.
    pub last_used_at: Micros,
}

/// How stale a tenant's last use in the register may get: a process writes it at the
/// admission of its first call for the tenant, then once this long has passed or the name
/// changed, so remembering tenants costs no write on nearly every call. An hour, microseconds.
pub const SEEN_REFRESH: Micros = 3_600_000_000;
/// How many tenants a process remembers having written; past it, it starts again (which
/// costs one more write per tenant, nothing else).
const SEEN_CAPACITY: usize = 100_000;

/// The tenants this process wrote to the register, with when and under which name.
#[derive(Default)]
pub struct SeenCache(Mutex<HashMap<String, (Micros, Option<String>)>>);

impl SeenCache {
    /// Whether an admission for this tenant at `now` should write the register.
    pub fn due(&self, id: &str, name: Option<&str>, now: Micros) -> bool {
        match unpoisoned(self.0.lock()).get(id) {
            None => true,
            Some((at, known)) => now - at >= SEEN_REFRESH || (name.is_some() && known.as_deref() != name),
        }
    }

    /// Notes a committed write of the register.
    pub fn written(&self, id: &str, name: Option<&str>, now: Micros) {
        let mut m = unpoisoned(self.0.lock());
        if m.len() >= SEEN_CAPACITY && !m.contains_key(id) {
            m.clear();
        }
        let known = name.map(str::to_string).or_else(|| m.get(id).and_then(|(_, n)| n.clone()));
        m.insert(id.to_string(), (now, known));
    }
}

/// Agent names (classes, `@agent` functions, `guarded(agent=...)`, `per_agent_*` budgets):
/// the same rules as tenant ids.
pub fn validate_agent_name(name: &str) -> Result<()> {
    check_name("agent name", name).map_err(Error::Configuration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_and_keys_hidden() {
        assert!(validate_tenant_id("acme").is_ok());
        assert!(validate_tenant_id(" ").is_err());
        assert!(validate_tenant_id("a\nb").is_err());
        assert!(validate_agent_name("Batch nightly").is_ok());
        for bad in ["Batch\tnightly", "a\nb", "", " ", &"x".repeat(256)] {
            assert!(matches!(validate_agent_name(bad), Err(Error::Configuration(_))), "{bad:?}");
        }
        assert!(validate_tenant_name("Acme, Inc.").is_ok());
        assert!(matches!(validate_tenant_name("a\nb"), Err(Error::InvalidTenant(_))));
        let mut t = TenantContext { id: Some("acme".into()), ..Default::default() };
        t.api_keys.insert("openai".into(), "sk-secret".into());
        assert!(!format!("{t:?}").contains("sk-secret"));
    }

    #[test]
    fn a_tenant_is_written_when_new_renamed_or_stale() {
        let seen = SeenCache::default();
        assert!(seen.due("a", None, 0));
        seen.written("a", Some("Acme"), 0);
        assert!(!seen.due("a", None, 10));
        assert!(!seen.due("a", Some("Acme"), SEEN_REFRESH - 1));
        assert!(seen.due("a", Some("Acme Corp"), 10));
        assert!(seen.due("a", None, SEEN_REFRESH));
        // A write without a name keeps the name known.
        seen.written("a", None, 20);
        assert!(!seen.due("a", Some("Acme"), 30));
    }
}
