"""What a user does first with an installed tenantllm: import, configure a database file, set a
budget, call an agent on the mock provider, query, and read the file with Python's sqlite3.

Usage: python wheel_smoke.py ENV_DIR VERSION. Fails if tenantllm was not imported from the
environment ENV_DIR or is not VERSION. Run it with -W error::RuntimeWarning on Linux, where
Python's sqlite3 may share the file with tenantllm's own SQLite (elsewhere tenantllm warns that
it may not)."""

import sqlite3
import sys
from pathlib import Path

import tenantllm as tl

venv = Path(sys.argv[1]).resolve()
assert Path(tl.__file__).resolve().is_relative_to(venv), f"tenantllm imported from {tl.__file__}, not {venv}"
assert tl.__version__ == sys.argv[2], (tl.__version__, sys.argv[2])
db = str(venv.parent / f"{venv.name}-smoke.db")
tl.configure(database=db)
tl.TenantBudget.create("acme", daily_limit="1.00", enforcement="hard")


class Hello(tl.Agent):
    model = "mock/hello"
    user = "Hello {name}"
    max_tokens = 20


r = Hello.call(name="wheel", tenant="acme")
q = tl.Execution.by_tenant("acme")
assert q.count() == 1 and q.sum("total_cost") == r.total_cost > 0, (q.count(), r.total_cost)
assert tl.TenantBudget.get("acme").current_daily_spending == r.total_cost
conn = sqlite3.connect(db)
assert conn.execute("SELECT count(*) FROM executions").fetchone()[0] == 1
conn.close()
where = Path(tl.__file__).parent
print(f"tenantllm {tl.__version__} ({where}): call, budget, query ok; SQLite {sqlite3.sqlite_version}")
