//! The tenant a call runs for, as resolved by the Python layer (ids, limits, keys: plain data).

use std::collections::HashMap;

use crate::budget::TenantBudget;
use crate::error::{Error, Result};

#[derive(Clone, Default)]
pub struct TenantContext {
    pub id: Option<String>,
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
        let mut t = TenantContext { id: Some("acme".into()), ..Default::default() };
        t.api_keys.insert("openai".into(), "sk-secret".into());
        assert!(!format!("{t:?}").contains("sk-secret"));
    }
}
