-- The audit ledger: findings, decisions, commands, outcomes and operator acts, append-only
-- and hash-chained (server/src/store/audit.rs defines the hash). PostgreSQL dialect. Keep in
-- step with ../sqlite/.
CREATE TABLE audit_log (
    -- 1, 2, 3, ... with no gap: a missing number is a removed row.
    seq        BIGINT PRIMARY KEY,
    at_unix_ms BIGINT NOT NULL,
    -- finding | decision | command | outcome | operator
    kind       TEXT NOT NULL,
    -- '' when the entry concerns no single node.
    node_id    TEXT NOT NULL DEFAULT '',
    -- JSON text (not JSONB: it is hashed exactly as stored).
    body       TEXT NOT NULL,
    -- Lowercase hex SHA-256: the previous row's hash (64 zeros for seq 1), then this row's.
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);

-- Append-only: the server never changes or removes a row. These refuse it at the SQL level
-- too; `guardianctl audit verify` still catches a change made around them.
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END;
$$;

CREATE TRIGGER audit_log_no_update_or_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();

CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
