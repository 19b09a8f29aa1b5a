//! GPU sampler (being written).
