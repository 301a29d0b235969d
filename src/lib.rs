//! tenantllm core: per-tenant budgets, circuit breakers, provider calls and execution
//! tracking for LLM agents. Pure Rust; the Python bindings live in `python/` only.

pub mod breaker;
pub mod budget;
pub mod cache;
pub mod clock;
pub mod config;
pub mod engine;
pub mod error;
pub mod execution;
pub mod lease;
pub mod money;
pub mod pricing;
pub mod ratelimit;
pub mod process;
pub mod providers;
pub mod retention;
pub mod retry;
pub mod secrets;
pub mod store;
pub mod tenancy;

#[cfg(feature = "python")]
mod python;
