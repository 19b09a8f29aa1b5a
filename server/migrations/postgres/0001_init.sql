-- Ledger and embedded telemetry store, PostgreSQL dialect. Keep in step with ../sqlite/.
CREATE TABLE nodes (
    node_id                    TEXT PRIMARY KEY,
    hostname                   TEXT NOT NULL DEFAULT '',
    agent_version              TEXT NOT NULL DEFAULT '',
    network                    TEXT NOT NULL DEFAULT '',
    first_seen_unix_ms         BIGINT NOT NULL,
    last_seen_unix_ms          BIGINT NOT NULL,
    last_stored_seq            BIGINT NOT NULL DEFAULT 0,
    last_host                  BYTEA,
    last_host_observed_unix_ms BIGINT NOT NULL DEFAULT 0
);

-- One row per committed batch: the idempotency record for (node, seq).
CREATE TABLE batches (
    node_id             TEXT NOT NULL,
    seq                 BIGINT NOT NULL,
    received_at_unix_ms BIGINT NOT NULL,
    sample_count        BIGINT NOT NULL,
    PRIMARY KEY (node_id, seq)
);

CREATE TABLE host_samples (
    node_id                      TEXT NOT NULL,
    seq                          BIGINT NOT NULL,
    idx                          BIGINT NOT NULL,
    observed_at_unix_ms          BIGINT NOT NULL,
    cpu_busy_percent             DOUBLE PRECISION NOT NULL,
    cpu_iowait_percent           DOUBLE PRECISION NOT NULL,
    mem_total_bytes              BIGINT NOT NULL,
    mem_available_bytes          BIGINT NOT NULL,
    load_avg_1m                  DOUBLE PRECISION NOT NULL,
    cpu_psi_some_avg10_percent   DOUBLE PRECISION,
    memory_psi_full_avg10_percent DOUBLE PRECISION,
    io_psi_full_avg10_percent    DOUBLE PRECISION,
    chain_data_used_percent      DOUBLE PRECISION,
    chain_data_available_bytes   BIGINT,
    disk_read_latency_ms_max     DOUBLE PRECISION NOT NULL,
    disk_write_latency_ms_max    DOUBLE PRECISION NOT NULL,
    disk_utilisation_percent_max DOUBLE PRECISION NOT NULL,
    net_rx_bytes_per_second      DOUBLE PRECISION NOT NULL,
    net_tx_bytes_per_second      DOUBLE PRECISION NOT NULL,
    net_errors_total             BIGINT NOT NULL,
    oom_kills_total              BIGINT NOT NULL,
    -- The whole guardian.v1.HostSample, protobuf-encoded: nothing the agent sent is lost.
    sample                       BYTEA NOT NULL,
    PRIMARY KEY (node_id, seq, idx)
);
CREATE INDEX host_samples_node_time ON host_samples (node_id, observed_at_unix_ms);

CREATE TABLE unavailable_samples (
    node_id             TEXT NOT NULL,
    seq                 BIGINT NOT NULL,
    idx                 BIGINT NOT NULL,
    observed_at_unix_ms BIGINT NOT NULL,
    sampler             TEXT NOT NULL,
    reason              TEXT NOT NULL,
    PRIMARY KEY (node_id, seq, idx)
);

-- Refused streams and calls: identity mismatches, wrong roles, malformed frames.
CREATE TABLE security_events (
    id         BIGSERIAL PRIMARY KEY,
    at_unix_ms BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    peer       TEXT NOT NULL,
    detail     TEXT NOT NULL
);
