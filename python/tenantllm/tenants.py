"""The register of tenants seen (DESIGN §1b): every tenant a call ran for, budget or not,
with the name the app gave it and its first and last use."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from tenantllm.config import engine


@dataclass(frozen=True)
class SeenTenant:
    """One tenant of the register. `name` is the latest one a call gave (`@llm_tenant(name=...)`
    or a tenant dict's "name"), None if none ever did. Times are aware (UTC); `last_used_at` is
    accurate to an hour: a process writes the register at a tenant's first call, then again
    only once an hour has passed or the name changed, so remembering costs no write per call."""

    id: str
    name: str | None
    first_used_at: datetime
    last_used_at: datetime


def tenants() -> list[SeenTenant]:
    """Every tenant seen, by id."""
    return [SeenTenant(**row) for row in engine().tenants()]
