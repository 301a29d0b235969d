"""`purge()`: apply a retention now (the background thread applies the configured one)."""

from __future__ import annotations

from typing import Any

from tenantllm._core import ConfigurationError
from tenantllm.config import engine


def purge(
    *, details_days: int | None = None, executions_days: int | None = None, dry_run: bool = False
) -> dict[str, Any]:
    """Clears the details (prompts, response, metadata, error messages) of executions that
    started more than `details_days` ago and deletes those of the days (in the database's
    timezone) before the day that began `executions_days` ago, in small batches, so a day is
    never half deleted; with neither given, applies the configured
    `retention`. Counters, budgets and daily totals are unaffected; calls still running are
    kept. While calls write to a SQLite database, the purge has its write lock 1/50 of the
    time (thousands of rows a second, not the ~100,000 of an idle database), so calls are not
    held up; on PostgreSQL, while calls are admitted, it pauses after each batch 9 times as
    long as the batch took, so it keeps the server busy a tenth of the time (with no calls,
    batches follow one another). With `dry_run=True`, changes nothing and only counts.

    Returns {"details": n, "executions": n, "details_before": datetime | None,
    "executions_before": datetime | None, "dry_run": bool}: how many executions had (or
    would have) their details cleared and were (or would be) deleted, and the cutoffs
    (`executions_before` is the start of a day)."""
    if not isinstance(dry_run, bool):
        raise ConfigurationError(f"dry_run must be True or False, got {type(dry_run).__name__}")
    given = {k: v for k, v in (("details_days", details_days), ("executions_days", executions_days)) if v is not None}
    return engine().purge(given or None, dry_run)
