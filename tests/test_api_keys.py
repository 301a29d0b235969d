"""Tenant API keys end to end, against the local fake provider server: `@llm_tenant` objects
(Django-model-like, dataclass, plain class with a key method), the resolution chain
(tenant object / runtime dict > `set_for_tenant` > `set_global` > `configure(api_keys=)` > env),
isolation under concurrency, `ApiConfiguration` (encrypted at rest with TENANTLLM_SECRET_KEY),
and invariant 5: a key never shows up in executions, errors, reprs, logs or the database file."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import tenantllm as tl
from fake_providers import FakeProvider, Recorded, Step

SECRET_ENV = "TENANTLLM_SECRET_KEY"
SECRET = "tenantllm-test-secret-4b1d9a77"
WRONG_SECRET = "a-different-secret-e02c5f13"
LOCAL_PRICE = {"input": "0.10", "output": "0.20"}

PROVIDERS = ["openai", "anthropic", "gemini", "deepseek", "mistral", "local"]
MODELS = {
    "openai": "gpt-4o",
    "anthropic": "claude-sonnet-4-5",
    "gemini": "gemini-2.5-flash",
    "deepseek": "deepseek/deepseek-flash",
    "mistral": "mistral-small-latest",
    "local": "local/llama3",
}
ENV_VARS = {
    "openai": ["OPENAI_API_KEY"],
    "anthropic": ["ANTHROPIC_API_KEY"],
    "gemini": ["GEMINI_API_KEY", "GOOGLE_API_KEY"],
    "deepseek": ["DEEPSEEK_API_KEY"],
    "mistral": ["MISTRAL_API_KEY"],
    "local": ["LOCAL_API_KEY"],
}

# Long, distinctive keys, so "this key does not appear in X" means something.
K_CONF = "sk-configured-global-6d02b7c1"
K_ENV = "sk-from-environment-93ae51f0"
K_GLOBAL = "sk-stored-global-0a7e3dd4"
K_TENANT = "sk-stored-tenant-acme-5c88e2a9"
K_OBJ = "sk-tenant-object-acme-4f1c9e"
K_DICT = "sk-runtime-dict-acme-b71f30"
K_ALPHA = "sk-tenant-alpha-2e9d41c7"
K_BETA = "sk-tenant-beta-8a13f05e"


def provider_key(provider: str, owner: str) -> str:
    return f"sk-{provider}-{owner}-7c3e19f2ab"


# ---------------------------------------------------------------- fake server and setup


@pytest.fixture
def fp(server: FakeProvider, monkeypatch: pytest.MonkeyPatch) -> FakeProvider:
    """The module's fake server, reset; no provider key and no secret in the environment."""
    server.reset()
    for names in ENV_VARS.values():
        for name in names:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(SECRET_ENV, raising=False)
    return server


Cfg = Callable[..., None]


@pytest.fixture
def cfg(fp: FakeProvider, db_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cfg:
    """Configures every provider against the fake server on this test's database. The secret
    is put in the environment first, since `configure()` reads it when building the engine."""

    def reconfigure(*, secret: str | None = SECRET, api_keys: dict[str, str] | None = None, **options: Any) -> None:
        if secret is None:
            monkeypatch.delenv(SECRET_ENV, raising=False)
        else:
            monkeypatch.setenv(SECRET_ENV, secret)
        tl.configure(
            database=str(db_path),
            base_urls=fp.base_urls(),
            pricing={"local/llama3": LOCAL_PRICE},
            api_keys=api_keys or {},
            **options,
        )

    return reconfigure


def _agent(provider: str, **attrs: Any) -> type[tl.Agent]:
    body = {"model": MODELS[provider], "user": "{prompt}", "max_tokens": 64, **attrs}
    return type(f"KeyAgent_{provider}", (tl.Agent,), body)


AGENTS = {p: _agent(p) for p in PROVIDERS}
_DEFAULT: Any = object()


def ask(provider: str = "openai", tenant: Any = _DEFAULT, prompt: str = "hello") -> Any:
    agent = AGENTS[provider]
    if tenant is _DEFAULT:
        return agent.call(prompt=prompt)
    return agent.call(prompt=prompt, tenant=tenant)


def sent_key(req: Recorded, provider: str) -> str | None:
    """The key a request carried, in the provider's own header."""
    if provider == "anthropic":
        return req.headers.get("x-api-key")
    if provider == "gemini":
        return req.headers.get("x-goog-api-key")
    auth = req.headers.get("authorization")
    return None if auth is None else auth.removeprefix("Bearer ")


def last_key(fp: FakeProvider, provider: str = "openai") -> str | None:
    assert fp.requests, "no request reached the fake provider"
    return sent_key(fp.requests[-1], provider)


def user_text(req: Recorded) -> str:
    body = req.body or {}
    if "contents" in body:
        return "".join(str(p.get("text", "")) for c in body["contents"] for p in c.get("parts", []))
    return "".join(str(m.get("content", "")) for m in body.get("messages", []) if m.get("role") == "user")


def db_bytes(db: Path) -> bytes:
    """The database file and its write-ahead log, as stored on disk."""
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())


def assert_not_in(keys: list[str], *texts: str) -> None:
    for key in keys:
        for text in texts:
            assert key not in text, f"key {key!r} leaked into: {text[:300]!r}"


# ---------------------------------------------------------------- tenant classes


class Model:
    """A stand-in for django.db.models.Model: fields are instance attributes set by __init__."""

    def __init__(self, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(self, name, value)


@tl.llm_tenant(
    id="pk", name="company_name", api_keys={"openai": "openai_api_key", "anthropic": "anthropic_api_key"}
)
class Organization(Model):
    pk: int
    company_name: str
    openai_api_key: str  # CharField(blank=True): "" when unset
    anthropic_api_key: str


@tl.llm_tenant(id="slug", name="name", api_keys={"openai": "openai_key", "gemini": "gemini_key"})
@dataclass
class Workspace:
    slug: str
    name: str
    openai_key: str | None = None
    gemini_key: str | None = None


@dataclass(frozen=True, slots=True)  # slots=True builds a new class: the decoration must survive it
@tl.llm_tenant(id="slug", name="name", api_keys={"openai": "openai_key", "gemini": "gemini_key"})
class FrozenWorkspace:
    slug: str
    name: str
    openai_key: str | None = None
    gemini_key: str | None = None


@tl.llm_tenant(id="tenant_id", api_keys={"openai": "fetch_openai_key", "anthropic": "fetch_anthropic_key"})
class Account:
    """Keys come from a zero-argument method (a vault, a settings service...)."""

    def __init__(self, tenant_id: str, vault: dict[str, str]) -> None:
        self.tenant_id = tenant_id
        self.vault = vault
        self.reads = 0

    def fetch_openai_key(self) -> str | None:
        self.reads += 1
        return self.vault.get("openai")

    def fetch_anthropic_key(self) -> str | None:
        return self.vault.get("anthropic")


@tl.llm_tenant(id="slug", api_keys={p: "key" for p in PROVIDERS})
class OneKeyTenant:
    """The same key for every provider (a single attribute may serve several providers)."""

    def __init__(self, slug: str, key: str | None) -> None:
        self.slug = slug
        self.key = key


@tl.llm_tenant(id="slug", api_keys={p: f"{p}_key" for p in PROVIDERS})
class AllProvidersTenant(Model):
    slug: str
    openai_key: str | None = None
    anthropic_key: str | None = None
    gemini_key: str | None = None
    deepseek_key: str | None = None
    mistral_key: str | None = None
    local_key: str | None = None


# ---------------------------------------------------------------- @llm_tenant on any class


def test_django_like_model_instance_with_integer_primary_key(fp: FakeProvider, cfg: Cfg) -> None:
    cfg(api_keys={"anthropic": K_CONF})
    org = Organization(pk=42, company_name="Acme", openai_api_key=K_OBJ, anthropic_api_key="")

    r = ask("openai", tenant=org)

    assert r.tenant_id == "42"  # an integer id becomes a string tenant id
    assert last_key(fp, "openai") == K_OBJ
    row = tl.Execution.get(r.execution_id)
    assert row.tenant_id == "42"
    assert tl.Execution.by_tenant("42").count() == 1

    # A blank field falls through; the stored key of tenant "42" applies to the object.
    ask("anthropic", tenant=org)
    assert last_key(fp, "anthropic") == K_CONF
    tl.ApiConfiguration.set_for_tenant("42", anthropic=K_TENANT)
    ask("anthropic", tenant=org)
    assert last_key(fp, "anthropic") == K_TENANT


@pytest.mark.parametrize("cls", [Workspace, FrozenWorkspace], ids=["dataclass", "frozen_slots_dataclass"])
def test_dataclass_instance(cls: type[Workspace] | type[FrozenWorkspace], fp: FakeProvider, cfg: Cfg) -> None:
    cfg(api_keys={"openai": K_CONF})
    ws = cls(slug="acme", name="Acme Inc", gemini_key=K_OBJ)

    r = ask("gemini", tenant=ws)
    assert (r.tenant_id, last_key(fp, "gemini")) == ("acme", K_OBJ)

    ask("openai", tenant=ws)  # openai_key is None: falls through to configure(api_keys=)
    assert last_key(fp, "openai") == K_CONF


def test_zero_argument_method_is_called_at_every_call(fp: FakeProvider, cfg: Cfg) -> None:
    cfg()
    account = Account("acme", {"openai": K_ALPHA, "anthropic": K_BETA})

    ask("openai", tenant=account)
    assert last_key(fp, "openai") == K_ALPHA
    ask("anthropic", tenant=account)
    assert last_key(fp, "anthropic") == K_BETA

    account.vault["openai"] = K_OBJ  # rotated in the vault between two calls
    ask("openai", tenant=account)
    assert last_key(fp, "openai") == K_OBJ
    assert account.reads >= 2  # read per call, never cached


def test_attributes_are_read_at_call_time(fp: FakeProvider, cfg: Cfg) -> None:
    cfg(api_keys={"openai": K_CONF})
    org = Organization(pk=7, company_name="Acme", openai_api_key=K_ALPHA, anthropic_api_key="")

    ask(tenant=org)
    org.openai_api_key = K_BETA
    ask(tenant=org)
    org.openai_api_key = ""
    ask(tenant=org)

    assert [sent_key(r, "openai") for r in fp.requests] == [K_ALPHA, K_BETA, K_CONF]


def test_instances_from_tenant_resolver_and_tenant_context(fp: FakeProvider, cfg: Cfg) -> None:
    current: list[Any] = [Workspace(slug="alpha", name="Alpha", openai_key=K_ALPHA)]
    cfg(api_keys={"openai": K_CONF}, multi_tenancy_enabled=True, tenant_resolver=lambda: current[0])

    r1 = ask()
    current[0] = Account("beta", {"openai": K_BETA})
    r2 = ask()
    with tl.tenant(OneKeyTenant("gamma", K_OBJ)):
        r3 = ask()
    current[0] = None
    r4 = ask()

    assert [sent_key(r, "openai") for r in fp.requests] == [K_ALPHA, K_BETA, K_OBJ, K_CONF]
    assert [r.tenant_id for r in (r1, r2, r3, r4)] == ["alpha", "beta", "gamma", None]


@pytest.mark.parametrize(
    "options",
    [
        {"id": "not an attribute"},
        {"id": "1st"},
        {"name": "company-name"},
        {"api_keys": {"openai": "openai api key"}},
        {"api_keys": {"openai": ""}},
        {"api_keys": {"openai": 42}},
        {"api_keys": {"openai": "openai_key", "gemini": "gemini.key"}},
    ],
    ids=["id_space", "id_digit", "name_dash", "key_space", "key_empty", "key_not_str", "one_bad_of_two"],
)
def test_bad_attribute_name_in_decorator_is_a_configuration_error(options: dict[str, Any]) -> None:
    with pytest.raises(tl.ConfigurationError, match="llm_tenant"):
        tl.llm_tenant(**options)


def test_attribute_missing_on_the_object_is_a_configuration_error(fp: FakeProvider, cfg: Cfg) -> None:
    @tl.llm_tenant(id="slug", api_keys={"openai": "opneai_key"})  # typo: no such attribute
    class Typo:
        slug = "acme"

    cfg(api_keys={"openai": K_CONF})
    with pytest.raises(tl.ConfigurationError, match="opneai_key"):
        ask(tenant=Typo())
    assert fp.requests == []
    assert tl.Execution.all().count() == 0


# ---------------------------------------------------------------- resolution chain

LEVELS = ["object", "dict", "tenant_stored", "global_stored", "configure", "env"]
LEVEL_KEYS = {
    "object": K_OBJ,
    "dict": K_DICT,
    "tenant_stored": K_TENANT,
    "global_stored": K_GLOBAL,
    "configure": K_CONF,
    "env": K_ENV,
}


def set_levels(cfg: Cfg, monkeypatch: pytest.MonkeyPatch, provider: str, values: dict[str, str]) -> Any:
    """Puts a key for `provider` at each given level; returns the `tenant=` for the call."""
    if "env" in values:
        monkeypatch.setenv(ENV_VARS[provider][0], values["env"])
    cfg(api_keys={provider: values["configure"]} if "configure" in values else {})
    if "global_stored" in values:
        tl.ApiConfiguration.set_global(**{provider: values["global_stored"]})
    if "tenant_stored" in values:
        tl.ApiConfiguration.set_for_tenant("acme", **{provider: values["tenant_stored"]})
    if "object" in values:
        return OneKeyTenant("acme", values["object"])
    if "dict" in values:
        return {"id": "acme", "api_keys": {provider: values["dict"]}}
    return "acme"


@pytest.mark.parametrize("top", range(len(LEVELS)), ids=LEVELS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_each_level_wins_over_the_ones_below(
    provider: str, top: int, fp: FakeProvider, cfg: Cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Levels above `top` are removed; `top` and every level below it hold a key."""
    tenant = set_levels(cfg, monkeypatch, provider, {lv: LEVEL_KEYS[lv] for lv in LEVELS[top:]})

    ask(provider, tenant=tenant)

    assert last_key(fp, provider) == LEVEL_KEYS[LEVELS[top]]


@pytest.mark.parametrize("blank", ["", "   "], ids=["empty", "spaces"])
@pytest.mark.parametrize("level", range(len(LEVELS)), ids=LEVELS)
def test_blank_value_falls_through_to_the_next_level(
    level: int, blank: str, fp: FakeProvider, cfg: Cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = {lv: LEVEL_KEYS[lv] for lv in LEVELS[level:]}
    values[LEVELS[level]] = blank
    tenant = set_levels(cfg, monkeypatch, "openai", values)

    if level == len(LEVELS) - 1:  # a blank environment variable: no key at all
        with pytest.raises(tl.ConfigurationError, match="OPENAI_API_KEY"):
            ask(tenant=tenant)
        assert fp.requests == []
        assert tl.Execution.all().count() == 0
    else:
        ask(tenant=tenant)
        # A call has one tenant value: an object or a dict, so a blank object key skips the dict level.
        below = LEVELS[level + 2] if LEVELS[level] == "object" else LEVELS[level + 1]
        assert last_key(fp) == LEVEL_KEYS[below]


def test_removing_levels_one_at_a_time(fp: FakeProvider, cfg: Cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """One database, every level set, then peeled off from the top."""
    tenant = set_levels(cfg, monkeypatch, "openai", dict(LEVEL_KEYS))
    assert isinstance(tenant, OneKeyTenant)

    ask(tenant=tenant)
    ask(tenant={"id": "acme", "api_keys": {"openai": K_DICT}})
    ask(tenant="acme")
    ask(tenant="globex")  # another tenant never gets acme's stored key
    tl.ApiConfiguration.set_for_tenant("acme", openai=None)
    ask(tenant="acme")
    tl.ApiConfiguration.set_global(openai=None)
    ask(tenant="acme")
    cfg(api_keys={})
    ask(tenant="acme")
    assert [sent_key(r, "openai") for r in fp.requests] == [
        K_OBJ, K_DICT, K_TENANT, K_GLOBAL, K_GLOBAL, K_CONF, K_ENV,
    ]

    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(tl.ConfigurationError, match="OPENAI_API_KEY"):
        ask(tenant="acme")
    assert len(fp.requests) == 7
    assert tl.Execution.all().count() == 7


def test_object_keys_for_one_provider_leave_other_providers_to_lower_levels(fp: FakeProvider, cfg: Cfg) -> None:
    cfg(api_keys={"anthropic": K_CONF})
    tl.ApiConfiguration.set_for_tenant("acme", gemini=K_TENANT)
    ws = Workspace(slug="acme", name="Acme", openai_key=K_OBJ)  # no gemini_key, no anthropic mapping

    ask("openai", tenant=ws)
    ask("gemini", tenant=ws)
    ask("anthropic", tenant=ws)

    assert [sent_key(r, p) for r, p in zip(fp.requests, ["openai", "gemini", "anthropic"], strict=True)] == [
        K_OBJ, K_TENANT, K_CONF,
    ]


def test_the_tenant_chosen_for_the_call_brings_its_keys_and_nothing_is_merged(fp: FakeProvider, cfg: Cfg) -> None:
    """An explicit `tenant=` replaces the context tenant entirely: keys are never merged."""
    cfg(api_keys={"openai": K_CONF})
    obj = OneKeyTenant("acme", K_OBJ)
    runtime = {"id": "acme", "api_keys": {"openai": K_DICT}}

    with tl.tenant(runtime):
        ask(tenant=obj)
        ask()
    with tl.tenant(obj):
        ask(tenant=runtime)
        ask(tenant="acme")  # explicit id, no keys: the context object's key is not used

    assert [sent_key(r, "openai") for r in fp.requests] == [K_OBJ, K_DICT, K_DICT, K_CONF]


def test_keys_apply_to_their_call_only(fp: FakeProvider, cfg: Cfg) -> None:
    cfg(api_keys={"openai": K_CONF})

    ask(tenant={"id": "alpha", "api_keys": {"openai": K_ALPHA}})
    ask(tenant="beta")
    ask(tenant=OneKeyTenant("alpha", K_ALPHA))
    ask(tenant={"id": "beta"})
    ask()
    ask(tenant={"id": "alpha"})  # alpha's earlier runtime key is not remembered
    tl.ApiConfiguration.set_for_tenant("alpha", openai=K_TENANT)
    ask(tenant="alpha")
    ask(tenant="beta")

    assert [sent_key(r, "openai") for r in fp.requests] == [
        K_ALPHA, K_CONF, K_ALPHA, K_CONF, K_CONF, K_CONF, K_TENANT, K_CONF,
    ]


# ---------------------------------------------------------------- concurrency

CALLS_PER_TENANT = 25
TENANT_KEYS = {"alpha": K_ALPHA, "beta": K_BETA}
SOURCES = ["object", "dict", "stored", "context"]


def _prepare_source(source: str, cfg: Cfg) -> None:
    cfg(api_keys={"openai": K_CONF})
    if source == "stored":
        for tid, key in TENANT_KEYS.items():
            tl.ApiConfiguration.set_for_tenant(tid, openai=key)


def _tenant_value(source: str, tid: str) -> Any:
    if source == "object":
        return Workspace(slug=tid, name=tid.title(), openai_key=TENANT_KEYS[tid])
    if source == "dict":
        return {"id": tid, "api_keys": {"openai": TENANT_KEYS[tid]}}
    if source == "stored":
        return tid
    return OneKeyTenant(tid, TENANT_KEYS[tid])  # "context": set with `with tl.tenant(...)`


def _jobs() -> list[tuple[str, int]]:
    return [(tid, i) for i in range(CALLS_PER_TENANT) for tid in TENANT_KEYS]


def _assert_isolated(fp: FakeProvider, results: list[Any]) -> None:
    assert len(fp.requests) == len(TENANT_KEYS) * CALLS_PER_TENANT
    for req in fp.requests:
        tid = user_text(req).split()[0].removeprefix("tenant=")
        assert tid in TENANT_KEYS, user_text(req)
        assert sent_key(req, "openai") == TENANT_KEYS[tid], f"request for {tid} carried another key"
    assert sorted(r.tenant_id for r in results) == sorted(tid for tid, _ in _jobs())
    for tid in TENANT_KEYS:
        assert tl.Execution.by_tenant(tid).successful().count() == CALLS_PER_TENANT


@pytest.mark.parametrize("source", SOURCES)
def test_concurrent_threads_each_request_carries_its_tenants_key(source: str, fp: FakeProvider, cfg: Cfg) -> None:
    _prepare_source(source, cfg)

    def one(job: tuple[str, int]) -> Any:
        tid, i = job
        prompt = f"tenant={tid} call={i}"
        if source == "context":
            with tl.tenant(_tenant_value(source, tid)):
                return AGENTS["openai"].call(prompt=prompt)
        return AGENTS["openai"].call(prompt=prompt, tenant=_tenant_value(source, tid))

    with ThreadPoolExecutor(max_workers=len(TENANT_KEYS) * CALLS_PER_TENANT) as pool:
        results = list(pool.map(one, _jobs()))

    _assert_isolated(fp, results)


@pytest.mark.parametrize("source", SOURCES)
async def test_concurrent_acalls_each_request_carries_its_tenants_key(
    source: str, fp: FakeProvider, cfg: Cfg
) -> None:
    _prepare_source(source, cfg)

    async def one(tid: str, i: int) -> Any:
        prompt = f"tenant={tid} call={i}"
        if source == "context":
            with tl.tenant(_tenant_value(source, tid)):
                return await AGENTS["openai"].acall(prompt=prompt)
        return await AGENTS["openai"].acall(prompt=prompt, tenant=_tenant_value(source, tid))

    results = await asyncio.gather(*(one(tid, i) for tid, i in _jobs()))

    _assert_isolated(fp, list(results))


# ---------------------------------------------------------------- ApiConfiguration


def test_refuses_to_store_without_a_secret(fp: FakeProvider, cfg: Cfg, db_path: Path) -> None:
    cfg(secret=None)

    with pytest.raises(tl.ConfigurationError, match=SECRET_ENV) as g:
        tl.ApiConfiguration.set_global(openai=K_GLOBAL)
    with pytest.raises(tl.ConfigurationError, match=SECRET_ENV) as t:
        tl.ApiConfiguration.set_for_tenant("acme", anthropic=K_TENANT, openai=None)

    assert_not_in([K_GLOBAL, K_TENANT], str(g.value), repr(g.value), str(t.value), repr(t.value))
    assert tl.ApiConfiguration.providers() == []
    assert tl.ApiConfiguration.providers("acme") == []
    assert_not_in([K_GLOBAL, K_TENANT], db_bytes(db_path).decode("latin-1"))


@pytest.mark.sqlite_only
def test_stored_keys_are_encrypted_and_only_provider_names_are_listed(
    fp: FakeProvider, cfg: Cfg, db_path: Path
) -> None:
    cfg()
    tl.ApiConfiguration.set_global(openai=K_GLOBAL, gemini=K_ALPHA)
    tl.ApiConfiguration.set_for_tenant("acme", anthropic=K_TENANT, openai=K_BETA)

    assert tl.ApiConfiguration.providers() == ["gemini", "openai"]
    assert tl.ApiConfiguration.providers("acme") == ["anthropic", "openai"]
    assert tl.ApiConfiguration.providers("globex") == []

    ask("openai", tenant="acme")
    ask("anthropic", tenant="acme")
    ask("gemini", tenant="acme")
    ask("openai", tenant="globex")
    assert [sent_key(r, p) for r, p in zip(fp.requests, ["openai", "anthropic", "gemini", "openai"], strict=True)] == [
        K_BETA, K_TENANT, K_ALPHA, K_GLOBAL,
    ]

    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as c:
        rows = c.execute(
            "SELECT scope, provider, ciphertext FROM api_configurations ORDER BY scope, provider"
        ).fetchall()
    assert [(s, p) for s, p, _ in rows] == [
        ("global", "gemini"), ("global", "openai"), ("tenant:acme", "anthropic"), ("tenant:acme", "openai"),
    ]
    raw = db_bytes(db_path)
    for key in (K_GLOBAL, K_ALPHA, K_TENANT, K_BETA):
        assert key.encode() not in raw
        assert key.encode("utf-16-le") not in raw
        assert all(key.encode() not in bytes(ct) for _, _, ct in rows)


def test_setting_none_or_blank_removes_a_stored_key(fp: FakeProvider, cfg: Cfg) -> None:
    cfg(api_keys={"openai": K_CONF})
    tl.ApiConfiguration.set_global(openai=K_GLOBAL, anthropic=K_ALPHA)
    tl.ApiConfiguration.set_for_tenant("acme", openai=K_TENANT, gemini=K_BETA)

    tl.ApiConfiguration.set_for_tenant("acme", openai=None, gemini="  ")
    assert tl.ApiConfiguration.providers("acme") == []
    ask(tenant="acme")
    assert last_key(fp) == K_GLOBAL

    tl.ApiConfiguration.set_global(openai=None)
    assert tl.ApiConfiguration.providers() == ["anthropic"]
    ask(tenant="acme")
    assert last_key(fp) == K_CONF
    tl.ApiConfiguration.set_global(openai=None)  # removing what is not there is fine
    assert tl.ApiConfiguration.providers() == ["anthropic"]


@pytest.mark.parametrize(
    "keys",
    [{"opneai": K_GLOBAL}, {"openai": K_GLOBAL, "opneai": K_ALPHA}, {"anthropic": K_GLOBAL, "ollama": K_ALPHA}],
    ids=["unknown", "valid_then_unknown", "unconfigured_compatible_name"],
)
@pytest.mark.parametrize("scope", ["global", "tenant"])
def test_unknown_provider_is_rejected_and_nothing_is_stored(
    scope: str, keys: dict[str, str], fp: FakeProvider, cfg: Cfg
) -> None:
    cfg()
    with pytest.raises(tl.ConfigurationError) as info:
        if scope == "global":
            tl.ApiConfiguration.set_global(**keys)
        else:
            tl.ApiConfiguration.set_for_tenant("acme", **keys)

    message = str(info.value)
    bad = next(p for p in keys if p not in PROVIDERS)
    assert bad in message
    for known in PROVIDERS:  # built-ins and the configured OpenAI-compatible "local"
        assert known in message
    assert_not_in([K_GLOBAL, K_ALPHA], message, repr(info.value))
    assert tl.ApiConfiguration.providers() == []
    assert tl.ApiConfiguration.providers("acme") == []


def test_wrong_secret_fails_clearly_without_the_key_or_an_execution(
    fp: FakeProvider, cfg: Cfg, db_path: Path
) -> None:
    cfg(api_keys={"anthropic": K_CONF})
    tl.ApiConfiguration.set_for_tenant("acme", openai=K_TENANT)
    tl.ApiConfiguration.set_global(gemini=K_GLOBAL)
    cfg(secret=WRONG_SECRET, api_keys={"anthropic": K_CONF})

    for provider, tenant in (("openai", "acme"), ("gemini", "acme"), ("gemini", None)):
        with pytest.raises(tl.ConfigurationError, match=SECRET_ENV) as info:
            ask(provider, tenant=tenant)
        assert_not_in([K_TENANT, K_GLOBAL], str(info.value), repr(info.value), repr(info.value.args))
    assert fp.requests == []
    assert tl.Execution.all().count() == 0

    # Calls that need no stored key still work; stored names are still listed.
    ask("anthropic", tenant="acme")
    ask("openai", tenant={"id": "acme", "api_keys": {"openai": K_DICT}})
    assert [sent_key(r, p) for r, p in zip(fp.requests, ["anthropic", "openai"], strict=True)] == [K_CONF, K_DICT]
    assert tl.ApiConfiguration.providers("acme") == ["openai"]

    cfg(api_keys={"anthropic": K_CONF})  # the right secret again: the stored keys were untouched
    ask("openai", tenant="acme")
    assert last_key(fp) == K_TENANT


def test_stored_key_without_any_secret_at_call_time(fp: FakeProvider, cfg: Cfg) -> None:
    cfg()
    tl.ApiConfiguration.set_global(openai=K_GLOBAL)
    cfg(secret=None, api_keys={"openai": K_CONF})

    with pytest.raises(tl.ConfigurationError, match=SECRET_ENV) as info:
        ask()
    assert K_GLOBAL not in str(info.value)
    assert fp.requests == [] and tl.Execution.all().count() == 0

    tl.ApiConfiguration.set_global(openai=None)  # removing needs no secret
    assert tl.ApiConfiguration.providers() == []
    ask()
    assert last_key(fp) == K_CONF


@pytest.mark.sqlite_only
def test_a_ciphertext_copied_to_another_tenants_row_does_not_decrypt(
    fp: FakeProvider, cfg: Cfg, db_path: Path
) -> None:
    cfg()
    tl.ApiConfiguration.set_for_tenant("acme", openai=K_ALPHA)
    tl.ApiConfiguration.set_for_tenant("globex", openai=K_BETA)

    with sqlite3.connect(str(db_path), timeout=10) as c:
        c.execute(
            "UPDATE api_configurations SET (nonce, ciphertext) = "
            "(SELECT nonce, ciphertext FROM api_configurations WHERE scope = 'tenant:acme' AND provider = 'openai') "
            "WHERE scope = 'tenant:globex' AND provider = 'openai'"
        )
    c.close()

    with pytest.raises(tl.ConfigurationError, match=SECRET_ENV):
        ask(tenant="globex")
    assert fp.requests == []
    ask(tenant="acme")
    assert last_key(fp) == K_ALPHA


@pytest.mark.parametrize("secret", ["short", "x" * 15, " " * 3], ids=["5", "15", "3_spaces"])
def test_secret_shorter_than_16_characters_is_rejected_at_configure(
    secret: str, fp: FakeProvider, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, secret)
    with pytest.raises(tl.ConfigurationError, match=SECRET_ENV):
        tl.configure(database=str(db_path))

    monkeypatch.setenv(SECRET_ENV, "x" * 16)
    tl.configure(database=str(db_path))
    tl.ApiConfiguration.set_global(openai=K_GLOBAL)
    assert tl.ApiConfiguration.providers() == ["openai"]


def test_secret_length_is_counted_in_characters(
    fp: FakeProvider, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, "é" * 8)  # 8 characters, 16 bytes
    with pytest.raises(tl.ConfigurationError, match=SECRET_ENV):
        tl.configure(database=str(db_path))


# ---------------------------------------------------------------- keys never leak


class Boom(Exception):
    pass


def test_keys_never_appear_in_rows_errors_reprs_logs_or_the_database(
    fp: FakeProvider, cfg: Cfg, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="tenantllm")

    def on_alert(alert: dict[str, Any]) -> None:
        raise Boom("alert handler failed")  # logged with a traceback by the library

    cfg(
        api_keys={"openai": K_CONF, "mistral": K_CONF, "anthropic": K_CONF},
        on_alert=on_alert,
        budgets={"global_daily": "0.0000001", "enforcement": "soft"},
    )
    tl.ApiConfiguration.set_global(gemini=K_GLOBAL)
    tl.ApiConfiguration.set_for_tenant("acme", anthropic=K_TENANT, deepseek=K_TENANT)
    org = Organization(pk=1, company_name="Acme", openai_api_key=K_OBJ, anthropic_api_key="")
    runtime = {"id": "acme", "api_keys": {"openai": K_DICT, "gemini": K_DICT}}

    class Metadata(tl.Agent):
        model = "gpt-4o"
        user = "{prompt}"
        max_tokens = 64

        def execution_metadata(self) -> dict[str, Any]:
            return {"plan": "pro"}

    Breaking = _agent(
        "openai", fallback_models=["claude-sonnet-4-5"], circuit_breaker=tl.BreakerPolicy(errors=1, cooldown=60)
    )

    texts: list[str] = []
    results = [
        ask("openai", tenant=org),
        ask("openai", tenant=runtime),
        ask("gemini", tenant=runtime),
        ask("anthropic", tenant="acme"),
        ask("deepseek", tenant="acme"),
        ask("gemini", tenant="globex"),
        ask("mistral"),
        Metadata.call(prompt="meta", tenant=org),
    ]
    errors: list[BaseException] = []
    failing: list[tuple[str, Any]] = [("openai", org), ("openai", runtime), ("anthropic", "acme"), ("gemini", None)]
    for provider, tenant in failing:
        fp.script(Step(kind="status", status=401))
        with pytest.raises(tl.AuthenticationError) as info:
            ask(provider, tenant=tenant)
        errors.append(info.value)
    fp.script(Step(kind="status", status=401), Step(kind="status", status=401))
    with pytest.raises(tl.AllModelsExhaustedError) as exhausted:
        Breaking.call(prompt="both fail", tenant=org)
    errors.append(exhausted.value)
    with pytest.raises(tl.TenantLLMError) as open_breaker:
        Breaking.call(prompt="short-circuited", tenant=org)
    errors.append(open_breaker.value)

    sent = {sent_key(r, p) for r in fp.requests for p in ("openai", "anthropic", "gemini")}
    assert {K_OBJ, K_DICT, K_TENANT, K_GLOBAL, K_CONF} <= sent  # the keys really were used

    for e in errors:
        texts += [str(e), repr(e), repr(e.args), repr(vars(e))]
        texts += [repr(getattr(e, a, None)) for a in ("errors", "provider", "status", "message", "execution_id")]
    texts += [repr(r) for r in results]
    for row in tl.Execution.all():
        full = tl.Execution.get(row.id)
        texts += [str(row.to_dict()), str(full.to_dict()), repr(full), json.dumps(full.metadata)]
    texts.append(str(tl.Execution.all().to_dicts()))
    assert tl.Execution.all().count() == len(results) + len(failing) + 2

    s = tl.config.settings()
    for tenant in (org, runtime, Account("acme", {"openai": K_OBJ})):
        resolved = tl.tenancy.resolve(s, tenant)
        texts += [repr(resolved), str(resolved)]
        texts.append(json.dumps(AGENTS["openai"].call(prompt="dry", tenant=tenant, dry_run=True), default=str))
    texts.append(repr(s))

    assert any(r.levelno >= logging.INFO for r in caplog.records), "the scenario should have logged something"
    texts.append(caplog.text)
    texts += [repr(r.args) for r in caplog.records]

    assert_not_in([K_OBJ, K_DICT, K_TENANT, K_GLOBAL, K_CONF], *texts)
    raw = db_bytes(db_path)
    for key in (K_OBJ, K_DICT, K_TENANT, K_GLOBAL, K_CONF):
        assert key.encode() not in raw


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_key_is_sent_in_a_header_never_in_the_url(provider: str, fp: FakeProvider, cfg: Cfg) -> None:
    cfg()
    ask(provider, tenant={"id": "acme", "api_keys": {provider: K_DICT}})
    req = fp.requests[-1]
    assert sent_key(req, provider) == K_DICT
    assert K_DICT not in req.path and K_DICT not in json.dumps(req.query) and K_DICT.encode() not in req.raw


class _EchoKeyHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that rejects the key and quotes it back, as some proxies do."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {key}", "code": "invalid_api_key"}})
        data = body.encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def test_a_provider_that_quotes_the_key_back_does_not_leak_it(
    fp: FakeProvider, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    echo = ThreadingHTTPServer(("127.0.0.1", 0), _EchoKeyHandler)
    thread = threading.Thread(target=echo.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        port = echo.server_address[1]
        tl.configure(database=str(db_path), base_urls={"openai": f"http://127.0.0.1:{port}/v1"})
        with pytest.raises(tl.AuthenticationError) as info:
            ask(tenant={"id": "acme", "api_keys": {"openai": K_DICT}})
    finally:
        echo.shutdown()
        echo.server_close()
        thread.join(timeout=5)

    rows = [str(tl.Execution.get(r.id).to_dict()) for r in tl.Execution.all()]
    assert len(rows) == 1
    assert_not_in([K_DICT], str(info.value), *rows)
    assert K_DICT.encode() not in db_bytes(db_path)


# ---------------------------------------------------------------- every supported provider


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_provider_takes_stored_keys(provider: str, fp: FakeProvider, cfg: Cfg) -> None:
    cfg()
    tenant_key, global_key = provider_key(provider, "acme"), provider_key(provider, "global")
    tl.ApiConfiguration.set_for_tenant("acme", **{provider: tenant_key})
    tl.ApiConfiguration.set_global(**{provider: global_key})
    assert tl.ApiConfiguration.providers("acme") == [provider]
    assert tl.ApiConfiguration.providers() == [provider]

    r = ask(provider, tenant="acme")
    ask(provider, tenant="globex")

    assert r.provider == provider
    assert [sent_key(q, provider) for q in fp.requests] == [tenant_key, global_key]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_provider_takes_llm_tenant_keys(provider: str, fp: FakeProvider, cfg: Cfg) -> None:
    cfg()
    key = provider_key(provider, "object")
    tenant = AllProvidersTenant(slug="acme", **{f"{provider}_key": key})

    r = ask(provider, tenant=tenant)

    assert (r.provider, r.tenant_id) == (provider, "acme")
    assert last_key(fp, provider) == key
    assert key not in str(tl.Execution.get(r.execution_id).to_dict())


@pytest.mark.parametrize("source", ["dict", "object"])
def test_unknown_provider_in_per_call_keys_is_rejected(source: str, fp: FakeProvider, cfg: Cfg) -> None:
    @tl.llm_tenant(id="slug", api_keys={"opneai": "key"})
    class Typo:
        slug = "acme"
        key = K_OBJ

    cfg(api_keys={"openai": K_CONF})
    tenant = Typo() if source == "object" else {"id": "acme", "api_keys": {"opneai": K_DICT}}
    with pytest.raises(tl.ConfigurationError, match="opneai"):
        ask(tenant=tenant)
    assert fp.requests == []


def test_dataclass_asdict_of_a_resolved_tenant_is_the_only_way_to_see_keys(cfg: Cfg) -> None:
    """Guards the repr checks: the resolved tenant really does carry the keys."""
    cfg()
    resolved = tl.tenancy.resolve(tl.config.settings(), OneKeyTenant("acme", K_OBJ))
    assert dataclasses.asdict(resolved)["api_keys"]["openai"] == K_OBJ
    assert K_OBJ not in repr(resolved)
