-- Same columns as the SQLite ledger's (where outbox blobs live in segment files); a
-- PostgreSQL ledger keeps its blobs in `batch` and leaves segment = 0.
ALTER TABLE outbox ADD COLUMN segment BIGINT NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN segment_offset BIGINT NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN segment_len BIGINT NOT NULL DEFAULT 0;
