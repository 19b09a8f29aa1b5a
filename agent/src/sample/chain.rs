//! Chain sampler (being written).
