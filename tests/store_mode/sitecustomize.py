"""Loaded at start-up by processes that tests spawn (see pg_everywhere.py)."""

import pg_everywhere

if pg_everywhere.ACTIVE:
    pg_everywhere.install()
