//! The engine's settings (`tl.configure(...)`), validated once when the engine is built.

use std::collections::HashMap;

use crate::budget::GlobalBudgets;
use crate::providers::MockSettings;

#[derive(Debug, Clone)]
pub struct PriceOverride {
    pub model: String,
    pub input: String,
    pub output: String,
    pub cached_input: Option<String>,
    pub cache_write: Option<String>,
    pub cache_write_1h: Option<String>,
}

#[derive(Clone)]
pub struct Config {
    pub database: String,
    /// The timezone this process expects; `None` uses the database's (`store::timezone`).
    pub timezone: Option<String>,
    pub multi_tenancy_enabled: bool,
    pub budgets: GlobalBudgets,
    pub pricing: Vec<PriceOverride>,
    /// Provider -> key, below per-tenant keys and above the environment. Never logged.
    pub api_keys: HashMap<String, String>,
    pub base_urls: HashMap<String, String>,
    pub mock: MockSettings,
    /// Keep prompts and responses in `execution_details`.
    pub store_prompts: bool,
    /// What old executions lose or are deleted, applied in the background.
    pub retention: crate::retention::Retention,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database: "tenantllm.db".into(),
            timezone: None,
            multi_tenancy_enabled: true,
            budgets: GlobalBudgets::default(),
            pricing: vec![],
            api_keys: HashMap::new(),
            base_urls: HashMap::new(),
            mock: MockSettings::default(),
            store_prompts: true,
            retention: Default::default(),
        }
    }
}

impl Config {
    /// The database setting with any password in a URL masked, for reprs and messages.
    pub fn database_display(&self) -> String {
        mask_password(&self.database)
    }
}

/// "postgresql://user:secret@host/db" -> "postgresql://user:***@host/db".
pub fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let Some((userinfo, host)) = rest.split_once('@') else { return url.to_string() };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

// Keys must never leak through Debug output.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database", &self.database_display())
            .field("timezone", &self.timezone)
            .field("multi_tenancy_enabled", &self.multi_tenancy_enabled)
            .field("budgets", &self.budgets)
            .field("pricing", &self.pricing)
            .field("api_keys", &self.api_keys.keys().collect::<Vec<_>>())
            .field("base_urls", &self.base_urls)
            .field("mock", &self.mock)
            .field("store_prompts", &self.store_prompts)
            .field("retention", &self.retention)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(mask_password("postgresql://u:hunter2@db:5432/x"), "postgresql://u:***@db:5432/x");
        assert_eq!(mask_password("postgresql://u@db/x"), "postgresql://u@db/x");
        assert_eq!(mask_password("tenantllm.db"), "tenantllm.db");
    }
}
