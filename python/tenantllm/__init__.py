"""tenantllm: per-tenant budgets, circuit breakers, API keys and execution tracking for LLM
agents, with the hot path in a Rust core."""

import atexit

from tenantllm import _core, alerts
from tenantllm._core import (
    AgentResult,
    AllModelsExhaustedError,
    AuthenticationError,
    BudgetExceededError,
    CircuitOpenError,
    ConfigurationError,
    InternalError,
    InvalidResponseError,
    InvalidTenantError,
    MissingParameterError,
    ProviderError,
    ProviderTimeoutError,
    RateLimitedError,
    RateLimitError,
    StoreError,
    TenantLLMError,
    __version__,
)
from tenantllm.agent import Agent, BreakerPolicy, Downgrade, Retries
from tenantllm.api_keys import ApiConfiguration
from tenantllm.breaker import CircuitBreaker
from tenantllm.budget import TenantBudget, rebuild_counters, spend_by_tenant
from tenantllm.config import configure, set_timezone
from tenantllm.decorators import AgentFunction, AsyncAgentFunction, UsageNotReported, agent, guard, guarded
from tenantllm.execution import Execution, ExecutionQuery
from tenantllm.retention import purge
from tenantllm.tenancy import llm_tenant, tenant
from tenantllm.tenants import SeenTenant, tenants

# Async calls still in flight at exit (an `acall` cancelled as its event loop closed) settle
# while the interpreter is alive, instead of after it is gone.
atexit.register(_core.drain_tasks, 5.0)

__all__ = [
    "Agent",
    "AgentFunction",
    "AgentResult",
    "AllModelsExhaustedError",
    "ApiConfiguration",
    "AsyncAgentFunction",
    "AuthenticationError",
    "BreakerPolicy",
    "BudgetExceededError",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConfigurationError",
    "Downgrade",
    "Execution",
    "ExecutionQuery",
    "InternalError",
    "InvalidResponseError",
    "InvalidTenantError",
    "MissingParameterError",
    "ProviderError",
    "ProviderTimeoutError",
    "RateLimitError",
    "RateLimitedError",
    "Retries",
    "SeenTenant",
    "StoreError",
    "TenantBudget",
    "TenantLLMError",
    "UsageNotReported",
    "__version__",
    "agent",
    "alerts",
    "configure",
    "guard",
    "guarded",
    "llm_tenant",
    "purge",
    "rebuild_counters",
    "set_timezone",
    "spend_by_tenant",
    "tenant",
    "tenants",
]
