"""Type stubs for the Rust extension `tenantllm._core` (checked by mypy.stubtest)."""

from collections.abc import Awaitable, Mapping
from decimal import Decimal
from typing import Any, final

__version__: str
__all__ = [
    "AgentResult",
    "AgentSpec",
    "AllModelsExhaustedError",
    "AuthenticationError",
    "BudgetExceededError",
    "CircuitOpenError",
    "ConfigurationError",
    "Engine",
    "InvalidResponseError",
    "InvalidTenantError",
    "MissingParameterError",
    "ProviderError",
    "ProviderTimeoutError",
    "RateLimitError",
    "StoreError",
    "TenantLLMError",
    "__version__",
]

class TenantLLMError(Exception): ...
class BudgetExceededError(TenantLLMError):
    scope: str
    limit: Decimal | int
    current: Decimal | int
    tenant_id: str | None
    agent: str
    tenant_budget: bool
    execution_id: str
class CircuitOpenError(TenantLLMError):
    agent: str
    tenant_id: str | None
    model: str
    retry_at: Any
    execution_id: str
class AllModelsExhaustedError(TenantLLMError):
    errors: list[dict[str, Any]]
class ProviderError(TenantLLMError):
    provider: str
    model: str
    status: int | None
    retryable: bool
    retry_after: float | None
class AuthenticationError(ProviderError): ...
class RateLimitError(ProviderError): ...
class ProviderTimeoutError(ProviderError): ...
class InvalidResponseError(ProviderError): ...
class ConfigurationError(TenantLLMError): ...
class InvalidTenantError(TenantLLMError): ...
class MissingParameterError(TenantLLMError): ...
class StoreError(TenantLLMError): ...

@final
class AgentSpec:
    def __new__(
        cls,
        name: str,
        model: str,
        *,
        fallback_models: list[str] = ...,
        temperature: float | None = None,
        max_tokens: int = 1024,
        timeout: float = 30.0,
        retries: int = 0,
        backoff: str = ...,
        base: float = 0.4,
        max_delay: float = 3.0,
        breaker: tuple[int, float, float] | None = None,
    ) -> AgentSpec: ...
    @property
    def name(self) -> str: ...

@final
class AgentResult:
    @property
    def content(self) -> str: ...
    @property
    def model_id(self) -> str: ...
    @property
    def chosen_model_id(self) -> str: ...
    @property
    def provider(self) -> str: ...
    @property
    def input_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int: ...
    @property
    def total_tokens(self) -> int: ...
    @property
    def input_cost(self) -> Decimal: ...
    @property
    def output_cost(self) -> Decimal: ...
    @property
    def total_cost(self) -> Decimal: ...
    @property
    def duration_ms(self) -> int: ...
    @property
    def attempts_count(self) -> int: ...
    @property
    def execution_id(self) -> str: ...
    @property
    def tenant_id(self) -> str | None: ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def budget_warnings(self) -> list[str]: ...

@final
class Engine:
    def __new__(cls, config: Mapping[str, Any]) -> Engine: ...
    @property
    def database(self) -> str: ...
    @property
    def timezone(self) -> str: ...
    @property
    def multi_tenancy_enabled(self) -> bool: ...
    def run(
        self,
        spec: AgentSpec,
        system: str | None,
        user: str,
        tenant_id: str | None = None,
        tenant_limits: Mapping[str, Any] | None = None,
        api_keys: Mapping[str, str] | None = None,
        metadata: str = ...,
        parent_execution_id: str | None = None,
    ) -> AgentResult: ...
    def arun(
        self,
        spec: AgentSpec,
        system: str | None,
        user: str,
        tenant_id: str | None = None,
        tenant_limits: Mapping[str, Any] | None = None,
        api_keys: Mapping[str, str] | None = None,
        metadata: str = ...,
        parent_execution_id: str | None = None,
    ) -> Awaitable[AgentResult]: ...
    def plan(
        self,
        spec: AgentSpec,
        system: str | None,
        user: str,
        tenant_id: str | None = None,
        tenant_limits: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]: ...
    def drain_alerts(self) -> list[dict[str, Any]]: ...
    def query_rows(self, ops: list[tuple[Any, ...]]) -> list[dict[str, Any]]: ...
    def query_aggregate(self, ops: list[tuple[Any, ...]], field: str | None = None) -> Any: ...
    def query_grouped(self, ops: list[tuple[Any, ...]], by: str, field: str | None = None) -> dict[Any, Any]: ...
    def get_execution(self, id: str) -> dict[str, Any] | None: ...
    def budget_get(self, tenant_id: str) -> dict[str, Any] | None: ...
    def budget_put(self, tenant_id: Any, fields: Mapping[str, Any], create_only: bool) -> dict[str, Any]: ...
    def budget_delete(self, tenant_id: str) -> bool: ...
    def budget_all(self) -> list[dict[str, Any]]: ...
    def tenant_usage(self, tenant_id: str) -> dict[str, dict[str, Any]]: ...
    def global_limits(self) -> dict[str, Any]: ...
    def usage_by_tenant(self, period: str) -> dict[str, dict[str, Any]]: ...
    def rebuild_counters(self) -> int: ...
    def breaker_status(self, agent: str, model: str, tenant_id: str | None = None) -> dict[str, Any]: ...
    def breaker_reset(self, agent: str, model: str, tenant_id: str | None = None) -> None: ...
    def breakers_not_closed(self) -> list[dict[str, Any]]: ...
