"""`ApiConfiguration`: provider keys stored encrypted in the database (needs
TENANTLLM_SECRET_KEY), globally or per tenant."""

from __future__ import annotations

from tenantllm._core import InvalidTenantError
from tenantllm.config import engine


class ApiConfiguration:
    """Per call, a provider's key is taken from (highest first): the tenant object's
    `api_keys`, the runtime `tenant={"api_keys": ...}`, `set_for_tenant`, `set_global`,
    `configure(api_keys=...)`, the environment. Blank values fall through."""

    @staticmethod
    def set_global(**keys: str | None) -> None:
        """`set_global(openai="sk-...")`; a None or blank value removes that key."""
        engine().set_api_keys(list(keys.items()))

    @staticmethod
    def set_for_tenant(tenant_id: str, **keys: str | None) -> None:
        """`set_for_tenant("acme", anthropic="sk-ant-...")`; None or blank removes it."""
        if tenant_id is None:  # the core would take None for "global"
            raise InvalidTenantError("set_for_tenant: tenant_id must be a non-empty string, got None")
        engine().set_api_keys(list(keys.items()), tenant_id)

    @staticmethod
    def providers(tenant_id: str | None = None) -> list[str]:
        """Providers with a stored key for the tenant (or globally). Keys are never returned."""
        return engine().stored_key_providers(tenant_id)
