-- Signed commands issued to agents and their outcomes. PostgreSQL dialect. Keep in step with
-- ../sqlite/.
CREATE TABLE commands (
    command_id          TEXT PRIMARY KEY,
    node_id             TEXT NOT NULL,
    action              TEXT NOT NULL,
    -- JSON object of the parameters.
    parameters          TEXT NOT NULL,
    issued_at_unix_ms   BIGINT NOT NULL,
    expires_at_unix_ms  BIGINT NOT NULL,
    issued_by           TEXT NOT NULL,
    -- issued | succeeded | failed | refused; only the first outcome is kept.
    state               TEXT NOT NULL,
    detail              TEXT NOT NULL DEFAULT '',
    outcome_at_unix_ms  BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX commands_node ON commands (node_id, issued_at_unix_ms);
