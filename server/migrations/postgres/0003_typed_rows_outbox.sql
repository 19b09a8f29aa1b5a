-- Typed chain and GPU rows for the embedded store's history; column names are the metric
-- names of server/src/store/telemetry.rs. PostgreSQL dialect. Keep in step with ../sqlite/.
CREATE TABLE chain_samples (
    node_id                  TEXT NOT NULL,
    seq                      BIGINT NOT NULL,
    idx                      BIGINT NOT NULL,
    observed_at_unix_ms      BIGINT NOT NULL,
    responsive               BIGINT NOT NULL,
    best_block               BIGINT NOT NULL,
    finalized_block          BIGINT NOT NULL,
    sync_highest_block       BIGINT NOT NULL,
    reference_best_block     BIGINT NOT NULL,
    block_lag                BIGINT NOT NULL,
    finality_lag_blocks      BIGINT NOT NULL,
    peers                    BIGINT NOT NULL,
    is_syncing               BIGINT NOT NULL,
    head_age_ms              BIGINT NOT NULL,
    rpc_latency_ms           DOUBLE PRECISION NOT NULL,
    spec_version             BIGINT NOT NULL,
    blocks_since_last_update BIGINT NOT NULL,
    validator_trust_ratio    DOUBLE PRECISION NOT NULL,
    emission_rao             BIGINT NOT NULL,
    PRIMARY KEY (node_id, seq, idx)
);
CREATE INDEX chain_samples_node_time ON chain_samples (node_id, observed_at_unix_ms);

CREATE TABLE gpu_samples (
    node_id                  TEXT NOT NULL,
    seq                      BIGINT NOT NULL,
    idx                      BIGINT NOT NULL,
    gpu_index                BIGINT NOT NULL,
    observed_at_unix_ms      BIGINT NOT NULL,
    gpu_uuid                 TEXT NOT NULL,
    utilisation_gpu_percent  DOUBLE PRECISION NOT NULL,
    memory_used_bytes        BIGINT NOT NULL,
    temperature_celsius      DOUBLE PRECISION NOT NULL,
    power_draw_watts         DOUBLE PRECISION NOT NULL,
    sm_clock_mhz             BIGINT NOT NULL,
    throttle_reasons_bitmask BIGINT NOT NULL,
    ecc_uncorrected_total    BIGINT NOT NULL,
    pcie_replay_total        BIGINT NOT NULL,
    xid_events               BIGINT NOT NULL,
    PRIMARY KEY (node_id, seq, idx, gpu_index)
);
CREATE INDEX gpu_samples_node_time ON gpu_samples (node_id, observed_at_unix_ms);

-- With ClickHouse as the telemetry store: committed batches wait here (durably, acked)
-- until the ClickHouse sink has inserted them; ids give the replay order.
CREATE TABLE outbox (
    id                  BIGSERIAL PRIMARY KEY,
    node_id             TEXT NOT NULL,
    network             TEXT NOT NULL,
    received_at_unix_ms BIGINT NOT NULL,
    -- The guardian.v1.SampleBatch, protobuf-encoded.
    batch               BYTEA NOT NULL
);

ALTER TABLE nodes ADD COLUMN spool_dropped_batches_total BIGINT NOT NULL DEFAULT 0;
