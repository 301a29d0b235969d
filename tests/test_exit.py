"""Interpreter exit with async calls in flight: nothing printed, no row left `running`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import tenantllm as tl

CANCEL_AND_EXIT = textwrap.dedent(
    """
    import asyncio
    import sys
    import tenantllm as tl

    tl.configure(database=sys.argv[1], mock={"latency_ms": 30_000})
    tl.TenantBudget.create("acme", daily_limit=5, enforcement="hard")

    class Slow(tl.Agent):
        model = "mock/slow"
        user = "Wait for {q}"
        max_tokens = 16

    async def main():
        tasks = [asyncio.create_task(Slow.acall(q=str(i), tenant="acme")) for i in range(5)]
        await asyncio.sleep(0.5)
        tasks[0].cancel()
        # Returning cancels the rest as the loop closes; the interpreter exits right after.

    asyncio.run(main())
    """
)


def test_exiting_with_cancelled_acalls_is_clean_and_settles_them(db_path: Path) -> None:
    for run in range(3):
        done = subprocess.run(
            [sys.executable, "-c", CANCEL_AND_EXIT, str(db_path)],
            capture_output=True, text=True, timeout=60, env=os.environ.copy(),
        )
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", f"run {run}: {done.stderr}"
        tl.TenantBudget.get("acme").delete()
    rows = tl.Execution.by_tenant("acme")
    assert rows.count() == 15
    assert rows.by_status("cancelled").count() == 15
    assert tl.config.engine().tenant_usage("acme")["daily"]["executions"] == 15
