//! PostgreSQL schema migrations, applied in order under an advisory lock; `schema_version`
//! records the last one applied. Never edit a shipped migration: add a new one.
//!
//! The same tables as the SQLite schema (`schema.rs`), so both stores answer the same queries:
//! money in BIGINT nano-USD, times in BIGINT UTC micros, JSON as TEXT. Text keys use the "C"
//! collation: byte order, like SQLite, so sorting, prefix ranges and the order in which rows
//! are locked agree with Rust's string order whatever the database's locale.

pub const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    CREATE TABLE executions (
        id TEXT COLLATE "C" PRIMARY KEY,
        agent TEXT COLLATE "C" NOT NULL,
        model_id TEXT COLLATE "C" NOT NULL,
        chosen_model_id TEXT COLLATE "C",
        provider TEXT COLLATE "C" NOT NULL,
        tenant_id TEXT COLLATE "C",
        status TEXT COLLATE "C" NOT NULL,
        error_class TEXT COLLATE "C",
        error_message TEXT COLLATE "C",
        started_at BIGINT NOT NULL,
        completed_at BIGINT,
        duration_ms BIGINT,
        input_tokens BIGINT NOT NULL DEFAULT 0,
        output_tokens BIGINT NOT NULL DEFAULT 0,
        cached_tokens BIGINT NOT NULL DEFAULT 0,
        total_tokens BIGINT NOT NULL DEFAULT 0,
        input_cost BIGINT NOT NULL DEFAULT 0,
        output_cost BIGINT NOT NULL DEFAULT 0,
        total_cost BIGINT NOT NULL DEFAULT 0,
        attempts_count BIGINT NOT NULL DEFAULT 0,
        attempts TEXT NOT NULL DEFAULT '[]',
        metadata TEXT NOT NULL DEFAULT '{}',
        finish_reason TEXT COLLATE "C",
        parent_execution_id TEXT COLLATE "C",
        root_execution_id TEXT COLLATE "C"
    );
    CREATE INDEX executions_started ON executions (started_at);
    CREATE INDEX executions_tenant ON executions (tenant_id, started_at);
    CREATE INDEX executions_agent ON executions (agent, started_at);

    CREATE TABLE execution_details (
        execution_id TEXT COLLATE "C" PRIMARY KEY,
        system_prompt TEXT,
        user_prompt TEXT,
        response TEXT
    );

    CREATE TABLE tenant_budgets (
        tenant_id TEXT COLLATE "C" PRIMARY KEY,
        name TEXT,
        daily_limit BIGINT,
        monthly_limit BIGINT,
        daily_token_limit BIGINT,
        monthly_token_limit BIGINT,
        daily_execution_limit BIGINT,
        monthly_execution_limit BIGINT,
        enforcement TEXT NOT NULL CHECK (enforcement IN ('hard', 'soft')),
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    );

    -- Running totals per scope ("global", "tenant:<id>", "agent:<name>") and period
    -- ("2026-11-28", "2026-11"): recorded usage, plus the estimates of admitted calls still
    -- in flight. Budget checks lock and read these rows, never SUM over executions.
    CREATE TABLE usage_counters (
        scope TEXT COLLATE "C" NOT NULL,
        period TEXT COLLATE "C" NOT NULL,
        cost BIGINT NOT NULL DEFAULT 0,
        tokens BIGINT NOT NULL DEFAULT 0,
        executions BIGINT NOT NULL DEFAULT 0,
        reserved_cost BIGINT NOT NULL DEFAULT 0,
        reserved_tokens BIGINT NOT NULL DEFAULT 0,
        reserved_executions BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (scope, period)
    );

    -- One row per admitted call holding a reservation: which counters it reserved on
    -- ("scope<TAB>period" lines) and how much. A lease, so a crashed process's expire.
    CREATE TABLE reservations (
        execution_id TEXT COLLATE "C" PRIMARY KEY,
        counters TEXT NOT NULL,
        cost BIGINT NOT NULL,
        tokens BIGINT NOT NULL,
        executions BIGINT NOT NULL,
        expires_at BIGINT NOT NULL
    );
    CREATE INDEX reservations_expiry ON reservations (expires_at);

    CREATE TABLE breakers (
        key TEXT COLLATE "C" PRIMARY KEY,
        agent TEXT COLLATE "C" NOT NULL,
        model TEXT COLLATE "C" NOT NULL,
        tenant_id TEXT COLLATE "C",
        phase TEXT NOT NULL,
        failures TEXT NOT NULL DEFAULT '',
        retry_at BIGINT NOT NULL DEFAULT 0,
        updated_at BIGINT NOT NULL
    );

    -- Budget alerts already sent, so each fires once per scope, period and threshold
    -- across all processes.
    CREATE TABLE alerts_sent (
        scope TEXT COLLATE "C" NOT NULL,
        period TEXT COLLATE "C" NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        threshold BIGINT NOT NULL,
        PRIMARY KEY (scope, period, name, threshold)
    );

    CREATE TABLE api_configurations (
        scope TEXT COLLATE "C" NOT NULL,
        provider TEXT COLLATE "C" NOT NULL,
        nonce BYTEA NOT NULL,
        ciphertext BYTEA NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (scope, provider)
    );
    "#,
    // 2: settings that belong to the database rather than to a process: the timezone its
    // calendar periods (the counters' keys) are in, recorded by the process that creates the
    // database or first opens it with this version (`store::open`), changed by `set_timezone`.
    r#"
    CREATE TABLE settings (
        name TEXT COLLATE "C" PRIMARY KEY,
        value TEXT NOT NULL
    );
    "#,
    // 3: cache writes and the cost breakdown of cache reads and writes (parts of input_cost).
    r#"
    ALTER TABLE executions ADD COLUMN cache_write_tokens BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE executions ADD COLUMN cache_read_cost BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE executions ADD COLUMN cache_write_cost BIGINT NOT NULL DEFAULT 0;
    "#,
    // 4: streams: how long the caller waited for the first piece of text (NULL for calls).
    r#"
    ALTER TABLE executions ADD COLUMN time_to_first_token_ms BIGINT;
    "#,
    // 5: rate limits (see schema.rs, migration 5).
    r#"
    ALTER TABLE tenant_budgets ADD COLUMN rpm_limit BIGINT;
    ALTER TABLE tenant_budgets ADD COLUMN tpm_limit BIGINT;
    ALTER TABLE tenant_budgets ADD COLUMN max_concurrent BIGINT;
    CREATE TABLE rate_events (
        scope TEXT COLLATE "C" NOT NULL,
        at BIGINT NOT NULL,
        execution_id TEXT COLLATE "C" NOT NULL,
        tokens BIGINT NOT NULL,
        PRIMARY KEY (scope, at, execution_id)
    );
    ALTER TABLE reservations ADD COLUMN concurrency_scope TEXT COLLATE "C";
    CREATE INDEX reservations_concurrency ON reservations (concurrency_scope) WHERE concurrency_scope IS NOT NULL;
    "#,
    // 6: a tool loop's calls (see schema.rs, migration 6).
    r#"
    ALTER TABLE execution_details ADD COLUMN tool_calls TEXT;
    "#,
    // 7: running totals of each rate-limited scope's admission log (see schema.rs, migration 7).
    r#"
    CREATE TABLE rate_totals (
        scope TEXT COLLATE "C" PRIMARY KEY,
        requests BIGINT NOT NULL,
        tokens BIGINT NOT NULL,
        horizon BIGINT NOT NULL
    );
    INSERT INTO rate_totals (scope, requests, tokens, horizon)
        SELECT scope, COUNT(*), SUM(tokens), MIN(at) - 1 FROM rate_events GROUP BY scope;
    "#,
    // 8: the register of tenants seen (see schema.rs, migration 8).
    r#"
    CREATE TABLE tenants (
        tenant_id TEXT COLLATE "C" PRIMARY KEY,
        name TEXT,
        first_used_at BIGINT NOT NULL,
        last_used_at BIGINT NOT NULL
    );
    "#,
    // 9: daily and monthly rollups (see schema.rs, migration 9).
    r#"
    CREATE TABLE daily_rollups (
        period TEXT COLLATE "C" NOT NULL,
        tenant_id TEXT COLLATE "C" NOT NULL,
        agent TEXT COLLATE "C" NOT NULL,
        model_id TEXT COLLATE "C" NOT NULL,
        status TEXT COLLATE "C" NOT NULL,
        calls BIGINT NOT NULL DEFAULT 0,
        input_tokens BIGINT NOT NULL DEFAULT 0,
        output_tokens BIGINT NOT NULL DEFAULT 0,
        cached_tokens BIGINT NOT NULL DEFAULT 0,
        total_tokens BIGINT NOT NULL DEFAULT 0,
        input_cost BIGINT NOT NULL DEFAULT 0,
        output_cost BIGINT NOT NULL DEFAULT 0,
        total_cost BIGINT NOT NULL DEFAULT 0,
        attempts_count BIGINT NOT NULL DEFAULT 0,
        cache_write_tokens BIGINT NOT NULL DEFAULT 0,
        cache_read_cost BIGINT NOT NULL DEFAULT 0,
        cache_write_cost BIGINT NOT NULL DEFAULT 0,
        duration_ms BIGINT NOT NULL DEFAULT 0,
        time_to_first_token_ms BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (period, tenant_id, agent, model_id, status)
    );
    CREATE TABLE monthly_rollups (
        period TEXT COLLATE "C" NOT NULL,
        tenant_id TEXT COLLATE "C" NOT NULL,
        agent TEXT COLLATE "C" NOT NULL,
        model_id TEXT COLLATE "C" NOT NULL,
        status TEXT COLLATE "C" NOT NULL,
        calls BIGINT NOT NULL DEFAULT 0,
        input_tokens BIGINT NOT NULL DEFAULT 0,
        output_tokens BIGINT NOT NULL DEFAULT 0,
        cached_tokens BIGINT NOT NULL DEFAULT 0,
        total_tokens BIGINT NOT NULL DEFAULT 0,
        input_cost BIGINT NOT NULL DEFAULT 0,
        output_cost BIGINT NOT NULL DEFAULT 0,
        total_cost BIGINT NOT NULL DEFAULT 0,
        attempts_count BIGINT NOT NULL DEFAULT 0,
        cache_write_tokens BIGINT NOT NULL DEFAULT 0,
        cache_read_cost BIGINT NOT NULL DEFAULT 0,
        cache_write_cost BIGINT NOT NULL DEFAULT 0,
        duration_ms BIGINT NOT NULL DEFAULT 0,
        time_to_first_token_ms BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (period, tenant_id, agent, model_id, status)
    );
    CREATE INDEX executions_running ON executions (started_at) WHERE status = 'running';
    "#,
    // 10: the response cache (see schema.rs, migration 10).
    r#"
    ALTER TABLE executions ADD COLUMN cached BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE response_cache (
        tenant_id TEXT COLLATE "C" NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        content TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        finish_reason TEXT,
        execution_id TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, key)
    );
    CREATE INDEX response_cache_expiry ON response_cache (expires_at);
    "#,
    // 11: the dashboard's list of tenants (store/tenant_list.rs): this period's counters of
    // every tenant by period first, and today's failed or refused calls without a scan; a
    // tenant's page reads its own days of rollups (the primary key is by day first: every
    // tenant's rows). IF NOT EXISTS: a test that re-runs the rollups' migration 9 re-runs this.
    r#"
    CREATE INDEX IF NOT EXISTS usage_counters_period ON usage_counters (period, scope);
    CREATE INDEX IF NOT EXISTS executions_problems ON executions (started_at, tenant_id, status)
        WHERE status IN ('error', 'timeout', 'blocked');
    CREATE INDEX IF NOT EXISTS daily_rollups_tenant ON daily_rollups (tenant_id, period);
    "#,
];
