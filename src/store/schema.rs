//! Schema migrations, applied in order; `schema_version` records the last one applied.
//! Never edit a shipped migration: add a new one.

pub const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    CREATE TABLE executions (
        id TEXT PRIMARY KEY,
        agent TEXT NOT NULL,
        model_id TEXT NOT NULL,
        chosen_model_id TEXT,
        provider TEXT NOT NULL,
        tenant_id TEXT,
        status TEXT NOT NULL,
        error_class TEXT,
        error_message TEXT,
        started_at INTEGER NOT NULL,
        completed_at INTEGER,
        duration_ms INTEGER,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        total_tokens INTEGER NOT NULL DEFAULT 0,
        input_cost INTEGER NOT NULL DEFAULT 0,
        output_cost INTEGER NOT NULL DEFAULT 0,
        total_cost INTEGER NOT NULL DEFAULT 0,
        attempts_count INTEGER NOT NULL DEFAULT 0,
        attempts TEXT NOT NULL DEFAULT '[]',
        metadata TEXT NOT NULL DEFAULT '{}',
        finish_reason TEXT,
        parent_execution_id TEXT,
        root_execution_id TEXT
    ) WITHOUT ROWID; -- clustered on the time-ordered id: one B-tree, appends at its end
    -- Ids are UUIDv7 (time-ordered), so time ranges and time order use the primary key
    -- (see sqlite.rs `where_clause`); these indexes end in the id implicitly.
    CREATE INDEX executions_tenant ON executions(tenant_id);
    CREATE INDEX executions_agent ON executions(agent);

    CREATE TABLE execution_details (
        execution_id TEXT PRIMARY KEY,
        system_prompt TEXT,
        user_prompt TEXT,
        response TEXT
    ) WITHOUT ROWID;

    CREATE TABLE tenant_budgets (
        tenant_id TEXT PRIMARY KEY,
        name TEXT,
        daily_limit INTEGER,
        monthly_limit INTEGER,
        daily_token_limit INTEGER,
        monthly_token_limit INTEGER,
        daily_execution_limit INTEGER,
        monthly_execution_limit INTEGER,
        enforcement TEXT NOT NULL CHECK (enforcement IN ('hard', 'soft')),
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );

    -- Running totals per scope ("global", "tenant:<id>", "agent:<name>") and period
    -- ("2026-11-28", "2026-11"): recorded usage, plus the estimates of admitted calls still
    -- in flight. Budget checks read these, never SUM over executions.
    CREATE TABLE usage_counters (
        scope TEXT NOT NULL,
        period TEXT NOT NULL,
        cost INTEGER NOT NULL DEFAULT 0,
        tokens INTEGER NOT NULL DEFAULT 0,
        executions INTEGER NOT NULL DEFAULT 0,
        reserved_cost INTEGER NOT NULL DEFAULT 0,
        reserved_tokens INTEGER NOT NULL DEFAULT 0,
        reserved_executions INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (scope, period)
    ) WITHOUT ROWID;

    -- One row per admitted call holding a reservation: which counters it reserved on
    -- ("scope<TAB>period" lines) and how much. A lease, so a crashed process's expire.
    -- Only calls in flight are here, so the expiry sweep scans it without an index.
    CREATE TABLE reservations (
        execution_id TEXT PRIMARY KEY,
        counters TEXT NOT NULL,
        cost INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        executions INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE breakers (
        key TEXT PRIMARY KEY,
        agent TEXT NOT NULL,
        model TEXT NOT NULL,
        tenant_id TEXT,
        phase TEXT NOT NULL,
        failures TEXT NOT NULL DEFAULT '',
        retry_at INTEGER NOT NULL DEFAULT 0,
        updated_at INTEGER NOT NULL
    );

    -- Budget alerts already sent, so each fires once per scope, period and threshold
    -- across all processes.
    CREATE TABLE alerts_sent (
        scope TEXT NOT NULL,
        period TEXT NOT NULL,
        name TEXT NOT NULL,
        threshold INTEGER NOT NULL,
        PRIMARY KEY (scope, period, name, threshold)
    ) WITHOUT ROWID;

    CREATE TABLE api_configurations (
        scope TEXT NOT NULL,
        provider TEXT NOT NULL,
        nonce BLOB NOT NULL,
        ciphertext BLOB NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (scope, provider)
    ) WITHOUT ROWID;
    "#,
    // 2: settings that belong to the database rather than to a process: the timezone its
    // calendar periods (the counters' keys) are in, recorded by the process that creates the
    // database or first opens it with this version (`store::open`), changed by `set_timezone`.
    r#"
    CREATE TABLE settings (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 3: cache writes and the cost breakdown of cache reads and writes (parts of input_cost).
    r#"
    ALTER TABLE executions ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE executions ADD COLUMN cache_read_cost INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE executions ADD COLUMN cache_write_cost INTEGER NOT NULL DEFAULT 0;
    "#,
    // 4: streams: how long the caller waited for the first piece of text (NULL for calls).
    r#"
    ALTER TABLE executions ADD COLUMN time_to_first_token_ms INTEGER;
    "#,
    // 5: rate limits. A tenant's requests and tokens per minute and calls in flight; the
    // admissions of the last window per rate-limited scope ("global", "tenant:<id>"), with
    // their tokens (the estimate, corrected at settlement); and which scope a reservation
    // holds a `max_concurrent` slot of.
    r#"
    ALTER TABLE tenant_budgets ADD COLUMN rpm_limit INTEGER;
    ALTER TABLE tenant_budgets ADD COLUMN tpm_limit INTEGER;
    ALTER TABLE tenant_budgets ADD COLUMN max_concurrent INTEGER;
    CREATE TABLE rate_events (
        scope TEXT NOT NULL,
        at INTEGER NOT NULL,
        execution_id TEXT NOT NULL,
        tokens INTEGER NOT NULL,
        PRIMARY KEY (scope, at, execution_id)
    ) WITHOUT ROWID;
    ALTER TABLE reservations ADD COLUMN concurrency_scope TEXT;
    CREATE INDEX reservations_concurrency ON reservations (concurrency_scope) WHERE concurrency_scope IS NOT NULL;
    "#,
    // 6: a tool loop's calls (name, arguments, result or error, duration), a JSON list kept
    // with the prompts of each round after the first.
    r#"
    ALTER TABLE execution_details ADD COLUMN tool_calls TEXT;
    "#,
    // 7: running totals of each rate-limited scope's admission log (`rate_events`): how many
    // admissions, and their tokens, are stamped after `horizon`, which follows the start of
    // the latest admission's window; an admission reads one row instead of counting its
    // window (src/ratelimit).
    r#"
    CREATE TABLE rate_totals (
        scope TEXT PRIMARY KEY,
        requests INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        horizon INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO rate_totals (scope, requests, tokens, horizon)
        SELECT scope, COUNT(*), SUM(tokens), MIN(at) - 1 FROM rate_events GROUP BY scope;
    "#,
    // 8: the register of tenants seen (DESIGN §1b): every tenant a call ran for, budget or
    // not, with the name the app gave and its first and last use (to `tenancy::SEEN_REFRESH`).
    r#"
    CREATE TABLE tenants (
        tenant_id TEXT PRIMARY KEY,
        name TEXT,
        first_used_at INTEGER NOT NULL,
        last_used_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 9: daily and monthly rollups (store/rollups.rs): per day ("2026-11-28") or month
    // ("2026-11") in the database's timezone, tenant ('' for none), agent, model and status,
    // the number of settled calls and the totals of their numeric fields. They outlive
    // purged rows. The store fills them from the existing executions when it applies this.
    // Calls still running are not rolled up; the partial index finds them.
    r#"
    CREATE TABLE daily_rollups (
        period TEXT NOT NULL,
        tenant_id TEXT NOT NULL,
        agent TEXT NOT NULL,
        model_id TEXT NOT NULL,
        status TEXT NOT NULL,
        calls INTEGER NOT NULL DEFAULT 0,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        total_tokens INTEGER NOT NULL DEFAULT 0,
        input_cost INTEGER NOT NULL DEFAULT 0,
        output_cost INTEGER NOT NULL DEFAULT 0,
        total_cost INTEGER NOT NULL DEFAULT 0,
        attempts_count INTEGER NOT NULL DEFAULT 0,
        cache_write_tokens INTEGER NOT NULL DEFAULT 0,
        cache_read_cost INTEGER NOT NULL DEFAULT 0,
        cache_write_cost INTEGER NOT NULL DEFAULT 0,
        duration_ms INTEGER NOT NULL DEFAULT 0,
        time_to_first_token_ms INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (period, tenant_id, agent, model_id, status)
    ) WITHOUT ROWID;
    CREATE TABLE monthly_rollups (
        period TEXT NOT NULL,
        tenant_id TEXT NOT NULL,
        agent TEXT NOT NULL,
        model_id TEXT NOT NULL,
        status TEXT NOT NULL,
        calls INTEGER NOT NULL DEFAULT 0,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        total_tokens INTEGER NOT NULL DEFAULT 0,
        input_cost INTEGER NOT NULL DEFAULT 0,
        output_cost INTEGER NOT NULL DEFAULT 0,
        total_cost INTEGER NOT NULL DEFAULT 0,
        attempts_count INTEGER NOT NULL DEFAULT 0,
        cache_write_tokens INTEGER NOT NULL DEFAULT 0,
        cache_read_cost INTEGER NOT NULL DEFAULT 0,
        cache_write_cost INTEGER NOT NULL DEFAULT 0,
        duration_ms INTEGER NOT NULL DEFAULT 0,
        time_to_first_token_ms INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (period, tenant_id, agent, model_id, status)
    ) WITHOUT ROWID;
    CREATE INDEX executions_running ON executions (started_at) WHERE status = 'running';
    "#,
    // 10: the response cache (`cache_ttl`, src/cache.rs): per tenant ('' for none) and key,
    // an answer until `expires_at` (UTC micros); expired entries are removed a few at a time
    // by later writes (the index finds them). `executions.cached` marks the rows answered
    // from it.
    r#"
    ALTER TABLE executions ADD COLUMN cached INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE response_cache (
        tenant_id TEXT NOT NULL,
        key TEXT NOT NULL,
        content TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        finish_reason TEXT,
        execution_id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (tenant_id, key)
    ) WITHOUT ROWID;
    CREATE INDEX response_cache_expiry ON response_cache (expires_at);
    "#,
    // 11: the dashboard's list of tenants (store/tenant_list.rs): this period's counters of
    // every tenant by period first, and today's failed or refused calls without a scan; a
    // tenant's page reads its own days of rollups (the primary key is by day first: every
    // tenant's rows). IF NOT EXISTS: a test that re-runs the rollups' migration 9 re-runs this.
    r#"
    CREATE INDEX IF NOT EXISTS usage_counters_period ON usage_counters(period, scope);
    CREATE INDEX IF NOT EXISTS executions_problems ON executions(started_at, tenant_id, status)
        WHERE status IN ('error', 'timeout', 'blocked');
    CREATE INDEX IF NOT EXISTS daily_rollups_tenant ON daily_rollups (tenant_id, period);
    "#,
    // 12: the calls holding a scope's `max_concurrent` slot, counted in its `rate_totals` row
    // (the admission that reserves one adds it, the settlement or expiry that releases it takes
    // it away) instead of counted from an index of the reservations: an admission reads it
    // with the scope's totals and writes no index page. A row made only for it has no logged
    // admissions, so any horizon will do. The table is rebuilt rather than altered so that the
    // migration can run again (the rollups' test re-runs every migration from 9).
    r#"
    CREATE TABLE rate_totals_counted (
        scope TEXT PRIMARY KEY,
        requests INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        horizon INTEGER NOT NULL,
        in_flight INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    INSERT INTO rate_totals_counted (scope, requests, tokens, horizon) SELECT scope, requests, tokens, horizon FROM rate_totals;
    INSERT INTO rate_totals_counted (scope, requests, tokens, horizon, in_flight)
        SELECT concurrency_scope, 0, 0, 0, COUNT(*) FROM reservations WHERE concurrency_scope IS NOT NULL GROUP BY concurrency_scope
        ON CONFLICT (scope) DO UPDATE SET in_flight = excluded.in_flight;
    DROP TABLE rate_totals;
    ALTER TABLE rate_totals_counted RENAME TO rate_totals;
    DROP INDEX IF EXISTS reservations_concurrency;
    "#,
    // 13: the daily rollups without the tenant (store/rollups.rs), for questions over all
    // tenants, filled from the daily rollups. IF NOT EXISTS and the DELETE: a test that re-runs
    // the rollups' migration 9 re-runs this (and then rebuilds them all).
    r#"
    CREATE TABLE IF NOT EXISTS daily_totals (
        period TEXT NOT NULL,
        agent TEXT NOT NULL,
        model_id TEXT NOT NULL,
        status TEXT NOT NULL,
        calls INTEGER NOT NULL DEFAULT 0,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        total_tokens INTEGER NOT NULL DEFAULT 0,
        input_cost INTEGER NOT NULL DEFAULT 0,
        output_cost INTEGER NOT NULL DEFAULT 0,
        total_cost INTEGER NOT NULL DEFAULT 0,
        attempts_count INTEGER NOT NULL DEFAULT 0,
        cache_write_tokens INTEGER NOT NULL DEFAULT 0,
        cache_read_cost INTEGER NOT NULL DEFAULT 0,
        cache_write_cost INTEGER NOT NULL DEFAULT 0,
        duration_ms INTEGER NOT NULL DEFAULT 0,
        time_to_first_token_ms INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (period, agent, model_id, status)
    ) WITHOUT ROWID;
    DELETE FROM daily_totals;
    INSERT INTO daily_totals (period, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
        SELECT period, agent, model_id, status, SUM(calls), SUM(input_tokens), SUM(output_tokens), SUM(cached_tokens), SUM(total_tokens), SUM(input_cost), SUM(output_cost), SUM(total_cost), SUM(attempts_count), SUM(cache_write_tokens), SUM(cache_read_cost), SUM(cache_write_cost), SUM(duration_ms), SUM(time_to_first_token_ms)
        FROM daily_rollups GROUP BY period, agent, model_id, status;
    "#,
    // 14: the counters keyed by period first, so that one period's counters of every tenant
    // (the dashboard's list of tenants, spend by tenant) are one range of the table rather than
    // a lookup per tenant through migration 11's index (50,000 lookups: 120 ms of CPU); a
    // scope's days (`usage_daily`) go through the index by scope instead. A counter's update
    // writes the table row alone either way. Today's refused calls include those refused by a
    // rate limit. Rebuilt under another name so that the migration can run again (the rollups'
    // test re-runs every migration from 9).
    r#"
    DROP TABLE IF EXISTS usage_counters_by_period;
    CREATE TABLE usage_counters_by_period (
        scope TEXT NOT NULL,
        period TEXT NOT NULL,
        cost INTEGER NOT NULL DEFAULT 0,
        tokens INTEGER NOT NULL DEFAULT 0,
        executions INTEGER NOT NULL DEFAULT 0,
        reserved_cost INTEGER NOT NULL DEFAULT 0,
        reserved_tokens INTEGER NOT NULL DEFAULT 0,
        reserved_executions INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (period, scope)
    ) WITHOUT ROWID;
    INSERT INTO usage_counters_by_period SELECT scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions
        FROM usage_counters ORDER BY period, scope;
    DROP TABLE usage_counters;
    ALTER TABLE usage_counters_by_period RENAME TO usage_counters;
    CREATE INDEX usage_counters_scope ON usage_counters (scope, period);
    DROP INDEX IF EXISTS executions_problems;
    CREATE INDEX executions_problems ON executions (started_at, tenant_id, status)
        WHERE status IN ('error', 'timeout', 'blocked', 'rate_limited');
    "#,
    // 15: the same index with its statuses ORed instead of listed in IN (...). SQLite checks a
    // partial index's WHERE on every insert and on both rows of every update, and codes an IN
    // list of more than two constants as a throwaway B-tree it builds each time: three per
    // guarded call (the insert and the settling update), ~8.9K instructions each on Debian's
    // SQLite. The ORs are plain comparisons. Queries must repeat the ORs
    // (`tenant_list::PROBLEM_STATUSES`) for SQLite to use the index.
    r#"
    DROP INDEX IF EXISTS executions_problems;
    CREATE INDEX executions_problems ON executions (started_at, tenant_id, status)
        WHERE status = 'error' OR status = 'timeout' OR status = 'blocked' OR status = 'rate_limited';
    "#,
    // 16: the rate limits' admission log is the executions rows themselves: `rate_scopes`
    // says which logs an admitted call is in (1: "global", 2: its tenant's, "tenant:<id>"),
    // `rate_tokens` its tokens (the estimate, corrected at settlement); NULL for calls not
    // logged. A scope's admissions in a time range are a range of ids (time-ordered; the
    // global log) or of `executions_tenant` (a tenant's), pages an admission writes anyway,
    // where `rate_events` added a row per scope (two B-tree tails written at admission and
    // again at settlement). The logged admissions move over; their ids were minted by a
    // clock read after their stamp, so a range of ids could miss one at its edge: every
    // scope's totals restart empty with their horizon a second after this migration, so
    // for the next window an admission counts the moved admissions in its window from the
    // log (`ratelimit::Step::Behind`) and no range ever ends between a moved stamp and its id.
    r#"
    ALTER TABLE executions ADD COLUMN rate_scopes INTEGER;
    ALTER TABLE executions ADD COLUMN rate_tokens INTEGER;
    UPDATE executions SET
        rate_scopes = (SELECT SUM(DISTINCT iif(r.scope = 'global', 1, 2)) FROM rate_events r WHERE r.execution_id = executions.id),
        rate_tokens = (SELECT MAX(r.tokens) FROM rate_events r WHERE r.execution_id = executions.id)
        WHERE id IN (SELECT execution_id FROM rate_events);
    UPDATE rate_totals SET requests = 0, tokens = 0,
        horizon = CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER) + 1000000;
    DROP TABLE rate_events;
    "#,
    // 17: a rate-limited scope's calls in flight are counted from their reservations, which
    // every call logged in a window or holding a `max_concurrent` slot has (with its stamp,
    // its logs and its tenant), and `rate_totals` counts only the settled and abandoned
    // admissions: an admission writes no totals (unless it moves their horizon) and a
    // settlement writes them once, where both wrote them before (a WAL page more at each). The
    // tables are rebuilt rather than altered so that the migration can run again (the rollups'
    // test re-runs every migration from 9). The totals restart empty with their horizon a
    // second after this migration, as in 16: for the next window an admission counts the
    // admissions before it from the log, whatever the totals held.
    r#"
    CREATE TABLE reservations_rated (
        execution_id TEXT PRIMARY KEY,
        counters TEXT NOT NULL,
        cost INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        executions INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        concurrency_scope TEXT,
        started_at INTEGER,
        rate_scopes INTEGER,
        tenant_id TEXT
    ) WITHOUT ROWID;
    INSERT INTO reservations_rated (execution_id, counters, cost, tokens, executions, expires_at, concurrency_scope)
        SELECT execution_id, counters, cost, tokens, executions, expires_at, concurrency_scope FROM reservations;
    DROP TABLE reservations;
    ALTER TABLE reservations_rated RENAME TO reservations;
    CREATE TABLE rate_totals_settled (
        scope TEXT PRIMARY KEY,
        requests INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        horizon INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO rate_totals_settled (scope, requests, tokens, horizon)
        SELECT scope, 0, 0, CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER) + 1000000 FROM rate_totals;
    DROP TABLE rate_totals;
    ALTER TABLE rate_totals_settled RENAME TO rate_totals;
    "#,
    // 18: the calls in flight are found from their reservations, which every call now has (one
    // holding no budget, log or slot has no counters and a lease that never runs out:
    // `sqlite::HOLD_NOTHING_SQL`), instead of from the partial index `executions_running`: a
    // call wrote that index's page at admission and again at settlement, two WAL pages, where
    // the reservations' page is written then anyway. Calls running when this is applied get
    // such a reservation unless they have one. IF EXISTS and OR IGNORE: the rollups' test
    // re-runs every migration from 9.
    r#"
    INSERT OR IGNORE INTO reservations (execution_id, counters, cost, tokens, executions, expires_at)
        SELECT id, '', 0, 0, 0, 9223372036854775807 FROM executions WHERE status = 'running';
    DROP INDEX IF EXISTS executions_running;
    "#,
    // 19: a call holding nothing has a lease renewed like any other (`sqlite::HOLD_NOTHING_SQL`),
    // so a crashed process's call is closed as abandoned instead of running for ever. The
    // reservations written with a lease that never runs out (migration 18 and admissions since)
    // get one ending an hour after this migration: calls of processes that crashed are closed
    // then, and a call that a process of an earlier version (which renews none) is still
    // running has an hour to finish. Once here, not at each expiry sweep, which then needs no
    // case for them; an earlier version still running may write more until it stops.
    r#"
    UPDATE reservations SET expires_at = CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER) + 3600000000
        WHERE expires_at = 9223372036854775807;
    "#,
    // 20: the dashboard counts today's failed and refused calls from the day's rollups
    // (`tenant_list::problems_sql`), as PostgreSQL has since its migration 20, so the partial
    // index on `status` they were read from goes: every settlement of such a call wrote it.
    r#"
    DROP INDEX IF EXISTS executions_problems;
    "#,
];
