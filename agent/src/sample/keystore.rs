//! Keystore sampler (being written).
