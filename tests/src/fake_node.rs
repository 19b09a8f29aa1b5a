//! Fake subtensor node (being written).
