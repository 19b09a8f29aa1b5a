-- Samples of kinds without their own columns yet (gpu, keystore, ...), kept whole so nothing
-- an agent sends is lost. PostgreSQL dialect. Keep in step with ../sqlite/.
CREATE TABLE kind_samples (
    node_id             TEXT NOT NULL,
    seq                 BIGINT NOT NULL,
    idx                 BIGINT NOT NULL,
    kind                TEXT NOT NULL,
    observed_at_unix_ms BIGINT NOT NULL,
    -- The guardian.v1.Sample, protobuf-encoded.
    sample              BYTEA NOT NULL,
    PRIMARY KEY (node_id, seq, idx)
);
CREATE INDEX kind_samples_node_kind_time ON kind_samples (node_id, kind, observed_at_unix_ms);
