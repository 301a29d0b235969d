"""Structured output: `schema = ` a pydantic model class or a JSON Schema dict on an agent.

The schema goes to the provider in its native form (the core builds it); the answer is
checked by the core (JSON syntax) and here (the model, or the JSON Schema with `jsonschema`)
before its row is written, so an answer off its schema is an `InvalidResponseError` with an
`error` row that still bills it; `r.parsed` is the validated answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tenantllm._core import ConfigurationError


@dataclass(frozen=True)
class Schema:
    """The answer's name, JSON Schema and parser (which raises on an invalid answer)."""

    name: str
    json_schema: dict[str, Any]
    parse: Callable[[str], Any]

    def check(self, text: str) -> str | None:
        """None when `text` follows the schema, else what is wrong (for the core)."""
        try:
            self.parse(text)
        except Exception as e:
            return f"it does not follow the schema: {describe(e)}"
        return None

    def for_spec(self) -> tuple[str, str]:
        return self.name, json.dumps(self.json_schema)


def describe(e: Exception) -> str:
    """A validation error in one line per problem: pydantic's as `field: message`."""
    errors = getattr(e, "errors", None)
    if not callable(errors):
        return str(e)
    return "; ".join(f"{'.'.join(map(str, x['loc'])) or '.'}: {x['msg']}" for x in errors())


def _name(raw: Any) -> str:
    """A name every provider takes: letters, digits, '_' and '-', at most 64."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", raw if isinstance(raw, str) else "")[:64]
    return name or "response"


def make_schema(value: Any, where: str) -> Schema | None:
    if value is None:
        return None
    if isinstance(value, type):
        try:
            import pydantic
        except ImportError:
            raise ConfigurationError(f"{where}: a model class needs pydantic installed") from None
        if not issubclass(value, pydantic.BaseModel):
            raise ConfigurationError(
                f"{where} must be a pydantic model class or a JSON Schema dict, got {value.__name__}"
            )
        schema = Schema(_name(value.__name__), value.model_json_schema(), value.model_validate_json)
    elif isinstance(value, dict):
        schema = _dict_schema(value, where)
    else:
        raise ConfigurationError(
            f"{where} must be a pydantic model class or a JSON Schema dict, got {type(value).__name__}"
        )
    if schema.json_schema.get("type") != "object":
        raise ConfigurationError(f"{where}: the answer's schema must be of type \"object\"")
    return schema


def _dict_schema(value: dict[str, Any], where: str) -> Schema:
    try:
        import jsonschema  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigurationError(
            f"{where}: a JSON Schema dict needs jsonschema: pip install 'tenantllm[schema]'"
        ) from None
    try:
        cls = jsonschema.validators.validator_for(value)
        cls.check_schema(value)
        json.dumps(value)
    except (jsonschema.SchemaError, TypeError, ValueError) as e:
        message = getattr(e, "message", None) or str(e)
        raise ConfigurationError(f"{where} is not a valid JSON Schema: {message}") from None
    validator = cls(value)

    def parse(text: str) -> Any:
        answer = json.loads(text)
        error = jsonschema.exceptions.best_match(validator.iter_errors(answer))
        if error is not None:
            path = "/".join(map(str, error.absolute_path)) or "the answer"
            raise ValueError(f"{path}: {error.message}")
        return answer

    return Schema(_name(value.get("title")), value, parse)
