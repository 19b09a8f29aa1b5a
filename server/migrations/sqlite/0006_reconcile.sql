-- The reconciler's state per node and the findings it acted on. SQLite dialect. Keep in step
-- with ../postgres/.
CREATE TABLE node_state (
    node_id             TEXT PRIMARY KEY,
    phase               TEXT NOT NULL,
    -- JSON of reconcile::NodeState (phase, attempts, cooldown, streaks, paused).
    state               TEXT NOT NULL,
    updated_at_unix_ms  BIGINT NOT NULL
);

-- One row per finding from the moment it is raised until it clears (cleared_at 0 = open).
-- A fleet finding has node_id '' and names its network.
CREATE TABLE findings (
    finding_id          INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id             TEXT NOT NULL,
    network             TEXT NOT NULL,
    kind                TEXT NOT NULL,
    severity            TEXT NOT NULL,
    score               REAL NOT NULL,
    summary             TEXT NOT NULL,
    -- JSON object of the evidence.
    evidence            TEXT NOT NULL,
    raised_at_unix_ms   BIGINT NOT NULL,
    cleared_at_unix_ms  BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX findings_open ON findings (cleared_at_unix_ms, node_id);
CREATE INDEX findings_node ON findings (node_id, raised_at_unix_ms);
