//! ClickHouse telemetry store (work in progress).
