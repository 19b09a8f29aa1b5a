-- Outbox blobs of a SQLite ledger live in append-only segment files beside it (see
-- server/src/store/segments.rs); the row says where. segment = 0: the blob is in `batch`
-- (PostgreSQL ledgers, and rows written before this migration).
ALTER TABLE outbox ADD COLUMN segment BIGINT NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN segment_offset BIGINT NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN segment_len BIGINT NOT NULL DEFAULT 0;
