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
    // 12: admission and settlement in one round trip each (store/postgres/server_side.rs).
    // PL/pgSQL keeps each function's plans per server connection, so a call parses only its
    // `SELECT f(...)`, and it holds its row locks only while the server runs it. The functions
    // take the common case (the call goes ahead; a settlement that changes no breaker) and
    // return a reason otherwise, having changed nothing a retry would not; the Rust store then
    // runs the statement-by-statement transaction, which decides every case (see admission.rs).
    // `tenantllm_roll` is rollups::record_sql's PostgreSQL SQL for both tables (a test pins it).
    // OR REPLACE: a test that re-runs the rollups' migration 9 re-runs this.
    r#"
    CREATE OR REPLACE FUNCTION tenantllm_roll(p_day TEXT, p_month TEXT, p_sign BIGINT, p_id TEXT) RETURNS VOID
    LANGUAGE plpgsql AS $fn$
    BEGIN
    INSERT INTO daily_rollups (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
             SELECT p_day, COALESCE(tenant_id, ''), agent, model_id, status, p_sign, p_sign * COALESCE(input_tokens, 0), p_sign * COALESCE(output_tokens, 0), p_sign * COALESCE(cached_tokens, 0), p_sign * COALESCE(total_tokens, 0), p_sign * COALESCE(input_cost, 0), p_sign * COALESCE(output_cost, 0), p_sign * COALESCE(total_cost, 0), p_sign * COALESCE(attempts_count, 0), p_sign * COALESCE(cache_write_tokens, 0), p_sign * COALESCE(cache_read_cost, 0), p_sign * COALESCE(cache_write_cost, 0), p_sign * COALESCE(duration_ms, 0), p_sign * COALESCE(time_to_first_token_ms, 0)
             FROM executions WHERE id = p_id AND status <> 'running'
             ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = daily_rollups.calls + excluded.calls, input_tokens = daily_rollups.input_tokens + excluded.input_tokens, output_tokens = daily_rollups.output_tokens + excluded.output_tokens, cached_tokens = daily_rollups.cached_tokens + excluded.cached_tokens, total_tokens = daily_rollups.total_tokens + excluded.total_tokens, input_cost = daily_rollups.input_cost + excluded.input_cost, output_cost = daily_rollups.output_cost + excluded.output_cost, total_cost = daily_rollups.total_cost + excluded.total_cost, attempts_count = daily_rollups.attempts_count + excluded.attempts_count, cache_write_tokens = daily_rollups.cache_write_tokens + excluded.cache_write_tokens, cache_read_cost = daily_rollups.cache_read_cost + excluded.cache_read_cost, cache_write_cost = daily_rollups.cache_write_cost + excluded.cache_write_cost, duration_ms = daily_rollups.duration_ms + excluded.duration_ms, time_to_first_token_ms = daily_rollups.time_to_first_token_ms + excluded.time_to_first_token_ms;
    INSERT INTO monthly_rollups (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
             SELECT p_month, COALESCE(tenant_id, ''), agent, model_id, status, p_sign, p_sign * COALESCE(input_tokens, 0), p_sign * COALESCE(output_tokens, 0), p_sign * COALESCE(cached_tokens, 0), p_sign * COALESCE(total_tokens, 0), p_sign * COALESCE(input_cost, 0), p_sign * COALESCE(output_cost, 0), p_sign * COALESCE(total_cost, 0), p_sign * COALESCE(attempts_count, 0), p_sign * COALESCE(cache_write_tokens, 0), p_sign * COALESCE(cache_read_cost, 0), p_sign * COALESCE(cache_write_cost, 0), p_sign * COALESCE(duration_ms, 0), p_sign * COALESCE(time_to_first_token_ms, 0)
             FROM executions WHERE id = p_id AND status <> 'running'
             ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = monthly_rollups.calls + excluded.calls, input_tokens = monthly_rollups.input_tokens + excluded.input_tokens, output_tokens = monthly_rollups.output_tokens + excluded.output_tokens, cached_tokens = monthly_rollups.cached_tokens + excluded.cached_tokens, total_tokens = monthly_rollups.total_tokens + excluded.total_tokens, input_cost = monthly_rollups.input_cost + excluded.input_cost, output_cost = monthly_rollups.output_cost + excluded.output_cost, total_cost = monthly_rollups.total_cost + excluded.total_cost, attempts_count = monthly_rollups.attempts_count + excluded.attempts_count, cache_write_tokens = monthly_rollups.cache_write_tokens + excluded.cache_write_tokens, cache_read_cost = monthly_rollups.cache_read_cost + excluded.cache_read_cost, cache_write_cost = monthly_rollups.cache_write_cost + excluded.cache_write_cost, duration_ms = monthly_rollups.duration_ms + excluded.duration_ms, time_to_first_token_ms = monthly_rollups.time_to_first_token_ms + excluded.time_to_first_token_ms;
    END
    $fn$;

    -- The counters (scope, period), in key order: locked, created first if missing; what they
    -- held before this call, six numbers each (cost, tokens, executions and their reserved
    -- amounts), or NULL when p_hard (a hard limit: scope, period, metric 0 cost, 1 tokens,
    -- 2 executions, limit) would be passed by the estimate.
    CREATE OR REPLACE FUNCTION tenantllm_lock_counters(p_scopes TEXT[], p_periods TEXT[], p_hard_scopes TEXT[],
        p_hard_periods TEXT[], p_hard_metrics INT[], p_hard_limits BIGINT[], p_cost BIGINT, p_tokens BIGINT,
        p_executions BIGINT) RETURNS BIGINT[]
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_locked BIGINT;
        v_usage BIGINT[] := '{}';
        v_row RECORD;
    BEGIN
        SELECT COUNT(*) INTO v_locked FROM (
            SELECT 1 FROM usage_counters c JOIN unnest(p_scopes, p_periods) AS k(scope, period)
                ON c.scope = k.scope AND c.period = k.period
            ORDER BY c.scope, c.period FOR UPDATE OF c) AS l;
        IF v_locked < cardinality(p_scopes) THEN
            INSERT INTO usage_counters (scope, period)
                SELECT scope, period FROM unnest(p_scopes, p_periods) WITH ORDINALITY AS k(scope, period, n) ORDER BY n
                ON CONFLICT (scope, period) DO NOTHING;
            PERFORM 1 FROM usage_counters c JOIN unnest(p_scopes, p_periods) AS k(scope, period)
                ON c.scope = k.scope AND c.period = k.period
            ORDER BY c.scope, c.period FOR UPDATE OF c;
        END IF;
        -- In NUMERIC, so no sum overflows; at a 64-bit limit this may refuse where Rust's
        -- saturating sums would not, and the Rust transaction then decides.
        IF EXISTS (
            SELECT 1 FROM unnest(p_hard_scopes, p_hard_periods, p_hard_metrics, p_hard_limits) AS h(scope, period, metric, lim)
            JOIN usage_counters c ON c.scope = h.scope AND c.period = h.period
            WHERE CASE h.metric
                WHEN 0 THEN c.cost::NUMERIC + c.reserved_cost + p_cost
                WHEN 1 THEN c.tokens::NUMERIC + c.reserved_tokens + p_tokens
                ELSE c.executions::NUMERIC + c.reserved_executions + p_executions
            END > h.lim
        ) THEN
            RETURN NULL;
        END IF;
        FOR v_row IN
            SELECT c.cost, c.tokens, c.executions, c.reserved_cost, c.reserved_tokens, c.reserved_executions
            FROM unnest(p_scopes, p_periods) WITH ORDINALITY AS k(scope, period, n)
            JOIN usage_counters c ON c.scope = k.scope AND c.period = k.period ORDER BY k.n
        LOOP
            v_usage := v_usage || ARRAY[v_row.cost, v_row.tokens, v_row.executions,
                v_row.reserved_cost, v_row.reserved_tokens, v_row.reserved_executions];
        END LOOP;
        RETURN v_usage;
    END
    $fn$;

    -- Admits a call that no rate limit applies to, in the order admission.rs takes its locks.
    -- Returns 'go' with the counters' usage before this call (tenantllm_lock_counters), or
    -- why the Rust transaction must decide: 'timezone' (the counters are keyed in another
    -- zone), 'budget' (the tenant's stored budget is not the one with xmin p_budget_stamp),
    -- 'expired' (reservations to release), 'refused' (a hard limit), 'breaker' (the first
    -- model's breaker is not closed). Only the register of tenants may have changed then.
    CREATE OR REPLACE FUNCTION tenantllm_admit(p_lock_timeout TEXT, p_timezone TEXT, p_now BIGINT,
        p_remember BOOLEAN, p_tenant TEXT, p_tenant_name TEXT, p_budget_tenant TEXT, p_budget_stamp BIGINT,
        p_scopes TEXT[], p_periods TEXT[], p_hard_scopes TEXT[], p_hard_periods TEXT[], p_hard_metrics INT[],
        p_hard_limits BIGINT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_counters TEXT,
        p_expires_at BIGINT, p_breaker TEXT,
        p_id TEXT, p_agent TEXT, p_model_id TEXT, p_provider TEXT, p_exec_tenant TEXT, p_started_at BIGINT,
        p_metadata TEXT, p_parent TEXT, p_root TEXT,
        OUT outcome TEXT, OUT usage BIGINT[])
    LANGUAGE plpgsql AS $fn$
    BEGIN
        PERFORM set_config('lock_timeout', p_lock_timeout, true);
        -- First, as in every write (see rebuild.rs `stored_timezone`).
        IF (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN
            outcome := 'timezone';
            RETURN;
        END IF;
        IF p_remember THEN
            INSERT INTO tenants (tenant_id, name, first_used_at, last_used_at) VALUES (p_tenant, p_tenant_name, p_now, p_now)
            ON CONFLICT (tenant_id) DO UPDATE SET name = COALESCE(EXCLUDED.name, tenants.name),
                first_used_at = LEAST(tenants.first_used_at, EXCLUDED.first_used_at),
                last_used_at = GREATEST(tenants.last_used_at, EXCLUDED.last_used_at);
        END IF;
        IF p_budget_tenant IS NOT NULL AND
            (SELECT xmin::TEXT::BIGINT FROM tenant_budgets WHERE tenant_id = p_budget_tenant) IS DISTINCT FROM p_budget_stamp THEN
            outcome := 'budget';
            RETURN;
        END IF;
        IF EXISTS (SELECT 1 FROM reservations WHERE expires_at <= p_now) THEN
            outcome := 'expired';
            RETURN;
        END IF;
        usage := tenantllm_lock_counters(p_scopes, p_periods, p_hard_scopes, p_hard_periods, p_hard_metrics,
            p_hard_limits, p_cost, p_tokens, p_executions);
        IF usage IS NULL THEN
            outcome := 'refused';
            RETURN;
        END IF;
        IF EXISTS (SELECT 1 FROM breakers WHERE key = p_breaker AND phase <> 'closed') THEN
            outcome := 'breaker';
            usage := NULL;
            RETURN;
        END IF;
        IF cardinality(p_scopes) > 0 THEN
            UPDATE usage_counters c SET reserved_cost = c.reserved_cost + p_cost, reserved_tokens = c.reserved_tokens + p_tokens,
                reserved_executions = c.reserved_executions + p_executions
            FROM unnest(p_scopes, p_periods) AS k(scope, period) WHERE c.scope = k.scope AND c.period = k.period;
            INSERT INTO reservations (execution_id, counters, cost, tokens, executions, expires_at)
            VALUES (p_id, p_counters, p_cost, p_tokens, p_executions, p_expires_at);
        END IF;
        INSERT INTO executions (id, agent, model_id, provider, tenant_id, status, started_at, metadata,
            parent_execution_id, root_execution_id)
        VALUES (p_id, p_agent, p_model_id, p_provider, p_exec_tenant, 'running', p_started_at, p_metadata, p_parent, p_root);
        outcome := 'go';
    END
    $fn$;

    -- Settles a call whose admission logged it in no rate limit's window and whose outcome
    -- changes no breaker (the Rust store tells): releases its reservation, closes its row
    -- (rollups too), adds its usage (p_scopes, p_periods: usage_keys) to the counters in key
    -- order. Returns 'done' with the changed counters' recorded usage after, or, having
    -- changed nothing, 'timezone' or 'taken_over' (its reservation expired: the Rust
    -- transaction settles it).
    CREATE OR REPLACE FUNCTION tenantllm_settle(p_lock_timeout TEXT, p_timezone TEXT, p_reserved BOOLEAN,
        p_scopes TEXT[], p_periods TEXT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_day TEXT, p_month TEXT,
        p_id TEXT, p_status TEXT, p_error_class TEXT, p_error_message TEXT, p_chosen_model_id TEXT, p_provider TEXT,
        p_completed_at BIGINT, p_duration_ms BIGINT, p_input_tokens BIGINT, p_output_tokens BIGINT,
        p_cached_tokens BIGINT, p_total_tokens BIGINT, p_input_cost BIGINT, p_output_cost BIGINT, p_total_cost BIGINT,
        p_attempts_count BIGINT, p_attempts TEXT, p_finish_reason TEXT, p_cache_write_tokens BIGINT,
        p_cache_read_cost BIGINT, p_cache_write_cost BIGINT, p_time_to_first_token_ms BIGINT, p_cached BIGINT,
        p_store_details BOOLEAN, p_system_prompt TEXT, p_user_prompt TEXT, p_response TEXT, p_tool_calls TEXT,
        OUT outcome TEXT, OUT scopes TEXT[], OUT periods TEXT[], OUT recorded_cost BIGINT[],
        OUT recorded_tokens BIGINT[], OUT recorded_executions BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_counters TEXT := '';
        v_cost BIGINT := 0;
        v_tokens BIGINT := 0;
        v_executions BIGINT := 0;
    BEGIN
        PERFORM set_config('lock_timeout', p_lock_timeout, true);
        IF (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN
            outcome := 'timezone';
            RETURN;
        END IF;
        IF p_reserved THEN
            DELETE FROM reservations WHERE execution_id = p_id RETURNING counters, cost, tokens, executions
                INTO v_counters, v_cost, v_tokens, v_executions;
            IF NOT FOUND THEN
                outcome := 'taken_over';
                RETURN;
            END IF;
        END IF;
        PERFORM tenantllm_roll(p_day, p_month, -1, p_id);
        UPDATE executions SET status = p_status, error_class = p_error_class, error_message = p_error_message,
            chosen_model_id = p_chosen_model_id, provider = COALESCE(p_provider, provider), completed_at = p_completed_at,
            duration_ms = p_duration_ms, input_tokens = p_input_tokens, output_tokens = p_output_tokens,
            cached_tokens = p_cached_tokens, total_tokens = p_total_tokens, input_cost = p_input_cost,
            output_cost = p_output_cost, total_cost = p_total_cost, attempts_count = p_attempts_count,
            attempts = p_attempts, finish_reason = p_finish_reason, cache_write_tokens = p_cache_write_tokens,
            cache_read_cost = p_cache_read_cost, cache_write_cost = p_cache_write_cost,
            time_to_first_token_ms = p_time_to_first_token_ms, cached = p_cached
        WHERE id = p_id;
        IF NOT FOUND THEN
            -- Undone with the rest; the Rust transaction then reports it.
            RAISE EXCEPTION 'execution % vanished before it could be completed', p_id USING ERRCODE = 'no_data_found';
        END IF;
        PERFORM tenantllm_roll(p_day, p_month, 1, p_id);
        IF p_store_details THEN
            INSERT INTO execution_details (execution_id, system_prompt, user_prompt, response, tool_calls)
            VALUES (p_id, p_system_prompt, p_user_prompt, p_response, p_tool_calls)
            ON CONFLICT (execution_id) DO UPDATE SET system_prompt = EXCLUDED.system_prompt,
                user_prompt = EXCLUDED.user_prompt, response = EXCLUDED.response, tool_calls = EXCLUDED.tool_calls;
        END IF;
        WITH d AS (
            SELECT k.scope, k.period, p_cost AS cost, p_tokens AS tokens, p_executions AS executions,
                0::BIGINT AS rc, 0::BIGINT AS rt, 0::BIGINT AS re
            FROM unnest(p_scopes, p_periods) AS k(scope, period)
            UNION ALL
            SELECT split_part(l, E'\t', 1), split_part(l, E'\t', 2), 0, 0, 0, -v_cost, -v_tokens, -v_executions
            FROM unnest(string_to_array(v_counters, E'\n')) AS l
        ), s AS (
            SELECT scope, period, SUM(cost)::BIGINT AS cost, SUM(tokens)::BIGINT AS tokens, SUM(executions)::BIGINT AS executions,
                SUM(rc)::BIGINT AS rc, SUM(rt)::BIGINT AS rt, SUM(re)::BIGINT AS re
            FROM d GROUP BY scope, period
        ), bumped AS (
            INSERT INTO usage_counters AS c (scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions)
            SELECT scope, period, cost, tokens, executions, rc, rt, re FROM s ORDER BY scope COLLATE "C", period COLLATE "C"
            ON CONFLICT (scope, period) DO UPDATE SET cost = c.cost + EXCLUDED.cost, tokens = c.tokens + EXCLUDED.tokens,
                executions = c.executions + EXCLUDED.executions, reserved_cost = c.reserved_cost + EXCLUDED.reserved_cost,
                reserved_tokens = c.reserved_tokens + EXCLUDED.reserved_tokens,
                reserved_executions = c.reserved_executions + EXCLUDED.reserved_executions
            RETURNING c.scope, c.period, c.cost, c.tokens, c.executions
        )
        SELECT COALESCE(array_agg(b.scope), '{}'), COALESCE(array_agg(b.period), '{}'), COALESCE(array_agg(b.cost), '{}'),
            COALESCE(array_agg(b.tokens), '{}'), COALESCE(array_agg(b.executions), '{}')
        INTO scopes, periods, recorded_cost, recorded_tokens, recorded_executions FROM bumped AS b;
        outcome := 'done';
    END
    $fn$;
    "#,
    // 13: today's refused calls include those refused by a rate limit (schema.rs, migration 14).
    r#"
    DROP INDEX IF EXISTS executions_problems;
    CREATE INDEX executions_problems ON executions (started_at, tenant_id, status)
        WHERE status IN ('error', 'timeout', 'blocked', 'rate_limited');
    "#,
    // 14: admission holds the counters' row locks for less time. Every call of a tenant (and,
    // under a global budget, every call) waits for the same counter rows, so the calls a
    // server can admit in a second are about one over the time each admission holds them.
    // tenantllm_admit now makes every check that needs no lock and writes the execution and
    // reservation rows first, then locks and reads the counters in one statement, compares
    // them with the hard limits in its arrays and takes its reservation: one more statement
    // while they are locked. A refusal deletes the two rows again (the Rust transaction then
    // decides, as before). tenantllm_lock_counters, now unused, goes. tenantllm_settle closes
    // only a running row, whose rollups hold nothing of it yet, so it no longer runs
    // tenantllm_roll's two statements that take an earlier outcome out of them.
    r#"
    DROP FUNCTION tenantllm_lock_counters(TEXT[], TEXT[], TEXT[], TEXT[], INT[], BIGINT[], BIGINT, BIGINT, BIGINT);

    -- Admits a call that no rate limit applies to. Returns 'go' with the counters' usage
    -- before this call, six numbers each (cost, tokens, executions and their reserved
    -- amounts) in the order of p_scopes, p_periods, or why the Rust transaction must decide:
    -- 'timezone' (the counters are keyed in another zone), 'budget' (the tenant's stored
    -- budget is not the one with xmin p_budget_stamp), 'expired' (reservations to release),
    -- 'breaker' (the first model's breaker is not closed), 'refused' (p_hard: a hard limit,
    -- scope, period, metric 0 cost, 1 tokens, 2 executions, limit, that the estimate would
    -- pass). Only the register of tenants may have changed then.
    CREATE OR REPLACE FUNCTION tenantllm_admit(p_lock_timeout TEXT, p_timezone TEXT, p_now BIGINT,
        p_remember BOOLEAN, p_tenant TEXT, p_tenant_name TEXT, p_budget_tenant TEXT, p_budget_stamp BIGINT,
        p_scopes TEXT[], p_periods TEXT[], p_hard_scopes TEXT[], p_hard_periods TEXT[], p_hard_metrics INT[],
        p_hard_limits BIGINT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_counters TEXT,
        p_expires_at BIGINT, p_breaker TEXT,
        p_id TEXT, p_agent TEXT, p_model_id TEXT, p_provider TEXT, p_exec_tenant TEXT, p_started_at BIGINT,
        p_metadata TEXT, p_parent TEXT, p_root TEXT,
        OUT outcome TEXT, OUT usage BIGINT[])
    LANGUAGE plpgsql AS $fn$
    BEGIN
        PERFORM set_config('lock_timeout', p_lock_timeout, true);
        -- First, as in every write (see rebuild.rs `stored_timezone`).
        IF (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN
            outcome := 'timezone';
            RETURN;
        END IF;
        IF p_budget_tenant IS NOT NULL AND
            (SELECT xmin::TEXT::BIGINT FROM tenant_budgets WHERE tenant_id = p_budget_tenant) IS DISTINCT FROM p_budget_stamp THEN
            outcome := 'budget';
            RETURN;
        END IF;
        IF EXISTS (SELECT 1 FROM reservations WHERE expires_at <= p_now) THEN
            outcome := 'expired';
            RETURN;
        END IF;
        IF EXISTS (SELECT 1 FROM breakers WHERE key = p_breaker AND phase <> 'closed') THEN
            outcome := 'breaker';
            RETURN;
        END IF;
        IF p_remember THEN
            INSERT INTO tenants (tenant_id, name, first_used_at, last_used_at) VALUES (p_tenant, p_tenant_name, p_now, p_now)
            ON CONFLICT (tenant_id) DO UPDATE SET name = COALESCE(EXCLUDED.name, tenants.name),
                first_used_at = LEAST(tenants.first_used_at, EXCLUDED.first_used_at),
                last_used_at = GREATEST(tenants.last_used_at, EXCLUDED.last_used_at);
        END IF;
        INSERT INTO executions (id, agent, model_id, provider, tenant_id, status, started_at, metadata,
            parent_execution_id, root_execution_id)
        VALUES (p_id, p_agent, p_model_id, p_provider, p_exec_tenant, 'running', p_started_at, p_metadata, p_parent, p_root);
        outcome := 'go';
        usage := '{}';
        IF cardinality(p_scopes) = 0 THEN
            RETURN;
        END IF;
        INSERT INTO reservations (execution_id, counters, cost, tokens, executions, expires_at)
        VALUES (p_id, p_counters, p_cost, p_tokens, p_executions, p_expires_at);
        -- Locked in the order admission.rs locks them (counters.rs `lock_counters`), so no two
        -- calls wait on each other in a cycle; the first use of a counter creates it.
        FOR attempt IN 1..2 LOOP
            SELECT COALESCE(array_agg(u.v ORDER BY l.n, u.i), '{}') INTO usage FROM (
                SELECT k.n, c.cost, c.tokens, c.executions, c.reserved_cost, c.reserved_tokens, c.reserved_executions
                FROM usage_counters c JOIN unnest(p_scopes, p_periods) WITH ORDINALITY AS k(scope, period, n)
                    ON c.scope = k.scope AND c.period = k.period
                ORDER BY c.scope, c.period FOR UPDATE OF c) AS l,
                LATERAL unnest(ARRAY[l.cost, l.tokens, l.executions, l.reserved_cost, l.reserved_tokens, l.reserved_executions])
                    WITH ORDINALITY AS u(v, i);
            EXIT WHEN cardinality(usage) = 6 * cardinality(p_scopes);
            INSERT INTO usage_counters (scope, period)
                SELECT scope, period FROM unnest(p_scopes, p_periods) WITH ORDINALITY AS k(scope, period, n) ORDER BY n
                ON CONFLICT (scope, period) DO NOTHING;
        END LOOP;
        -- In NUMERIC, so no sum overflows; at a 64-bit limit this may refuse where Rust's
        -- saturating sums would not, and the Rust transaction then decides.
        IF EXISTS (
            SELECT 1 FROM unnest(p_hard_scopes, p_hard_periods, p_hard_metrics, p_hard_limits) AS h(scope, period, metric, lim)
            JOIN unnest(p_scopes, p_periods) WITH ORDINALITY AS k(scope, period, n) ON k.scope = h.scope AND k.period = h.period
            WHERE usage[6 * (k.n - 1) + 1 + h.metric]::NUMERIC + usage[6 * (k.n - 1) + 4 + h.metric]
                + CASE h.metric WHEN 0 THEN p_cost WHEN 1 THEN p_tokens ELSE p_executions END > h.lim
        ) THEN
            DELETE FROM reservations WHERE execution_id = p_id;
            DELETE FROM executions WHERE id = p_id;
            outcome := 'refused';
            usage := NULL;
            RETURN;
        END IF;
        UPDATE usage_counters c SET reserved_cost = c.reserved_cost + p_cost, reserved_tokens = c.reserved_tokens + p_tokens,
            reserved_executions = c.reserved_executions + p_executions
        FROM unnest(p_scopes, p_periods) AS k(scope, period) WHERE c.scope = k.scope AND c.period = k.period;
    END
    $fn$;

    -- Settles a call whose admission logged it in no rate limit's window and whose outcome
    -- changes no breaker (the Rust store tells): releases its reservation, closes its row
    -- (rollups too), adds its usage (p_scopes, p_periods: usage_keys) to the counters in key
    -- order. Returns 'done' with the changed counters' recorded usage after, or, having
    -- changed nothing, 'timezone' or 'taken_over' (its reservation expired: the Rust
    -- transaction settles it). A row no longer running fails with no_data_found, undone.
    CREATE OR REPLACE FUNCTION tenantllm_settle(p_lock_timeout TEXT, p_timezone TEXT, p_reserved BOOLEAN,
        p_scopes TEXT[], p_periods TEXT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_day TEXT, p_month TEXT,
        p_id TEXT, p_status TEXT, p_error_class TEXT, p_error_message TEXT, p_chosen_model_id TEXT, p_provider TEXT,
        p_completed_at BIGINT, p_duration_ms BIGINT, p_input_tokens BIGINT, p_output_tokens BIGINT,
        p_cached_tokens BIGINT, p_total_tokens BIGINT, p_input_cost BIGINT, p_output_cost BIGINT, p_total_cost BIGINT,
        p_attempts_count BIGINT, p_attempts TEXT, p_finish_reason TEXT, p_cache_write_tokens BIGINT,
        p_cache_read_cost BIGINT, p_cache_write_cost BIGINT, p_time_to_first_token_ms BIGINT, p_cached BIGINT,
        p_store_details BOOLEAN, p_system_prompt TEXT, p_user_prompt TEXT, p_response TEXT, p_tool_calls TEXT,
        OUT outcome TEXT, OUT scopes TEXT[], OUT periods TEXT[], OUT recorded_cost BIGINT[],
        OUT recorded_tokens BIGINT[], OUT recorded_executions BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_counters TEXT := '';
        v_cost BIGINT := 0;
        v_tokens BIGINT := 0;
        v_executions BIGINT := 0;
    BEGIN
        PERFORM set_config('lock_timeout', p_lock_timeout, true);
        IF (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN
            outcome := 'timezone';
            RETURN;
        END IF;
        IF p_reserved THEN
            DELETE FROM reservations WHERE execution_id = p_id RETURNING counters, cost, tokens, executions
                INTO v_counters, v_cost, v_tokens, v_executions;
            IF NOT FOUND THEN
                outcome := 'taken_over';
                RETURN;
            END IF;
        END IF;
        UPDATE executions SET status = p_status, error_class = p_error_class, error_message = p_error_message,
            chosen_model_id = p_chosen_model_id, provider = COALESCE(p_provider, provider), completed_at = p_completed_at,
            duration_ms = p_duration_ms, input_tokens = p_input_tokens, output_tokens = p_output_tokens,
            cached_tokens = p_cached_tokens, total_tokens = p_total_tokens, input_cost = p_input_cost,
            output_cost = p_output_cost, total_cost = p_total_cost, attempts_count = p_attempts_count,
            attempts = p_attempts, finish_reason = p_finish_reason, cache_write_tokens = p_cache_write_tokens,
            cache_read_cost = p_cache_read_cost, cache_write_cost = p_cache_write_cost,
            time_to_first_token_ms = p_time_to_first_token_ms, cached = p_cached
        WHERE id = p_id AND status = 'running';
        IF NOT FOUND THEN
            -- Gone, or closed before (its rollups count it under its earlier outcome, which
            -- would have to come out first): undone with the rest; the Rust transaction then
            -- settles or reports it.
            RAISE EXCEPTION 'execution % is not running', p_id USING ERRCODE = 'no_data_found';
        END IF;
        PERFORM tenantllm_roll(p_day, p_month, 1, p_id);
        IF p_store_details THEN
            INSERT INTO execution_details (execution_id, system_prompt, user_prompt, response, tool_calls)
            VALUES (p_id, p_system_prompt, p_user_prompt, p_response, p_tool_calls)
            ON CONFLICT (execution_id) DO UPDATE SET system_prompt = EXCLUDED.system_prompt,
                user_prompt = EXCLUDED.user_prompt, response = EXCLUDED.response, tool_calls = EXCLUDED.tool_calls;
        END IF;
        WITH d AS (
            SELECT k.scope, k.period, p_cost AS cost, p_tokens AS tokens, p_executions AS executions,
                0::BIGINT AS rc, 0::BIGINT AS rt, 0::BIGINT AS re
            FROM unnest(p_scopes, p_periods) AS k(scope, period)
            UNION ALL
            SELECT split_part(l, E'\t', 1), split_part(l, E'\t', 2), 0, 0, 0, -v_cost, -v_tokens, -v_executions
            FROM unnest(string_to_array(v_counters, E'\n')) AS l
        ), s AS (
            SELECT scope, period, SUM(cost)::BIGINT AS cost, SUM(tokens)::BIGINT AS tokens, SUM(executions)::BIGINT AS executions,
                SUM(rc)::BIGINT AS rc, SUM(rt)::BIGINT AS rt, SUM(re)::BIGINT AS re
            FROM d GROUP BY scope, period
        ), bumped AS (
            INSERT INTO usage_counters AS c (scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions)
            SELECT scope, period, cost, tokens, executions, rc, rt, re FROM s ORDER BY scope COLLATE "C", period COLLATE "C"
            ON CONFLICT (scope, period) DO UPDATE SET cost = c.cost + EXCLUDED.cost, tokens = c.tokens + EXCLUDED.tokens,
                executions = c.executions + EXCLUDED.executions, reserved_cost = c.reserved_cost + EXCLUDED.reserved_cost,
                reserved_tokens = c.reserved_tokens + EXCLUDED.reserved_tokens,
                reserved_executions = c.reserved_executions + EXCLUDED.reserved_executions
            RETURNING c.scope, c.period, c.cost, c.tokens, c.executions
        )
        SELECT COALESCE(array_agg(b.scope), '{}'), COALESCE(array_agg(b.period), '{}'), COALESCE(array_agg(b.cost), '{}'),
            COALESCE(array_agg(b.tokens), '{}'), COALESCE(array_agg(b.executions), '{}')
        INTO scopes, periods, recorded_cost, recorded_tokens, recorded_executions FROM bumped AS b;
        outcome := 'done';
    END
    $fn$;
    "#,
    // 15: fewer statements per call inside the server-side functions, measured with
    // pg_stat_statements over 1,000 full-guard calls (benches/pg_statements.py): each
    // statement a PL/pgSQL function runs costs an executor start-up and a cached-plan fetch
    // whatever it does. tenantllm_admit makes its four checks that need no lock (timezone,
    // stored budget, expired leases, breaker) in one statement instead of four.
    // tenantllm_settle closes the row and adds it to both rollups in one statement, from the
    // values the UPDATE returns, instead of calling tenantllm_roll, whose two statements read
    // the row back (that call was ~115 of the function's ~540 µs). tenantllm_roll, now
    // unused (executions.rs runs rollups::record_sql itself), goes.
    r#"
    DROP FUNCTION IF EXISTS tenantllm_roll(TEXT, TEXT, BIGINT, TEXT);

    -- As migration 14's, with the checks before the first write in one statement.
    CREATE OR REPLACE FUNCTION tenantllm_admit(p_lock_timeout TEXT, p_timezone TEXT, p_now BIGINT,
        p_remember BOOLEAN, p_tenant TEXT, p_tenant_name TEXT, p_budget_tenant TEXT, p_budget_stamp BIGINT,
        p_scopes TEXT[], p_periods TEXT[], p_hard_scopes TEXT[], p_hard_periods TEXT[], p_hard_metrics INT[],
        p_hard_limits BIGINT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_counters TEXT,
        p_expires_at BIGINT, p_breaker TEXT,
        p_id TEXT, p_agent TEXT, p_model_id TEXT, p_provider TEXT, p_exec_tenant TEXT, p_started_at BIGINT,
        p_metadata TEXT, p_parent TEXT, p_root TEXT,
        OUT outcome TEXT, OUT usage BIGINT[])
    LANGUAGE plpgsql AS $fn$
    BEGIN
        -- Before any statement that could wait for a lock (the settings table is locked
        -- while the timezone changes: rebuild.rs).
        PERFORM set_config('lock_timeout', p_lock_timeout, true);
        -- The timezone first, as in every write (see rebuild.rs `stored_timezone`).
        outcome := CASE
            WHEN (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN 'timezone'
            WHEN p_budget_tenant IS NOT NULL AND (SELECT xmin::TEXT::BIGINT FROM tenant_budgets WHERE tenant_id = p_budget_tenant)
                IS DISTINCT FROM p_budget_stamp THEN 'budget'
            WHEN EXISTS (SELECT 1 FROM reservations WHERE expires_at <= p_now) THEN 'expired'
            WHEN EXISTS (SELECT 1 FROM breakers WHERE key = p_breaker AND phase <> 'closed') THEN 'breaker'
        END;
        IF outcome IS NOT NULL THEN
            RETURN;
        END IF;
        IF p_remember THEN
            INSERT INTO tenants (tenant_id, name, first_used_at, last_used_at) VALUES (p_tenant, p_tenant_name, p_now, p_now)
            ON CONFLICT (tenant_id) DO UPDATE SET name = COALESCE(EXCLUDED.name, tenants.name),
                first_used_at = LEAST(tenants.first_used_at, EXCLUDED.first_used_at),
                last_used_at = GREATEST(tenants.last_used_at, EXCLUDED.last_used_at);
        END IF;
        INSERT INTO executions (id, agent, model_id, provider, tenant_id, status, started_at, metadata,
            parent_execution_id, root_execution_id)
        VALUES (p_id, p_agent, p_model_id, p_provider, p_exec_tenant, 'running', p_started_at, p_metadata, p_parent, p_root);
        outcome := 'go';
        usage := '{}';
        IF cardinality(p_scopes) = 0 THEN
            RETURN;
        END IF;
        INSERT INTO reservations (execution_id, counters, cost, tokens, executions, expires_at)
        VALUES (p_id, p_counters, p_cost, p_tokens, p_executions, p_expires_at);
        -- Locked in the order admission.rs locks them (counters.rs `lock_counters`), so no two
        -- calls wait on each other in a cycle; the first use of a counter creates it.
        FOR attempt IN 1..2 LOOP
            SELECT COALESCE(array_agg(u.v ORDER BY l.n, u.i), '{}') INTO usage FROM (
                SELECT k.n, c.cost, c.tokens, c.executions, c.reserved_cost, c.reserved_tokens, c.reserved_executions
                FROM usage_counters c JOIN unnest(p_scopes, p_periods) WITH ORDINALITY AS k(scope, period, n)
                    ON c.scope = k.scope AND c.period = k.period
                ORDER BY c.scope, c.period FOR UPDATE OF c) AS l,
                LATERAL unnest(ARRAY[l.cost, l.tokens, l.executions, l.reserved_cost, l.reserved_tokens, l.reserved_executions])
                    WITH ORDINALITY AS u(v, i);
            EXIT WHEN cardinality(usage) = 6 * cardinality(p_scopes);
            INSERT INTO usage_counters (scope, period)
                SELECT scope, period FROM unnest(p_scopes, p_periods) WITH ORDINALITY AS k(scope, period, n) ORDER BY n
                ON CONFLICT (scope, period) DO NOTHING;
        END LOOP;
        -- In NUMERIC, so no sum overflows; at a 64-bit limit this may refuse where Rust's
        -- saturating sums would not, and the Rust transaction then decides.
        IF EXISTS (
            SELECT 1 FROM unnest(p_hard_scopes, p_hard_periods, p_hard_metrics, p_hard_limits) AS h(scope, period, metric, lim)
            JOIN unnest(p_scopes, p_periods) WITH ORDINALITY AS k(scope, period, n) ON k.scope = h.scope AND k.period = h.period
            WHERE usage[6 * (k.n - 1) + 1 + h.metric]::NUMERIC + usage[6 * (k.n - 1) + 4 + h.metric]
                + CASE h.metric WHEN 0 THEN p_cost WHEN 1 THEN p_tokens ELSE p_executions END > h.lim
        ) THEN
            DELETE FROM reservations WHERE execution_id = p_id;
            DELETE FROM executions WHERE id = p_id;
            outcome := 'refused';
            usage := NULL;
            RETURN;
        END IF;
        UPDATE usage_counters c SET reserved_cost = c.reserved_cost + p_cost, reserved_tokens = c.reserved_tokens + p_tokens,
            reserved_executions = c.reserved_executions + p_executions
        FROM unnest(p_scopes, p_periods) AS k(scope, period) WHERE c.scope = k.scope AND c.period = k.period;
    END
    $fn$;

    -- As migration 14's, with the row closed and rolled up in one statement: the rollups
    -- add the values just written (rollups::record_sql reads them back from the row).
    CREATE OR REPLACE FUNCTION tenantllm_settle(p_lock_timeout TEXT, p_timezone TEXT, p_reserved BOOLEAN,
        p_scopes TEXT[], p_periods TEXT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_day TEXT, p_month TEXT,
        p_id TEXT, p_status TEXT, p_error_class TEXT, p_error_message TEXT, p_chosen_model_id TEXT, p_provider TEXT,
        p_completed_at BIGINT, p_duration_ms BIGINT, p_input_tokens BIGINT, p_output_tokens BIGINT,
        p_cached_tokens BIGINT, p_total_tokens BIGINT, p_input_cost BIGINT, p_output_cost BIGINT, p_total_cost BIGINT,
        p_attempts_count BIGINT, p_attempts TEXT, p_finish_reason TEXT, p_cache_write_tokens BIGINT,
        p_cache_read_cost BIGINT, p_cache_write_cost BIGINT, p_time_to_first_token_ms BIGINT, p_cached BIGINT,
        p_store_details BOOLEAN, p_system_prompt TEXT, p_user_prompt TEXT, p_response TEXT, p_tool_calls TEXT,
        OUT outcome TEXT, OUT scopes TEXT[], OUT periods TEXT[], OUT recorded_cost BIGINT[],
        OUT recorded_tokens BIGINT[], OUT recorded_executions BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_counters TEXT := '';
        v_cost BIGINT := 0;
        v_tokens BIGINT := 0;
        v_executions BIGINT := 0;
    BEGIN
        PERFORM set_config('lock_timeout', p_lock_timeout, true);
        IF (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN
            outcome := 'timezone';
            RETURN;
        END IF;
        IF p_reserved THEN
            DELETE FROM reservations WHERE execution_id = p_id RETURNING counters, cost, tokens, executions
                INTO v_counters, v_cost, v_tokens, v_executions;
            IF NOT FOUND THEN
                outcome := 'taken_over';
                RETURN;
            END IF;
        END IF;
        WITH e AS (
            UPDATE executions SET status = p_status, error_class = p_error_class, error_message = p_error_message,
                chosen_model_id = p_chosen_model_id, provider = COALESCE(p_provider, provider), completed_at = p_completed_at,
                duration_ms = p_duration_ms, input_tokens = p_input_tokens, output_tokens = p_output_tokens,
                cached_tokens = p_cached_tokens, total_tokens = p_total_tokens, input_cost = p_input_cost,
                output_cost = p_output_cost, total_cost = p_total_cost, attempts_count = p_attempts_count,
                attempts = p_attempts, finish_reason = p_finish_reason, cache_write_tokens = p_cache_write_tokens,
                cache_read_cost = p_cache_read_cost, cache_write_cost = p_cache_write_cost,
                time_to_first_token_ms = p_time_to_first_token_ms, cached = p_cached
            WHERE id = p_id AND status = 'running'
            RETURNING *
        ), daily AS (
            INSERT INTO daily_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
                SELECT p_day, COALESCE(e.tenant_id, ''), e.agent, e.model_id, e.status, 1, COALESCE(e.input_tokens, 0), COALESCE(e.output_tokens, 0), COALESCE(e.cached_tokens, 0), COALESCE(e.total_tokens, 0), COALESCE(e.input_cost, 0), COALESCE(e.output_cost, 0), COALESCE(e.total_cost, 0), COALESCE(e.attempts_count, 0), COALESCE(e.cache_write_tokens, 0), COALESCE(e.cache_read_cost, 0), COALESCE(e.cache_write_cost, 0), COALESCE(e.duration_ms, 0), COALESCE(e.time_to_first_token_ms, 0) FROM e
                ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms
        )
        INSERT INTO monthly_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
                SELECT p_month, COALESCE(e.tenant_id, ''), e.agent, e.model_id, e.status, 1, COALESCE(e.input_tokens, 0), COALESCE(e.output_tokens, 0), COALESCE(e.cached_tokens, 0), COALESCE(e.total_tokens, 0), COALESCE(e.input_cost, 0), COALESCE(e.output_cost, 0), COALESCE(e.total_cost, 0), COALESCE(e.attempts_count, 0), COALESCE(e.cache_write_tokens, 0), COALESCE(e.cache_read_cost, 0), COALESCE(e.cache_write_cost, 0), COALESCE(e.duration_ms, 0), COALESCE(e.time_to_first_token_ms, 0) FROM e
                ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms;
        IF NOT FOUND THEN
            -- Gone, or closed before (its rollups count it under its earlier outcome, which
            -- would have to come out first): undone with the rest; the Rust transaction then
            -- settles or reports it.
            RAISE EXCEPTION 'execution % is not running', p_id USING ERRCODE = 'no_data_found';
        END IF;
        IF p_store_details THEN
            INSERT INTO execution_details (execution_id, system_prompt, user_prompt, response, tool_calls)
            VALUES (p_id, p_system_prompt, p_user_prompt, p_response, p_tool_calls)
            ON CONFLICT (execution_id) DO UPDATE SET system_prompt = EXCLUDED.system_prompt,
                user_prompt = EXCLUDED.user_prompt, response = EXCLUDED.response, tool_calls = EXCLUDED.tool_calls;
        END IF;
        WITH d AS (
            SELECT k.scope, k.period, p_cost AS cost, p_tokens AS tokens, p_executions AS executions,
                0::BIGINT AS rc, 0::BIGINT AS rt, 0::BIGINT AS re
            FROM unnest(p_scopes, p_periods) AS k(scope, period)
            UNION ALL
            SELECT split_part(l, E'\t', 1), split_part(l, E'\t', 2), 0, 0, 0, -v_cost, -v_tokens, -v_executions
            FROM unnest(string_to_array(v_counters, E'\n')) AS l
        ), s AS (
            SELECT scope, period, SUM(cost)::BIGINT AS cost, SUM(tokens)::BIGINT AS tokens, SUM(executions)::BIGINT AS executions,
                SUM(rc)::BIGINT AS rc, SUM(rt)::BIGINT AS rt, SUM(re)::BIGINT AS re
            FROM d GROUP BY scope, period
        ), bumped AS (
            INSERT INTO usage_counters AS c (scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions)
            SELECT scope, period, cost, tokens, executions, rc, rt, re FROM s ORDER BY scope COLLATE "C", period COLLATE "C"
            ON CONFLICT (scope, period) DO UPDATE SET cost = c.cost + EXCLUDED.cost, tokens = c.tokens + EXCLUDED.tokens,
                executions = c.executions + EXCLUDED.executions, reserved_cost = c.reserved_cost + EXCLUDED.reserved_cost,
                reserved_tokens = c.reserved_tokens + EXCLUDED.reserved_tokens,
                reserved_executions = c.reserved_executions + EXCLUDED.reserved_executions
            RETURNING c.scope, c.period, c.cost, c.tokens, c.executions
        )
        SELECT COALESCE(array_agg(b.scope), '{}'), COALESCE(array_agg(b.period), '{}'), COALESCE(array_agg(b.cost), '{}'),
            COALESCE(array_agg(b.tokens), '{}'), COALESCE(array_agg(b.executions), '{}')
        INTO scopes, periods, recorded_cost, recorded_tokens, recorded_executions FROM bumped AS b;
        outcome := 'done';
    END
    $fn$;
    "#,
    // 16: the daily rollups without the tenant (store/rollups.rs; SQLite's migration 13), for
    // questions over all tenants: a few rows per day instead of one per tenant and day. Filled
    // from the daily rollups; tenantllm_settle adds each call to its day's total in the
    // statement that adds it to the rollups. IF NOT EXISTS and the DELETE: a test that re-runs
    // the rollups' migration 9 re-runs this (and then rebuilds them all).
    r#"
    CREATE TABLE IF NOT EXISTS daily_totals (
        period TEXT COLLATE "C" NOT NULL,
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
        PRIMARY KEY (period, agent, model_id, status)
    );
    DELETE FROM daily_totals;
    INSERT INTO daily_totals (period, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
        SELECT period, agent, model_id, status, SUM(calls), SUM(input_tokens), SUM(output_tokens), SUM(cached_tokens), SUM(total_tokens), SUM(input_cost), SUM(output_cost), SUM(total_cost), SUM(attempts_count), SUM(cache_write_tokens), SUM(cache_read_cost), SUM(cache_write_cost), SUM(duration_ms), SUM(time_to_first_token_ms)
        FROM daily_rollups GROUP BY period, agent, model_id, status;

    -- As migration 15's, with the call added to its day's total too (the `totals` CTE).
    CREATE OR REPLACE FUNCTION tenantllm_settle(p_lock_timeout TEXT, p_timezone TEXT, p_reserved BOOLEAN,
        p_scopes TEXT[], p_periods TEXT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_day TEXT, p_month TEXT,
        p_id TEXT, p_status TEXT, p_error_class TEXT, p_error_message TEXT, p_chosen_model_id TEXT, p_provider TEXT,
        p_completed_at BIGINT, p_duration_ms BIGINT, p_input_tokens BIGINT, p_output_tokens BIGINT,
        p_cached_tokens BIGINT, p_total_tokens BIGINT, p_input_cost BIGINT, p_output_cost BIGINT, p_total_cost BIGINT,
        p_attempts_count BIGINT, p_attempts TEXT, p_finish_reason TEXT, p_cache_write_tokens BIGINT,
        p_cache_read_cost BIGINT, p_cache_write_cost BIGINT, p_time_to_first_token_ms BIGINT, p_cached BIGINT,
        p_store_details BOOLEAN, p_system_prompt TEXT, p_user_prompt TEXT, p_response TEXT, p_tool_calls TEXT,
        OUT outcome TEXT, OUT scopes TEXT[], OUT periods TEXT[], OUT recorded_cost BIGINT[],
        OUT recorded_tokens BIGINT[], OUT recorded_executions BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_counters TEXT := '';
        v_cost BIGINT := 0;
        v_tokens BIGINT := 0;
        v_executions BIGINT := 0;
    BEGIN
        PERFORM set_config('lock_timeout', p_lock_timeout, true);
        IF (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN
            outcome := 'timezone';
            RETURN;
        END IF;
        IF p_reserved THEN
            DELETE FROM reservations WHERE execution_id = p_id RETURNING counters, cost, tokens, executions
                INTO v_counters, v_cost, v_tokens, v_executions;
            IF NOT FOUND THEN
                outcome := 'taken_over';
                RETURN;
            END IF;
        END IF;
        WITH e AS (
            UPDATE executions SET status = p_status, error_class = p_error_class, error_message = p_error_message,
                chosen_model_id = p_chosen_model_id, provider = COALESCE(p_provider, provider), completed_at = p_completed_at,
                duration_ms = p_duration_ms, input_tokens = p_input_tokens, output_tokens = p_output_tokens,
                cached_tokens = p_cached_tokens, total_tokens = p_total_tokens, input_cost = p_input_cost,
                output_cost = p_output_cost, total_cost = p_total_cost, attempts_count = p_attempts_count,
                attempts = p_attempts, finish_reason = p_finish_reason, cache_write_tokens = p_cache_write_tokens,
                cache_read_cost = p_cache_read_cost, cache_write_cost = p_cache_write_cost,
                time_to_first_token_ms = p_time_to_first_token_ms, cached = p_cached
            WHERE id = p_id AND status = 'running'
            RETURNING *
        ), daily AS (
            INSERT INTO daily_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
                SELECT p_day, COALESCE(e.tenant_id, ''), e.agent, e.model_id, e.status, 1, COALESCE(e.input_tokens, 0), COALESCE(e.output_tokens, 0), COALESCE(e.cached_tokens, 0), COALESCE(e.total_tokens, 0), COALESCE(e.input_cost, 0), COALESCE(e.output_cost, 0), COALESCE(e.total_cost, 0), COALESCE(e.attempts_count, 0), COALESCE(e.cache_write_tokens, 0), COALESCE(e.cache_read_cost, 0), COALESCE(e.cache_write_cost, 0), COALESCE(e.duration_ms, 0), COALESCE(e.time_to_first_token_ms, 0) FROM e
                ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms
        ), totals AS (
            INSERT INTO daily_totals AS r (period, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
                SELECT p_day, e.agent, e.model_id, e.status, 1, COALESCE(e.input_tokens, 0), COALESCE(e.output_tokens, 0), COALESCE(e.cached_tokens, 0), COALESCE(e.total_tokens, 0), COALESCE(e.input_cost, 0), COALESCE(e.output_cost, 0), COALESCE(e.total_cost, 0), COALESCE(e.attempts_count, 0), COALESCE(e.cache_write_tokens, 0), COALESCE(e.cache_read_cost, 0), COALESCE(e.cache_write_cost, 0), COALESCE(e.duration_ms, 0), COALESCE(e.time_to_first_token_ms, 0) FROM e
                ON CONFLICT (period, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms
        )
        INSERT INTO monthly_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
                SELECT p_month, COALESCE(e.tenant_id, ''), e.agent, e.model_id, e.status, 1, COALESCE(e.input_tokens, 0), COALESCE(e.output_tokens, 0), COALESCE(e.cached_tokens, 0), COALESCE(e.total_tokens, 0), COALESCE(e.input_cost, 0), COALESCE(e.output_cost, 0), COALESCE(e.total_cost, 0), COALESCE(e.attempts_count, 0), COALESCE(e.cache_write_tokens, 0), COALESCE(e.cache_read_cost, 0), COALESCE(e.cache_write_cost, 0), COALESCE(e.duration_ms, 0), COALESCE(e.time_to_first_token_ms, 0) FROM e
                ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms;
        IF NOT FOUND THEN
            -- Gone, or closed before (its rollups count it under its earlier outcome, which
            -- would have to come out first): undone with the rest; the Rust transaction then
            -- settles or reports it.
            RAISE EXCEPTION 'execution % is not running', p_id USING ERRCODE = 'no_data_found';
        END IF;
        IF p_store_details THEN
            INSERT INTO execution_details (execution_id, system_prompt, user_prompt, response, tool_calls)
            VALUES (p_id, p_system_prompt, p_user_prompt, p_response, p_tool_calls)
            ON CONFLICT (execution_id) DO UPDATE SET system_prompt = EXCLUDED.system_prompt,
                user_prompt = EXCLUDED.user_prompt, response = EXCLUDED.response, tool_calls = EXCLUDED.tool_calls;
        END IF;
        WITH d AS (
            SELECT k.scope, k.period, p_cost AS cost, p_tokens AS tokens, p_executions AS executions,
                0::BIGINT AS rc, 0::BIGINT AS rt, 0::BIGINT AS re
            FROM unnest(p_scopes, p_periods) AS k(scope, period)
            UNION ALL
            SELECT split_part(l, E'\t', 1), split_part(l, E'\t', 2), 0, 0, 0, -v_cost, -v_tokens, -v_executions
            FROM unnest(string_to_array(v_counters, E'\n')) AS l
        ), s AS (
            SELECT scope, period, SUM(cost)::BIGINT AS cost, SUM(tokens)::BIGINT AS tokens, SUM(executions)::BIGINT AS executions,
                SUM(rc)::BIGINT AS rc, SUM(rt)::BIGINT AS rt, SUM(re)::BIGINT AS re
            FROM d GROUP BY scope, period
        ), bumped AS (
            INSERT INTO usage_counters AS c (scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions)
            SELECT scope, period, cost, tokens, executions, rc, rt, re FROM s ORDER BY scope COLLATE "C", period COLLATE "C"
            ON CONFLICT (scope, period) DO UPDATE SET cost = c.cost + EXCLUDED.cost, tokens = c.tokens + EXCLUDED.tokens,
                executions = c.executions + EXCLUDED.executions, reserved_cost = c.reserved_cost + EXCLUDED.reserved_cost,
                reserved_tokens = c.reserved_tokens + EXCLUDED.reserved_tokens,
                reserved_executions = c.reserved_executions + EXCLUDED.reserved_executions
            RETURNING c.scope, c.period, c.cost, c.tokens, c.executions
        )
        SELECT COALESCE(array_agg(b.scope), '{}'), COALESCE(array_agg(b.period), '{}'), COALESCE(array_agg(b.cost), '{}'),
            COALESCE(array_agg(b.tokens), '{}'), COALESCE(array_agg(b.executions), '{}')
        INTO scopes, periods, recorded_cost, recorded_tokens, recorded_executions FROM bumped AS b;
        outcome := 'done';
    END
    $fn$;
    "#,
    // 17: a settlement that reaches a budget alert's threshold marks it sent in the same
    // statement (tenantllm_settle's new p_alert_* arrays) instead of a transaction of its own
    // after it: one round trip instead of four (the settlement, then BEGIN, INSERT, COMMIT).
    // The function's arguments change, so the old one goes.
    r#"
    DROP FUNCTION IF EXISTS tenantllm_settle(TEXT, TEXT, BOOLEAN, TEXT[], TEXT[], BIGINT, BIGINT, BIGINT, TEXT, TEXT,
        TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, BIGINT, BIGINT, BIGINT, BIGINT, BIGINT, BIGINT, BIGINT, BIGINT, BIGINT,
        BIGINT, TEXT, TEXT, BIGINT, BIGINT, BIGINT, BIGINT, BIGINT, BOOLEAN, TEXT, TEXT, TEXT, TEXT);

    -- As migration 16's, with p_alert_*: the budget alerts this settlement may raise, one per
    -- check and threshold of the call's counters (server_side.rs): its scope, period, name,
    -- threshold (percent), metric (0 cost, 1 tokens, 2 executions) and the recorded amount at
    -- which it is reached. Those reached and not sent yet are marked sent; `alerted` returns
    -- their positions (1-based) in the arrays. Each alert's counter is locked by then, so no
    -- two calls wait on each other for one.
    CREATE OR REPLACE FUNCTION tenantllm_settle(p_lock_timeout TEXT, p_timezone TEXT, p_reserved BOOLEAN,
        p_scopes TEXT[], p_periods TEXT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_day TEXT, p_month TEXT,
        p_id TEXT, p_status TEXT, p_error_class TEXT, p_error_message TEXT, p_chosen_model_id TEXT, p_provider TEXT,
        p_completed_at BIGINT, p_duration_ms BIGINT, p_input_tokens BIGINT, p_output_tokens BIGINT,
        p_cached_tokens BIGINT, p_total_tokens BIGINT, p_input_cost BIGINT, p_output_cost BIGINT, p_total_cost BIGINT,
        p_attempts_count BIGINT, p_attempts TEXT, p_finish_reason TEXT, p_cache_write_tokens BIGINT,
        p_cache_read_cost BIGINT, p_cache_write_cost BIGINT, p_time_to_first_token_ms BIGINT, p_cached BIGINT,
        p_store_details BOOLEAN, p_system_prompt TEXT, p_user_prompt TEXT, p_response TEXT, p_tool_calls TEXT,
        p_alert_scopes TEXT[], p_alert_periods TEXT[], p_alert_names TEXT[], p_alert_thresholds BIGINT[],
        p_alert_metrics INT[], p_alert_at BIGINT[],
        OUT outcome TEXT, OUT scopes TEXT[], OUT periods TEXT[], OUT recorded_cost BIGINT[],
        OUT recorded_tokens BIGINT[], OUT recorded_executions BIGINT[], OUT alerted BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_counters TEXT := '';
        v_cost BIGINT := 0;
        v_tokens BIGINT := 0;
        v_executions BIGINT := 0;
    BEGIN
        PERFORM set_config('lock_timeout', p_lock_timeout, true);
        IF (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN
            outcome := 'timezone';
            RETURN;
        END IF;
        IF p_reserved THEN
            DELETE FROM reservations WHERE execution_id = p_id RETURNING counters, cost, tokens, executions
                INTO v_counters, v_cost, v_tokens, v_executions;
            IF NOT FOUND THEN
                outcome := 'taken_over';
                RETURN;
            END IF;
        END IF;
        WITH e AS (
            UPDATE executions SET status = p_status, error_class = p_error_class, error_message = p_error_message,
                chosen_model_id = p_chosen_model_id, provider = COALESCE(p_provider, provider), completed_at = p_completed_at,
                duration_ms = p_duration_ms, input_tokens = p_input_tokens, output_tokens = p_output_tokens,
                cached_tokens = p_cached_tokens, total_tokens = p_total_tokens, input_cost = p_input_cost,
                output_cost = p_output_cost, total_cost = p_total_cost, attempts_count = p_attempts_count,
                attempts = p_attempts, finish_reason = p_finish_reason, cache_write_tokens = p_cache_write_tokens,
                cache_read_cost = p_cache_read_cost, cache_write_cost = p_cache_write_cost,
                time_to_first_token_ms = p_time_to_first_token_ms, cached = p_cached
            WHERE id = p_id AND status = 'running'
            RETURNING *
        ), daily AS (
            INSERT INTO daily_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
                SELECT p_day, COALESCE(e.tenant_id, ''), e.agent, e.model_id, e.status, 1, COALESCE(e.input_tokens, 0), COALESCE(e.output_tokens, 0), COALESCE(e.cached_tokens, 0), COALESCE(e.total_tokens, 0), COALESCE(e.input_cost, 0), COALESCE(e.output_cost, 0), COALESCE(e.total_cost, 0), COALESCE(e.attempts_count, 0), COALESCE(e.cache_write_tokens, 0), COALESCE(e.cache_read_cost, 0), COALESCE(e.cache_write_cost, 0), COALESCE(e.duration_ms, 0), COALESCE(e.time_to_first_token_ms, 0) FROM e
                ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms
        ), totals AS (
            INSERT INTO daily_totals AS r (period, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
                SELECT p_day, e.agent, e.model_id, e.status, 1, COALESCE(e.input_tokens, 0), COALESCE(e.output_tokens, 0), COALESCE(e.cached_tokens, 0), COALESCE(e.total_tokens, 0), COALESCE(e.input_cost, 0), COALESCE(e.output_cost, 0), COALESCE(e.total_cost, 0), COALESCE(e.attempts_count, 0), COALESCE(e.cache_write_tokens, 0), COALESCE(e.cache_read_cost, 0), COALESCE(e.cache_write_cost, 0), COALESCE(e.duration_ms, 0), COALESCE(e.time_to_first_token_ms, 0) FROM e
                ON CONFLICT (period, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms
        )
        INSERT INTO monthly_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
                SELECT p_month, COALESCE(e.tenant_id, ''), e.agent, e.model_id, e.status, 1, COALESCE(e.input_tokens, 0), COALESCE(e.output_tokens, 0), COALESCE(e.cached_tokens, 0), COALESCE(e.total_tokens, 0), COALESCE(e.input_cost, 0), COALESCE(e.output_cost, 0), COALESCE(e.total_cost, 0), COALESCE(e.attempts_count, 0), COALESCE(e.cache_write_tokens, 0), COALESCE(e.cache_read_cost, 0), COALESCE(e.cache_write_cost, 0), COALESCE(e.duration_ms, 0), COALESCE(e.time_to_first_token_ms, 0) FROM e
                ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms;
        IF NOT FOUND THEN
            -- Gone, or closed before (its rollups count it under its earlier outcome, which
            -- would have to come out first): undone with the rest; the Rust transaction then
            -- settles or reports it.
            RAISE EXCEPTION 'execution % is not running', p_id USING ERRCODE = 'no_data_found';
        END IF;
        IF p_store_details THEN
            INSERT INTO execution_details (execution_id, system_prompt, user_prompt, response, tool_calls)
            VALUES (p_id, p_system_prompt, p_user_prompt, p_response, p_tool_calls)
            ON CONFLICT (execution_id) DO UPDATE SET system_prompt = EXCLUDED.system_prompt,
                user_prompt = EXCLUDED.user_prompt, response = EXCLUDED.response, tool_calls = EXCLUDED.tool_calls;
        END IF;
        WITH d AS (
            SELECT k.scope, k.period, p_cost AS cost, p_tokens AS tokens, p_executions AS executions,
                0::BIGINT AS rc, 0::BIGINT AS rt, 0::BIGINT AS re
            FROM unnest(p_scopes, p_periods) AS k(scope, period)
            UNION ALL
            SELECT split_part(l, E'\t', 1), split_part(l, E'\t', 2), 0, 0, 0, -v_cost, -v_tokens, -v_executions
            FROM unnest(string_to_array(v_counters, E'\n')) AS l
        ), s AS (
            SELECT scope, period, SUM(cost)::BIGINT AS cost, SUM(tokens)::BIGINT AS tokens, SUM(executions)::BIGINT AS executions,
                SUM(rc)::BIGINT AS rc, SUM(rt)::BIGINT AS rt, SUM(re)::BIGINT AS re
            FROM d GROUP BY scope, period
        ), bumped AS (
            INSERT INTO usage_counters AS c (scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions)
            SELECT scope, period, cost, tokens, executions, rc, rt, re FROM s ORDER BY scope COLLATE "C", period COLLATE "C"
            ON CONFLICT (scope, period) DO UPDATE SET cost = c.cost + EXCLUDED.cost, tokens = c.tokens + EXCLUDED.tokens,
                executions = c.executions + EXCLUDED.executions, reserved_cost = c.reserved_cost + EXCLUDED.reserved_cost,
                reserved_tokens = c.reserved_tokens + EXCLUDED.reserved_tokens,
                reserved_executions = c.reserved_executions + EXCLUDED.reserved_executions
            RETURNING c.scope, c.period, c.cost, c.tokens, c.executions
        )
        SELECT COALESCE(array_agg(b.scope), '{}'), COALESCE(array_agg(b.period), '{}'), COALESCE(array_agg(b.cost), '{}'),
            COALESCE(array_agg(b.tokens), '{}'), COALESCE(array_agg(b.executions), '{}')
        INTO scopes, periods, recorded_cost, recorded_tokens, recorded_executions FROM bumped AS b;
        alerted := '{}';
        IF cardinality(p_alert_scopes) > 0 THEN
            WITH reached AS (
                SELECT a.scope, a.period, a.name, a.threshold, a.n
                FROM unnest(p_alert_scopes, p_alert_periods, p_alert_names, p_alert_thresholds, p_alert_metrics, p_alert_at)
                        WITH ORDINALITY AS a(scope, period, name, threshold, metric, at, n)
                    JOIN unnest(scopes, periods, recorded_cost, recorded_tokens, recorded_executions)
                        AS r(scope, period, cost, tokens, executions) ON r.scope = a.scope AND r.period = a.period
                WHERE CASE a.metric WHEN 0 THEN r.cost WHEN 1 THEN r.tokens ELSE r.executions END >= a.at
            ), fresh AS (
                INSERT INTO alerts_sent (scope, period, name, threshold)
                SELECT scope, period, name, threshold FROM reached ORDER BY n
                ON CONFLICT DO NOTHING
                RETURNING scope, period, name, threshold
            )
            SELECT COALESCE(array_agg(reached.n ORDER BY reached.n), '{}') INTO alerted
            FROM reached JOIN fresh ON fresh.scope = reached.scope AND fresh.period = reached.period
                AND fresh.name = reached.name AND fresh.threshold = reached.threshold;
        END IF;
        outcome := 'done';
    END
    $fn$;
    "#,
    // 18: less work for the server per guarded call, counted in instructions its backend runs
    // per full-guard call (callgrind on the server, pg_statements.py's call): 2,828k before,
    // 2,422k after (-14 %). Most of it is executor start-up, which every statement pays by
    // plan node whatever rows it touches: the hash joins, sorts and aggregates over unnest()
    // that locked, checked and added to the counters cost more to start than the few rows
    // they touch. Each function now takes its counters one at a time, in the same order as
    // before, with an UPDATE by key that locks the row and returns what the checks need; the
    // checks and the alerts' thresholds are PL/pgSQL expressions, which need no executor, and
    // an alert is inserted only when reached; the rollups add the arguments instead of the
    // row's values read back; `lock_timeout` is set by an assignment, not PERFORM. Same
    // arguments and results as before.
    r#"
    -- As migration 15's, with the counters locked, reserved and checked one at a time.
    CREATE OR REPLACE FUNCTION tenantllm_admit(p_lock_timeout TEXT, p_timezone TEXT, p_now BIGINT,
        p_remember BOOLEAN, p_tenant TEXT, p_tenant_name TEXT, p_budget_tenant TEXT, p_budget_stamp BIGINT,
        p_scopes TEXT[], p_periods TEXT[], p_hard_scopes TEXT[], p_hard_periods TEXT[], p_hard_metrics INT[],
        p_hard_limits BIGINT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_counters TEXT,
        p_expires_at BIGINT, p_breaker TEXT,
        p_id TEXT, p_agent TEXT, p_model_id TEXT, p_provider TEXT, p_exec_tenant TEXT, p_started_at BIGINT,
        p_metadata TEXT, p_parent TEXT, p_root TEXT,
        OUT outcome TEXT, OUT usage BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_row BIGINT[];
        v_refused BOOLEAN := false;
        v_set TEXT;
    BEGIN
        -- Before any statement that could wait for a lock (the settings table is locked
        -- while the timezone changes: rebuild.rs).
        -- An assignment, not PERFORM: PL/pgSQL evaluates it without starting an executor.
        v_set := set_config('lock_timeout', p_lock_timeout, true);
        -- The timezone first, as in every write (see rebuild.rs `stored_timezone`).
        outcome := CASE
            WHEN (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN 'timezone'
            WHEN p_budget_tenant IS NOT NULL AND (SELECT xmin::TEXT::BIGINT FROM tenant_budgets WHERE tenant_id = p_budget_tenant)
                IS DISTINCT FROM p_budget_stamp THEN 'budget'
            WHEN EXISTS (SELECT 1 FROM reservations WHERE expires_at <= p_now) THEN 'expired'
            WHEN EXISTS (SELECT 1 FROM breakers WHERE key = p_breaker AND phase <> 'closed') THEN 'breaker'
        END;
        IF outcome IS NOT NULL THEN
            RETURN;
        END IF;
        IF p_remember THEN
            INSERT INTO tenants (tenant_id, name, first_used_at, last_used_at) VALUES (p_tenant, p_tenant_name, p_now, p_now)
            ON CONFLICT (tenant_id) DO UPDATE SET name = COALESCE(EXCLUDED.name, tenants.name),
                first_used_at = LEAST(tenants.first_used_at, EXCLUDED.first_used_at),
                last_used_at = GREATEST(tenants.last_used_at, EXCLUDED.last_used_at);
        END IF;
        INSERT INTO executions (id, agent, model_id, provider, tenant_id, status, started_at, metadata,
            parent_execution_id, root_execution_id)
        VALUES (p_id, p_agent, p_model_id, p_provider, p_exec_tenant, 'running', p_started_at, p_metadata, p_parent, p_root);
        outcome := 'go';
        usage := '{}';
        IF cardinality(p_scopes) = 0 THEN
            RETURN;
        END IF;
        INSERT INTO reservations (execution_id, counters, cost, tokens, executions, expires_at)
        VALUES (p_id, p_counters, p_cost, p_tokens, p_executions, p_expires_at);
        -- One counter at a time, in the order admission.rs locks them (counters.rs
        -- `lock_counters`), so no two calls wait on each other in a cycle: each UPDATE locks its
        -- row and adds the estimate; the first use of a counter creates it. usage gets the
        -- counter's values before this call's estimate. A sum past 64 bits raises an error,
        -- undoing everything: the Rust transaction then decides (server_side.rs).
        FOR i IN 1..cardinality(p_scopes) LOOP
            UPDATE usage_counters SET reserved_cost = reserved_cost + p_cost, reserved_tokens = reserved_tokens + p_tokens,
                reserved_executions = reserved_executions + p_executions
            WHERE scope = p_scopes[i] AND period = p_periods[i]
            RETURNING ARRAY[cost, tokens, executions, reserved_cost - p_cost, reserved_tokens - p_tokens,
                reserved_executions - p_executions] INTO v_row;
            IF NOT FOUND THEN
                INSERT INTO usage_counters AS c (scope, period, reserved_cost, reserved_tokens, reserved_executions)
                VALUES (p_scopes[i], p_periods[i], p_cost, p_tokens, p_executions)
                ON CONFLICT (scope, period) DO UPDATE SET reserved_cost = c.reserved_cost + p_cost,
                    reserved_tokens = c.reserved_tokens + p_tokens, reserved_executions = c.reserved_executions + p_executions
                RETURNING ARRAY[c.cost, c.tokens, c.executions, c.reserved_cost - p_cost, c.reserved_tokens - p_tokens,
                    c.reserved_executions - p_executions] INTO v_row;
            END IF;
            usage := usage || v_row;
            -- In NUMERIC, so no sum overflows; at a 64-bit limit this may refuse where Rust's
            -- saturating sums would not, and the Rust transaction then decides.
            FOR h IN 1..cardinality(p_hard_scopes) LOOP
                IF p_hard_scopes[h] = p_scopes[i] AND p_hard_periods[h] = p_periods[i]
                    AND v_row[1 + p_hard_metrics[h]]::NUMERIC + v_row[4 + p_hard_metrics[h]]
                        + (CASE p_hard_metrics[h] WHEN 0 THEN p_cost WHEN 1 THEN p_tokens ELSE p_executions END) > p_hard_limits[h] THEN
                    v_refused := true;
                END IF;
            END LOOP;
        END LOOP;
        IF v_refused THEN
            -- The estimates come off again: a refusal leaves the counters as they were.
            UPDATE usage_counters c SET reserved_cost = c.reserved_cost - p_cost, reserved_tokens = c.reserved_tokens - p_tokens,
                reserved_executions = c.reserved_executions - p_executions
            FROM unnest(p_scopes, p_periods) AS k(scope, period) WHERE c.scope = k.scope AND c.period = k.period;
            DELETE FROM reservations WHERE execution_id = p_id;
            DELETE FROM executions WHERE id = p_id;
            outcome := 'refused';
            usage := NULL;
        END IF;
    END
    $fn$;


    -- As migration 17's, with the rollups added from the arguments (the row returns only
    -- its keys), and the counters and alerts one at a time.
    CREATE OR REPLACE FUNCTION tenantllm_settle(p_lock_timeout TEXT, p_timezone TEXT, p_reserved BOOLEAN,
        p_scopes TEXT[], p_periods TEXT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_day TEXT, p_month TEXT,
        p_id TEXT, p_status TEXT, p_error_class TEXT, p_error_message TEXT, p_chosen_model_id TEXT, p_provider TEXT,
        p_completed_at BIGINT, p_duration_ms BIGINT, p_input_tokens BIGINT, p_output_tokens BIGINT,
        p_cached_tokens BIGINT, p_total_tokens BIGINT, p_input_cost BIGINT, p_output_cost BIGINT, p_total_cost BIGINT,
        p_attempts_count BIGINT, p_attempts TEXT, p_finish_reason TEXT, p_cache_write_tokens BIGINT,
        p_cache_read_cost BIGINT, p_cache_write_cost BIGINT, p_time_to_first_token_ms BIGINT, p_cached BIGINT,
        p_store_details BOOLEAN, p_system_prompt TEXT, p_user_prompt TEXT, p_response TEXT, p_tool_calls TEXT,
        p_alert_scopes TEXT[], p_alert_periods TEXT[], p_alert_names TEXT[], p_alert_thresholds BIGINT[],
        p_alert_metrics INT[], p_alert_at BIGINT[],
        OUT outcome TEXT, OUT scopes TEXT[], OUT periods TEXT[], OUT recorded_cost BIGINT[],
        OUT recorded_tokens BIGINT[], OUT recorded_executions BIGINT[], OUT alerted BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_counters TEXT := '';
        v_cost BIGINT := 0;
        v_tokens BIGINT := 0;
        v_executions BIGINT := 0;
        v_keys TEXT[];
        v_own TEXT[] := '{}';
        v_scope TEXT;
        v_period TEXT;
        v_released BOOLEAN;
        v_row BIGINT[];
        v_set TEXT;
    BEGIN
        v_set := set_config('lock_timeout', p_lock_timeout, true);
        IF (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN
            outcome := 'timezone';
            RETURN;
        END IF;
        IF p_reserved THEN
            DELETE FROM reservations WHERE execution_id = p_id RETURNING counters, cost, tokens, executions
                INTO v_counters, v_cost, v_tokens, v_executions;
            IF NOT FOUND THEN
                outcome := 'taken_over';
                RETURN;
            END IF;
        END IF;
        WITH e AS (
            UPDATE executions SET status = p_status, error_class = p_error_class, error_message = p_error_message,
                chosen_model_id = p_chosen_model_id, provider = COALESCE(p_provider, provider), completed_at = p_completed_at,
                duration_ms = p_duration_ms, input_tokens = p_input_tokens, output_tokens = p_output_tokens,
                cached_tokens = p_cached_tokens, total_tokens = p_total_tokens, input_cost = p_input_cost,
                output_cost = p_output_cost, total_cost = p_total_cost, attempts_count = p_attempts_count,
                attempts = p_attempts, finish_reason = p_finish_reason, cache_write_tokens = p_cache_write_tokens,
                cache_read_cost = p_cache_read_cost, cache_write_cost = p_cache_write_cost,
                time_to_first_token_ms = p_time_to_first_token_ms, cached = p_cached
            WHERE id = p_id AND status = 'running'
            RETURNING COALESCE(tenant_id, '') AS tenant_id, agent, model_id
        ), daily AS (
            INSERT INTO daily_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
                SELECT p_day, e.tenant_id, e.agent, e.model_id, p_status, 1, COALESCE(p_input_tokens, 0), COALESCE(p_output_tokens, 0), COALESCE(p_cached_tokens, 0), COALESCE(p_total_tokens, 0), COALESCE(p_input_cost, 0), COALESCE(p_output_cost, 0), COALESCE(p_total_cost, 0), COALESCE(p_attempts_count, 0), COALESCE(p_cache_write_tokens, 0), COALESCE(p_cache_read_cost, 0), COALESCE(p_cache_write_cost, 0), COALESCE(p_duration_ms, 0), COALESCE(p_time_to_first_token_ms, 0) FROM e
                ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms
        ), totals AS (
            INSERT INTO daily_totals AS r (period, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
                SELECT p_day, e.agent, e.model_id, p_status, 1, COALESCE(p_input_tokens, 0), COALESCE(p_output_tokens, 0), COALESCE(p_cached_tokens, 0), COALESCE(p_total_tokens, 0), COALESCE(p_input_cost, 0), COALESCE(p_output_cost, 0), COALESCE(p_total_cost, 0), COALESCE(p_attempts_count, 0), COALESCE(p_cache_write_tokens, 0), COALESCE(p_cache_read_cost, 0), COALESCE(p_cache_write_cost, 0), COALESCE(p_duration_ms, 0), COALESCE(p_time_to_first_token_ms, 0) FROM e
                ON CONFLICT (period, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms
        )
        INSERT INTO monthly_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
                SELECT p_month, e.tenant_id, e.agent, e.model_id, p_status, 1, COALESCE(p_input_tokens, 0), COALESCE(p_output_tokens, 0), COALESCE(p_cached_tokens, 0), COALESCE(p_total_tokens, 0), COALESCE(p_input_cost, 0), COALESCE(p_output_cost, 0), COALESCE(p_total_cost, 0), COALESCE(p_attempts_count, 0), COALESCE(p_cache_write_tokens, 0), COALESCE(p_cache_read_cost, 0), COALESCE(p_cache_write_cost, 0), COALESCE(p_duration_ms, 0), COALESCE(p_time_to_first_token_ms, 0) FROM e
                ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms;
        IF NOT FOUND THEN
            -- Gone, or closed before (its rollups count it under its earlier outcome, which
            -- would have to come out first): undone with the rest; the Rust transaction then
            -- settles or reports it.
            RAISE EXCEPTION 'execution % is not running', p_id USING ERRCODE = 'no_data_found';
        END IF;
        IF p_store_details THEN
            INSERT INTO execution_details (execution_id, system_prompt, user_prompt, response, tool_calls)
            VALUES (p_id, p_system_prompt, p_user_prompt, p_response, p_tool_calls)
            ON CONFLICT (execution_id) DO UPDATE SET system_prompt = EXCLUDED.system_prompt,
                user_prompt = EXCLUDED.user_prompt, response = EXCLUDED.response, tool_calls = EXCLUDED.tool_calls;
        END IF;
        -- The counters of the reservation are among the call's own (admission reserves on
        -- those it checks, at the time the call starts) unless the call started on one side of
        -- midnight and was admitted on the other: then, undone with the rest, the Rust
        -- transaction settles it.
        v_keys := CASE WHEN v_counters = '' THEN '{}' ELSE string_to_array(v_counters, E'\n') END;
        FOR i IN 1..cardinality(p_scopes) LOOP
            v_own := v_own || (p_scopes[i] || E'\t' || p_periods[i]);
        END LOOP;
        IF NOT v_keys <@ v_own THEN
            RAISE EXCEPTION 'execution % reserved on other counters', p_id USING ERRCODE = 'no_data_found';
        END IF;
        -- One counter at a time, in the order every write locks them (server_side.rs passes
        -- the call's counters sorted), so no two calls wait on each other in a cycle: each adds
        -- the call's usage and gives back what the reservation held on it; the first use of a
        -- counter creates it.
        scopes := '{}'; periods := '{}'; recorded_cost := '{}'; recorded_tokens := '{}'; recorded_executions := '{}';
        alerted := '{}';
        FOR i IN 1..cardinality(p_scopes) LOOP
            v_scope := p_scopes[i];
            v_period := p_periods[i];
            v_released := v_own[i] = ANY(v_keys);
            UPDATE usage_counters SET cost = cost + p_cost, tokens = tokens + p_tokens, executions = executions + p_executions,
                reserved_cost = reserved_cost - CASE WHEN v_released THEN v_cost ELSE 0 END,
                reserved_tokens = reserved_tokens - CASE WHEN v_released THEN v_tokens ELSE 0 END,
                reserved_executions = reserved_executions - CASE WHEN v_released THEN v_executions ELSE 0 END
            WHERE scope = v_scope AND period = v_period
            RETURNING ARRAY[cost, tokens, executions] INTO v_row;
            IF NOT FOUND THEN
                INSERT INTO usage_counters AS c (scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions)
                VALUES (v_scope, v_period, p_cost, p_tokens, p_executions, CASE WHEN v_released THEN -v_cost ELSE 0 END,
                    CASE WHEN v_released THEN -v_tokens ELSE 0 END, CASE WHEN v_released THEN -v_executions ELSE 0 END)
                ON CONFLICT (scope, period) DO UPDATE SET cost = c.cost + EXCLUDED.cost, tokens = c.tokens + EXCLUDED.tokens,
                    executions = c.executions + EXCLUDED.executions, reserved_cost = c.reserved_cost + EXCLUDED.reserved_cost,
                    reserved_tokens = c.reserved_tokens + EXCLUDED.reserved_tokens,
                    reserved_executions = c.reserved_executions + EXCLUDED.reserved_executions
                RETURNING ARRAY[c.cost, c.tokens, c.executions] INTO v_row;
            END IF;
            scopes := scopes || v_scope;
            periods := periods || v_period;
            recorded_cost := recorded_cost || v_row[1];
            recorded_tokens := recorded_tokens || v_row[2];
            recorded_executions := recorded_executions || v_row[3];
            -- The alerts of this counter it now reaches, marked sent while it is locked.
            FOR a IN 1..cardinality(p_alert_scopes) LOOP
                IF p_alert_scopes[a] = v_scope AND p_alert_periods[a] = v_period
                    AND v_row[1 + p_alert_metrics[a]] >= p_alert_at[a] THEN
                    INSERT INTO alerts_sent (scope, period, name, threshold)
                    VALUES (v_scope, v_period, p_alert_names[a], p_alert_thresholds[a]) ON CONFLICT DO NOTHING;
                    IF FOUND THEN
                        alerted := alerted || a::BIGINT;
                    END IF;
                END IF;
            END LOOP;
        END LOOP;
        outcome := 'done';
    END
    $fn$;
    "#,
    // 19: every call in flight has a reservation, as on SQLite (its migration 19): a call with
    // no budget counters got none, so when its process died (OOM killer, SIGKILL) nothing
    // closed its row, which stayed 'running' for ever. Now its empty reservation's lease, renewed
    // while the process lives, expires and the next admission closes the row as abandoned.
    // Calls running now get a lease ending an hour after the migration, so calls of processes
    // still on the earlier version can finish.
    r#"
    -- As migration 18's, with the reservation written before the calls without counters return.
    CREATE OR REPLACE FUNCTION tenantllm_admit(p_lock_timeout TEXT, p_timezone TEXT, p_now BIGINT,
        p_remember BOOLEAN, p_tenant TEXT, p_tenant_name TEXT, p_budget_tenant TEXT, p_budget_stamp BIGINT,
        p_scopes TEXT[], p_periods TEXT[], p_hard_scopes TEXT[], p_hard_periods TEXT[], p_hard_metrics INT[],
        p_hard_limits BIGINT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_counters TEXT,
        p_expires_at BIGINT, p_breaker TEXT,
        p_id TEXT, p_agent TEXT, p_model_id TEXT, p_provider TEXT, p_exec_tenant TEXT, p_started_at BIGINT,
        p_metadata TEXT, p_parent TEXT, p_root TEXT,
        OUT outcome TEXT, OUT usage BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_row BIGINT[];
        v_refused BOOLEAN := false;
        v_set TEXT;
    BEGIN
        -- Before any statement that could wait for a lock (the settings table is locked
        -- while the timezone changes: rebuild.rs).
        -- An assignment, not PERFORM: PL/pgSQL evaluates it without starting an executor.
        v_set := set_config('lock_timeout', p_lock_timeout, true);
        -- The timezone first, as in every write (see rebuild.rs `stored_timezone`).
        outcome := CASE
            WHEN (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN 'timezone'
            WHEN p_budget_tenant IS NOT NULL AND (SELECT xmin::TEXT::BIGINT FROM tenant_budgets WHERE tenant_id = p_budget_tenant)
                IS DISTINCT FROM p_budget_stamp THEN 'budget'
            WHEN EXISTS (SELECT 1 FROM reservations WHERE expires_at <= p_now) THEN 'expired'
            WHEN EXISTS (SELECT 1 FROM breakers WHERE key = p_breaker AND phase <> 'closed') THEN 'breaker'
        END;
        IF outcome IS NOT NULL THEN
            RETURN;
        END IF;
        IF p_remember THEN
            INSERT INTO tenants (tenant_id, name, first_used_at, last_used_at) VALUES (p_tenant, p_tenant_name, p_now, p_now)
            ON CONFLICT (tenant_id) DO UPDATE SET name = COALESCE(EXCLUDED.name, tenants.name),
                first_used_at = LEAST(tenants.first_used_at, EXCLUDED.first_used_at),
                last_used_at = GREATEST(tenants.last_used_at, EXCLUDED.last_used_at);
        END IF;
        INSERT INTO executions (id, agent, model_id, provider, tenant_id, status, started_at, metadata,
            parent_execution_id, root_execution_id)
        VALUES (p_id, p_agent, p_model_id, p_provider, p_exec_tenant, 'running', p_started_at, p_metadata, p_parent, p_root);
        outcome := 'go';
        usage := '{}';
        -- Every call in flight has a reservation, holding nothing when it has no counters:
        -- its lease, renewed while its process lives, is what closes its row once that
        -- process dies.
        INSERT INTO reservations (execution_id, counters, cost, tokens, executions, expires_at)
        VALUES (p_id, p_counters, p_cost, p_tokens, p_executions, p_expires_at);
        IF cardinality(p_scopes) = 0 THEN
            RETURN;
        END IF;
        -- One counter at a time, in the order admission.rs locks them (counters.rs
        -- `lock_counters`), so no two calls wait on each other in a cycle: each UPDATE locks its
        -- row and adds the estimate; the first use of a counter creates it. usage gets the
        -- counter's values before this call's estimate. A sum past 64 bits raises an error,
        -- undoing everything: the Rust transaction then decides (server_side.rs).
        FOR i IN 1..cardinality(p_scopes) LOOP
            UPDATE usage_counters SET reserved_cost = reserved_cost + p_cost, reserved_tokens = reserved_tokens + p_tokens,
                reserved_executions = reserved_executions + p_executions
            WHERE scope = p_scopes[i] AND period = p_periods[i]
            RETURNING ARRAY[cost, tokens, executions, reserved_cost - p_cost, reserved_tokens - p_tokens,
                reserved_executions - p_executions] INTO v_row;
            IF NOT FOUND THEN
                INSERT INTO usage_counters AS c (scope, period, reserved_cost, reserved_tokens, reserved_executions)
                VALUES (p_scopes[i], p_periods[i], p_cost, p_tokens, p_executions)
                ON CONFLICT (scope, period) DO UPDATE SET reserved_cost = c.reserved_cost + p_cost,
                    reserved_tokens = c.reserved_tokens + p_tokens, reserved_executions = c.reserved_executions + p_executions
                RETURNING ARRAY[c.cost, c.tokens, c.executions, c.reserved_cost - p_cost, c.reserved_tokens - p_tokens,
                    c.reserved_executions - p_executions] INTO v_row;
            END IF;
            usage := usage || v_row;
            -- In NUMERIC, so no sum overflows; at a 64-bit limit this may refuse where Rust's
            -- saturating sums would not, and the Rust transaction then decides.
            FOR h IN 1..cardinality(p_hard_scopes) LOOP
                IF p_hard_scopes[h] = p_scopes[i] AND p_hard_periods[h] = p_periods[i]
                    AND v_row[1 + p_hard_metrics[h]]::NUMERIC + v_row[4 + p_hard_metrics[h]]
                        + (CASE p_hard_metrics[h] WHEN 0 THEN p_cost WHEN 1 THEN p_tokens ELSE p_executions END) > p_hard_limits[h] THEN
                    v_refused := true;
                END IF;
            END LOOP;
        END LOOP;
        IF v_refused THEN
            -- The estimates come off again: a refusal leaves the counters as they were.
            UPDATE usage_counters c SET reserved_cost = c.reserved_cost - p_cost, reserved_tokens = c.reserved_tokens - p_tokens,
                reserved_executions = c.reserved_executions - p_executions
            FROM unnest(p_scopes, p_periods) AS k(scope, period) WHERE c.scope = k.scope AND c.period = k.period;
            DELETE FROM reservations WHERE execution_id = p_id;
            DELETE FROM executions WHERE id = p_id;
            outcome := 'refused';
            usage := NULL;
        END IF;
    END
    $fn$;

    INSERT INTO reservations (execution_id, counters, cost, tokens, executions, expires_at)
    SELECT id, '', 0, 0, 0, (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT + 3600000000
    FROM executions WHERE status = 'running'
    ON CONFLICT (execution_id) DO NOTHING;
    "#,
    // 20: less work for the server per guarded call, counted in instructions its backend runs
    // per full-guard call (callgrind on the server, as for migration 18): 2,425k before,
    // 2,012k after (-17 %). Each statement a function runs pays an executor start-up by plan
    // node whatever rows it touches, so the 3 counters of an admission and the 6 of a
    // settlement are each one INSERT ... ON CONFLICT DO UPDATE over the sorted keys (same
    // order, same locks) instead of one UPDATE per key; a settlement checks each alert once
    // against its counter instead of every alert against every counter. The partial indexes on `status`
    // go (the calls in flight are found from their reservations, which every one has since
    // migration 19, and today's problems from the daily rollups: postgres/tenant_list.rs),
    // so a settlement's UPDATE no longer writes a new entry in each of the row's indexes: it
    // changes no indexed column and can be heap-only. IF EXISTS: the rollups' test re-runs
    // every migration from 9.
    r#"
    -- As migration 19's, with the counters locked, reserved and read in one statement.
    CREATE OR REPLACE FUNCTION tenantllm_admit(p_lock_timeout TEXT, p_timezone TEXT, p_now BIGINT,
        p_remember BOOLEAN, p_tenant TEXT, p_tenant_name TEXT, p_budget_tenant TEXT, p_budget_stamp BIGINT,
        p_scopes TEXT[], p_periods TEXT[], p_hard_scopes TEXT[], p_hard_periods TEXT[], p_hard_metrics INT[],
        p_hard_limits BIGINT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_counters TEXT,
        p_expires_at BIGINT, p_breaker TEXT,
        p_id TEXT, p_agent TEXT, p_model_id TEXT, p_provider TEXT, p_exec_tenant TEXT, p_started_at BIGINT,
        p_metadata TEXT, p_parent TEXT, p_root TEXT,
        OUT outcome TEXT, OUT usage BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_row BIGINT[];
        v_refused BOOLEAN := false;
        v_key RECORD;
        v_set TEXT;
    BEGIN
        -- Before any statement that could wait for a lock (the settings table is locked
        -- while the timezone changes: rebuild.rs).
        -- An assignment, not PERFORM: PL/pgSQL evaluates it without starting an executor.
        v_set := set_config('lock_timeout', p_lock_timeout, true);
        -- The timezone first, as in every write (see rebuild.rs `stored_timezone`).
        outcome := CASE
            WHEN (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN 'timezone'
            WHEN p_budget_tenant IS NOT NULL AND (SELECT xmin::TEXT::BIGINT FROM tenant_budgets WHERE tenant_id = p_budget_tenant)
                IS DISTINCT FROM p_budget_stamp THEN 'budget'
            WHEN EXISTS (SELECT 1 FROM reservations WHERE expires_at <= p_now) THEN 'expired'
            WHEN EXISTS (SELECT 1 FROM breakers WHERE key = p_breaker AND phase <> 'closed') THEN 'breaker'
        END;
        IF outcome IS NOT NULL THEN
            RETURN;
        END IF;
        IF p_remember THEN
            INSERT INTO tenants (tenant_id, name, first_used_at, last_used_at) VALUES (p_tenant, p_tenant_name, p_now, p_now)
            ON CONFLICT (tenant_id) DO UPDATE SET name = COALESCE(EXCLUDED.name, tenants.name),
                first_used_at = LEAST(tenants.first_used_at, EXCLUDED.first_used_at),
                last_used_at = GREATEST(tenants.last_used_at, EXCLUDED.last_used_at);
        END IF;
        INSERT INTO executions (id, agent, model_id, provider, tenant_id, status, started_at, metadata,
            parent_execution_id, root_execution_id)
        VALUES (p_id, p_agent, p_model_id, p_provider, p_exec_tenant, 'running', p_started_at, p_metadata, p_parent, p_root);
        outcome := 'go';
        usage := '{}';
        -- Every call in flight has a reservation, holding nothing when it has no counters:
        -- its lease, renewed while its process lives, is what closes its row once that
        -- process dies.
        INSERT INTO reservations (execution_id, counters, cost, tokens, executions, expires_at)
        VALUES (p_id, p_counters, p_cost, p_tokens, p_executions, p_expires_at);
        IF cardinality(p_scopes) = 0 THEN
            RETURN;
        END IF;
        -- The counters in one statement, one row after another in the order admission.rs locks
        -- them (counters.rs `lock_counters`: the arrays come sorted), so no two calls wait on
        -- each other in a cycle: each row is locked and gets the estimate, the first use of a
        -- counter creates it, and RETURNING gives the rows in that order with their values
        -- before this call's estimate. A sum past 64 bits raises an error, undoing everything:
        -- the Rust transaction then decides (server_side.rs).
        FOR v_key IN
            INSERT INTO usage_counters AS c (scope, period, reserved_cost, reserved_tokens, reserved_executions)
            SELECT k.scope, k.period, p_cost, p_tokens, p_executions FROM unnest(p_scopes, p_periods) AS k(scope, period)
            ON CONFLICT (scope, period) DO UPDATE SET reserved_cost = c.reserved_cost + p_cost,
                reserved_tokens = c.reserved_tokens + p_tokens, reserved_executions = c.reserved_executions + p_executions
            RETURNING c.scope, c.period, ARRAY[c.cost, c.tokens, c.executions, c.reserved_cost - p_cost, c.reserved_tokens - p_tokens,
                c.reserved_executions - p_executions] AS v
        LOOP
            v_row := v_key.v;
            usage := usage || v_row;
            -- In NUMERIC, so no sum overflows; at a 64-bit limit this may refuse where Rust's
            -- saturating sums would not, and the Rust transaction then decides.
            FOR h IN 1..cardinality(p_hard_scopes) LOOP
                IF p_hard_scopes[h] = v_key.scope AND p_hard_periods[h] = v_key.period
                    AND v_row[1 + p_hard_metrics[h]]::NUMERIC + v_row[4 + p_hard_metrics[h]]
                        + (CASE p_hard_metrics[h] WHEN 0 THEN p_cost WHEN 1 THEN p_tokens ELSE p_executions END) > p_hard_limits[h] THEN
                    v_refused := true;
                END IF;
            END LOOP;
        END LOOP;
        IF v_refused THEN
            -- The estimates come off again: a refusal leaves the counters as they were.
            UPDATE usage_counters c SET reserved_cost = c.reserved_cost - p_cost, reserved_tokens = c.reserved_tokens - p_tokens,
                reserved_executions = c.reserved_executions - p_executions
            FROM unnest(p_scopes, p_periods) AS k(scope, period) WHERE c.scope = k.scope AND c.period = k.period;
            DELETE FROM reservations WHERE execution_id = p_id;
            DELETE FROM executions WHERE id = p_id;
            outcome := 'refused';
            usage := NULL;
        END IF;
    END
    $fn$;


    -- As migration 18's, with the counters in one statement and each alert checked once.
    CREATE OR REPLACE FUNCTION tenantllm_settle(p_lock_timeout TEXT, p_timezone TEXT, p_reserved BOOLEAN,
        p_scopes TEXT[], p_periods TEXT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_day TEXT, p_month TEXT,
        p_id TEXT, p_status TEXT, p_error_class TEXT, p_error_message TEXT, p_chosen_model_id TEXT, p_provider TEXT,
        p_completed_at BIGINT, p_duration_ms BIGINT, p_input_tokens BIGINT, p_output_tokens BIGINT,
        p_cached_tokens BIGINT, p_total_tokens BIGINT, p_input_cost BIGINT, p_output_cost BIGINT, p_total_cost BIGINT,
        p_attempts_count BIGINT, p_attempts TEXT, p_finish_reason TEXT, p_cache_write_tokens BIGINT,
        p_cache_read_cost BIGINT, p_cache_write_cost BIGINT, p_time_to_first_token_ms BIGINT, p_cached BIGINT,
        p_store_details BOOLEAN, p_system_prompt TEXT, p_user_prompt TEXT, p_response TEXT, p_tool_calls TEXT,
        p_alert_scopes TEXT[], p_alert_periods TEXT[], p_alert_names TEXT[], p_alert_thresholds BIGINT[],
        p_alert_metrics INT[], p_alert_at BIGINT[],
        OUT outcome TEXT, OUT scopes TEXT[], OUT periods TEXT[], OUT recorded_cost BIGINT[],
        OUT recorded_tokens BIGINT[], OUT recorded_executions BIGINT[], OUT alerted BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_counters TEXT := '';
        v_cost BIGINT := 0;
        v_tokens BIGINT := 0;
        v_executions BIGINT := 0;
        v_keys TEXT[];
        v_own TEXT[] := '{}';
        v_set TEXT;
        v_key RECORD;
        v_i INT;
    BEGIN
        v_set := set_config('lock_timeout', p_lock_timeout, true);
        IF (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN
            outcome := 'timezone';
            RETURN;
        END IF;
        IF p_reserved THEN
            DELETE FROM reservations WHERE execution_id = p_id RETURNING counters, cost, tokens, executions
                INTO v_counters, v_cost, v_tokens, v_executions;
            IF NOT FOUND THEN
                outcome := 'taken_over';
                RETURN;
            END IF;
        END IF;
        WITH e AS (
            UPDATE executions SET status = p_status, error_class = p_error_class, error_message = p_error_message,
                chosen_model_id = p_chosen_model_id, provider = COALESCE(p_provider, provider), completed_at = p_completed_at,
                duration_ms = p_duration_ms, input_tokens = p_input_tokens, output_tokens = p_output_tokens,
                cached_tokens = p_cached_tokens, total_tokens = p_total_tokens, input_cost = p_input_cost,
                output_cost = p_output_cost, total_cost = p_total_cost, attempts_count = p_attempts_count,
                attempts = p_attempts, finish_reason = p_finish_reason, cache_write_tokens = p_cache_write_tokens,
                cache_read_cost = p_cache_read_cost, cache_write_cost = p_cache_write_cost,
                time_to_first_token_ms = p_time_to_first_token_ms, cached = p_cached
            WHERE id = p_id AND status = 'running'
            RETURNING COALESCE(tenant_id, '') AS tenant_id, agent, model_id
        ), daily AS (
            INSERT INTO daily_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
                SELECT p_day, e.tenant_id, e.agent, e.model_id, p_status, 1, COALESCE(p_input_tokens, 0), COALESCE(p_output_tokens, 0), COALESCE(p_cached_tokens, 0), COALESCE(p_total_tokens, 0), COALESCE(p_input_cost, 0), COALESCE(p_output_cost, 0), COALESCE(p_total_cost, 0), COALESCE(p_attempts_count, 0), COALESCE(p_cache_write_tokens, 0), COALESCE(p_cache_read_cost, 0), COALESCE(p_cache_write_cost, 0), COALESCE(p_duration_ms, 0), COALESCE(p_time_to_first_token_ms, 0) FROM e
                ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms
        ), totals AS (
            INSERT INTO daily_totals AS r (period, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
                SELECT p_day, e.agent, e.model_id, p_status, 1, COALESCE(p_input_tokens, 0), COALESCE(p_output_tokens, 0), COALESCE(p_cached_tokens, 0), COALESCE(p_total_tokens, 0), COALESCE(p_input_cost, 0), COALESCE(p_output_cost, 0), COALESCE(p_total_cost, 0), COALESCE(p_attempts_count, 0), COALESCE(p_cache_write_tokens, 0), COALESCE(p_cache_read_cost, 0), COALESCE(p_cache_write_cost, 0), COALESCE(p_duration_ms, 0), COALESCE(p_time_to_first_token_ms, 0) FROM e
                ON CONFLICT (period, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms
        )
        INSERT INTO monthly_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
                SELECT p_month, e.tenant_id, e.agent, e.model_id, p_status, 1, COALESCE(p_input_tokens, 0), COALESCE(p_output_tokens, 0), COALESCE(p_cached_tokens, 0), COALESCE(p_total_tokens, 0), COALESCE(p_input_cost, 0), COALESCE(p_output_cost, 0), COALESCE(p_total_cost, 0), COALESCE(p_attempts_count, 0), COALESCE(p_cache_write_tokens, 0), COALESCE(p_cache_read_cost, 0), COALESCE(p_cache_write_cost, 0), COALESCE(p_duration_ms, 0), COALESCE(p_time_to_first_token_ms, 0) FROM e
                ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms;
        IF NOT FOUND THEN
            -- Gone, or closed before (its rollups count it under its earlier outcome, which
            -- would have to come out first): undone with the rest; the Rust transaction then
            -- settles or reports it.
            RAISE EXCEPTION 'execution % is not running', p_id USING ERRCODE = 'no_data_found';
        END IF;
        IF p_store_details THEN
            INSERT INTO execution_details (execution_id, system_prompt, user_prompt, response, tool_calls)
            VALUES (p_id, p_system_prompt, p_user_prompt, p_response, p_tool_calls)
            ON CONFLICT (execution_id) DO UPDATE SET system_prompt = EXCLUDED.system_prompt,
                user_prompt = EXCLUDED.user_prompt, response = EXCLUDED.response, tool_calls = EXCLUDED.tool_calls;
        END IF;
        -- The counters of the reservation are among the call's own (admission reserves on
        -- those it checks, at the time the call starts) unless the call started on one side of
        -- midnight and was admitted on the other: then, undone with the rest, the Rust
        -- transaction settles it.
        v_keys := CASE WHEN v_counters = '' THEN '{}' ELSE string_to_array(v_counters, E'\n') END;
        FOR i IN 1..cardinality(p_scopes) LOOP
            v_own := v_own || (p_scopes[i] || E'\t' || p_periods[i]);
        END LOOP;
        IF NOT v_keys <@ v_own THEN
            RAISE EXCEPTION 'execution % reserved on other counters', p_id USING ERRCODE = 'no_data_found';
        END IF;
        -- The counters in one statement, one row after another in the order every write locks
        -- them (server_side.rs passes the call's counters sorted), so no two calls wait on each
        -- other in a cycle: each gets the call's usage and gives back what the reservation held
        -- on it; the first use of a counter creates it. RETURNING gives them in that order.
        recorded_cost := '{}'; recorded_tokens := '{}'; recorded_executions := '{}'; alerted := '{}';
        FOR v_key IN
            INSERT INTO usage_counters AS c (scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions)
            SELECT k.scope, k.period, p_cost, p_tokens, p_executions, CASE WHEN k.released THEN -v_cost ELSE 0 END,
                CASE WHEN k.released THEN -v_tokens ELSE 0 END, CASE WHEN k.released THEN -v_executions ELSE 0 END
            FROM (SELECT u.scope, u.period, u.scope || E'\t' || u.period = ANY(v_keys) AS released
                FROM unnest(p_scopes, p_periods) AS u(scope, period)) AS k
            ON CONFLICT (scope, period) DO UPDATE SET cost = c.cost + EXCLUDED.cost, tokens = c.tokens + EXCLUDED.tokens,
                executions = c.executions + EXCLUDED.executions, reserved_cost = c.reserved_cost + EXCLUDED.reserved_cost,
                reserved_tokens = c.reserved_tokens + EXCLUDED.reserved_tokens,
                reserved_executions = c.reserved_executions + EXCLUDED.reserved_executions
            RETURNING c.cost, c.tokens, c.executions
        LOOP
            recorded_cost := recorded_cost || v_key.cost;
            recorded_tokens := recorded_tokens || v_key.tokens;
            recorded_executions := recorded_executions || v_key.executions;
        END LOOP;
        scopes := p_scopes;
        periods := p_periods;
        -- Each alert its counter now reaches, marked sent while the counters are locked.
        FOR a IN 1..cardinality(p_alert_scopes) LOOP
            v_i := array_position(v_own, p_alert_scopes[a] || E'\t' || p_alert_periods[a]);
            IF (CASE p_alert_metrics[a] WHEN 0 THEN recorded_cost[v_i] WHEN 1 THEN recorded_tokens[v_i] ELSE recorded_executions[v_i] END)
                >= p_alert_at[a] THEN
                INSERT INTO alerts_sent (scope, period, name, threshold)
                VALUES (p_alert_scopes[a], p_alert_periods[a], p_alert_names[a], p_alert_thresholds[a]) ON CONFLICT DO NOTHING;
                IF FOUND THEN
                    alerted := alerted || a::BIGINT;
                END IF;
            END IF;
        END LOOP;
        outcome := 'done';
    END
    $fn$;

    -- The calls in flight are found from their reservations, today's problems from the daily
    -- rollups: no index looks at status, so a settlement's UPDATE can be heap-only.
    DROP INDEX IF EXISTS executions_running;
    DROP INDEX IF EXISTS executions_problems;
    "#,
    // 21: a call refused by a hard budget in 2 round trips instead of 14 (counted by
    // postgres/tests.rs `round_trips_per_path`): `tenantllm_admit` returns the usage it read
    // with its refusal, Rust's `budget::evaluate` names the breach from it (server_side.rs),
    // and `tenantllm_block` writes the blocked row and its rollups in one call. Where the two
    // disagree (a sum at 64 bits) the transaction decides, as before.
    r#"
    -- As migration 20's, but a refusal returns the usage it read, as a call that goes ahead does.
    CREATE OR REPLACE FUNCTION tenantllm_admit(p_lock_timeout TEXT, p_timezone TEXT, p_now BIGINT,
        p_remember BOOLEAN, p_tenant TEXT, p_tenant_name TEXT, p_budget_tenant TEXT, p_budget_stamp BIGINT,
        p_scopes TEXT[], p_periods TEXT[], p_hard_scopes TEXT[], p_hard_periods TEXT[], p_hard_metrics INT[],
        p_hard_limits BIGINT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_counters TEXT,
        p_expires_at BIGINT, p_breaker TEXT,
        p_id TEXT, p_agent TEXT, p_model_id TEXT, p_provider TEXT, p_exec_tenant TEXT, p_started_at BIGINT,
        p_metadata TEXT, p_parent TEXT, p_root TEXT,
        OUT outcome TEXT, OUT usage BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_row BIGINT[];
        v_refused BOOLEAN := false;
        v_key RECORD;
        v_set TEXT;
    BEGIN
        -- Before any statement that could wait for a lock (the settings table is locked
        -- while the timezone changes: rebuild.rs).
        -- An assignment, not PERFORM: PL/pgSQL evaluates it without starting an executor.
        v_set := set_config('lock_timeout', p_lock_timeout, true);
        -- The timezone first, as in every write (see rebuild.rs `stored_timezone`).
        outcome := CASE
            WHEN (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN 'timezone'
            WHEN p_budget_tenant IS NOT NULL AND (SELECT xmin::TEXT::BIGINT FROM tenant_budgets WHERE tenant_id = p_budget_tenant)
                IS DISTINCT FROM p_budget_stamp THEN 'budget'
            WHEN EXISTS (SELECT 1 FROM reservations WHERE expires_at <= p_now) THEN 'expired'
            WHEN EXISTS (SELECT 1 FROM breakers WHERE key = p_breaker AND phase <> 'closed') THEN 'breaker'
        END;
        IF outcome IS NOT NULL THEN
            RETURN;
        END IF;
        IF p_remember THEN
            INSERT INTO tenants (tenant_id, name, first_used_at, last_used_at) VALUES (p_tenant, p_tenant_name, p_now, p_now)
            ON CONFLICT (tenant_id) DO UPDATE SET name = COALESCE(EXCLUDED.name, tenants.name),
                first_used_at = LEAST(tenants.first_used_at, EXCLUDED.first_used_at),
                last_used_at = GREATEST(tenants.last_used_at, EXCLUDED.last_used_at);
        END IF;
        INSERT INTO executions (id, agent, model_id, provider, tenant_id, status, started_at, metadata,
            parent_execution_id, root_execution_id)
        VALUES (p_id, p_agent, p_model_id, p_provider, p_exec_tenant, 'running', p_started_at, p_metadata, p_parent, p_root);
        outcome := 'go';
        usage := '{}';
        -- Every call in flight has a reservation, holding nothing when it has no counters:
        -- its lease, renewed while its process lives, is what closes its row once that
        -- process dies.
        INSERT INTO reservations (execution_id, counters, cost, tokens, executions, expires_at)
        VALUES (p_id, p_counters, p_cost, p_tokens, p_executions, p_expires_at);
        IF cardinality(p_scopes) = 0 THEN
            RETURN;
        END IF;
        -- The counters in one statement, one row after another in the order admission.rs locks
        -- them (counters.rs `lock_counters`: the arrays come sorted), so no two calls wait on
        -- each other in a cycle: each row is locked and gets the estimate, the first use of a
        -- counter creates it, and RETURNING gives the rows in that order with their values
        -- before this call's estimate. A sum past 64 bits raises an error, undoing everything:
        -- the Rust transaction then decides (server_side.rs).
        FOR v_key IN
            INSERT INTO usage_counters AS c (scope, period, reserved_cost, reserved_tokens, reserved_executions)
            SELECT k.scope, k.period, p_cost, p_tokens, p_executions FROM unnest(p_scopes, p_periods) AS k(scope, period)
            ON CONFLICT (scope, period) DO UPDATE SET reserved_cost = c.reserved_cost + p_cost,
                reserved_tokens = c.reserved_tokens + p_tokens, reserved_executions = c.reserved_executions + p_executions
            RETURNING c.scope, c.period, ARRAY[c.cost, c.tokens, c.executions, c.reserved_cost - p_cost, c.reserved_tokens - p_tokens,
                c.reserved_executions - p_executions] AS v
        LOOP
            v_row := v_key.v;
            usage := usage || v_row;
            -- In NUMERIC, so no sum overflows; at a 64-bit limit this may refuse where Rust's
            -- saturating sums would not, and the Rust transaction then decides.
            FOR h IN 1..cardinality(p_hard_scopes) LOOP
                IF p_hard_scopes[h] = v_key.scope AND p_hard_periods[h] = v_key.period
                    AND v_row[1 + p_hard_metrics[h]]::NUMERIC + v_row[4 + p_hard_metrics[h]]
                        + (CASE p_hard_metrics[h] WHEN 0 THEN p_cost WHEN 1 THEN p_tokens ELSE p_executions END) > p_hard_limits[h] THEN
                    v_refused := true;
                END IF;
            END LOOP;
        END LOOP;
        IF v_refused THEN
            -- The estimates come off again: a refusal leaves the counters as they were.
            UPDATE usage_counters c SET reserved_cost = c.reserved_cost - p_cost, reserved_tokens = c.reserved_tokens - p_tokens,
                reserved_executions = c.reserved_executions - p_executions
            FROM unnest(p_scopes, p_periods) AS k(scope, period) WHERE c.scope = k.scope AND c.period = k.period;
            DELETE FROM reservations WHERE execution_id = p_id;
            DELETE FROM executions WHERE id = p_id;
            outcome := 'refused';
        END IF;
    END
    $fn$;

    -- The blocked row of a refused call: inserted running, then closed by `tenantllm_settle`
    -- (its rollups, no counters: a blocked call uses nothing, and it holds no reservation),
    -- so it lands as admission.rs's transaction writes it. 'timezone' when the stored timezone
    -- is not the caller's, changing nothing.
    CREATE OR REPLACE FUNCTION tenantllm_block(p_lock_timeout TEXT, p_timezone TEXT, p_day TEXT, p_month TEXT,
        p_id TEXT, p_agent TEXT, p_model_id TEXT, p_provider TEXT, p_exec_tenant TEXT, p_started_at BIGINT,
        p_metadata TEXT, p_parent TEXT, p_root TEXT,
        p_status TEXT, p_error_class TEXT, p_error_message TEXT, p_chosen_model_id TEXT, p_closed_provider TEXT,
        p_completed_at BIGINT, p_duration_ms BIGINT, p_input_tokens BIGINT, p_output_tokens BIGINT,
        p_cached_tokens BIGINT, p_total_tokens BIGINT, p_input_cost BIGINT, p_output_cost BIGINT, p_total_cost BIGINT,
        p_attempts_count BIGINT, p_attempts TEXT, p_finish_reason TEXT, p_cache_write_tokens BIGINT,
        p_cache_read_cost BIGINT, p_cache_write_cost BIGINT, p_time_to_first_token_ms BIGINT, p_cached BIGINT,
        OUT outcome TEXT)
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_set TEXT;
    BEGIN
        v_set := set_config('lock_timeout', p_lock_timeout, true);
        IF (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN
            outcome := 'timezone';
            RETURN;
        END IF;
        INSERT INTO executions (id, agent, model_id, provider, tenant_id, status, started_at, metadata,
            parent_execution_id, root_execution_id)
        VALUES (p_id, p_agent, p_model_id, p_provider, p_exec_tenant, 'running', p_started_at, p_metadata, p_parent, p_root);
        SELECT s.outcome INTO outcome FROM tenantllm_settle(p_lock_timeout, p_timezone, false, '{}', '{}', 0, 0, 0, p_day, p_month,
            p_id, p_status, p_error_class, p_error_message, p_chosen_model_id, p_closed_provider, p_completed_at, p_duration_ms,
            p_input_tokens, p_output_tokens, p_cached_tokens, p_total_tokens, p_input_cost, p_output_cost, p_total_cost,
            p_attempts_count, p_attempts, p_finish_reason, p_cache_write_tokens, p_cache_read_cost, p_cache_write_cost,
            p_time_to_first_token_ms, p_cached, false, NULL, NULL, NULL, NULL, '{}', '{}', '{}', '{}', '{}', '{}') AS s;
    END
    $fn$;
    "#,
    // 22: a call under a rate limit admitted in 1 round trip, and one a rate limit refuses in
    // 2 (the refusal, then its row through `tenantllm_block`), instead of 10 and 16 (counted
    // by postgres/tests.rs `round_trips_per_path`). `tenantllm_admit_rated` does what
    // admission.rs's transaction does around `tenantllm_admit`, in the same lock order: the
    // tenant's register row, the scopes' advisory locks, the counters (`tenantllm_admit`,
    // which also makes the budget's checks), then each scope's window totals (rates.rs
    // `rate_state`, with its horizon steps) and the calls in flight. The checks come in the
    // policy's order (`ratelimit::checks`); the first one breached refuses the call, and the
    // admission is undone as `tenantllm_admit` undoes a refusal, keeping what the window's
    // step wrote (as the transaction commits it). Rust's `ratelimit::evaluate` then names
    // the breach from the usage and the breached scope's log returned; where it names
    // another check, the transaction decides. A new function: older builds keep calling
    // `tenantllm_admit` for the calls without rate limits and the transaction for the others.
    // OR REPLACE: a test that re-runs the rollups' migration 9 re-runs this.
    r#"
    CREATE OR REPLACE FUNCTION tenantllm_admit_rated(p_lock_timeout TEXT, p_timezone TEXT, p_now BIGINT,
        p_remember BOOLEAN, p_tenant TEXT, p_tenant_name TEXT, p_budget_tenant TEXT, p_budget_stamp BIGINT,
        p_scopes TEXT[], p_periods TEXT[], p_hard_scopes TEXT[], p_hard_periods TEXT[], p_hard_metrics INT[],
        p_hard_limits BIGINT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_counters TEXT,
        p_expires_at BIGINT, p_breaker TEXT,
        p_id TEXT, p_agent TEXT, p_model_id TEXT, p_provider TEXT, p_exec_tenant TEXT, p_started_at BIGINT,
        p_metadata TEXT, p_parent TEXT, p_root TEXT,
        p_window BIGINT, p_lock_scopes TEXT[], p_window_scopes TEXT[], p_check_scopes TEXT[], p_check_kinds INT[],
        p_check_limits BIGINT[], p_concurrency_scope TEXT,
        OUT outcome TEXT, OUT usage BIGINT[], OUT requests BIGINT[], OUT tokens BIGINT[], OUT in_flight BIGINT,
        OUT breached INT, OUT events_at BIGINT[], OUT events_tokens BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_set TEXT;
        v_scope TEXT;
        v_start BIGINT := p_now - p_window;
        v_requests BIGINT;
        v_tokens BIGINT;
        v_horizon BIGINT;
        v_n BIGINT;
        v_t BIGINT;
        v_w INT;
        v_over BOOLEAN;
    BEGIN
        v_set := set_config('lock_timeout', p_lock_timeout, true);
        IF (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN
            outcome := 'timezone';
            RETURN;
        END IF;
        -- The register of tenants before the scopes' locks, as the transaction writes it.
        IF p_remember THEN
            INSERT INTO tenants (tenant_id, name, first_used_at, last_used_at) VALUES (p_tenant, p_tenant_name, p_now, p_now)
            ON CONFLICT (tenant_id) DO UPDATE SET name = COALESCE(EXCLUDED.name, tenants.name),
                first_used_at = LEAST(tenants.first_used_at, EXCLUDED.first_used_at),
                last_used_at = GREATEST(tenants.last_used_at, EXCLUDED.last_used_at);
        END IF;
        -- Admissions of a scope take turns (rates.rs `lock_rate_scopes`: the same keys, in
        -- scope order, before any row lock).
        FOREACH v_scope IN ARRAY p_lock_scopes LOOP
            PERFORM pg_advisory_xact_lock(hashtextextended('tenantllm rate ' || v_scope, 0));
        END LOOP;
        SELECT a.outcome, a.usage INTO outcome, usage FROM tenantllm_admit(p_lock_timeout, p_timezone, p_now, false, p_tenant,
            p_tenant_name, p_budget_tenant, p_budget_stamp, p_scopes, p_periods, p_hard_scopes, p_hard_periods, p_hard_metrics,
            p_hard_limits, p_cost, p_tokens, p_executions, p_counters, p_expires_at, p_breaker, p_id, p_agent, p_model_id,
            p_provider, p_exec_tenant, p_started_at, p_metadata, p_parent, p_root) AS a;
        IF outcome <> 'go' THEN
            RETURN;
        END IF;
        -- Each window's use (rates.rs `rate_state`): its totals row, created with this
        -- window's start as its horizon, moved up to it, or read with the log behind it.
        requests := '{}';
        tokens := '{}';
        FOREACH v_scope IN ARRAY p_window_scopes LOOP
            INSERT INTO rate_totals (scope, requests, tokens, horizon) VALUES (v_scope, 0, 0, v_start)
            ON CONFLICT (scope) DO UPDATE SET scope = EXCLUDED.scope
            RETURNING rate_totals.requests, rate_totals.tokens, rate_totals.horizon INTO v_requests, v_tokens, v_horizon;
            IF v_start <= v_horizon THEN
                SELECT COUNT(*), COALESCE(SUM(e.tokens), 0)::BIGINT INTO v_n, v_t FROM rate_events e
                WHERE e.scope = v_scope AND e.at > v_start AND e.at <= v_horizon;
                v_requests := v_requests + v_n;
                v_tokens := LEAST(v_tokens::NUMERIC + v_t, 9223372036854775807)::BIGINT;
            ELSE
                WITH crossed AS (
                    SELECT COUNT(*) AS n, COALESCE(SUM(e.tokens), 0)::BIGINT AS t FROM rate_events e
                    WHERE e.scope = v_scope AND e.at > v_horizon AND e.at <= v_start
                ), forgotten AS (DELETE FROM rate_events e WHERE e.scope = v_scope AND e.at <= v_start - p_window)
                UPDATE rate_totals r SET requests = r.requests - crossed.n, tokens = r.tokens - crossed.t, horizon = v_start
                FROM crossed WHERE r.scope = v_scope RETURNING r.requests, r.tokens INTO v_requests, v_tokens;
            END IF;
            requests := requests || v_requests;
            tokens := tokens || v_tokens;
        END LOOP;
        in_flight := 0;
        IF p_concurrency_scope IS NOT NULL THEN
            SELECT COUNT(*) INTO in_flight FROM reservations WHERE concurrency_scope = p_concurrency_scope;
        END IF;
        -- The first check breached, in the policy's order (`ratelimit::evaluate`).
        FOR i IN 1..cardinality(p_check_scopes) LOOP
            v_w := array_position(p_window_scopes, p_check_scopes[i]);
            v_over := CASE p_check_kinds[i]
                WHEN 0 THEN requests[v_w] >= p_check_limits[i]
                WHEN 1 THEN tokens[v_w]::NUMERIC + p_tokens > p_check_limits[i]
                ELSE in_flight >= p_check_limits[i]
            END;
            IF v_over THEN
                breached := i;
                EXIT;
            END IF;
        END LOOP;
        IF breached IS NOT NULL THEN
            -- Undone as `tenantllm_admit` undoes a refusal; the window's steps stay.
            UPDATE usage_counters c SET reserved_cost = c.reserved_cost - p_cost, reserved_tokens = c.reserved_tokens - p_tokens,
                reserved_executions = c.reserved_executions - p_executions
            FROM unnest(p_scopes, p_periods) AS k(scope, period) WHERE c.scope = k.scope AND c.period = k.period;
            DELETE FROM reservations WHERE execution_id = p_id;
            DELETE FROM executions WHERE id = p_id;
            outcome := 'rate_limited';
            -- The breached scope's admissions in the window, oldest first, for its retry time.
            IF p_check_kinds[breached] <> 2 THEN
                SELECT COALESCE(array_agg(e.at ORDER BY e.at), '{}'), COALESCE(array_agg(e.tokens ORDER BY e.at), '{}')
                INTO events_at, events_tokens FROM rate_events e WHERE e.scope = p_check_scopes[breached] AND e.at > v_start;
            END IF;
            RETURN;
        END IF;
        -- Admitted: logged in each window (counted in its totals unless this call's clock is
        -- behind their horizon), and in flight in its concurrency scope.
        INSERT INTO rate_events (scope, at, execution_id, tokens) SELECT s, p_started_at, p_id, p_tokens FROM unnest(p_window_scopes) AS s;
        UPDATE rate_totals r SET requests = r.requests + 1, tokens = r.tokens + p_tokens
        WHERE r.scope = ANY(p_window_scopes) AND r.horizon < p_started_at;
        IF p_concurrency_scope IS NOT NULL THEN
            UPDATE reservations SET concurrency_scope = p_concurrency_scope WHERE execution_id = p_id;
        END IF;
    END
    $fn$;
    "#,
    // 23: a call whose first model's breaker is not closed admitted in 2 round trips instead
    // of 10 (its probe claimed, or the next model's breaker passing it) and short-circuited in
    // 2 or 3 (counted by postgres/tests.rs `round_trips_per_path`): `tenantllm_admit_full` is
    // migration 22's `tenantllm_admit_rated` that then makes the breakers' choice as the
    // transaction does, after the budgets and rate limits (store::first_admitted with
    // breaker::admit, the probe claimed on the locked row); when every breaker is open it undoes
    // the admission and returns the earliest retry time, and Rust writes the short-circuited row
    // through `tenantllm_block`. `tenantllm_admit_rated` (same arguments and results, for
    // processes of the previous version) now calls it with no breakers. OR REPLACE: a test that
    // re-runs the rollups' migration 9 re-runs this.
    r#"
    CREATE OR REPLACE FUNCTION tenantllm_admit_full(p_lock_timeout TEXT, p_timezone TEXT, p_now BIGINT,
        p_remember BOOLEAN, p_tenant TEXT, p_tenant_name TEXT, p_budget_tenant TEXT, p_budget_stamp BIGINT,
        p_scopes TEXT[], p_periods TEXT[], p_hard_scopes TEXT[], p_hard_periods TEXT[], p_hard_metrics INT[],
        p_hard_limits BIGINT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_counters TEXT,
        p_expires_at BIGINT, p_breaker TEXT,
        p_id TEXT, p_agent TEXT, p_model_id TEXT, p_provider TEXT, p_exec_tenant TEXT, p_started_at BIGINT,
        p_metadata TEXT, p_parent TEXT, p_root TEXT,
        p_window BIGINT, p_lock_scopes TEXT[], p_window_scopes TEXT[], p_check_scopes TEXT[], p_check_kinds INT[],
        p_check_limits BIGINT[], p_concurrency_scope TEXT, p_breakers TEXT[], p_probe_lease BIGINT,
        OUT outcome TEXT, OUT usage BIGINT[], OUT requests BIGINT[], OUT tokens BIGINT[], OUT in_flight BIGINT,
        OUT breached INT, OUT events_at BIGINT[], OUT events_tokens BIGINT[], OUT model_index INT, OUT probe BOOLEAN,
        OUT retry_at BIGINT)
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_set TEXT;
        v_scope TEXT;
        v_start BIGINT := p_now - p_window;
        v_requests BIGINT;
        v_tokens BIGINT;
        v_horizon BIGINT;
        v_n BIGINT;
        v_t BIGINT;
        v_w INT;
        v_over BOOLEAN;
        v_phase TEXT;
        v_retry_at BIGINT;
        v_lost BOOLEAN := false;
    BEGIN
        v_set := set_config('lock_timeout', p_lock_timeout, true);
        IF (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN
            outcome := 'timezone';
            RETURN;
        END IF;
        -- The register of tenants before the scopes' locks, as the transaction writes it.
        IF p_remember THEN
            INSERT INTO tenants (tenant_id, name, first_used_at, last_used_at) VALUES (p_tenant, p_tenant_name, p_now, p_now)
            ON CONFLICT (tenant_id) DO UPDATE SET name = COALESCE(EXCLUDED.name, tenants.name),
                first_used_at = LEAST(tenants.first_used_at, EXCLUDED.first_used_at),
                last_used_at = GREATEST(tenants.last_used_at, EXCLUDED.last_used_at);
        END IF;
        -- Admissions of a scope take turns (rates.rs `lock_rate_scopes`: the same keys, in
        -- scope order, before any row lock).
        FOREACH v_scope IN ARRAY p_lock_scopes LOOP
            PERFORM pg_advisory_xact_lock(hashtextextended('tenantllm rate ' || v_scope, 0));
        END LOOP;
        SELECT a.outcome, a.usage INTO outcome, usage FROM tenantllm_admit(p_lock_timeout, p_timezone, p_now, false, p_tenant,
            p_tenant_name, p_budget_tenant, p_budget_stamp, p_scopes, p_periods, p_hard_scopes, p_hard_periods, p_hard_metrics,
            p_hard_limits, p_cost, p_tokens, p_executions, p_counters, p_expires_at, p_breaker, p_id, p_agent, p_model_id,
            p_provider, p_exec_tenant, p_started_at, p_metadata, p_parent, p_root) AS a;
        IF outcome <> 'go' THEN
            RETURN;
        END IF;
        -- Each window's use (rates.rs `rate_state`): its totals row, created with this
        -- window's start as its horizon, moved up to it, or read with the log behind it.
        requests := '{}';
        tokens := '{}';
        FOREACH v_scope IN ARRAY p_window_scopes LOOP
            INSERT INTO rate_totals (scope, requests, tokens, horizon) VALUES (v_scope, 0, 0, v_start)
            ON CONFLICT (scope) DO UPDATE SET scope = EXCLUDED.scope
            RETURNING rate_totals.requests, rate_totals.tokens, rate_totals.horizon INTO v_requests, v_tokens, v_horizon;
            IF v_start <= v_horizon THEN
                SELECT COUNT(*), COALESCE(SUM(e.tokens), 0)::BIGINT INTO v_n, v_t FROM rate_events e
                WHERE e.scope = v_scope AND e.at > v_start AND e.at <= v_horizon;
                v_requests := v_requests + v_n;
                v_tokens := LEAST(v_tokens::NUMERIC + v_t, 9223372036854775807)::BIGINT;
            ELSE
                WITH crossed AS (
                    SELECT COUNT(*) AS n, COALESCE(SUM(e.tokens), 0)::BIGINT AS t FROM rate_events e
                    WHERE e.scope = v_scope AND e.at > v_horizon AND e.at <= v_start
                ), forgotten AS (DELETE FROM rate_events e WHERE e.scope = v_scope AND e.at <= v_start - p_window)
                UPDATE rate_totals r SET requests = r.requests - crossed.n, tokens = r.tokens - crossed.t, horizon = v_start
                FROM crossed WHERE r.scope = v_scope RETURNING r.requests, r.tokens INTO v_requests, v_tokens;
            END IF;
            requests := requests || v_requests;
            tokens := tokens || v_tokens;
        END LOOP;
        in_flight := 0;
        IF p_concurrency_scope IS NOT NULL THEN
            SELECT COUNT(*) INTO in_flight FROM reservations WHERE concurrency_scope = p_concurrency_scope;
        END IF;
        -- The first check breached, in the policy's order (`ratelimit::evaluate`).
        FOR i IN 1..cardinality(p_check_scopes) LOOP
            v_w := array_position(p_window_scopes, p_check_scopes[i]);
            v_over := CASE p_check_kinds[i]
                WHEN 0 THEN requests[v_w] >= p_check_limits[i]
                WHEN 1 THEN tokens[v_w]::NUMERIC + p_tokens > p_check_limits[i]
                ELSE in_flight >= p_check_limits[i]
            END;
            IF v_over THEN
                breached := i;
                EXIT;
            END IF;
        END LOOP;
        -- The breakers, once the budgets and rate limits let the call go (store::first_admitted
        -- with breaker::admit): the first model whose breaker is closed goes, or the first
        -- whose cooldown is over claims the half-open probe, decided again on its locked row
        -- (breakers.rs `breaker_admit_tx`) so that of racing processes exactly one claims it.
        -- A row gone under the lock is left to the transaction ('breaker').
        IF breached IS NULL THEN
            IF cardinality(p_breakers) = 0 THEN
                model_index := 0;
                probe := false;
            END IF;
            FOR i IN 1..cardinality(p_breakers) LOOP
                SELECT b.phase, b.retry_at INTO v_phase, v_retry_at FROM breakers b WHERE b.key = p_breakers[i];
                IF NOT FOUND OR v_phase = 'closed' THEN
                    model_index := i - 1;
                    probe := false;
                    EXIT;
                END IF;
                IF p_now >= v_retry_at THEN
                    SELECT b.phase, b.retry_at INTO v_phase, v_retry_at FROM breakers b WHERE b.key = p_breakers[i] FOR UPDATE;
                    IF NOT FOUND THEN
                        v_lost := true;
                        EXIT;
                    END IF;
                    IF v_phase = 'closed' OR p_now >= v_retry_at THEN
                        model_index := i - 1;
                        probe := v_phase <> 'closed';
                        IF probe THEN
                            UPDATE breakers b SET phase = 'half_open', failures = '', retry_at = p_now + p_probe_lease, updated_at = p_now
                            WHERE b.key = p_breakers[i];
                        END IF;
                        EXIT;
                    END IF;
                END IF;
                retry_at := LEAST(COALESCE(retry_at, v_retry_at), v_retry_at);
            END LOOP;
        END IF;
        IF breached IS NOT NULL OR model_index IS NULL THEN
            -- Undone as `tenantllm_admit` undoes a refusal; the window's steps stay.
            UPDATE usage_counters c SET reserved_cost = c.reserved_cost - p_cost, reserved_tokens = c.reserved_tokens - p_tokens,
                reserved_executions = c.reserved_executions - p_executions
            FROM unnest(p_scopes, p_periods) AS k(scope, period) WHERE c.scope = k.scope AND c.period = k.period;
            DELETE FROM reservations WHERE execution_id = p_id;
            DELETE FROM executions WHERE id = p_id;
            outcome := CASE WHEN breached IS NOT NULL THEN 'rate_limited' WHEN v_lost THEN 'breaker' ELSE 'short_circuited' END;
            -- The breached scope's admissions in the window, oldest first, for its retry time.
            IF p_check_kinds[breached] <> 2 THEN
                SELECT COALESCE(array_agg(e.at ORDER BY e.at), '{}'), COALESCE(array_agg(e.tokens ORDER BY e.at), '{}')
                INTO events_at, events_tokens FROM rate_events e WHERE e.scope = p_check_scopes[breached] AND e.at > v_start;
            END IF;
            RETURN;
        END IF;
        -- Admitted: logged in each window (counted in its totals unless this call's clock is
        -- behind their horizon), and in flight in its concurrency scope.
        INSERT INTO rate_events (scope, at, execution_id, tokens) SELECT s, p_started_at, p_id, p_tokens FROM unnest(p_window_scopes) AS s;
        UPDATE rate_totals r SET requests = r.requests + 1, tokens = r.tokens + p_tokens
        WHERE r.scope = ANY(p_window_scopes) AND r.horizon < p_started_at;
        IF p_concurrency_scope IS NOT NULL THEN
            UPDATE reservations SET concurrency_scope = p_concurrency_scope WHERE execution_id = p_id;
        END IF;
    END
    $fn$;

    CREATE OR REPLACE FUNCTION tenantllm_admit_rated(p_lock_timeout TEXT, p_timezone TEXT, p_now BIGINT,
        p_remember BOOLEAN, p_tenant TEXT, p_tenant_name TEXT, p_budget_tenant TEXT, p_budget_stamp BIGINT,
        p_scopes TEXT[], p_periods TEXT[], p_hard_scopes TEXT[], p_hard_periods TEXT[], p_hard_metrics INT[],
        p_hard_limits BIGINT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_counters TEXT,
        p_expires_at BIGINT, p_breaker TEXT,
        p_id TEXT, p_agent TEXT, p_model_id TEXT, p_provider TEXT, p_exec_tenant TEXT, p_started_at BIGINT,
        p_metadata TEXT, p_parent TEXT, p_root TEXT,
        p_window BIGINT, p_lock_scopes TEXT[], p_window_scopes TEXT[], p_check_scopes TEXT[], p_check_kinds INT[],
        p_check_limits BIGINT[], p_concurrency_scope TEXT,
        OUT outcome TEXT, OUT usage BIGINT[], OUT requests BIGINT[], OUT tokens BIGINT[], OUT in_flight BIGINT,
        OUT breached INT, OUT events_at BIGINT[], OUT events_tokens BIGINT[])
    LANGUAGE sql AS $fn$
        SELECT f.outcome, f.usage, f.requests, f.tokens, f.in_flight, f.breached, f.events_at, f.events_tokens
        FROM tenantllm_admit_full(p_lock_timeout, p_timezone, p_now, p_remember, p_tenant, p_tenant_name, p_budget_tenant,
            p_budget_stamp, p_scopes, p_periods, p_hard_scopes, p_hard_periods, p_hard_metrics, p_hard_limits, p_cost, p_tokens,
            p_executions, p_counters, p_expires_at, p_breaker, p_id, p_agent, p_model_id, p_provider, p_exec_tenant,
            p_started_at, p_metadata, p_parent, p_root, p_window, p_lock_scopes, p_window_scopes, p_check_scopes, p_check_kinds,
            p_check_limits, p_concurrency_scope, '{}', NULL) AS f
    $fn$;
    "#,
    // 24: room in each page of `executions` for its calls in flight to be settled heap-only.
    // A call's row is inserted running (about 220 bytes) and its settlement rewrites it
    // completed (about 560); since migration 20 no index covers a column the settlement
    // changes, so the new version stays heap-only (no entry in the table's four indexes,
    // about 200k fewer server instructions per settlement, callgrind) whenever it fits in the
    // same page. With pages filled to the brim by inserts, the calls still running when their
    // page fills did not fit: with 32 calls in flight held 1 s, 68-80 % of settlements were
    // heap-only; leaving 10 % of each page to updates, 82-94 % (held 0 s: 91 % and 99 %).
    // The price is at most a tenth more heap, where every call ends before its page fills;
    // the runs above used fewer pages, as non-HOT updates leave dead versions behind. Only
    // pages written from now on keep the room; SHARE UPDATE EXCLUSIVE: calls go on meanwhile.
    r#"
    ALTER TABLE executions SET (fillfactor = 90);
    "#,
    // 25: the settlement of a call under a rate limit (every call of a tenant or app with rate
    // limits) in 1 round trip instead of a transaction of 13 plus 2 a rate-limited scope
    // (counted by postgres/tests.rs `round_trips_per_path`), so it holds its row locks only while the
    // server works. Rust's statement runs `tenantllm_settle`, then on its answer
    // `tenantllm_settle_rates`: what admission.rs's `finish` writes after the counters to correct
    // the rate limits' logs. The logged estimate becomes the call's tokens in each scope's log
    // entry, and in its totals if they count it, scope by scope in scope order, as the
    // transaction does and admissions lock them. `tenantllm_settle` is unchanged: processes of
    // the previous version settle as before. OR REPLACE: a test that re-runs the rollups'
    // migration 9 re-runs this.
    r#"
    -- Returns `tenantllm_settle`'s outcome, having changed nothing unless it is 'done'.
    CREATE OR REPLACE FUNCTION tenantllm_settle_rates(p_outcome TEXT, p_id TEXT, p_started_at BIGINT, p_rate_scopes TEXT[],
        p_rate_tokens BIGINT)
    RETURNS TEXT
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_scope TEXT;
    BEGIN
        IF p_outcome IS DISTINCT FROM 'done' THEN
            RETURN p_outcome;
        END IF;
        -- Totals first, then the log (rates.rs `rate_state` locks a scope's totals before it
        -- reads its log); the scopes come sorted. The alerts `tenantllm_settle` marked sent,
        -- before the totals where the transaction marks them after, change no lock order: only
        -- a process holding their counter's lock, as this one does, writes them.
        FOREACH v_scope IN ARRAY p_rate_scopes LOOP
            UPDATE rate_totals r SET tokens = r.tokens + p_rate_tokens
                - COALESCE((SELECT e.tokens FROM rate_events e WHERE e.scope = v_scope AND e.at = p_started_at
                    AND e.execution_id = p_id), p_rate_tokens)
            WHERE r.scope = v_scope AND r.horizon < p_started_at;
            UPDATE rate_events e SET tokens = p_rate_tokens WHERE e.scope = v_scope AND e.at = p_started_at AND e.execution_id = p_id;
        END LOOP;
        RETURN p_outcome;
    END
    $fn$;
    "#,
    // 26: an admission that finds leases run out (a worker killed) in 2 round trips instead
    // of 15, the first short-circuit of a process with no rate limits in 2 instead of 3
    // (counted by postgres/tests.rs `round_trips_per_path`). `tenantllm_admit` and
    // `tenantllm_admit_full` get new overloads: asked with no expired lease keyed, they answer
    // 'expired' with the ids of the reservations whose lease ran out and when each call still
    // running started; asked again with each call's day (its usage and rollups are keyed by the
    // caller's calendar, which the server does not have), they release those reservations,
    // close their calls as abandoned with their rollups, and add the changes to the counters in
    // the statement that locks and reserves the call's own, in one key order, as admission.rs's
    // transaction does (counters.rs `expire_reservations`). A first model's breaker not closed
    // no longer answers 'breaker' to the caller: `tenantllm_admit` makes the breakers' choice
    // through `tenantllm_admit_full` in the same statement. The previous overloads stay as they
    // were, for processes of the previous version. OR REPLACE: a test that re-runs the rollups'
    // migration 9 re-runs this.
    r#"
    CREATE OR REPLACE FUNCTION tenantllm_admit(p_lock_timeout TEXT, p_timezone TEXT, p_now BIGINT,
        p_remember BOOLEAN, p_tenant TEXT, p_tenant_name TEXT, p_budget_tenant TEXT, p_budget_stamp BIGINT,
        p_scopes TEXT[], p_periods TEXT[], p_hard_scopes TEXT[], p_hard_periods TEXT[], p_hard_metrics INT[],
        p_hard_limits BIGINT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_counters TEXT,
        p_expires_at BIGINT, p_breaker TEXT,
        p_id TEXT, p_agent TEXT, p_model_id TEXT, p_provider TEXT, p_exec_tenant TEXT, p_started_at BIGINT,
        p_metadata TEXT, p_parent TEXT, p_root TEXT,
        p_breakers TEXT[], p_probe_lease BIGINT, p_expired_ids TEXT[], p_expired_days TEXT[],
        OUT outcome TEXT, OUT usage BIGINT[], OUT model_index INT, OUT probe BOOLEAN, OUT retry_at BIGINT,
        OUT expired_ids TEXT[], OUT expired_started BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_key RECORD;
        v_row BIGINT[];
        v_set TEXT;
        v_own INT := 1;
        v_refused BOOLEAN := false;
        v_m INT;
        v_scopes TEXT[];
        v_periods TEXT[];
        v_used BIGINT[];
        v_cost BIGINT[];
        v_tokens BIGINT[];
        v_executions BIGINT[];
    BEGIN
        v_set := set_config('lock_timeout', p_lock_timeout, true);
        -- Expired leases other than those the caller has keyed send it back for their keys.
        outcome := CASE
            WHEN (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN 'timezone'
            WHEN p_budget_tenant IS NOT NULL AND (SELECT xmin::TEXT::BIGINT FROM tenant_budgets WHERE tenant_id = p_budget_tenant)
                IS DISTINCT FROM p_budget_stamp THEN 'budget'
            WHEN EXISTS (SELECT 1 FROM reservations WHERE expires_at <= p_now AND execution_id <> ALL(p_expired_ids)) THEN 'expired'
            WHEN EXISTS (SELECT 1 FROM breakers WHERE key = p_breaker AND phase <> 'closed') THEN 'breaker'
        END;
        IF outcome = 'expired' THEN
            -- Every reservation whose lease ran out, and when its call started if it is still
            -- running: the caller keys that call's usage and rollups by its day (in its
            -- calendar, which the timezone check above holds to) and asks again with them.
            SELECT array_agg(r.execution_id ORDER BY r.execution_id), array_agg(e.started_at ORDER BY r.execution_id)
            INTO expired_ids, expired_started
            FROM reservations r LEFT JOIN executions e ON e.id = r.execution_id AND e.status = 'running'
            WHERE r.expires_at <= p_now;
            RETURN;
        ELSIF outcome = 'breaker' AND cardinality(p_breakers) > 0 THEN
            -- The first model's breaker is not closed: the full function makes the breakers'
            -- choice, in this same statement (the register of tenants is its to write).
            SELECT f.outcome, f.usage, f.model_index, f.probe, f.retry_at, f.expired_ids, f.expired_started
            INTO outcome, usage, model_index, probe, retry_at, expired_ids, expired_started
            FROM tenantllm_admit_full(p_lock_timeout, p_timezone, p_now, p_remember, p_tenant, p_tenant_name, p_budget_tenant,
                p_budget_stamp, p_scopes, p_periods, p_hard_scopes, p_hard_periods, p_hard_metrics, p_hard_limits, p_cost, p_tokens,
                p_executions, p_counters, p_expires_at, NULL, p_id, p_agent, p_model_id, p_provider, p_exec_tenant, p_started_at,
                p_metadata, p_parent, p_root, 0, '{}', '{}', '{}', '{}', '{}', NULL, p_breakers, p_probe_lease, p_expired_ids,
                p_expired_days) AS f;
            RETURN;
        ELSIF outcome IS NOT NULL THEN
            RETURN;
        END IF;
        IF p_remember THEN
            INSERT INTO tenants (tenant_id, name, first_used_at, last_used_at) VALUES (p_tenant, p_tenant_name, p_now, p_now)
            ON CONFLICT (tenant_id) DO UPDATE SET name = COALESCE(EXCLUDED.name, tenants.name),
                first_used_at = LEAST(tenants.first_used_at, EXCLUDED.first_used_at),
                last_used_at = GREATEST(tenants.last_used_at, EXCLUDED.last_used_at);
        END IF;
        INSERT INTO executions (id, agent, model_id, provider, tenant_id, status, started_at, metadata,
            parent_execution_id, root_execution_id)
        VALUES (p_id, p_agent, p_model_id, p_provider, p_exec_tenant, 'running', p_started_at, p_metadata, p_parent, p_root);
        outcome := 'go';
        usage := '{}';
        INSERT INTO reservations (execution_id, counters, cost, tokens, executions, expires_at)
        VALUES (p_id, p_counters, p_cost, p_tokens, p_executions, p_expires_at);
        IF cardinality(p_expired_ids) > 0 THEN
            -- The expired reservations the caller keyed and still here (counters.rs
            -- `expire_reservations`): released, their calls closed as abandoned and added to
            -- the rollups, rows locked in the transaction's order (reservations, executions,
            -- rollups, then counters); what that changes on the counters is collected for the
            -- one statement below that locks them all.
            WITH gone AS (
                DELETE FROM reservations r WHERE r.execution_id = ANY(p_expired_ids) AND r.expires_at <= p_now
                RETURNING r.execution_id, r.counters, r.cost, r.tokens, r.executions
            ), abandoned AS (
                UPDATE executions e SET status = 'error', error_class = 'Abandoned',
                    error_message = 'the process running this call stopped before it finished', completed_at = p_now
                FROM gone WHERE e.id = gone.execution_id AND e.status = 'running'
                RETURNING p_expired_days[array_position(p_expired_ids, e.id)] AS day, e.tenant_id, e.agent, e.model_id, e.status,
                    e.input_tokens, e.output_tokens, e.cached_tokens, e.total_tokens, e.input_cost, e.output_cost, e.total_cost,
                    e.attempts_count, e.cache_write_tokens, e.cache_read_cost, e.cache_write_cost, e.duration_ms,
                    e.time_to_first_token_ms
            ), rolled AS (
                SELECT a.day, COALESCE(a.tenant_id, '') AS tenant_id, a.agent, a.model_id, a.status, COUNT(*) AS calls,
                    SUM(a.input_tokens)::BIGINT AS input_tokens, SUM(a.output_tokens)::BIGINT AS output_tokens,
                    SUM(a.cached_tokens)::BIGINT AS cached_tokens, SUM(a.total_tokens)::BIGINT AS total_tokens,
                    SUM(a.input_cost)::BIGINT AS input_cost, SUM(a.output_cost)::BIGINT AS output_cost,
                    SUM(a.total_cost)::BIGINT AS total_cost, SUM(a.attempts_count)::BIGINT AS attempts_count,
                    SUM(a.cache_write_tokens)::BIGINT AS cache_write_tokens, SUM(a.cache_read_cost)::BIGINT AS cache_read_cost,
                    SUM(a.cache_write_cost)::BIGINT AS cache_write_cost, COALESCE(SUM(a.duration_ms), 0)::BIGINT AS duration_ms,
                    COALESCE(SUM(a.time_to_first_token_ms), 0)::BIGINT AS time_to_first_token_ms
                FROM abandoned a GROUP BY a.day, COALESCE(a.tenant_id, ''), a.agent, a.model_id, a.status
            ), daily AS (
                INSERT INTO daily_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
                SELECT * FROM rolled
                ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms
            ), monthly AS (
                INSERT INTO monthly_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
                SELECT left(d.day, 7), d.tenant_id, d.agent, d.model_id, d.status, SUM(d.calls)::BIGINT, SUM(d.input_tokens)::BIGINT, SUM(d.output_tokens)::BIGINT, SUM(d.cached_tokens)::BIGINT, SUM(d.total_tokens)::BIGINT, SUM(d.input_cost)::BIGINT, SUM(d.output_cost)::BIGINT, SUM(d.total_cost)::BIGINT, SUM(d.attempts_count)::BIGINT, SUM(d.cache_write_tokens)::BIGINT, SUM(d.cache_read_cost)::BIGINT, SUM(d.cache_write_cost)::BIGINT, SUM(d.duration_ms)::BIGINT, SUM(d.time_to_first_token_ms)::BIGINT
                FROM rolled d GROUP BY left(d.day, 7), d.tenant_id, d.agent, d.model_id, d.status
                ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms
            ), totals AS (
                INSERT INTO daily_totals AS r (period, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
                SELECT d.day, d.agent, d.model_id, d.status, SUM(d.calls)::BIGINT, SUM(d.input_tokens)::BIGINT, SUM(d.output_tokens)::BIGINT, SUM(d.cached_tokens)::BIGINT, SUM(d.total_tokens)::BIGINT, SUM(d.input_cost)::BIGINT, SUM(d.output_cost)::BIGINT, SUM(d.total_cost)::BIGINT, SUM(d.attempts_count)::BIGINT, SUM(d.cache_write_tokens)::BIGINT, SUM(d.cache_read_cost)::BIGINT, SUM(d.cache_write_cost)::BIGINT, SUM(d.duration_ms)::BIGINT, SUM(d.time_to_first_token_ms)::BIGINT
                FROM rolled d GROUP BY d.day, d.agent, d.model_id, d.status
                ON CONFLICT (period, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms
            )
            -- Each released reservation gives back its estimate on its counters ("scope<TAB>period"
            -- lines); each abandoned call counts as one execution on its usage keys
            -- (store::usage_keys: the global, agent and tenant scopes, by day and month).
            SELECT array_agg(k.scope), array_agg(k.period), array_agg(k.used), array_agg(k.cost), array_agg(k.tokens),
                array_agg(k.executions)
            INTO v_scopes, v_periods, v_used, v_cost, v_tokens, v_executions
            FROM (
                SELECT split_part(l, E'\t', 1), substr(l, strpos(l, E'\t') + 1), 0::BIGINT, -g.cost, -g.tokens, -g.executions
                FROM gone g, regexp_split_to_table(g.counters, E'\n') AS l WHERE strpos(l, E'\t') > 0
                UNION ALL
                SELECT s, p, 1::BIGINT, 0::BIGINT, 0::BIGINT, 0::BIGINT
                FROM abandoned a,
                    unnest(ARRAY['global', 'agent:' || a.agent] || CASE WHEN a.tenant_id IS NULL THEN '{}' ELSE ARRAY['tenant:' || a.tenant_id] END) AS s,
                    unnest(ARRAY[a.day, left(a.day, 7)]) AS p
            ) AS k(scope, period, used, cost, tokens, executions);
        END IF;
        IF cardinality(v_scopes) > 0 THEN
            -- The call's own counters and those the expiry changed, in one statement in key
            -- order (as admission.rs locks them together); the call's own come back in its
            -- order, with its estimate taken off again for the checks below.
            FOR v_key IN
                INSERT INTO usage_counters AS c (scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions)
                SELECT d.scope, d.period, 0, 0, SUM(d.used)::BIGINT, SUM(d.cost)::BIGINT, SUM(d.tokens)::BIGINT, SUM(d.executions)::BIGINT
                FROM (
                    SELECT k.scope, k.period, 0::BIGINT, p_cost, p_tokens, p_executions FROM unnest(p_scopes, p_periods) AS k(scope, period)
                    UNION ALL
                    SELECT * FROM unnest(v_scopes, v_periods, v_used, v_cost, v_tokens, v_executions)
                ) AS d(scope, period, used, cost, tokens, executions)
                GROUP BY d.scope, d.period
                ORDER BY d.scope COLLATE "C", d.period COLLATE "C"
                ON CONFLICT (scope, period) DO UPDATE SET executions = c.executions + EXCLUDED.executions,
                    reserved_cost = c.reserved_cost + EXCLUDED.reserved_cost, reserved_tokens = c.reserved_tokens + EXCLUDED.reserved_tokens,
                    reserved_executions = c.reserved_executions + EXCLUDED.reserved_executions
                RETURNING c.scope, c.period, ARRAY[c.cost, c.tokens, c.executions, c.reserved_cost, c.reserved_tokens,
                    c.reserved_executions] AS v
            LOOP
                IF v_own <= cardinality(p_scopes) AND v_key.scope = p_scopes[v_own] AND v_key.period = p_periods[v_own] THEN
                    v_row := v_key.v;
                    usage := usage || ARRAY[v_row[1], v_row[2], v_row[3], v_row[4] - p_cost, v_row[5] - p_tokens, v_row[6] - p_executions];
                    v_own := v_own + 1;
                END IF;
            END LOOP;
        ELSIF cardinality(p_scopes) > 0 THEN
            -- As migration 20's: the call's own counters, each locked and given the estimate.
            FOR v_key IN
                INSERT INTO usage_counters AS c (scope, period, reserved_cost, reserved_tokens, reserved_executions)
                SELECT k.scope, k.period, p_cost, p_tokens, p_executions FROM unnest(p_scopes, p_periods) AS k(scope, period)
                ON CONFLICT (scope, period) DO UPDATE SET reserved_cost = c.reserved_cost + p_cost,
                    reserved_tokens = c.reserved_tokens + p_tokens, reserved_executions = c.reserved_executions + p_executions
                RETURNING ARRAY[c.cost, c.tokens, c.executions, c.reserved_cost - p_cost, c.reserved_tokens - p_tokens,
                    c.reserved_executions - p_executions] AS v
            LOOP
                usage := usage || v_key.v;
            END LOOP;
        END IF;
        -- Each hard limit against its counter, in NUMERIC so no sum overflows (at a 64-bit
        -- limit this may refuse where Rust's saturating sums would not, and the Rust
        -- transaction then decides).
        FOR i IN 1..cardinality(p_scopes) LOOP
            FOR h IN 1..cardinality(p_hard_scopes) LOOP
                v_m := p_hard_metrics[h];
                IF p_hard_scopes[h] = p_scopes[i] AND p_hard_periods[h] = p_periods[i]
                    AND usage[6 * i - 5 + v_m]::NUMERIC + usage[6 * i - 2 + v_m]
                        + (CASE v_m WHEN 0 THEN p_cost WHEN 1 THEN p_tokens ELSE p_executions END) > p_hard_limits[h] THEN
                    v_refused := true;
                END IF;
            END LOOP;
        END LOOP;
        IF v_refused THEN
            -- The estimates come off again: a refusal leaves the counters as they were, but for
            -- the expired reservations it released, which stay released (as the transaction's),
            -- and returns the usage it read (migration 21).
            UPDATE usage_counters c SET reserved_cost = c.reserved_cost - p_cost, reserved_tokens = c.reserved_tokens - p_tokens,
                reserved_executions = c.reserved_executions - p_executions
            FROM unnest(p_scopes, p_periods) AS k(scope, period) WHERE c.scope = k.scope AND c.period = k.period;
            DELETE FROM reservations WHERE execution_id = p_id;
            DELETE FROM executions WHERE id = p_id;
            outcome := 'refused';
        END IF;
    END
    $fn$;

    CREATE OR REPLACE FUNCTION tenantllm_admit_full(p_lock_timeout TEXT, p_timezone TEXT, p_now BIGINT,
        p_remember BOOLEAN, p_tenant TEXT, p_tenant_name TEXT, p_budget_tenant TEXT, p_budget_stamp BIGINT,
        p_scopes TEXT[], p_periods TEXT[], p_hard_scopes TEXT[], p_hard_periods TEXT[], p_hard_metrics INT[],
        p_hard_limits BIGINT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_counters TEXT,
        p_expires_at BIGINT, p_breaker TEXT,
        p_id TEXT, p_agent TEXT, p_model_id TEXT, p_provider TEXT, p_exec_tenant TEXT, p_started_at BIGINT,
        p_metadata TEXT, p_parent TEXT, p_root TEXT,
        p_window BIGINT, p_lock_scopes TEXT[], p_window_scopes TEXT[], p_check_scopes TEXT[], p_check_kinds INT[],
        p_check_limits BIGINT[], p_concurrency_scope TEXT, p_breakers TEXT[], p_probe_lease BIGINT,
        p_expired_ids TEXT[], p_expired_days TEXT[],
        OUT outcome TEXT, OUT usage BIGINT[], OUT requests BIGINT[], OUT tokens BIGINT[], OUT in_flight BIGINT,
        OUT breached INT, OUT events_at BIGINT[], OUT events_tokens BIGINT[], OUT model_index INT, OUT probe BOOLEAN,
        OUT retry_at BIGINT, OUT expired_ids TEXT[], OUT expired_started BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_set TEXT;
        v_scope TEXT;
        v_start BIGINT := p_now - p_window;
        v_requests BIGINT;
        v_tokens BIGINT;
        v_horizon BIGINT;
        v_n BIGINT;
        v_t BIGINT;
        v_w INT;
        v_over BOOLEAN;
        v_phase TEXT;
        v_retry_at BIGINT;
        v_lost BOOLEAN := false;
    BEGIN
        v_set := set_config('lock_timeout', p_lock_timeout, true);
        IF (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN
            outcome := 'timezone';
            RETURN;
        END IF;
        -- The register of tenants before the scopes' locks, as the transaction writes it.
        IF p_remember THEN
            INSERT INTO tenants (tenant_id, name, first_used_at, last_used_at) VALUES (p_tenant, p_tenant_name, p_now, p_now)
            ON CONFLICT (tenant_id) DO UPDATE SET name = COALESCE(EXCLUDED.name, tenants.name),
                first_used_at = LEAST(tenants.first_used_at, EXCLUDED.first_used_at),
                last_used_at = GREATEST(tenants.last_used_at, EXCLUDED.last_used_at);
        END IF;
        -- Admissions of a scope take turns (rates.rs `lock_rate_scopes`: the same keys, in
        -- scope order, before any row lock).
        FOREACH v_scope IN ARRAY p_lock_scopes LOOP
            PERFORM pg_advisory_xact_lock(hashtextextended('tenantllm rate ' || v_scope, 0));
        END LOOP;
        SELECT a.outcome, a.usage, a.expired_ids, a.expired_started INTO outcome, usage, expired_ids, expired_started
        FROM tenantllm_admit(p_lock_timeout, p_timezone, p_now, false, p_tenant, p_tenant_name, p_budget_tenant, p_budget_stamp,
            p_scopes, p_periods, p_hard_scopes, p_hard_periods, p_hard_metrics, p_hard_limits, p_cost, p_tokens, p_executions,
            p_counters, p_expires_at, p_breaker, p_id, p_agent, p_model_id, p_provider, p_exec_tenant, p_started_at, p_metadata,
            p_parent, p_root, '{}', NULL, p_expired_ids, p_expired_days) AS a;
        IF outcome <> 'go' THEN
            RETURN;
        END IF;
        -- Each window's use (rates.rs `rate_state`): its totals row, created with this
        -- window's start as its horizon, moved up to it, or read with the log behind it.
        requests := '{}';
        tokens := '{}';
        FOREACH v_scope IN ARRAY p_window_scopes LOOP
            INSERT INTO rate_totals (scope, requests, tokens, horizon) VALUES (v_scope, 0, 0, v_start)
            ON CONFLICT (scope) DO UPDATE SET scope = EXCLUDED.scope
            RETURNING rate_totals.requests, rate_totals.tokens, rate_totals.horizon INTO v_requests, v_tokens, v_horizon;
            IF v_start <= v_horizon THEN
                SELECT COUNT(*), COALESCE(SUM(e.tokens), 0)::BIGINT INTO v_n, v_t FROM rate_events e
                WHERE e.scope = v_scope AND e.at > v_start AND e.at <= v_horizon;
                v_requests := v_requests + v_n;
                v_tokens := LEAST(v_tokens::NUMERIC + v_t, 9223372036854775807)::BIGINT;
            ELSE
                WITH crossed AS (
                    SELECT COUNT(*) AS n, COALESCE(SUM(e.tokens), 0)::BIGINT AS t FROM rate_events e
                    WHERE e.scope = v_scope AND e.at > v_horizon AND e.at <= v_start
                ), forgotten AS (DELETE FROM rate_events e WHERE e.scope = v_scope AND e.at <= v_start - p_window)
                UPDATE rate_totals r SET requests = r.requests - crossed.n, tokens = r.tokens - crossed.t, horizon = v_start
                FROM crossed WHERE r.scope = v_scope RETURNING r.requests, r.tokens INTO v_requests, v_tokens;
            END IF;
            requests := requests || v_requests;
            tokens := tokens || v_tokens;
        END LOOP;
        in_flight := 0;
        IF p_concurrency_scope IS NOT NULL THEN
            SELECT COUNT(*) INTO in_flight FROM reservations WHERE concurrency_scope = p_concurrency_scope;
        END IF;
        -- The first check breached, in the policy's order (`ratelimit::evaluate`).
        FOR i IN 1..cardinality(p_check_scopes) LOOP
            v_w := array_position(p_window_scopes, p_check_scopes[i]);
            v_over := CASE p_check_kinds[i]
                WHEN 0 THEN requests[v_w] >= p_check_limits[i]
                WHEN 1 THEN tokens[v_w]::NUMERIC + p_tokens > p_check_limits[i]
                ELSE in_flight >= p_check_limits[i]
            END;
            IF v_over THEN
                breached := i;
                EXIT;
            END IF;
        END LOOP;
        -- The breakers, once the budgets and rate limits let the call go (store::first_admitted
        -- with breaker::admit): the first model whose breaker is closed goes, or the first
        -- whose cooldown is over claims the half-open probe, decided again on its locked row
        -- (breakers.rs `breaker_admit_tx`) so that of racing processes exactly one claims it.
        -- A row gone under the lock is left to the transaction ('breaker').
        IF breached IS NULL THEN
            IF cardinality(p_breakers) = 0 THEN
                model_index := 0;
                probe := false;
            END IF;
            FOR i IN 1..cardinality(p_breakers) LOOP
                SELECT b.phase, b.retry_at INTO v_phase, v_retry_at FROM breakers b WHERE b.key = p_breakers[i];
                IF NOT FOUND OR v_phase = 'closed' THEN
                    model_index := i - 1;
                    probe := false;
                    EXIT;
                END IF;
                IF p_now >= v_retry_at THEN
                    SELECT b.phase, b.retry_at INTO v_phase, v_retry_at FROM breakers b WHERE b.key = p_breakers[i] FOR UPDATE;
                    IF NOT FOUND THEN
                        v_lost := true;
                        EXIT;
                    END IF;
                    IF v_phase = 'closed' OR p_now >= v_retry_at THEN
                        model_index := i - 1;
                        probe := v_phase <> 'closed';
                        IF probe THEN
                            UPDATE breakers b SET phase = 'half_open', failures = '', retry_at = p_now + p_probe_lease, updated_at = p_now
                            WHERE b.key = p_breakers[i];
                        END IF;
                        EXIT;
                    END IF;
                END IF;
                retry_at := LEAST(COALESCE(retry_at, v_retry_at), v_retry_at);
            END LOOP;
        END IF;
        IF breached IS NOT NULL OR model_index IS NULL THEN
            -- Undone as `tenantllm_admit` undoes a refusal; the window's steps stay.
            UPDATE usage_counters c SET reserved_cost = c.reserved_cost - p_cost, reserved_tokens = c.reserved_tokens - p_tokens,
                reserved_executions = c.reserved_executions - p_executions
            FROM unnest(p_scopes, p_periods) AS k(scope, period) WHERE c.scope = k.scope AND c.period = k.period;
            DELETE FROM reservations WHERE execution_id = p_id;
            DELETE FROM executions WHERE id = p_id;
            outcome := CASE WHEN breached IS NOT NULL THEN 'rate_limited' WHEN v_lost THEN 'breaker' ELSE 'short_circuited' END;
            -- The breached scope's admissions in the window, oldest first, for its retry time.
            IF p_check_kinds[breached] <> 2 THEN
                SELECT COALESCE(array_agg(e.at ORDER BY e.at), '{}'), COALESCE(array_agg(e.tokens ORDER BY e.at), '{}')
                INTO events_at, events_tokens FROM rate_events e WHERE e.scope = p_check_scopes[breached] AND e.at > v_start;
            END IF;
            RETURN;
        END IF;
        -- Admitted: logged in each window (counted in its totals unless this call's clock is
        -- behind their horizon), and in flight in its concurrency scope.
        INSERT INTO rate_events (scope, at, execution_id, tokens) SELECT s, p_started_at, p_id, p_tokens FROM unnest(p_window_scopes) AS s;
        UPDATE rate_totals r SET requests = r.requests + 1, tokens = r.tokens + p_tokens
        WHERE r.scope = ANY(p_window_scopes) AND r.horizon < p_started_at;
        IF p_concurrency_scope IS NOT NULL THEN
            UPDATE reservations SET concurrency_scope = p_concurrency_scope WHERE execution_id = p_id;
        END IF;
    END
    $fn$;
    "#,
    // 27: a settlement that may move a breaker (a failure under a breaker, the half-open
    // probe's result) in 1 round trip instead of a transaction of 16 to 18 (counted by
    // postgres/tests.rs `round_trips_per_path`). Rust's statement runs `tenantllm_settle`, then
    // on its answer `tenantllm_settle_rates` and `tenantllm_settle_breakers`: each breaker
    // outcome as breakers.rs `breaker_record` applies it after the rate limits, the row read
    // without a lock, and locked and written only when the outcome changes it. The policy's
    // numbers come from Rust (breaker::Policy::at); the server applies breaker::record's rule
    // to the row it locks and returns the events Rust raises as alerts. OR REPLACE: a test that
    // re-runs the rollups' migration 9 re-runs this.
    r#"
    -- The event of each outcome (0: none, 1: opened, 2: closed); NULL, having changed
    -- nothing, unless `tenantllm_settle`'s outcome is 'done'.
    CREATE OR REPLACE FUNCTION tenantllm_settle_breakers(p_outcome TEXT, p_now BIGINT, p_breakers TEXT[],
        p_breaker_agents TEXT[], p_breaker_models TEXT[], p_breaker_tenants TEXT[], p_breaker_success BOOLEAN[],
        p_breaker_probe BOOLEAN[], p_breaker_since BIGINT[], p_breaker_errors INT[], p_breaker_open_until BIGINT[],
        OUT breaker_events INT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_phase TEXT;
        v_failures TEXT;
        v_retry_at BIGINT;
        v_kept BIGINT[];
        v_event INT;
        v_moves BOOLEAN;
    BEGIN
        IF p_outcome IS DISTINCT FROM 'done' THEN
            RETURN;
        END IF;
        -- Each breaker outcome, in the order given (breakers.rs `breaker_record`): read without
        -- a lock, and only when breaker::record would change the row, locked (created closed
        -- first when there is none) and decided again on it. Event 1: opened, 2: closed.
        breaker_events := '{}';
        FOR i IN 1..cardinality(p_breakers) LOOP
            v_event := 0;
            SELECT b.phase INTO v_phase FROM breakers b WHERE b.key = p_breakers[i];
            v_phase := COALESCE(v_phase, 'closed');
            IF (v_phase = 'half_open' AND p_breaker_probe[i]) OR (v_phase = 'closed' AND NOT p_breaker_success[i]) THEN
                SELECT b.phase, b.failures INTO v_phase, v_failures FROM breakers b WHERE b.key = p_breakers[i] FOR UPDATE;
                IF NOT FOUND THEN
                    INSERT INTO breakers (key, agent, model, tenant_id, phase, failures, retry_at, updated_at)
                    VALUES (p_breakers[i], p_breaker_agents[i], p_breaker_models[i], p_breaker_tenants[i], 'closed', '', 0, p_now)
                    ON CONFLICT (key) DO NOTHING;
                    SELECT b.phase, b.failures INTO v_phase, v_failures FROM breakers b WHERE b.key = p_breakers[i] FOR UPDATE;
                END IF;
                v_phase := COALESCE(v_phase, 'closed');
                v_moves := true;
                IF v_phase = 'half_open' AND p_breaker_probe[i] THEN
                    -- The probe's result: closed again, or open for another cooldown.
                    v_event := CASE WHEN p_breaker_success[i] THEN 2 ELSE 1 END;
                    v_phase := CASE WHEN p_breaker_success[i] THEN 'closed' ELSE 'open' END;
                    v_failures := '';
                    v_retry_at := CASE WHEN p_breaker_success[i] THEN 0 ELSE p_breaker_open_until[i] END;
                ELSIF v_phase = 'closed' AND NOT p_breaker_success[i] THEN
                    -- The failures still in the window (State::decode_failures skips what does
                    -- not parse) and this one; enough of them open it.
                    SELECT COALESCE(array_agg(f::BIGINT ORDER BY n), '{}') INTO v_kept
                    FROM unnest(string_to_array(COALESCE(v_failures, ''), ',')) WITH ORDINALITY AS u(f, n)
                    WHERE CASE WHEN f ~ '^[+-]?[0-9]{1,18}$' THEN f::BIGINT > p_breaker_since[i] ELSE false END;
                    v_kept := v_kept || p_now;
                    IF cardinality(v_kept) >= p_breaker_errors[i] THEN
                        v_event := 1;
                        v_phase := 'open';
                        v_failures := '';
                        v_retry_at := p_breaker_open_until[i];
                    ELSE
                        v_failures := array_to_string(v_kept, ',');
                        v_retry_at := 0;
                    END IF;
                ELSE
                    -- Moved by another process meanwhile: this outcome changes it no more.
                    v_moves := false;
                END IF;
                IF v_moves THEN
                    INSERT INTO breakers (key, agent, model, tenant_id, phase, failures, retry_at, updated_at)
                    VALUES (p_breakers[i], p_breaker_agents[i], p_breaker_models[i], p_breaker_tenants[i], v_phase, v_failures,
                        v_retry_at, p_now)
                    ON CONFLICT (key) DO UPDATE SET phase = EXCLUDED.phase, failures = EXCLUDED.failures,
                        retry_at = EXCLUDED.retry_at, updated_at = EXCLUDED.updated_at;
                END IF;
            END IF;
            breaker_events := breaker_events || v_event;
        END LOOP;
    END
    $fn$;
    "#,
    // 28: a settlement locks its call's rollups in the order every write takes them (daily
    // rollup, monthly rollup, then the day's total: executions.rs `roll`), so two settlements
    // of calls with the same tenant, agent, model and status, one through this function and one
    // through the transaction, no longer deadlock (postgres/tests.rs
    // `settlements_lock_the_rollups_in_one_order`): the data-modifying CTEs of one statement
    // run in an order PostgreSQL does not promise (in practice the main statement's first, then
    // the others in reverse: monthly rollup, day's total, daily rollup); here they are
    // statements of their own. And less work for the server: 2,035k instructions per
    // full-guard call before, 1,935k after (callgrind on the server, autovacuum off, prepared
    // statements). Every PL/pgSQL expression is compiled again in each call's transaction, so
    // loops and statements cost by what they are, not by the rows they touch: a new overload
    // takes the call's counters as the reservation stores them (one text, checked against the
    // reservation's in one expression instead of a loop over the keys) and each alert by the
    // index of its counter (no lookup per alert); a rollup that exists is updated (an upsert
    // that finds its row also locks it first, a WAL record more), the details are written in
    // the statement that closes the row, and the counters' values come back aggregated
    // instead of appended row by row. The previous overload stays, for processes of the
    // previous version and `tenantllm_block`: it hands its arguments over. OR REPLACE: a test
    // that re-runs the rollups' migration 9 re-runs this.
    r#"
    -- The call's counters in `p_counters` as reservations store them ("scope<TAB>period" lines,
    -- sorted: they are locked in that order), each alert by its counter's place among them.
    CREATE OR REPLACE FUNCTION tenantllm_settle(p_lock_timeout TEXT, p_timezone TEXT, p_reserved BOOLEAN,
        p_counters TEXT, p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_day TEXT, p_month TEXT,
        p_id TEXT, p_status TEXT, p_error_class TEXT, p_error_message TEXT, p_chosen_model_id TEXT, p_provider TEXT,
        p_completed_at BIGINT, p_duration_ms BIGINT, p_input_tokens BIGINT, p_output_tokens BIGINT,
        p_cached_tokens BIGINT, p_total_tokens BIGINT, p_input_cost BIGINT, p_output_cost BIGINT, p_total_cost BIGINT,
        p_attempts_count BIGINT, p_attempts TEXT, p_finish_reason TEXT, p_cache_write_tokens BIGINT,
        p_cache_read_cost BIGINT, p_cache_write_cost BIGINT, p_time_to_first_token_ms BIGINT, p_cached BIGINT,
        p_store_details BOOLEAN, p_system_prompt TEXT, p_user_prompt TEXT, p_response TEXT, p_tool_calls TEXT,
        p_alert_counters INT[], p_alert_names TEXT[], p_alert_thresholds BIGINT[],
        p_alert_metrics INT[], p_alert_at BIGINT[],
        OUT outcome TEXT, OUT scopes TEXT[], OUT periods TEXT[], OUT recorded_cost BIGINT[],
        OUT recorded_tokens BIGINT[], OUT recorded_executions BIGINT[], OUT alerted BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_counters TEXT := '';
        v_cost BIGINT := 0;
        v_tokens BIGINT := 0;
        v_executions BIGINT := 0;
        v_keys TEXT[];
        v_set TEXT;
        v_tenant TEXT;
        v_agent TEXT;
        v_model TEXT;
    BEGIN
        v_set := set_config('lock_timeout', p_lock_timeout, true);
        IF (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN
            outcome := 'timezone';
            RETURN;
        END IF;
        IF p_reserved THEN
            DELETE FROM reservations WHERE execution_id = p_id RETURNING counters, cost, tokens, executions
                INTO v_counters, v_cost, v_tokens, v_executions;
            IF NOT FOUND THEN
                outcome := 'taken_over';
                RETURN;
            END IF;
        END IF;
        -- The details row is this call's alone: no lock order to keep.
        WITH details AS (
            INSERT INTO execution_details (execution_id, system_prompt, user_prompt, response, tool_calls)
            SELECT p_id, p_system_prompt, p_user_prompt, p_response, p_tool_calls WHERE p_store_details
            ON CONFLICT (execution_id) DO UPDATE SET system_prompt = EXCLUDED.system_prompt,
                user_prompt = EXCLUDED.user_prompt, response = EXCLUDED.response, tool_calls = EXCLUDED.tool_calls
        )
        UPDATE executions SET status = p_status, error_class = p_error_class, error_message = p_error_message,
            chosen_model_id = p_chosen_model_id, provider = COALESCE(p_provider, provider), completed_at = p_completed_at,
            duration_ms = p_duration_ms, input_tokens = p_input_tokens, output_tokens = p_output_tokens,
            cached_tokens = p_cached_tokens, total_tokens = p_total_tokens, input_cost = p_input_cost,
            output_cost = p_output_cost, total_cost = p_total_cost, attempts_count = p_attempts_count,
            attempts = p_attempts, finish_reason = p_finish_reason, cache_write_tokens = p_cache_write_tokens,
            cache_read_cost = p_cache_read_cost, cache_write_cost = p_cache_write_cost,
            time_to_first_token_ms = p_time_to_first_token_ms, cached = p_cached
        WHERE id = p_id AND status = 'running'
        RETURNING COALESCE(tenant_id, ''), agent, model_id INTO v_tenant, v_agent, v_model;
        IF NOT FOUND THEN
            -- Gone, or closed before (its rollups count it under its earlier outcome, which
            -- would have to come out first): undone with the rest; the Rust transaction then
            -- settles or reports it.
            RAISE EXCEPTION 'execution % is not running', p_id USING ERRCODE = 'no_data_found';
        END IF;
        -- The rollups one statement each, in the order every write locks them (executions.rs
        -- `roll`): the daily rollup, the monthly one, then the day's total; each created by
        -- the first call of its key.
        UPDATE daily_rollups SET calls = calls + 1, input_tokens = input_tokens + COALESCE(p_input_tokens, 0), output_tokens = output_tokens + COALESCE(p_output_tokens, 0), cached_tokens = cached_tokens + COALESCE(p_cached_tokens, 0), total_tokens = total_tokens + COALESCE(p_total_tokens, 0), input_cost = input_cost + COALESCE(p_input_cost, 0), output_cost = output_cost + COALESCE(p_output_cost, 0), total_cost = total_cost + COALESCE(p_total_cost, 0), attempts_count = attempts_count + COALESCE(p_attempts_count, 0), cache_write_tokens = cache_write_tokens + COALESCE(p_cache_write_tokens, 0), cache_read_cost = cache_read_cost + COALESCE(p_cache_read_cost, 0), cache_write_cost = cache_write_cost + COALESCE(p_cache_write_cost, 0), duration_ms = duration_ms + COALESCE(p_duration_ms, 0), time_to_first_token_ms = time_to_first_token_ms + COALESCE(p_time_to_first_token_ms, 0)
        WHERE period = p_day AND tenant_id = v_tenant AND agent = v_agent AND model_id = v_model AND status = p_status;
        IF NOT FOUND THEN
            INSERT INTO daily_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
            VALUES (p_day, v_tenant, v_agent, v_model, p_status, 1, COALESCE(p_input_tokens, 0), COALESCE(p_output_tokens, 0), COALESCE(p_cached_tokens, 0), COALESCE(p_total_tokens, 0), COALESCE(p_input_cost, 0), COALESCE(p_output_cost, 0), COALESCE(p_total_cost, 0), COALESCE(p_attempts_count, 0), COALESCE(p_cache_write_tokens, 0), COALESCE(p_cache_read_cost, 0), COALESCE(p_cache_write_cost, 0), COALESCE(p_duration_ms, 0), COALESCE(p_time_to_first_token_ms, 0))
            ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms;
        END IF;
        UPDATE monthly_rollups SET calls = calls + 1, input_tokens = input_tokens + COALESCE(p_input_tokens, 0), output_tokens = output_tokens + COALESCE(p_output_tokens, 0), cached_tokens = cached_tokens + COALESCE(p_cached_tokens, 0), total_tokens = total_tokens + COALESCE(p_total_tokens, 0), input_cost = input_cost + COALESCE(p_input_cost, 0), output_cost = output_cost + COALESCE(p_output_cost, 0), total_cost = total_cost + COALESCE(p_total_cost, 0), attempts_count = attempts_count + COALESCE(p_attempts_count, 0), cache_write_tokens = cache_write_tokens + COALESCE(p_cache_write_tokens, 0), cache_read_cost = cache_read_cost + COALESCE(p_cache_read_cost, 0), cache_write_cost = cache_write_cost + COALESCE(p_cache_write_cost, 0), duration_ms = duration_ms + COALESCE(p_duration_ms, 0), time_to_first_token_ms = time_to_first_token_ms + COALESCE(p_time_to_first_token_ms, 0)
        WHERE period = p_month AND tenant_id = v_tenant AND agent = v_agent AND model_id = v_model AND status = p_status;
        IF NOT FOUND THEN
            INSERT INTO monthly_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
            VALUES (p_month, v_tenant, v_agent, v_model, p_status, 1, COALESCE(p_input_tokens, 0), COALESCE(p_output_tokens, 0), COALESCE(p_cached_tokens, 0), COALESCE(p_total_tokens, 0), COALESCE(p_input_cost, 0), COALESCE(p_output_cost, 0), COALESCE(p_total_cost, 0), COALESCE(p_attempts_count, 0), COALESCE(p_cache_write_tokens, 0), COALESCE(p_cache_read_cost, 0), COALESCE(p_cache_write_cost, 0), COALESCE(p_duration_ms, 0), COALESCE(p_time_to_first_token_ms, 0))
            ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms;
        END IF;
        UPDATE daily_totals SET calls = calls + 1, input_tokens = input_tokens + COALESCE(p_input_tokens, 0), output_tokens = output_tokens + COALESCE(p_output_tokens, 0), cached_tokens = cached_tokens + COALESCE(p_cached_tokens, 0), total_tokens = total_tokens + COALESCE(p_total_tokens, 0), input_cost = input_cost + COALESCE(p_input_cost, 0), output_cost = output_cost + COALESCE(p_output_cost, 0), total_cost = total_cost + COALESCE(p_total_cost, 0), attempts_count = attempts_count + COALESCE(p_attempts_count, 0), cache_write_tokens = cache_write_tokens + COALESCE(p_cache_write_tokens, 0), cache_read_cost = cache_read_cost + COALESCE(p_cache_read_cost, 0), cache_write_cost = cache_write_cost + COALESCE(p_cache_write_cost, 0), duration_ms = duration_ms + COALESCE(p_duration_ms, 0), time_to_first_token_ms = time_to_first_token_ms + COALESCE(p_time_to_first_token_ms, 0)
        WHERE period = p_day AND agent = v_agent AND model_id = v_model AND status = p_status;
        IF NOT FOUND THEN
            INSERT INTO daily_totals AS r (period, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
            VALUES (p_day, v_agent, v_model, p_status, 1, COALESCE(p_input_tokens, 0), COALESCE(p_output_tokens, 0), COALESCE(p_cached_tokens, 0), COALESCE(p_total_tokens, 0), COALESCE(p_input_cost, 0), COALESCE(p_output_cost, 0), COALESCE(p_total_cost, 0), COALESCE(p_attempts_count, 0), COALESCE(p_cache_write_tokens, 0), COALESCE(p_cache_read_cost, 0), COALESCE(p_cache_write_cost, 0), COALESCE(p_duration_ms, 0), COALESCE(p_time_to_first_token_ms, 0))
            ON CONFLICT (period, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms;
        END IF;
        -- The counters of the reservation are among the call's own (admission reserves on
        -- those it checks, at the time the call starts) unless the call started on one side of
        -- midnight and was admitted on the other: then, undone with the rest, the Rust
        -- transaction settles it.
        v_keys := string_to_array(v_counters, E'\n');
        IF NOT v_keys <@ string_to_array(p_counters, E'\n') THEN
            RAISE EXCEPTION 'execution % reserved on other counters', p_id USING ERRCODE = 'no_data_found';
        END IF;
        -- The counters in one statement, one row after another in the order every write locks
        -- them (the keys come sorted), so no two calls wait on each other in a cycle: each gets
        -- the call's usage and gives back what the reservation held on it; the first use of a
        -- counter creates it. They come back in that order: RETURNING gives the rows as they
        -- are written, and the aggregates read them so.
        WITH written AS (
            INSERT INTO usage_counters AS c (scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions)
            SELECT split_part(k.key, E'\t', 1), split_part(k.key, E'\t', 2), p_cost, p_tokens, p_executions,
                CASE WHEN k.released THEN -v_cost ELSE 0 END, CASE WHEN k.released THEN -v_tokens ELSE 0 END,
                CASE WHEN k.released THEN -v_executions ELSE 0 END
            FROM (SELECT u.key, u.key = ANY(v_keys) AS released FROM unnest(string_to_array(p_counters, E'\n')) AS u(key)) AS k
            ON CONFLICT (scope, period) DO UPDATE SET cost = c.cost + EXCLUDED.cost, tokens = c.tokens + EXCLUDED.tokens,
                executions = c.executions + EXCLUDED.executions, reserved_cost = c.reserved_cost + EXCLUDED.reserved_cost,
                reserved_tokens = c.reserved_tokens + EXCLUDED.reserved_tokens,
                reserved_executions = c.reserved_executions + EXCLUDED.reserved_executions
            RETURNING c.scope, c.period, c.cost, c.tokens, c.executions
        )
        SELECT COALESCE(array_agg(w.scope), '{}'), COALESCE(array_agg(w.period), '{}'), COALESCE(array_agg(w.cost), '{}'),
            COALESCE(array_agg(w.tokens), '{}'), COALESCE(array_agg(w.executions), '{}')
        INTO scopes, periods, recorded_cost, recorded_tokens, recorded_executions FROM written w;
        -- Each alert its counter now reaches, marked sent while the counters are locked.
        alerted := '{}';
        FOR a IN 1..cardinality(p_alert_counters) LOOP
            IF (CASE p_alert_metrics[a] WHEN 0 THEN recorded_cost[p_alert_counters[a]] WHEN 1 THEN recorded_tokens[p_alert_counters[a]]
                ELSE recorded_executions[p_alert_counters[a]] END) >= p_alert_at[a] THEN
                INSERT INTO alerts_sent (scope, period, name, threshold)
                VALUES (scopes[p_alert_counters[a]], periods[p_alert_counters[a]], p_alert_names[a], p_alert_thresholds[a])
                ON CONFLICT DO NOTHING;
                IF FOUND THEN
                    alerted := alerted || a::BIGINT;
                END IF;
            END IF;
        END LOOP;
        outcome := 'done';
    END
    $fn$;

    -- The previous overload, as the one above takes its arguments (an alert whose counter is
    -- not among the call's is never reached, as before).
    CREATE OR REPLACE FUNCTION tenantllm_settle(p_lock_timeout TEXT, p_timezone TEXT, p_reserved BOOLEAN,
        p_scopes TEXT[], p_periods TEXT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_day TEXT, p_month TEXT,
        p_id TEXT, p_status TEXT, p_error_class TEXT, p_error_message TEXT, p_chosen_model_id TEXT, p_provider TEXT,
        p_completed_at BIGINT, p_duration_ms BIGINT, p_input_tokens BIGINT, p_output_tokens BIGINT,
        p_cached_tokens BIGINT, p_total_tokens BIGINT, p_input_cost BIGINT, p_output_cost BIGINT, p_total_cost BIGINT,
        p_attempts_count BIGINT, p_attempts TEXT, p_finish_reason TEXT, p_cache_write_tokens BIGINT,
        p_cache_read_cost BIGINT, p_cache_write_cost BIGINT, p_time_to_first_token_ms BIGINT, p_cached BIGINT,
        p_store_details BOOLEAN, p_system_prompt TEXT, p_user_prompt TEXT, p_response TEXT, p_tool_calls TEXT,
        p_alert_scopes TEXT[], p_alert_periods TEXT[], p_alert_names TEXT[], p_alert_thresholds BIGINT[],
        p_alert_metrics INT[], p_alert_at BIGINT[],
        OUT outcome TEXT, OUT scopes TEXT[], OUT periods TEXT[], OUT recorded_cost BIGINT[],
        OUT recorded_tokens BIGINT[], OUT recorded_executions BIGINT[], OUT alerted BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_own TEXT[] := '{}';
        v_alert_counters INT[] := '{}';
    BEGIN
        FOR i IN 1..cardinality(p_scopes) LOOP
            v_own := v_own || (p_scopes[i] || E'\t' || p_periods[i]);
        END LOOP;
        FOR a IN 1..cardinality(p_alert_scopes) LOOP
            v_alert_counters := v_alert_counters || array_position(v_own, p_alert_scopes[a] || E'\t' || p_alert_periods[a]);
        END LOOP;
        SELECT s.outcome, s.scopes, s.periods, s.recorded_cost, s.recorded_tokens, s.recorded_executions, s.alerted
        INTO outcome, scopes, periods, recorded_cost, recorded_tokens, recorded_executions, alerted
        FROM tenantllm_settle(
            p_lock_timeout, p_timezone, p_reserved, array_to_string(v_own, E'\n'), p_cost, p_tokens, p_executions, p_day,
            p_month, p_id, p_status, p_error_class, p_error_message, p_chosen_model_id, p_provider, p_completed_at,
            p_duration_ms, p_input_tokens, p_output_tokens, p_cached_tokens, p_total_tokens, p_input_cost, p_output_cost,
            p_total_cost, p_attempts_count, p_attempts, p_finish_reason, p_cache_write_tokens, p_cache_read_cost,
            p_cache_write_cost, p_time_to_first_token_ms, p_cached, p_store_details, p_system_prompt, p_user_prompt,
            p_response, p_tool_calls, v_alert_counters, p_alert_names, p_alert_thresholds, p_alert_metrics, p_alert_at) AS s;
    END
    $fn$;
    "#,
    // 29: the rollup rows of calls an admission closes as abandoned (their leases ran out) are
    // locked in the one order every write takes them in: daily rollups, then monthly rollups,
    // then daily totals, each table's rows in key order. Migration 26 wrote the three in one
    // statement, whose data-modifying parts PostgreSQL runs in no promised order (in practice
    // the totals first), so with a settlement of the same key (which locks a daily rollup,
    // then the rest) it could deadlock. `tenantllm_admit` (migration 26's overload; the full
    // function reaches it too) now runs the expiry statement by statement: reservations,
    // executions, each rollup table sorted by its key, then the counters with the call's own,
    // as counters.rs `expire_reservations` does. The common path tests that no check sent the
    // call elsewhere first, and checks the hard limits on each counter as it comes back, as
    // migration 21's did (no expiry to add first). Same arguments and results. OR REPLACE: a
    // test that re-runs the rollups' migration 9 re-runs this.
    r#"
    CREATE OR REPLACE FUNCTION tenantllm_admit(p_lock_timeout TEXT, p_timezone TEXT, p_now BIGINT,
        p_remember BOOLEAN, p_tenant TEXT, p_tenant_name TEXT, p_budget_tenant TEXT, p_budget_stamp BIGINT,
        p_scopes TEXT[], p_periods TEXT[], p_hard_scopes TEXT[], p_hard_periods TEXT[], p_hard_metrics INT[],
        p_hard_limits BIGINT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_counters TEXT,
        p_expires_at BIGINT, p_breaker TEXT,
        p_id TEXT, p_agent TEXT, p_model_id TEXT, p_provider TEXT, p_exec_tenant TEXT, p_started_at BIGINT,
        p_metadata TEXT, p_parent TEXT, p_root TEXT,
        p_breakers TEXT[], p_probe_lease BIGINT, p_expired_ids TEXT[], p_expired_days TEXT[],
        OUT outcome TEXT, OUT usage BIGINT[], OUT model_index INT, OUT probe BOOLEAN, OUT retry_at BIGINT,
        OUT expired_ids TEXT[], OUT expired_started BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_key RECORD;
        v_row BIGINT[];
        v_set TEXT;
        v_own INT := 1;
        v_refused BOOLEAN := false;
        v_gone TEXT[];
        v_abandoned TEXT[];
        v_scopes TEXT[];
        v_periods TEXT[];
        v_used BIGINT[];
        v_cost BIGINT[];
        v_tokens BIGINT[];
        v_executions BIGINT[];
    BEGIN
        v_set := set_config('lock_timeout', p_lock_timeout, true);
        -- Expired leases other than those the caller has keyed send it back for their keys.
        outcome := CASE
            WHEN (SELECT value FROM settings WHERE name = 'timezone') IS DISTINCT FROM p_timezone THEN 'timezone'
            WHEN p_budget_tenant IS NOT NULL AND (SELECT xmin::TEXT::BIGINT FROM tenant_budgets WHERE tenant_id = p_budget_tenant)
                IS DISTINCT FROM p_budget_stamp THEN 'budget'
            WHEN EXISTS (SELECT 1 FROM reservations WHERE expires_at <= p_now AND execution_id <> ALL(p_expired_ids)) THEN 'expired'
            WHEN EXISTS (SELECT 1 FROM breakers WHERE key = p_breaker AND phase <> 'closed') THEN 'breaker'
        END;
        IF outcome IS NOT NULL THEN
            IF outcome = 'expired' THEN
                -- Every reservation whose lease ran out, and when its call started if it is still
                -- running: the caller keys that call's usage and rollups by its day (in its
                -- calendar, which the timezone check above holds to) and asks again with them.
                SELECT array_agg(r.execution_id ORDER BY r.execution_id), array_agg(e.started_at ORDER BY r.execution_id)
                INTO expired_ids, expired_started
                FROM reservations r LEFT JOIN executions e ON e.id = r.execution_id AND e.status = 'running'
                WHERE r.expires_at <= p_now;
            ELSIF outcome = 'breaker' AND cardinality(p_breakers) > 0 THEN
                -- The first model's breaker is not closed: the full function makes the breakers'
                -- choice, in this same statement (the register of tenants is its to write).
                SELECT f.outcome, f.usage, f.model_index, f.probe, f.retry_at, f.expired_ids, f.expired_started
                INTO outcome, usage, model_index, probe, retry_at, expired_ids, expired_started
                FROM tenantllm_admit_full(p_lock_timeout, p_timezone, p_now, p_remember, p_tenant, p_tenant_name, p_budget_tenant,
                    p_budget_stamp, p_scopes, p_periods, p_hard_scopes, p_hard_periods, p_hard_metrics, p_hard_limits, p_cost, p_tokens,
                    p_executions, p_counters, p_expires_at, NULL, p_id, p_agent, p_model_id, p_provider, p_exec_tenant, p_started_at,
                    p_metadata, p_parent, p_root, 0, '{}', '{}', '{}', '{}', '{}', NULL, p_breakers, p_probe_lease, p_expired_ids,
                    p_expired_days) AS f;
            END IF;
            RETURN;
        END IF;
        IF p_remember THEN
            INSERT INTO tenants (tenant_id, name, first_used_at, last_used_at) VALUES (p_tenant, p_tenant_name, p_now, p_now)
            ON CONFLICT (tenant_id) DO UPDATE SET name = COALESCE(EXCLUDED.name, tenants.name),
                first_used_at = LEAST(tenants.first_used_at, EXCLUDED.first_used_at),
                last_used_at = GREATEST(tenants.last_used_at, EXCLUDED.last_used_at);
        END IF;
        INSERT INTO executions (id, agent, model_id, provider, tenant_id, status, started_at, metadata,
            parent_execution_id, root_execution_id)
        VALUES (p_id, p_agent, p_model_id, p_provider, p_exec_tenant, 'running', p_started_at, p_metadata, p_parent, p_root);
        outcome := 'go';
        usage := '{}';
        INSERT INTO reservations (execution_id, counters, cost, tokens, executions, expires_at)
        VALUES (p_id, p_counters, p_cost, p_tokens, p_executions, p_expires_at);
        IF cardinality(p_expired_ids) > 0 THEN
            -- The expired reservations the caller keyed and still here (counters.rs
            -- `expire_reservations`), each table in a statement of its own, in the order every
            -- write locks them: the reservations released (what each gave back on its counters
            -- collected for the statement below that locks them all) ...
            WITH gone AS (
                DELETE FROM reservations r WHERE r.execution_id = ANY(p_expired_ids) AND r.expires_at <= p_now
                RETURNING r.execution_id, r.counters, r.cost, r.tokens, r.executions
            )
            SELECT (SELECT array_agg(g.execution_id) FROM gone g), array_agg(k.scope), array_agg(k.period), array_agg(0::BIGINT),
                array_agg(-k.cost), array_agg(-k.tokens), array_agg(-k.executions)
            INTO v_gone, v_scopes, v_periods, v_used, v_cost, v_tokens, v_executions
            FROM (
                SELECT split_part(l, E'\t', 1), substr(l, strpos(l, E'\t') + 1), g.cost, g.tokens, g.executions
                FROM gone g, regexp_split_to_table(g.counters, E'\n') AS l WHERE strpos(l, E'\t') > 0
            ) AS k(scope, period, cost, tokens, executions);
            -- ... their calls still running closed as abandoned ...
            WITH abandoned AS (
                UPDATE executions e SET status = 'error', error_class = 'Abandoned',
                    error_message = 'the process running this call stopped before it finished', completed_at = p_now
                WHERE e.id = ANY(v_gone) AND e.status = 'running'
                RETURNING e.id
            )
            SELECT array_agg(a.id) INTO v_abandoned FROM abandoned a;
            -- ... and added to the daily rollups, the monthly ones and the daily totals, each
            -- table's rows in key order (as rollups::record_sql adds a row, on its call's day) ...
            INSERT INTO daily_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
            SELECT * FROM (
                SELECT p_expired_days[array_position(p_expired_ids, e.id)] AS day, COALESCE(e.tenant_id, '') AS tenant_id, e.agent, e.model_id, e.status, COUNT(*), SUM(e.input_tokens)::BIGINT, SUM(e.output_tokens)::BIGINT, SUM(e.cached_tokens)::BIGINT, SUM(e.total_tokens)::BIGINT, SUM(e.input_cost)::BIGINT, SUM(e.output_cost)::BIGINT, SUM(e.total_cost)::BIGINT, SUM(e.attempts_count)::BIGINT, SUM(e.cache_write_tokens)::BIGINT, SUM(e.cache_read_cost)::BIGINT, SUM(e.cache_write_cost)::BIGINT, COALESCE(SUM(e.duration_ms), 0)::BIGINT, COALESCE(SUM(e.time_to_first_token_ms), 0)::BIGINT
                FROM executions e WHERE e.id = ANY(v_abandoned) GROUP BY 1, 2, 3, 4, 5
            ) AS d ORDER BY d.day COLLATE "C", d.tenant_id, d.agent, d.model_id, d.status
            ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms;
            INSERT INTO monthly_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
            SELECT * FROM (
                SELECT left(p_expired_days[array_position(p_expired_ids, e.id)], 7) AS month, COALESCE(e.tenant_id, '') AS tenant_id, e.agent, e.model_id, e.status, COUNT(*), SUM(e.input_tokens)::BIGINT, SUM(e.output_tokens)::BIGINT, SUM(e.cached_tokens)::BIGINT, SUM(e.total_tokens)::BIGINT, SUM(e.input_cost)::BIGINT, SUM(e.output_cost)::BIGINT, SUM(e.total_cost)::BIGINT, SUM(e.attempts_count)::BIGINT, SUM(e.cache_write_tokens)::BIGINT, SUM(e.cache_read_cost)::BIGINT, SUM(e.cache_write_cost)::BIGINT, COALESCE(SUM(e.duration_ms), 0)::BIGINT, COALESCE(SUM(e.time_to_first_token_ms), 0)::BIGINT
                FROM executions e WHERE e.id = ANY(v_abandoned) GROUP BY 1, 2, 3, 4, 5
            ) AS d ORDER BY d.month COLLATE "C", d.tenant_id, d.agent, d.model_id, d.status
            ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms;
            INSERT INTO daily_totals AS r (period, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
            SELECT * FROM (
                SELECT p_expired_days[array_position(p_expired_ids, e.id)] AS day, e.agent, e.model_id, e.status, COUNT(*), SUM(e.input_tokens)::BIGINT, SUM(e.output_tokens)::BIGINT, SUM(e.cached_tokens)::BIGINT, SUM(e.total_tokens)::BIGINT, SUM(e.input_cost)::BIGINT, SUM(e.output_cost)::BIGINT, SUM(e.total_cost)::BIGINT, SUM(e.attempts_count)::BIGINT, SUM(e.cache_write_tokens)::BIGINT, SUM(e.cache_read_cost)::BIGINT, SUM(e.cache_write_cost)::BIGINT, COALESCE(SUM(e.duration_ms), 0)::BIGINT, COALESCE(SUM(e.time_to_first_token_ms), 0)::BIGINT
                FROM executions e WHERE e.id = ANY(v_abandoned) GROUP BY 1, 2, 3, 4
            ) AS d ORDER BY d.day COLLATE "C", d.agent, d.model_id, d.status
            ON CONFLICT (period, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms;
            -- ... and each abandoned call counted as one execution on its usage keys
            -- (store::usage_keys: the global, agent and tenant scopes, by day and month).
            SELECT v_scopes || array_agg(s), v_periods || array_agg(p), v_used || array_agg(1::BIGINT), v_cost || array_agg(0::BIGINT),
                v_tokens || array_agg(0::BIGINT), v_executions || array_agg(0::BIGINT)
            INTO v_scopes, v_periods, v_used, v_cost, v_tokens, v_executions
            FROM executions e,
                unnest(ARRAY['global', 'agent:' || e.agent] || CASE WHEN e.tenant_id IS NULL THEN '{}' ELSE ARRAY['tenant:' || e.tenant_id] END) AS s,
                unnest(ARRAY[p_expired_days[array_position(p_expired_ids, e.id)], left(p_expired_days[array_position(p_expired_ids, e.id)], 7)]) AS p
            WHERE e.id = ANY(v_abandoned);
        END IF;
        IF cardinality(v_scopes) > 0 THEN
            -- The call's own counters and those the expiry changed, in one statement in key
            -- order (as admission.rs locks them together); the call's own come back in its
            -- order, with its estimate taken off again for the checks below.
            FOR v_key IN
                INSERT INTO usage_counters AS c (scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions)
                SELECT d.scope, d.period, 0, 0, SUM(d.used)::BIGINT, SUM(d.cost)::BIGINT, SUM(d.tokens)::BIGINT, SUM(d.executions)::BIGINT
                FROM (
                    SELECT k.scope, k.period, 0::BIGINT, p_cost, p_tokens, p_executions FROM unnest(p_scopes, p_periods) AS k(scope, period)
                    UNION ALL
                    SELECT * FROM unnest(v_scopes, v_periods, v_used, v_cost, v_tokens, v_executions)
                ) AS d(scope, period, used, cost, tokens, executions)
                GROUP BY d.scope, d.period
                ORDER BY d.scope COLLATE "C", d.period COLLATE "C"
                ON CONFLICT (scope, period) DO UPDATE SET executions = c.executions + EXCLUDED.executions,
                    reserved_cost = c.reserved_cost + EXCLUDED.reserved_cost, reserved_tokens = c.reserved_tokens + EXCLUDED.reserved_tokens,
                    reserved_executions = c.reserved_executions + EXCLUDED.reserved_executions
                RETURNING c.scope, c.period, ARRAY[c.cost, c.tokens, c.executions, c.reserved_cost, c.reserved_tokens,
                    c.reserved_executions] AS v
            LOOP
                IF v_own <= cardinality(p_scopes) AND v_key.scope = p_scopes[v_own] AND v_key.period = p_periods[v_own] THEN
                    v_row := v_key.v;
                    usage := usage || ARRAY[v_row[1], v_row[2], v_row[3], v_row[4] - p_cost, v_row[5] - p_tokens, v_row[6] - p_executions];
                    v_own := v_own + 1;
                END IF;
            END LOOP;
        ELSIF cardinality(p_scopes) > 0 THEN
            -- As migration 20's: the call's own counters, each locked and given the estimate.
            FOR v_key IN
                INSERT INTO usage_counters AS c (scope, period, reserved_cost, reserved_tokens, reserved_executions)
                SELECT k.scope, k.period, p_cost, p_tokens, p_executions FROM unnest(p_scopes, p_periods) AS k(scope, period)
                ON CONFLICT (scope, period) DO UPDATE SET reserved_cost = c.reserved_cost + p_cost,
                    reserved_tokens = c.reserved_tokens + p_tokens, reserved_executions = c.reserved_executions + p_executions
                RETURNING ARRAY[c.cost, c.tokens, c.executions, c.reserved_cost - p_cost, c.reserved_tokens - p_tokens,
                    c.reserved_executions - p_executions] AS v
            LOOP
                usage := usage || v_key.v;
            END LOOP;
        END IF;
        -- Each hard limit against its counter, in NUMERIC so no sum overflows (at a 64-bit
        -- limit this may refuse where Rust's saturating sums would not, and the Rust
        -- transaction then decides).
        FOR i IN 1..cardinality(p_scopes) LOOP
            FOR h IN 1..cardinality(p_hard_scopes) LOOP
                IF p_hard_scopes[h] = p_scopes[i] AND p_hard_periods[h] = p_periods[i]
                    AND usage[6 * i - 5 + p_hard_metrics[h]]::NUMERIC + usage[6 * i - 2 + p_hard_metrics[h]]
                        + (CASE p_hard_metrics[h] WHEN 0 THEN p_cost WHEN 1 THEN p_tokens ELSE p_executions END) > p_hard_limits[h] THEN
                    v_refused := true;
                END IF;
            END LOOP;
        END LOOP;
        IF v_refused THEN
            -- The estimates come off again: a refusal leaves the counters as they were, but for
            -- the expired reservations it released, which stay released (as the transaction's),
            -- and returns the usage it read (migration 21).
            UPDATE usage_counters c SET reserved_cost = c.reserved_cost - p_cost, reserved_tokens = c.reserved_tokens - p_tokens,
                reserved_executions = c.reserved_executions - p_executions
            FROM unnest(p_scopes, p_periods) AS k(scope, period) WHERE c.scope = k.scope AND c.period = k.period;
            DELETE FROM reservations WHERE execution_id = p_id;
            DELETE FROM executions WHERE id = p_id;
            outcome := 'refused';
        END IF;
    END
    $fn$;
    "#,
    // 30: fewer arguments for the server to bind per guarded call. Each argument a function
    // takes costs its call about 1.1k server instructions (a scalar, NULL or not), an array
    // about 3k more and 1.2k an element, one text of many values about as little as a scalar
    // (callgrind, empty PL/pgSQL functions called prepared). New overloads of
    // `tenantllm_settle` (38 arguments instead of 42), `tenantllm_admit` (27 instead of 33)
    // and `tenantllm_admit_full` (34 instead of 40) take what they can derive or pack: the
    // month from the day; the alerts as one array of numbers and one of names, instead of
    // five; the call's counters only as the text its reservation stores (the scopes and
    // periods split from it), the hard limits as one array of numbers by the counter's place,
    // instead of six arrays; the first model's breaker as the first of the breakers; NULL for
    // expired leases not keyed. On the way: the stored timezone read into a variable (a
    // comparison with a subquery is a query of its own); the call's row and reservation
    // written in one statement; the hard limits checked in one loop over the limits (was every
    // limit for every counter). The previous `tenantllm_settle` overload hands its arguments
    // over (processes of the previous version), and `tenantllm_block` settles through the new
    // one. The previous `tenantllm_admit` and `tenantllm_admit_full` stay as migrations 29 and
    // 26 wrote them, for processes of the previous version. A full-guard call with prepared
    // statements: 1,878k server instructions before, 1,838k after (benches/pg_instructions.py).
    // OR REPLACE: a test that re-runs the rollups' migration 9 re-runs this.
    r#"
    -- The call's counters in `p_counters` as reservations store them ("scope<TAB>period" lines,
    -- sorted: they are locked in that order); the month's rollup is keyed by `p_day`'s month;
    -- each alert in `p_alerts` as four numbers: its counter's place among the call's (from 1),
    -- its metric (0 cost, 1 tokens, 2 executions), the amount that reaches it and its threshold,
    -- its name in `p_alert_names` (both NULL when there is none).
    CREATE OR REPLACE FUNCTION tenantllm_settle(p_lock_timeout TEXT, p_timezone TEXT, p_reserved BOOLEAN,
        p_counters TEXT, p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_day TEXT,
        p_id TEXT, p_status TEXT, p_error_class TEXT, p_error_message TEXT, p_chosen_model_id TEXT, p_provider TEXT,
        p_completed_at BIGINT, p_duration_ms BIGINT, p_input_tokens BIGINT, p_output_tokens BIGINT,
        p_cached_tokens BIGINT, p_total_tokens BIGINT, p_input_cost BIGINT, p_output_cost BIGINT, p_total_cost BIGINT,
        p_attempts_count BIGINT, p_attempts TEXT, p_finish_reason TEXT, p_cache_write_tokens BIGINT,
        p_cache_read_cost BIGINT, p_cache_write_cost BIGINT, p_time_to_first_token_ms BIGINT, p_cached BIGINT,
        p_store_details BOOLEAN, p_system_prompt TEXT, p_user_prompt TEXT, p_response TEXT, p_tool_calls TEXT,
        p_alerts BIGINT[], p_alert_names TEXT[],
        OUT outcome TEXT, OUT scopes TEXT[], OUT periods TEXT[], OUT recorded_cost BIGINT[],
        OUT recorded_tokens BIGINT[], OUT recorded_executions BIGINT[], OUT alerted BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_counters TEXT := '';
        v_cost BIGINT := 0;
        v_tokens BIGINT := 0;
        v_executions BIGINT := 0;
        v_keys TEXT[];
        v_set TEXT;
        v_tenant TEXT;
        v_agent TEXT;
        v_model TEXT;
        v_timezone TEXT;
    BEGIN
        v_set := set_config('lock_timeout', p_lock_timeout, true);
        -- Read into a variable: a comparison with a subquery is a query of its own.
        SELECT value INTO v_timezone FROM settings WHERE name = 'timezone';
        IF v_timezone IS DISTINCT FROM p_timezone THEN
            outcome := 'timezone';
            RETURN;
        END IF;
        IF p_reserved THEN
            DELETE FROM reservations WHERE execution_id = p_id RETURNING counters, cost, tokens, executions
                INTO v_counters, v_cost, v_tokens, v_executions;
            IF NOT FOUND THEN
                outcome := 'taken_over';
                RETURN;
            END IF;
        END IF;
        -- The details row is this call's alone: no lock order to keep.
        WITH details AS (
            INSERT INTO execution_details (execution_id, system_prompt, user_prompt, response, tool_calls)
            SELECT p_id, p_system_prompt, p_user_prompt, p_response, p_tool_calls WHERE p_store_details
            ON CONFLICT (execution_id) DO UPDATE SET system_prompt = EXCLUDED.system_prompt,
                user_prompt = EXCLUDED.user_prompt, response = EXCLUDED.response, tool_calls = EXCLUDED.tool_calls
        )
        UPDATE executions SET status = p_status, error_class = p_error_class, error_message = p_error_message,
            chosen_model_id = p_chosen_model_id, provider = COALESCE(p_provider, provider), completed_at = p_completed_at,
            duration_ms = p_duration_ms, input_tokens = p_input_tokens, output_tokens = p_output_tokens,
            cached_tokens = p_cached_tokens, total_tokens = p_total_tokens, input_cost = p_input_cost,
            output_cost = p_output_cost, total_cost = p_total_cost, attempts_count = p_attempts_count,
            attempts = p_attempts, finish_reason = p_finish_reason, cache_write_tokens = p_cache_write_tokens,
            cache_read_cost = p_cache_read_cost, cache_write_cost = p_cache_write_cost,
            time_to_first_token_ms = p_time_to_first_token_ms, cached = p_cached
        WHERE id = p_id AND status = 'running'
        RETURNING COALESCE(tenant_id, ''), agent, model_id INTO v_tenant, v_agent, v_model;
        IF NOT FOUND THEN
            -- Gone, or closed before (its rollups count it under its earlier outcome, which
            -- would have to come out first): undone with the rest; the Rust transaction then
            -- settles or reports it.
            RAISE EXCEPTION 'execution % is not running', p_id USING ERRCODE = 'no_data_found';
        END IF;
        -- The rollups one statement each, in the order every write locks them (executions.rs
        -- `roll`): the daily rollup, the monthly one, then the day's total; each created by
        -- the first call of its key.
        UPDATE daily_rollups SET calls = calls + 1, input_tokens = input_tokens + COALESCE(p_input_tokens, 0), output_tokens = output_tokens + COALESCE(p_output_tokens, 0), cached_tokens = cached_tokens + COALESCE(p_cached_tokens, 0), total_tokens = total_tokens + COALESCE(p_total_tokens, 0), input_cost = input_cost + COALESCE(p_input_cost, 0), output_cost = output_cost + COALESCE(p_output_cost, 0), total_cost = total_cost + COALESCE(p_total_cost, 0), attempts_count = attempts_count + COALESCE(p_attempts_count, 0), cache_write_tokens = cache_write_tokens + COALESCE(p_cache_write_tokens, 0), cache_read_cost = cache_read_cost + COALESCE(p_cache_read_cost, 0), cache_write_cost = cache_write_cost + COALESCE(p_cache_write_cost, 0), duration_ms = duration_ms + COALESCE(p_duration_ms, 0), time_to_first_token_ms = time_to_first_token_ms + COALESCE(p_time_to_first_token_ms, 0)
        WHERE period = p_day AND tenant_id = v_tenant AND agent = v_agent AND model_id = v_model AND status = p_status;
        IF NOT FOUND THEN
            INSERT INTO daily_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
            VALUES (p_day, v_tenant, v_agent, v_model, p_status, 1, COALESCE(p_input_tokens, 0), COALESCE(p_output_tokens, 0), COALESCE(p_cached_tokens, 0), COALESCE(p_total_tokens, 0), COALESCE(p_input_cost, 0), COALESCE(p_output_cost, 0), COALESCE(p_total_cost, 0), COALESCE(p_attempts_count, 0), COALESCE(p_cache_write_tokens, 0), COALESCE(p_cache_read_cost, 0), COALESCE(p_cache_write_cost, 0), COALESCE(p_duration_ms, 0), COALESCE(p_time_to_first_token_ms, 0))
            ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms;
        END IF;
        UPDATE monthly_rollups SET calls = calls + 1, input_tokens = input_tokens + COALESCE(p_input_tokens, 0), output_tokens = output_tokens + COALESCE(p_output_tokens, 0), cached_tokens = cached_tokens + COALESCE(p_cached_tokens, 0), total_tokens = total_tokens + COALESCE(p_total_tokens, 0), input_cost = input_cost + COALESCE(p_input_cost, 0), output_cost = output_cost + COALESCE(p_output_cost, 0), total_cost = total_cost + COALESCE(p_total_cost, 0), attempts_count = attempts_count + COALESCE(p_attempts_count, 0), cache_write_tokens = cache_write_tokens + COALESCE(p_cache_write_tokens, 0), cache_read_cost = cache_read_cost + COALESCE(p_cache_read_cost, 0), cache_write_cost = cache_write_cost + COALESCE(p_cache_write_cost, 0), duration_ms = duration_ms + COALESCE(p_duration_ms, 0), time_to_first_token_ms = time_to_first_token_ms + COALESCE(p_time_to_first_token_ms, 0)
        WHERE period = left(p_day, 7) AND tenant_id = v_tenant AND agent = v_agent AND model_id = v_model AND status = p_status;
        IF NOT FOUND THEN
            INSERT INTO monthly_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
            VALUES (left(p_day, 7), v_tenant, v_agent, v_model, p_status, 1, COALESCE(p_input_tokens, 0), COALESCE(p_output_tokens, 0), COALESCE(p_cached_tokens, 0), COALESCE(p_total_tokens, 0), COALESCE(p_input_cost, 0), COALESCE(p_output_cost, 0), COALESCE(p_total_cost, 0), COALESCE(p_attempts_count, 0), COALESCE(p_cache_write_tokens, 0), COALESCE(p_cache_read_cost, 0), COALESCE(p_cache_write_cost, 0), COALESCE(p_duration_ms, 0), COALESCE(p_time_to_first_token_ms, 0))
            ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms;
        END IF;
        UPDATE daily_totals SET calls = calls + 1, input_tokens = input_tokens + COALESCE(p_input_tokens, 0), output_tokens = output_tokens + COALESCE(p_output_tokens, 0), cached_tokens = cached_tokens + COALESCE(p_cached_tokens, 0), total_tokens = total_tokens + COALESCE(p_total_tokens, 0), input_cost = input_cost + COALESCE(p_input_cost, 0), output_cost = output_cost + COALESCE(p_output_cost, 0), total_cost = total_cost + COALESCE(p_total_cost, 0), attempts_count = attempts_count + COALESCE(p_attempts_count, 0), cache_write_tokens = cache_write_tokens + COALESCE(p_cache_write_tokens, 0), cache_read_cost = cache_read_cost + COALESCE(p_cache_read_cost, 0), cache_write_cost = cache_write_cost + COALESCE(p_cache_write_cost, 0), duration_ms = duration_ms + COALESCE(p_duration_ms, 0), time_to_first_token_ms = time_to_first_token_ms + COALESCE(p_time_to_first_token_ms, 0)
        WHERE period = p_day AND agent = v_agent AND model_id = v_model AND status = p_status;
        IF NOT FOUND THEN
            INSERT INTO daily_totals AS r (period, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
            VALUES (p_day, v_agent, v_model, p_status, 1, COALESCE(p_input_tokens, 0), COALESCE(p_output_tokens, 0), COALESCE(p_cached_tokens, 0), COALESCE(p_total_tokens, 0), COALESCE(p_input_cost, 0), COALESCE(p_output_cost, 0), COALESCE(p_total_cost, 0), COALESCE(p_attempts_count, 0), COALESCE(p_cache_write_tokens, 0), COALESCE(p_cache_read_cost, 0), COALESCE(p_cache_write_cost, 0), COALESCE(p_duration_ms, 0), COALESCE(p_time_to_first_token_ms, 0))
            ON CONFLICT (period, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms;
        END IF;
        -- The counters of the reservation are among the call's own (admission reserves on
        -- those it checks, at the time the call starts) unless the call started on one side of
        -- midnight and was admitted on the other: then, undone with the rest, the Rust
        -- transaction settles it.
        v_keys := string_to_array(v_counters, E'\n');
        IF NOT v_keys <@ string_to_array(p_counters, E'\n') THEN
            RAISE EXCEPTION 'execution % reserved on other counters', p_id USING ERRCODE = 'no_data_found';
        END IF;
        -- The counters in one statement, one row after another in the order every write locks
        -- them (the keys come sorted), so no two calls wait on each other in a cycle: each gets
        -- the call's usage and gives back what the reservation held on it; the first use of a
        -- counter creates it. They come back in that order: RETURNING gives the rows as they
        -- are written, and the aggregates read them so.
        WITH written AS (
            INSERT INTO usage_counters AS c (scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions)
            SELECT split_part(k.key, E'\t', 1), split_part(k.key, E'\t', 2), p_cost, p_tokens, p_executions,
                CASE WHEN k.released THEN -v_cost ELSE 0 END, CASE WHEN k.released THEN -v_tokens ELSE 0 END,
                CASE WHEN k.released THEN -v_executions ELSE 0 END
            FROM (SELECT u.key, u.key = ANY(v_keys) AS released FROM unnest(string_to_array(p_counters, E'\n')) AS u(key)) AS k
            ON CONFLICT (scope, period) DO UPDATE SET cost = c.cost + EXCLUDED.cost, tokens = c.tokens + EXCLUDED.tokens,
                executions = c.executions + EXCLUDED.executions, reserved_cost = c.reserved_cost + EXCLUDED.reserved_cost,
                reserved_tokens = c.reserved_tokens + EXCLUDED.reserved_tokens,
                reserved_executions = c.reserved_executions + EXCLUDED.reserved_executions
            RETURNING c.scope, c.period, c.cost, c.tokens, c.executions
        )
        SELECT COALESCE(array_agg(w.scope), '{}'), COALESCE(array_agg(w.period), '{}'), COALESCE(array_agg(w.cost), '{}'),
            COALESCE(array_agg(w.tokens), '{}'), COALESCE(array_agg(w.executions), '{}')
        INTO scopes, periods, recorded_cost, recorded_tokens, recorded_executions FROM written w;
        -- Each alert its counter now reaches, marked sent while the counters are locked.
        alerted := '{}';
        FOR a IN 1..COALESCE(cardinality(p_alert_names), 0) LOOP
            IF (CASE p_alerts[4 * a - 2] WHEN 0 THEN recorded_cost[p_alerts[4 * a - 3]] WHEN 1 THEN recorded_tokens[p_alerts[4 * a - 3]]
                ELSE recorded_executions[p_alerts[4 * a - 3]] END) >= p_alerts[4 * a - 1] THEN
                INSERT INTO alerts_sent (scope, period, name, threshold)
                VALUES (scopes[p_alerts[4 * a - 3]], periods[p_alerts[4 * a - 3]], p_alert_names[a], p_alerts[4 * a])
                ON CONFLICT DO NOTHING;
                IF FOUND THEN
                    alerted := alerted || a::BIGINT;
                END IF;
            END IF;
        END LOOP;
        outcome := 'done';
    END
    $fn$;


    -- The previous overload (migration 28's), as the one above takes its arguments: `p_month`
    -- is `p_day`'s month, as every caller sends it.
    CREATE OR REPLACE FUNCTION tenantllm_settle(p_lock_timeout TEXT, p_timezone TEXT, p_reserved BOOLEAN,
        p_counters TEXT, p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT, p_day TEXT, p_month TEXT,
        p_id TEXT, p_status TEXT, p_error_class TEXT, p_error_message TEXT, p_chosen_model_id TEXT, p_provider TEXT,
        p_completed_at BIGINT, p_duration_ms BIGINT, p_input_tokens BIGINT, p_output_tokens BIGINT,
        p_cached_tokens BIGINT, p_total_tokens BIGINT, p_input_cost BIGINT, p_output_cost BIGINT, p_total_cost BIGINT,
        p_attempts_count BIGINT, p_attempts TEXT, p_finish_reason TEXT, p_cache_write_tokens BIGINT,
        p_cache_read_cost BIGINT, p_cache_write_cost BIGINT, p_time_to_first_token_ms BIGINT, p_cached BIGINT,
        p_store_details BOOLEAN, p_system_prompt TEXT, p_user_prompt TEXT, p_response TEXT, p_tool_calls TEXT,
        p_alert_counters INT[], p_alert_names TEXT[], p_alert_thresholds BIGINT[],
        p_alert_metrics INT[], p_alert_at BIGINT[],
        OUT outcome TEXT, OUT scopes TEXT[], OUT periods TEXT[], OUT recorded_cost BIGINT[],
        OUT recorded_tokens BIGINT[], OUT recorded_executions BIGINT[], OUT alerted BIGINT[])
    LANGUAGE plpgsql AS $fn$
    BEGIN
        SELECT s.outcome, s.scopes, s.periods, s.recorded_cost, s.recorded_tokens, s.recorded_executions, s.alerted
        INTO outcome, scopes, periods, recorded_cost, recorded_tokens, recorded_executions, alerted
        FROM tenantllm_settle(
            p_lock_timeout, p_timezone, p_reserved, p_counters, p_cost, p_tokens, p_executions, p_day, p_id, p_status,
            p_error_class, p_error_message, p_chosen_model_id, p_provider, p_completed_at, p_duration_ms, p_input_tokens,
            p_output_tokens, p_cached_tokens, p_total_tokens, p_input_cost, p_output_cost, p_total_cost, p_attempts_count,
            p_attempts, p_finish_reason, p_cache_write_tokens, p_cache_read_cost, p_cache_write_cost,
            p_time_to_first_token_ms, p_cached, p_store_details, p_system_prompt, p_user_prompt, p_response, p_tool_calls,
            ARRAY(SELECT x FROM generate_subscripts(p_alert_names, 1) AS a,
                unnest(ARRAY[p_alert_counters[a], p_alert_metrics[a], p_alert_at[a], p_alert_thresholds[a]]) WITH ORDINALITY AS u(x, j)
                ORDER BY a, j),
            p_alert_names) AS s;
    END
    $fn$;

    -- Migration 21's, settling through the overload above (`p_month`: as there).
    CREATE OR REPLACE FUNCTION tenantllm_block(p_lock_timeout TEXT, p_timezone TEXT, p_day TEXT, p_month TEXT,
        p_id TEXT, p_agent TEXT, p_model_id TEXT, p_provider TEXT, p_exec_tenant TEXT, p_started_at BIGINT,
        p_metadata TEXT, p_parent TEXT, p_root TEXT,
        p_status TEXT, p_error_class TEXT, p_error_message TEXT, p_chosen_model_id TEXT, p_closed_provider TEXT,
        p_completed_at BIGINT, p_duration_ms BIGINT, p_input_tokens BIGINT, p_output_tokens BIGINT,
        p_cached_tokens BIGINT, p_total_tokens BIGINT, p_input_cost BIGINT, p_output_cost BIGINT, p_total_cost BIGINT,
        p_attempts_count BIGINT, p_attempts TEXT, p_finish_reason TEXT, p_cache_write_tokens BIGINT,
        p_cache_read_cost BIGINT, p_cache_write_cost BIGINT, p_time_to_first_token_ms BIGINT, p_cached BIGINT,
        OUT outcome TEXT)
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_set TEXT;
        v_timezone TEXT;
    BEGIN
        v_set := set_config('lock_timeout', p_lock_timeout, true);
        SELECT value INTO v_timezone FROM settings WHERE name = 'timezone';
        IF v_timezone IS DISTINCT FROM p_timezone THEN
            outcome := 'timezone';
            RETURN;
        END IF;
        INSERT INTO executions (id, agent, model_id, provider, tenant_id, status, started_at, metadata,
            parent_execution_id, root_execution_id)
        VALUES (p_id, p_agent, p_model_id, p_provider, p_exec_tenant, 'running', p_started_at, p_metadata, p_parent, p_root);
        SELECT (tenantllm_settle(p_lock_timeout, p_timezone, false, '', 0, 0, 0, p_day, p_id, p_status, p_error_class,
            p_error_message, p_chosen_model_id, p_closed_provider, p_completed_at, p_duration_ms, p_input_tokens, p_output_tokens,
            p_cached_tokens, p_total_tokens, p_input_cost, p_output_cost, p_total_cost, p_attempts_count, p_attempts,
            p_finish_reason, p_cache_write_tokens, p_cache_read_cost, p_cache_write_cost, p_time_to_first_token_ms, p_cached,
            false, NULL, NULL, NULL, NULL, NULL, NULL)).outcome INTO outcome;
    END
    $fn$;

    -- The call's counters in `p_counters` as its reservation stores them ("scope<TAB>period"
    -- lines, sorted: they are locked in that order); each hard limit in `p_hard` as three
    -- numbers: its counter's place among them (from 1), its metric (0 cost, 1 tokens, 2
    -- executions) and the limit (NULL: none). The first of `p_breakers` is the first model's.
    -- The expired leases keyed, NULL when none.
    CREATE OR REPLACE FUNCTION tenantllm_admit(p_lock_timeout TEXT, p_timezone TEXT, p_now BIGINT,
        p_remember BOOLEAN, p_tenant TEXT, p_tenant_name TEXT, p_budget_tenant TEXT, p_budget_stamp BIGINT,
        p_counters TEXT, p_hard BIGINT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT,
        p_expires_at BIGINT, p_id TEXT, p_agent TEXT, p_model_id TEXT, p_provider TEXT, p_exec_tenant TEXT, p_started_at BIGINT,
        p_metadata TEXT, p_parent TEXT, p_root TEXT,
        p_breakers TEXT[], p_probe_lease BIGINT, p_expired_ids TEXT[], p_expired_days TEXT[],
        OUT outcome TEXT, OUT usage BIGINT[], OUT model_index INT, OUT probe BOOLEAN, OUT retry_at BIGINT,
        OUT expired_ids TEXT[], OUT expired_started BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_key RECORD;
        v_row BIGINT[];
        v_set TEXT;
        v_own INT := 1;
        v_refused BOOLEAN := false;
        v_timezone TEXT;
        v_keys TEXT[];
        v_own_scopes TEXT[];
        v_own_periods TEXT[];
        v_gone TEXT[];
        v_abandoned TEXT[];
        v_scopes TEXT[];
        v_periods TEXT[];
        v_used BIGINT[];
        v_cost BIGINT[];
        v_tokens BIGINT[];
        v_executions BIGINT[];
    BEGIN
        v_set := set_config('lock_timeout', p_lock_timeout, true);
        -- Read into a variable: a comparison with a subquery is a query of its own.
        SELECT value INTO v_timezone FROM settings WHERE name = 'timezone';
        -- Expired leases other than those the caller has keyed send it back for their keys.
        outcome := CASE
            WHEN v_timezone IS DISTINCT FROM p_timezone THEN 'timezone'
            WHEN p_budget_tenant IS NOT NULL AND (SELECT xmin::TEXT::BIGINT FROM tenant_budgets WHERE tenant_id = p_budget_tenant)
                IS DISTINCT FROM p_budget_stamp THEN 'budget'
            WHEN EXISTS (SELECT 1 FROM reservations WHERE expires_at <= p_now AND execution_id <> ALL(COALESCE(p_expired_ids, '{}'))) THEN 'expired'
            WHEN EXISTS (SELECT 1 FROM breakers WHERE key = p_breakers[1] AND phase <> 'closed') THEN 'breaker'
        END;
        IF outcome IS NOT NULL THEN
            IF outcome = 'expired' THEN
                -- Every reservation whose lease ran out, and when its call started if it is still
                -- running: the caller keys that call's usage and rollups by its day (in its
                -- calendar, which the timezone check above holds to) and asks again with them.
                SELECT array_agg(r.execution_id ORDER BY r.execution_id), array_agg(e.started_at ORDER BY r.execution_id)
                INTO expired_ids, expired_started
                FROM reservations r LEFT JOIN executions e ON e.id = r.execution_id AND e.status = 'running'
                WHERE r.expires_at <= p_now;
            ELSIF outcome = 'breaker' AND cardinality(p_breakers) > 0 THEN
                -- The first model's breaker is not closed: the full function makes the breakers'
                -- choice, in this same statement (the register of tenants is its to write).
                SELECT f.outcome, f.usage, f.model_index, f.probe, f.retry_at, f.expired_ids, f.expired_started
                INTO outcome, usage, model_index, probe, retry_at, expired_ids, expired_started
                FROM tenantllm_admit_full(p_lock_timeout, p_timezone, p_now, p_remember, p_tenant, p_tenant_name, p_budget_tenant,
                    p_budget_stamp, p_counters, p_hard, p_cost, p_tokens, p_executions, p_expires_at, p_id, p_agent, p_model_id,
                    p_provider, p_exec_tenant, p_started_at, p_metadata, p_parent, p_root, 0, '{}', '{}', '{}', '{}', '{}', NULL,
                    p_breakers, p_probe_lease, p_expired_ids, p_expired_days) AS f;
            END IF;
            RETURN;
        END IF;
        IF p_remember THEN
            INSERT INTO tenants (tenant_id, name, first_used_at, last_used_at) VALUES (p_tenant, p_tenant_name, p_now, p_now)
            ON CONFLICT (tenant_id) DO UPDATE SET name = COALESCE(EXCLUDED.name, tenants.name),
                first_used_at = LEAST(tenants.first_used_at, EXCLUDED.first_used_at),
                last_used_at = GREATEST(tenants.last_used_at, EXCLUDED.last_used_at);
        END IF;
        -- The call's row and its reservation, one statement (two new rows: no lock order).
        WITH reserved AS (
            INSERT INTO reservations (execution_id, counters, cost, tokens, executions, expires_at)
            VALUES (p_id, p_counters, p_cost, p_tokens, p_executions, p_expires_at)
        )
        INSERT INTO executions (id, agent, model_id, provider, tenant_id, status, started_at, metadata,
            parent_execution_id, root_execution_id)
        VALUES (p_id, p_agent, p_model_id, p_provider, p_exec_tenant, 'running', p_started_at, p_metadata, p_parent, p_root);
        outcome := 'go';
        usage := '{}';
        IF cardinality(p_expired_ids) > 0 THEN
            -- The expired reservations the caller keyed and still here (counters.rs
            -- `expire_reservations`), each table in a statement of its own, in the order every
            -- write locks them: the reservations released (what each gave back on its counters
            -- collected for the statement below that locks them all) ...
            WITH gone AS (
                DELETE FROM reservations r WHERE r.execution_id = ANY(p_expired_ids) AND r.expires_at <= p_now
                RETURNING r.execution_id, r.counters, r.cost, r.tokens, r.executions
            )
            SELECT (SELECT array_agg(g.execution_id) FROM gone g), array_agg(k.scope), array_agg(k.period), array_agg(0::BIGINT),
                array_agg(-k.cost), array_agg(-k.tokens), array_agg(-k.executions)
            INTO v_gone, v_scopes, v_periods, v_used, v_cost, v_tokens, v_executions
            FROM (
                SELECT split_part(l, E'\t', 1), substr(l, strpos(l, E'\t') + 1), g.cost, g.tokens, g.executions
                FROM gone g, regexp_split_to_table(g.counters, E'\n') AS l WHERE strpos(l, E'\t') > 0
            ) AS k(scope, period, cost, tokens, executions);
            -- ... their calls still running closed as abandoned ...
            WITH abandoned AS (
                UPDATE executions e SET status = 'error', error_class = 'Abandoned',
                    error_message = 'the process running this call stopped before it finished', completed_at = p_now
                WHERE e.id = ANY(v_gone) AND e.status = 'running'
                RETURNING e.id
            )
            SELECT array_agg(a.id) INTO v_abandoned FROM abandoned a;
            -- ... and added to the daily rollups, the monthly ones and the daily totals, each
            -- table's rows in key order (as rollups::record_sql adds a row, on its call's day) ...
            INSERT INTO daily_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
            SELECT * FROM (
                SELECT p_expired_days[array_position(p_expired_ids, e.id)] AS day, COALESCE(e.tenant_id, '') AS tenant_id, e.agent, e.model_id, e.status, COUNT(*), SUM(e.input_tokens)::BIGINT, SUM(e.output_tokens)::BIGINT, SUM(e.cached_tokens)::BIGINT, SUM(e.total_tokens)::BIGINT, SUM(e.input_cost)::BIGINT, SUM(e.output_cost)::BIGINT, SUM(e.total_cost)::BIGINT, SUM(e.attempts_count)::BIGINT, SUM(e.cache_write_tokens)::BIGINT, SUM(e.cache_read_cost)::BIGINT, SUM(e.cache_write_cost)::BIGINT, COALESCE(SUM(e.duration_ms), 0)::BIGINT, COALESCE(SUM(e.time_to_first_token_ms), 0)::BIGINT
                FROM executions e WHERE e.id = ANY(v_abandoned) GROUP BY 1, 2, 3, 4, 5
            ) AS d ORDER BY d.day COLLATE "C", d.tenant_id, d.agent, d.model_id, d.status
            ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms;
            INSERT INTO monthly_rollups AS r (period, tenant_id, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
            SELECT * FROM (
                SELECT left(p_expired_days[array_position(p_expired_ids, e.id)], 7) AS month, COALESCE(e.tenant_id, '') AS tenant_id, e.agent, e.model_id, e.status, COUNT(*), SUM(e.input_tokens)::BIGINT, SUM(e.output_tokens)::BIGINT, SUM(e.cached_tokens)::BIGINT, SUM(e.total_tokens)::BIGINT, SUM(e.input_cost)::BIGINT, SUM(e.output_cost)::BIGINT, SUM(e.total_cost)::BIGINT, SUM(e.attempts_count)::BIGINT, SUM(e.cache_write_tokens)::BIGINT, SUM(e.cache_read_cost)::BIGINT, SUM(e.cache_write_cost)::BIGINT, COALESCE(SUM(e.duration_ms), 0)::BIGINT, COALESCE(SUM(e.time_to_first_token_ms), 0)::BIGINT
                FROM executions e WHERE e.id = ANY(v_abandoned) GROUP BY 1, 2, 3, 4, 5
            ) AS d ORDER BY d.month COLLATE "C", d.tenant_id, d.agent, d.model_id, d.status
            ON CONFLICT (period, tenant_id, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms;
            INSERT INTO daily_totals AS r (period, agent, model_id, status, calls, input_tokens, output_tokens, cached_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, cache_write_tokens, cache_read_cost, cache_write_cost, duration_ms, time_to_first_token_ms)
            SELECT * FROM (
                SELECT p_expired_days[array_position(p_expired_ids, e.id)] AS day, e.agent, e.model_id, e.status, COUNT(*), SUM(e.input_tokens)::BIGINT, SUM(e.output_tokens)::BIGINT, SUM(e.cached_tokens)::BIGINT, SUM(e.total_tokens)::BIGINT, SUM(e.input_cost)::BIGINT, SUM(e.output_cost)::BIGINT, SUM(e.total_cost)::BIGINT, SUM(e.attempts_count)::BIGINT, SUM(e.cache_write_tokens)::BIGINT, SUM(e.cache_read_cost)::BIGINT, SUM(e.cache_write_cost)::BIGINT, COALESCE(SUM(e.duration_ms), 0)::BIGINT, COALESCE(SUM(e.time_to_first_token_ms), 0)::BIGINT
                FROM executions e WHERE e.id = ANY(v_abandoned) GROUP BY 1, 2, 3, 4
            ) AS d ORDER BY d.day COLLATE "C", d.agent, d.model_id, d.status
            ON CONFLICT (period, agent, model_id, status) DO UPDATE SET calls = r.calls + EXCLUDED.calls, input_tokens = r.input_tokens + EXCLUDED.input_tokens, output_tokens = r.output_tokens + EXCLUDED.output_tokens, cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, total_tokens = r.total_tokens + EXCLUDED.total_tokens, input_cost = r.input_cost + EXCLUDED.input_cost, output_cost = r.output_cost + EXCLUDED.output_cost, total_cost = r.total_cost + EXCLUDED.total_cost, attempts_count = r.attempts_count + EXCLUDED.attempts_count, cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens, cache_read_cost = r.cache_read_cost + EXCLUDED.cache_read_cost, cache_write_cost = r.cache_write_cost + EXCLUDED.cache_write_cost, duration_ms = r.duration_ms + EXCLUDED.duration_ms, time_to_first_token_ms = r.time_to_first_token_ms + EXCLUDED.time_to_first_token_ms;
            -- ... and each abandoned call counted as one execution on its usage keys
            -- (store::usage_keys: the global, agent and tenant scopes, by day and month).
            SELECT v_scopes || array_agg(s), v_periods || array_agg(p), v_used || array_agg(1::BIGINT), v_cost || array_agg(0::BIGINT),
                v_tokens || array_agg(0::BIGINT), v_executions || array_agg(0::BIGINT)
            INTO v_scopes, v_periods, v_used, v_cost, v_tokens, v_executions
            FROM executions e,
                unnest(ARRAY['global', 'agent:' || e.agent] || CASE WHEN e.tenant_id IS NULL THEN '{}' ELSE ARRAY['tenant:' || e.tenant_id] END) AS s,
                unnest(ARRAY[p_expired_days[array_position(p_expired_ids, e.id)], left(p_expired_days[array_position(p_expired_ids, e.id)], 7)]) AS p
            WHERE e.id = ANY(v_abandoned);
        END IF;
        IF cardinality(v_scopes) > 0 THEN
            SELECT array_agg(split_part(k, E'\t', 1)), array_agg(split_part(k, E'\t', 2))
            INTO v_own_scopes, v_own_periods FROM unnest(string_to_array(p_counters, E'\n')) AS k;
            -- The call's own counters and those the expiry changed, in one statement in key
            -- order (as admission.rs locks them together); the call's own come back in its
            -- order, with its estimate taken off again for the checks below.
            FOR v_key IN
                INSERT INTO usage_counters AS c (scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions)
                SELECT d.scope, d.period, 0, 0, SUM(d.used)::BIGINT, SUM(d.cost)::BIGINT, SUM(d.tokens)::BIGINT, SUM(d.executions)::BIGINT
                FROM (
                    SELECT k.scope, k.period, 0::BIGINT, p_cost, p_tokens, p_executions FROM unnest(v_own_scopes, v_own_periods) AS k(scope, period)
                    UNION ALL
                    SELECT * FROM unnest(v_scopes, v_periods, v_used, v_cost, v_tokens, v_executions)
                ) AS d(scope, period, used, cost, tokens, executions)
                GROUP BY d.scope, d.period
                ORDER BY d.scope COLLATE "C", d.period COLLATE "C"
                ON CONFLICT (scope, period) DO UPDATE SET executions = c.executions + EXCLUDED.executions,
                    reserved_cost = c.reserved_cost + EXCLUDED.reserved_cost, reserved_tokens = c.reserved_tokens + EXCLUDED.reserved_tokens,
                    reserved_executions = c.reserved_executions + EXCLUDED.reserved_executions
                RETURNING c.scope, c.period, ARRAY[c.cost, c.tokens, c.executions, c.reserved_cost, c.reserved_tokens,
                    c.reserved_executions] AS v
            LOOP
                IF v_own <= cardinality(v_own_scopes) AND v_key.scope = v_own_scopes[v_own] AND v_key.period = v_own_periods[v_own] THEN
                    v_row := v_key.v;
                    usage := usage || ARRAY[v_row[1], v_row[2], v_row[3], v_row[4] - p_cost, v_row[5] - p_tokens, v_row[6] - p_executions];
                    v_own := v_own + 1;
                END IF;
            END LOOP;
        ELSIF p_counters <> '' THEN
            -- As migration 20's: the call's own counters, each locked and given the estimate.
            FOR v_key IN
                INSERT INTO usage_counters AS c (scope, period, reserved_cost, reserved_tokens, reserved_executions)
                SELECT split_part(k, E'\t', 1), split_part(k, E'\t', 2), p_cost, p_tokens, p_executions
                FROM unnest(string_to_array(p_counters, E'\n')) AS k
                ON CONFLICT (scope, period) DO UPDATE SET reserved_cost = c.reserved_cost + p_cost,
                    reserved_tokens = c.reserved_tokens + p_tokens, reserved_executions = c.reserved_executions + p_executions
                RETURNING ARRAY[c.cost, c.tokens, c.executions, c.reserved_cost - p_cost, c.reserved_tokens - p_tokens,
                    c.reserved_executions - p_executions] AS v
            LOOP
                usage := usage || v_key.v;
            END LOOP;
        END IF;
        -- Each hard limit against its counter (its place from 1, so its six numbers in `usage`
        -- start at 6 * place - 5), in NUMERIC so no sum overflows (at a 64-bit limit this may
        -- refuse where Rust's saturating sums would not, and the Rust transaction then decides).
        FOR h IN 1..COALESCE(cardinality(p_hard), 0) / 3 LOOP
            IF usage[6 * p_hard[3 * h - 2] - 5 + p_hard[3 * h - 1]]::NUMERIC + usage[6 * p_hard[3 * h - 2] - 2 + p_hard[3 * h - 1]]
                    + (CASE p_hard[3 * h - 1] WHEN 0 THEN p_cost WHEN 1 THEN p_tokens ELSE p_executions END) > p_hard[3 * h] THEN
                v_refused := true;
            END IF;
        END LOOP;
        IF v_refused THEN
            -- The estimates come off again: a refusal leaves the counters as they were, but for
            -- the expired reservations it released, which stay released (as the transaction's),
            -- and returns the usage it read (migration 21).
            UPDATE usage_counters c SET reserved_cost = c.reserved_cost - p_cost, reserved_tokens = c.reserved_tokens - p_tokens,
                reserved_executions = c.reserved_executions - p_executions
            FROM unnest(string_to_array(p_counters, E'\n')) AS k WHERE c.scope = split_part(k, E'\t', 1)
                AND c.period = split_part(k, E'\t', 2);
            DELETE FROM reservations WHERE execution_id = p_id;
            DELETE FROM executions WHERE id = p_id;
            outcome := 'refused';
        END IF;
    END
    $fn$;

    -- Migration 26's, with the counters, hard limits and expired leases as the overload above
    -- takes them (no first breaker: this function makes the breakers' choice), admitting
    -- through it.
    CREATE OR REPLACE FUNCTION tenantllm_admit_full(p_lock_timeout TEXT, p_timezone TEXT, p_now BIGINT,
        p_remember BOOLEAN, p_tenant TEXT, p_tenant_name TEXT, p_budget_tenant TEXT, p_budget_stamp BIGINT,
        p_counters TEXT, p_hard BIGINT[], p_cost BIGINT, p_tokens BIGINT, p_executions BIGINT,
        p_expires_at BIGINT, p_id TEXT, p_agent TEXT, p_model_id TEXT, p_provider TEXT, p_exec_tenant TEXT, p_started_at BIGINT,
        p_metadata TEXT, p_parent TEXT, p_root TEXT,
        p_window BIGINT, p_lock_scopes TEXT[], p_window_scopes TEXT[], p_check_scopes TEXT[], p_check_kinds INT[],
        p_check_limits BIGINT[], p_concurrency_scope TEXT, p_breakers TEXT[], p_probe_lease BIGINT,
        p_expired_ids TEXT[], p_expired_days TEXT[],
        OUT outcome TEXT, OUT usage BIGINT[], OUT requests BIGINT[], OUT tokens BIGINT[], OUT in_flight BIGINT,
        OUT breached INT, OUT events_at BIGINT[], OUT events_tokens BIGINT[], OUT model_index INT, OUT probe BOOLEAN,
        OUT retry_at BIGINT, OUT expired_ids TEXT[], OUT expired_started BIGINT[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_set TEXT;
        v_scope TEXT;
        v_start BIGINT := p_now - p_window;
        v_requests BIGINT;
        v_tokens BIGINT;
        v_horizon BIGINT;
        v_n BIGINT;
        v_t BIGINT;
        v_w INT;
        v_over BOOLEAN;
        v_phase TEXT;
        v_retry_at BIGINT;
        v_lost BOOLEAN := false;
        v_timezone TEXT;
    BEGIN
        v_set := set_config('lock_timeout', p_lock_timeout, true);
        SELECT value INTO v_timezone FROM settings WHERE name = 'timezone';
        IF v_timezone IS DISTINCT FROM p_timezone THEN
            outcome := 'timezone';
            RETURN;
        END IF;
        -- The register of tenants before the scopes' locks, as the transaction writes it.
        IF p_remember THEN
            INSERT INTO tenants (tenant_id, name, first_used_at, last_used_at) VALUES (p_tenant, p_tenant_name, p_now, p_now)
            ON CONFLICT (tenant_id) DO UPDATE SET name = COALESCE(EXCLUDED.name, tenants.name),
                first_used_at = LEAST(tenants.first_used_at, EXCLUDED.first_used_at),
                last_used_at = GREATEST(tenants.last_used_at, EXCLUDED.last_used_at);
        END IF;
        -- Admissions of a scope take turns (rates.rs `lock_rate_scopes`: the same keys, in
        -- scope order, before any row lock).
        FOREACH v_scope IN ARRAY p_lock_scopes LOOP
            PERFORM pg_advisory_xact_lock(hashtextextended('tenantllm rate ' || v_scope, 0));
        END LOOP;
        SELECT a.outcome, a.usage, a.expired_ids, a.expired_started INTO outcome, usage, expired_ids, expired_started
        FROM tenantllm_admit(p_lock_timeout, p_timezone, p_now, false, p_tenant, p_tenant_name, p_budget_tenant, p_budget_stamp,
            p_counters, p_hard, p_cost, p_tokens, p_executions, p_expires_at, p_id, p_agent, p_model_id, p_provider, p_exec_tenant,
            p_started_at, p_metadata, p_parent, p_root, '{}', NULL, p_expired_ids, p_expired_days) AS a;
        IF outcome <> 'go' THEN
            RETURN;
        END IF;
        -- Each window's use (rates.rs `rate_state`): its totals row, created with this
        -- window's start as its horizon, moved up to it, or read with the log behind it.
        requests := '{}';
        tokens := '{}';
        FOREACH v_scope IN ARRAY p_window_scopes LOOP
            INSERT INTO rate_totals (scope, requests, tokens, horizon) VALUES (v_scope, 0, 0, v_start)
            ON CONFLICT (scope) DO UPDATE SET scope = EXCLUDED.scope
            RETURNING rate_totals.requests, rate_totals.tokens, rate_totals.horizon INTO v_requests, v_tokens, v_horizon;
            IF v_start <= v_horizon THEN
                SELECT COUNT(*), COALESCE(SUM(e.tokens), 0)::BIGINT INTO v_n, v_t FROM rate_events e
                WHERE e.scope = v_scope AND e.at > v_start AND e.at <= v_horizon;
                v_requests := v_requests + v_n;
                v_tokens := LEAST(v_tokens::NUMERIC + v_t, 9223372036854775807)::BIGINT;
            ELSE
                WITH crossed AS (
                    SELECT COUNT(*) AS n, COALESCE(SUM(e.tokens), 0)::BIGINT AS t FROM rate_events e
                    WHERE e.scope = v_scope AND e.at > v_horizon AND e.at <= v_start
                ), forgotten AS (DELETE FROM rate_events e WHERE e.scope = v_scope AND e.at <= v_start - p_window)
                UPDATE rate_totals r SET requests = r.requests - crossed.n, tokens = r.tokens - crossed.t, horizon = v_start
                FROM crossed WHERE r.scope = v_scope RETURNING r.requests, r.tokens INTO v_requests, v_tokens;
            END IF;
            requests := requests || v_requests;
            tokens := tokens || v_tokens;
        END LOOP;
        in_flight := 0;
        IF p_concurrency_scope IS NOT NULL THEN
            SELECT COUNT(*) INTO in_flight FROM reservations WHERE concurrency_scope = p_concurrency_scope;
        END IF;
        -- The first check breached, in the policy's order (`ratelimit::evaluate`).
        FOR i IN 1..cardinality(p_check_scopes) LOOP
            v_w := array_position(p_window_scopes, p_check_scopes[i]);
            v_over := CASE p_check_kinds[i]
                WHEN 0 THEN requests[v_w] >= p_check_limits[i]
                WHEN 1 THEN tokens[v_w]::NUMERIC + p_tokens > p_check_limits[i]
                ELSE in_flight >= p_check_limits[i]
            END;
            IF v_over THEN
                breached := i;
                EXIT;
            END IF;
        END LOOP;
        -- The breakers, once the budgets and rate limits let the call go (store::first_admitted
        -- with breaker::admit): the first model whose breaker is closed goes, or the first
        -- whose cooldown is over claims the half-open probe, decided again on its locked row
        -- (breakers.rs `breaker_admit_tx`) so that of racing processes exactly one claims it.
        -- A row gone under the lock is left to the transaction ('breaker').
        IF breached IS NULL THEN
            IF cardinality(p_breakers) = 0 THEN
                model_index := 0;
                probe := false;
            END IF;
            FOR i IN 1..cardinality(p_breakers) LOOP
                SELECT b.phase, b.retry_at INTO v_phase, v_retry_at FROM breakers b WHERE b.key = p_breakers[i];
                IF NOT FOUND OR v_phase = 'closed' THEN
                    model_index := i - 1;
                    probe := false;
                    EXIT;
                END IF;
                IF p_now >= v_retry_at THEN
                    SELECT b.phase, b.retry_at INTO v_phase, v_retry_at FROM breakers b WHERE b.key = p_breakers[i] FOR UPDATE;
                    IF NOT FOUND THEN
                        v_lost := true;
                        EXIT;
                    END IF;
                    IF v_phase = 'closed' OR p_now >= v_retry_at THEN
                        model_index := i - 1;
                        probe := v_phase <> 'closed';
                        IF probe THEN
                            UPDATE breakers b SET phase = 'half_open', failures = '', retry_at = p_now + p_probe_lease, updated_at = p_now
                            WHERE b.key = p_breakers[i];
                        END IF;
                        EXIT;
                    END IF;
                END IF;
                retry_at := LEAST(COALESCE(retry_at, v_retry_at), v_retry_at);
            END LOOP;
        END IF;
        IF breached IS NOT NULL OR model_index IS NULL THEN
            -- Undone as `tenantllm_admit` undoes a refusal; the window's steps stay.
            UPDATE usage_counters c SET reserved_cost = c.reserved_cost - p_cost, reserved_tokens = c.reserved_tokens - p_tokens,
                reserved_executions = c.reserved_executions - p_executions
            FROM unnest(string_to_array(p_counters, E'\n')) AS k WHERE c.scope = split_part(k, E'\t', 1)
                AND c.period = split_part(k, E'\t', 2);
            DELETE FROM reservations WHERE execution_id = p_id;
            DELETE FROM executions WHERE id = p_id;
            outcome := CASE WHEN breached IS NOT NULL THEN 'rate_limited' WHEN v_lost THEN 'breaker' ELSE 'short_circuited' END;
            -- The breached scope's admissions in the window, oldest first, for its retry time.
            IF p_check_kinds[breached] <> 2 THEN
                SELECT COALESCE(array_agg(e.at ORDER BY e.at), '{}'), COALESCE(array_agg(e.tokens ORDER BY e.at), '{}')
                INTO events_at, events_tokens FROM rate_events e WHERE e.scope = p_check_scopes[breached] AND e.at > v_start;
            END IF;
            RETURN;
        END IF;
        -- Admitted: logged in each window (counted in its totals unless this call's clock is
        -- behind their horizon), and in flight in its concurrency scope.
        INSERT INTO rate_events (scope, at, execution_id, tokens) SELECT s, p_started_at, p_id, p_tokens FROM unnest(p_window_scopes) AS s;
        UPDATE rate_totals r SET requests = r.requests + 1, tokens = r.tokens + p_tokens
        WHERE r.scope = ANY(p_window_scopes) AND r.horizon < p_started_at;
        IF p_concurrency_scope IS NOT NULL THEN
            UPDATE reservations SET concurrency_scope = p_concurrency_scope WHERE execution_id = p_id;
        END IF;
    END
    $fn$;
    "#,
];
