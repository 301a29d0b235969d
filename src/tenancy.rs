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

pub fn validate_tenant_id(id: &str) -> Result<()> {
    if id.trim().is_empty() {
        return Err(Error::InvalidTenant("tenant_id must be a non-empty string".into()));
    }
    if id.len() > MAX_TENANT_ID_LEN {
        return Err(Error::InvalidTenant(format!("tenant_id is longer than {MAX_TENANT_ID_LEN} bytes")));
    }
    if id.chars().any(char::is_control) {
        return Err(Error::InvalidTenant(format!("tenant_id {id:?} contains control characters")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_and_keys_hidden() {
        assert!(validate_tenant_id("acme").is_ok());
        assert!(validate_tenant_id(" ").is_err());
        assert!(validate_tenant_id("a\nb").is_err());
        let mut t = TenantContext { id: Some("acme".into()), ..Default::default() };
        t.api_keys.insert("openai".into(), "sk-secret".into());
        assert!(!format!("{t:?}").contains("sk-secret"));
    }
}
