"""`INSTALLED_APPS = [..., "tenantllm.integrations.django"]`: configures tenantllm from
`settings.TENANTLLM` once Django has loaded its settings, in every process that runs the
project (runserver, gunicorn and uvicorn workers, manage.py commands, Celery workers that set
up Django)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.apps import AppConfig  # type: ignore[import-untyped]
from django.conf import settings  # type: ignore[import-untyped]
from django.utils.module_loading import import_string  # type: ignore[import-untyped]

from tenantllm._core import ConfigurationError
from tenantllm.config import _HOOK_OPTIONS, configure


class TenantLLMConfig(AppConfig):  # type: ignore[misc]
    name = "tenantllm.integrations.django"
    label = "tenantllm"
    verbose_name = "tenantllm"
    default = True

    def ready(self) -> None:
        options = getattr(settings, "TENANTLLM", None)
        if options is None:
            return
        if not isinstance(options, Mapping):
            raise ConfigurationError(
                f"settings.TENANTLLM must be a dict of configure() keywords, got {type(options).__name__}"
            )
        # Callables (tenant_resolver, on_alert, ...) may be given as dotted paths.
        options = {k: _imported(k, v) if k in _HOOK_OPTIONS else v for k, v in options.items()}
        try:
            configure(**options)
        except ConfigurationError as e:
            raise ConfigurationError(f"settings.TENANTLLM: {e}") from None


def _imported(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return import_string(value)
    except ImportError as e:
        raise ConfigurationError(f"settings.TENANTLLM[{name!r}]: cannot import {value!r}: {e}") from None
