-- Every seq at or below a node's batch_floor_seq is stored (or was dropped by the agent's
-- spool) and its idempotency record in `batches` may be pruned: a batch at or below it is a
-- replay (see server/src/store/records.rs).
ALTER TABLE nodes ADD COLUMN batch_floor_seq BIGINT NOT NULL DEFAULT 0;
