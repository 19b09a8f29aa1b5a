//! Samplers: one per source, each turning what it reads into a typed `guardian.v1` sample.
//!
//! A sampler is synchronous and cheap (it reads `/proc`, a socket answer, a statfs); the
//! [`crate::run`] loop calls every configured sampler once per interval and batches the results.
//! A sampler that fails this round yields a `SamplerUnavailable` sample instead of nothing,
//! so the server sees *why* data is missing.

pub mod chain;
pub mod gpu;
pub mod host;
pub mod keystore;

use std::path::PathBuf;

use guardian_proto::v1::{Sample, SamplerUnavailable, sample};

/// Why a sampler could not produce a sample this round.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// A file the sampler needs could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file was read but its contents were not in the expected format.
    #[error("cannot parse {path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// statvfs(2) on a path failed.
    #[error("cannot statvfs {path}: {source}")]
    Statfs {
        /// The path.
        path: PathBuf,
        /// The errno.
        source: std::io::Error,
    },
    /// The source has not been read yet (a background sampler's first round is still
    /// running); nothing is known, good or bad.
    #[error("{0}")]
    NotYet(String),
}

impl SampleError {
    /// Stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::Parse { .. } => "parse",
            Self::Statfs { .. } => "statfs",
            Self::NotYet(_) => "not_yet",
        }
    }
}

/// A source of samples. Implementations keep whatever state they need between rounds
/// (previous counters for rates).
pub trait Sampler: Send {
    /// Short stable name, used in `Hello.capabilities` and in `SamplerUnavailable`.
    fn name(&self) -> &'static str;

    /// Whether the sampler has anything true to report yet. A background sampler answers
    /// [`SampleError::NotYet`] until its first round has finished; [`take`] then reports that
    /// instead of a sample (which could only be a guess). Always ready by default.
    ///
    /// # Errors
    /// [`SampleError::NotYet`] while there is nothing to report.
    fn ready(&self) -> Result<(), SampleError> {
        Ok(())
    }

    /// Takes one sample.
    ///
    /// # Errors
    /// A [`SampleError`] when the source cannot be read this round; the caller reports it as
    /// `SamplerUnavailable` and tries again next round.
    fn sample(&mut self) -> Result<sample::Kind, SampleError>;
}

/// Runs one sampler and always returns a sample: its data, or why it had none (also when it
/// is not [`Sampler::ready`] yet).
pub fn take(sampler: &mut dyn Sampler, observed_at_unix_ms: i64) -> Sample {
    let kind = match sampler.ready().and_then(|()| sampler.sample()) {
        Ok(kind) => kind,
        Err(error) => {
            if matches!(error, SampleError::NotYet(_)) {
                // Expected right after start: not worth a warning.
                tracing::debug!(sampler = sampler.name(), error = %error, kind = error.kind(), "SamplerUnavailable");
            } else {
                tracing::warn!(sampler = sampler.name(), error = %error, kind = error.kind(), "SamplerUnavailable");
            }
            sample::Kind::Unavailable(SamplerUnavailable {
                sampler: sampler.name().to_owned(),
                reason: error.to_string(),
            })
        }
    };
    Sample {
        observed_at_unix_ms,
        kind: Some(kind),
    }
}
