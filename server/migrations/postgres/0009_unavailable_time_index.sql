-- Retention of the embedded store (server/src/store/retention.rs) finds and deletes a node's
-- oldest rows of each sample table through an index on (node_id, observed_at_unix_ms); the
-- other sample tables have one already (kind_samples: per kind).
CREATE INDEX unavailable_samples_node_time ON unavailable_samples (node_id, observed_at_unix_ms);
