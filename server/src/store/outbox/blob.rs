//! The outbox's own encoding of a committed batch: what ClickHouse needs of it, compactly.
//!
//! The outbox once kept each batch as the agent encoded it (~650 bytes a host sample, with
//! every disk, interface and pressure figure) although ClickHouse's `host_samples` keeps 17
//! values of it. At 100 000 samples/s that was ~64 MB/s written to segment files, read back
//! and decoded a second time whenever ClickHouse fell behind the in-memory hand-off:
//! ~20 % of the server's CPU (BENCHMARKS.md). Here a host sample is its [`HostValues`]
//! (17 little-endian words); the rarer kinds (one chain sample a batch, GPU now and then)
//! keep their protobuf encoding.
//!
//! # Format (version 1, little-endian)
//! `0x00 0x01`, `seq: u64`, `spool_dropped_batches_total: u64`, `samples: u32`, then per
//! sample `observed_at_unix_ms: i64`, a kind byte and its body:
//! - 0 (no kind): nothing;
//! - 1 (host): the 17 [`HostValues`] words in column order, `disks: u32`, `networks: u32`;
//! - 2 chain, 3 GPU, 4 keystore, 5 unavailable: `len: u32` and the kind's protobuf bytes.
//!
//! # Guarantees
//! - A blob never starts like an agent's encoding: protobuf has no field 0, so no encoded
//!   `SampleBatch` that decodes begins with a zero byte. [`decode`] reads both, so outbox
//!   rows written before this format still drain.
//! - `decode(encode(b))` equals `b` except that host samples carry no encoded bytes
//!   ([`Host::encoded`] is empty: ClickHouse rows need the values only).
//! - A truncated or otherwise malformed blob is an error, never a panic or a short batch.

use guardian_proto::v1::{ChainSample, GpuSample, KeystoreSample, SamplerUnavailable};
use prost::Message;
use prost::bytes::Bytes;

use crate::batch::values::HostValues;
use crate::batch::{Batch, DecodeError, Host, Kind, Sample};

/// First byte of every blob in this format (no protobuf key is 0).
const MARK: u8 = 0x00;
/// The format's version.
const VERSION: u8 = 1;

const KIND_NONE: u8 = 0;
const KIND_HOST: u8 = 1;
const KIND_CHAIN: u8 = 2;
const KIND_GPU: u8 = 3;
const KIND_KEYSTORE: u8 = 4;
const KIND_UNAVAILABLE: u8 = 5;

/// A value kept as one 64-bit word.
trait Word: Copy {
    fn to_word(self) -> u64;
    fn from_word(word: u64) -> Self;
}

impl Word for f64 {
    fn to_word(self) -> u64 {
        self.to_bits()
    }
    fn from_word(word: u64) -> Self {
        Self::from_bits(word)
    }
}

impl Word for u64 {
    fn to_word(self) -> u64 {
        self
    }
    fn from_word(word: u64) -> Self {
        word
    }
}

/// The [`HostValues`] fields in column order, once for both directions. Both take the
/// struct apart and build it with every field named, so a field added to [`HostValues`] and
/// not here does not compile.
macro_rules! host_words {
    ($apply:ident) => {
        $apply!(
            cpu_busy_percent,
            cpu_iowait_percent,
            mem_total_bytes,
            mem_available_bytes,
            load_avg_1m,
            cpu_psi_some_avg10_percent,
            memory_psi_full_avg10_percent,
            io_psi_full_avg10_percent,
            chain_data_used_percent,
            chain_data_available_bytes,
            disk_read_latency_ms_max,
            disk_write_latency_ms_max,
            disk_utilisation_percent_max,
            net_rx_bytes_per_second,
            net_tx_bytes_per_second,
            net_errors_total,
            oom_kills_total
        )
    };
}

/// Bytes of a host sample's values.
const HOST_WORDS: usize = 17 * 8;
/// Bytes of a host sample's body: its values, then the disk and interface counts.
const HOST_BODY: usize = HOST_WORDS + 4 + 4;

/// True when `blob` is in this format (else it is an agent's `SampleBatch` encoding).
pub fn is_compact(blob: &[u8]) -> bool {
    blob.first() == Some(&MARK)
}

/// Encodes `batch` for the outbox.
pub fn encode(batch: &Batch) -> Bytes {
    let mut out = Vec::with_capacity(encoded_len(batch));
    out.extend_from_slice(&[MARK, VERSION]);
    out.extend_from_slice(&batch.seq.to_le_bytes());
    out.extend_from_slice(&batch.spool_dropped_batches_total.to_le_bytes());
    out.extend_from_slice(&len_u32(batch.samples.len()).to_le_bytes());
    for sample in &batch.samples {
        out.extend_from_slice(&sample.observed_at_unix_ms.to_le_bytes());
        match &sample.kind {
            None => out.push(KIND_NONE),
            Some(Kind::Host(host)) => {
                out.push(KIND_HOST);
                put_host_words(&mut out, &host.values);
                out.extend_from_slice(&len_u32(host.disks).to_le_bytes());
                out.extend_from_slice(&len_u32(host.networks).to_le_bytes());
            }
            Some(Kind::Chain(m)) => message(&mut out, KIND_CHAIN, m.as_ref()),
            Some(Kind::Gpu(m)) => message(&mut out, KIND_GPU, m.as_ref()),
            Some(Kind::Keystore(m)) => message(&mut out, KIND_KEYSTORE, m.as_ref()),
            Some(Kind::Unavailable(m)) => message(&mut out, KIND_UNAVAILABLE, m.as_ref()),
        }
    }
    out.into()
}

/// The exact size [`encode`] gives `batch`.
fn encoded_len(batch: &Batch) -> usize {
    let body = |kind: &Option<Kind>| match kind {
        None => 0,
        Some(Kind::Host(_)) => HOST_BODY,
        Some(Kind::Chain(m)) => 4 + m.encoded_len(),
        Some(Kind::Gpu(m)) => 4 + m.encoded_len(),
        Some(Kind::Keystore(m)) => 4 + m.encoded_len(),
        Some(Kind::Unavailable(m)) => 4 + m.encoded_len(),
    };
    2 + 8
        + 8
        + 4
        + batch
            .samples
            .iter()
            .map(|s| 8 + 1 + body(&s.kind))
            .sum::<usize>()
}

fn message(out: &mut Vec<u8>, kind: u8, message: &impl Message) {
    let bytes = message.encode_to_vec();
    out.push(kind);
    out.extend_from_slice(&len_u32(bytes.len()).to_le_bytes());
    out.extend_from_slice(&bytes);
}

/// Lengths and counts a batch that passed ingest holds fit in 32 bits (frames are at most
/// a few MiB, and ingest refuses hosts with over 256 disks or interfaces); saturate rather
/// than wrap if one ever did not: a saturated length or sample count fails decode.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Decodes an outbox blob in either format: this one, or an agent's `SampleBatch` encoding
/// (rows written before it).
///
/// # Errors
/// [`DecodeError`] when the blob is malformed or truncated.
pub fn decode(blob: &Bytes) -> Result<Batch, DecodeError> {
    if !is_compact(blob) {
        return Batch::decode(blob);
    }
    let mut walk = Walk::open(blob)?;
    let mut samples = Vec::with_capacity(walk.left.min(4096));
    while let Some((observed_at_unix_ms, item)) = walk.next()? {
        let kind = match item {
            Item::Host(body) => {
                let mut words = body[..HOST_WORDS]
                    .chunks_exact(8)
                    .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]));
                let mut word = || words.next().unwrap_or(0);
                macro_rules! get {
                    ($($field:ident),*) => {
                        HostValues { $($field: Word::from_word(word())),* }
                    };
                }
                let values = host_words!(get);
                let tail = &body[HOST_WORDS..];
                let count = |at: usize| {
                    u32::from_le_bytes([tail[at], tail[at + 1], tail[at + 2], tail[at + 3]])
                        as usize
                };
                Some(Kind::Host(Host {
                    values,
                    disks: count(0),
                    networks: count(4),
                    encoded: Bytes::new(),
                }))
            }
            Item::Other(kind) => kind,
        };
        samples.push(Sample {
            observed_at_unix_ms,
            kind,
        });
    }
    Ok(Batch {
        seq: walk.seq,
        spool_dropped_batches_total: walk.spool_dropped_batches_total,
        samples,
    })
}

/// One sample of an outbox blob as [`visit`] hands it on.
#[derive(Debug)]
pub enum Visit<'a> {
    /// A host sample's [`HostValues`]: 17 little-endian 64-bit words in column order
    /// ([`HOST_WORD_FIELDS`]), which is exactly their RowBinary encoding.
    HostWords(&'a [u8]),
    /// Any other sample (and every sample of a row in the agent's encoding).
    Kind(&'a Kind),
}

/// Walks `blob` (either format) without building a [`Batch`]: calls `each(seq, index,
/// observed_at_unix_ms, sample)` for every sample with a kind, in order (`index` counts
/// kind-less samples too, as the batch's own positions do). What ClickHouse's insert reads
/// of a host sample it gets as the bytes the blob holds, copied once.
///
/// # Errors
/// As [`decode`]. `each` may have been called for samples before the fault: drop what it
/// gathered.
pub fn visit(
    blob: &Bytes,
    mut each: impl FnMut(u64, u32, i64, Visit<'_>),
) -> Result<(), DecodeError> {
    if !is_compact(blob) {
        visit_batch(&Batch::decode(blob)?, &mut each);
        return Ok(());
    }
    let mut walk = Walk::open(blob)?;
    let mut index = 0u32;
    while let Some((at, item)) = walk.next()? {
        match item {
            Item::Host(body) => each(walk.seq, index, at, Visit::HostWords(&body[..HOST_WORDS])),
            Item::Other(Some(kind)) => each(walk.seq, index, at, Visit::Kind(&kind)),
            Item::Other(None) => {}
        }
        index = index.saturating_add(1);
    }
    Ok(())
}

/// [`visit`] over a decoded batch: every sample with a kind, as [`Visit::Kind`].
pub fn visit_batch(batch: &Batch, each: &mut dyn FnMut(u64, u32, i64, Visit<'_>)) {
    for (index, sample) in batch.samples.iter().enumerate() {
        if let Some(kind) = &sample.kind {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            each(
                batch.seq,
                index,
                sample.observed_at_unix_ms,
                Visit::Kind(kind),
            );
        }
    }
}

/// The [`HostValues`] fields in the order [`Visit::HostWords`] holds them.
pub const HOST_WORD_FIELDS: [&str; 17] = {
    macro_rules! names {
        ($($field:ident),*) => { [$(stringify!($field)),*] };
    }
    host_words!(names)
};

/// Writes `values` as [`Visit::HostWords`] holds them.
pub fn put_host_words(out: &mut Vec<u8>, values: &HostValues) {
    let mut words = [0u8; HOST_WORDS];
    let mut at = 0;
    macro_rules! put {
        ($($field:ident),*) => {
            let HostValues { $($field),* } = *values;
            $(
                words[at..at + 8].copy_from_slice(&Word::to_word($field).to_le_bytes());
                at += 8;
            )*
        };
    }
    host_words!(put);
    debug_assert_eq!(at, HOST_WORDS);
    out.extend_from_slice(&words);
}

/// One sample as [`Walk`] reads it.
enum Item<'a> {
    /// A host sample's body ([`HOST_BODY`] bytes).
    Host(&'a [u8]),
    /// Any other kind, decoded (None: the sample had no kind).
    Other(Option<Kind>),
}

/// A compact blob read sample by sample.
struct Walk<'a> {
    r: Reader<'a>,
    seq: u64,
    spool_dropped_batches_total: u64,
    /// Samples not read yet.
    left: usize,
}

impl<'a> Walk<'a> {
    fn open(blob: &'a Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader { buf: blob, at: 0 };
        r.take(1)?;
        let version = r.take(1)?[0];
        if version != VERSION {
            return Err(DecodeError::Outbox(format!(
                "format version {version} is not one this server reads (it reads {VERSION}); \
                 was the outbox written by a newer server?"
            )));
        }
        let seq = r.u64()?;
        let spool_dropped_batches_total = r.u64()?;
        let left = r.u32()? as usize;
        // Each sample takes at least 9 bytes: a count beyond what is left is corrupt, and is
        // refused before it sizes an allocation.
        if left > r.left() / 9 {
            return Err(r.error("sample count larger than the blob"));
        }
        Ok(Self {
            r,
            seq,
            spool_dropped_batches_total,
            left,
        })
    }

    /// The next sample; `None` after the last, once the blob is checked to end there.
    fn next(&mut self) -> Result<Option<(i64, Item<'a>)>, DecodeError> {
        let r = &mut self.r;
        if self.left == 0 {
            if r.left() > 0 {
                return Err(r.error("bytes after the last sample"));
            }
            return Ok(None);
        }
        self.left -= 1;
        let observed_at_unix_ms = r.u64()? as i64;
        let item = match r.take(1)?[0] {
            KIND_NONE => Item::Other(None),
            // One bounds check for the whole body, then fixed offsets.
            KIND_HOST => Item::Host(r.take(HOST_BODY)?),
            KIND_CHAIN => Item::Other(Some(Kind::Chain(Box::new(r.message::<ChainSample>()?)))),
            KIND_GPU => Item::Other(Some(Kind::Gpu(Box::new(r.message::<GpuSample>()?)))),
            KIND_KEYSTORE => Item::Other(Some(Kind::Keystore(Box::new(
                r.message::<KeystoreSample>()?,
            )))),
            KIND_UNAVAILABLE => Item::Other(Some(Kind::Unavailable(Box::new(
                r.message::<SamplerUnavailable>()?,
            )))),
            other => return Err(r.error(&format!("unknown sample kind {other}"))),
        };
        Ok(Some((observed_at_unix_ms, item)))
    }
}

/// A bounds-checked cursor over a blob.
struct Reader<'a> {
    buf: &'a Bytes,
    at: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.at
    }

    #[cold]
    fn error(&self, what: &str) -> DecodeError {
        DecodeError::Outbox(format!(
            "{what} (at byte {} of {}): the blob is corrupt",
            self.at,
            self.buf.len()
        ))
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.left() {
            return Err(self.error(&format!("{n} bytes wanted, {} left", self.left())));
        }
        let out = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    #[inline]
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let bytes = self.take(8)?;
        Ok(u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8])))
    }

    #[inline]
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes(bytes.try_into().unwrap_or([0; 4])))
    }

    fn message<M: Message + Default>(&mut self) -> Result<M, DecodeError> {
        let len = self.u32()? as usize;
        let start = self.at;
        self.take(len)?;
        Ok(M::decode(self.buf.slice(start..start + len))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guardian_proto::v1::{HostSample, SampleBatch, sample};

    fn mixed() -> Batch {
        let host = |i: u32| HostSample {
            cpu_busy_percent: 12.5 + f64::from(i),
            mem_total_bytes: 1 << 40,
            mem_available_bytes: u64::MAX - u64::from(i),
            load_avg_1m: f64::NAN,
            oom_kills_total: 3,
            disks: vec![guardian_proto::v1::DiskIo {
                device: "nvme0n1".into(),
                read_latency_ms: 0.25,
                ..Default::default()
            }],
            ..Default::default()
        };
        let proto = SampleBatch {
            seq: 77,
            spool_dropped_batches_total: 5,
            samples: vec![
                guardian_proto::v1::Sample {
                    observed_at_unix_ms: -3,
                    kind: Some(sample::Kind::Host(host(1))),
                },
                guardian_proto::v1::Sample {
                    observed_at_unix_ms: 1_700_000_000_000,
                    kind: Some(sample::Kind::Chain(ChainSample {
                        endpoint: "ws://127.0.0.1:9944".into(),
                        best_block: 4_000_000,
                        ..Default::default()
                    })),
                },
                guardian_proto::v1::Sample {
                    observed_at_unix_ms: 2,
                    kind: Some(sample::Kind::Gpu(GpuSample {
                        available: true,
                        driver_version: "550.90.07".into(),
                        ..Default::default()
                    })),
                },
                guardian_proto::v1::Sample {
                    observed_at_unix_ms: 3,
                    kind: Some(sample::Kind::Keystore(KeystoreSample::default())),
                },
                guardian_proto::v1::Sample {
                    observed_at_unix_ms: 4,
                    kind: Some(sample::Kind::Unavailable(SamplerUnavailable {
                        sampler: "gpu".into(),
                        reason: "no NVML".into(),
                    })),
                },
                guardian_proto::v1::Sample {
                    observed_at_unix_ms: 5,
                    kind: Some(sample::Kind::Host(host(2))),
                },
            ],
        };
        Batch::from(&proto)
    }

    /// `batch` as decode gives it back: host samples without their encoded bytes.
    fn without_host_bytes(batch: &Batch) -> Batch {
        let mut out = batch.clone();
        for sample in &mut out.samples {
            if let Some(Kind::Host(host)) = &mut sample.kind {
                host.encoded = Bytes::new();
            }
        }
        out
    }

    fn same(a: &Batch, b: &Batch) -> bool {
        // NaN != NaN under PartialEq: compare through the blob, word for word.
        encode(a) == encode(b) && a.samples.len() == b.samples.len()
    }

    #[test]
    fn round_trips_every_kind_bit_for_bit() {
        let batch = mixed();
        let blob = encode(&batch);
        assert_eq!(blob.len(), encoded_len(&batch));
        assert!(is_compact(&blob));
        let back = decode(&blob).expect("decodes");
        assert!(same(&back, &without_host_bytes(&batch)));
        assert_eq!(back.seq, 77);
        assert_eq!(back.spool_dropped_batches_total, 5);
        let Some(Kind::Host(host)) = &back.samples[0].kind else {
            panic!("host first")
        };
        assert!(host.values.load_avg_1m.is_nan());
        assert_eq!(host.values.mem_available_bytes, u64::MAX - 1);
        assert_eq!(host.disks, 1);
        assert_eq!(back.samples[0].observed_at_unix_ms, -3);
        // Everything but the host bytes is equal as values too.
        assert_eq!(back.samples[1..5], without_host_bytes(&batch).samples[1..5]);
    }

    #[test]
    fn is_several_times_smaller_than_the_agents_encoding_of_host_samples() {
        use guardian_proto::v1::{DiskIo, Filesystem, NetIo, Pressure};
        // A host as agents report one: four disks, two interfaces, PSI, the chain volume.
        let pressure = Some(Pressure {
            some_avg10_percent: 1.5,
            some_avg60_percent: 1.25,
            full_avg10_percent: 0.5,
            full_avg60_percent: 0.25,
            some_total_microseconds: 123_456_789,
        });
        let host = HostSample {
            cpu_busy_percent: 35.5,
            cpu_iowait_percent: 2.5,
            cpu_count: 64,
            mem_total_bytes: 512 << 30,
            mem_available_bytes: 300 << 30,
            load_avg_1m: 22.5,
            cpu_pressure: pressure,
            memory_pressure: pressure,
            io_pressure: pressure,
            chain_data: Some(Filesystem {
                path: "/var/lib/subtensor".into(),
                total_bytes: 3_840_000_000_000,
                available_bytes: 1_600_000_000_000,
                used_percent: 58.3,
                inodes_total: 240_000_000,
                inodes_free: 239_000_000,
            }),
            disks: (0..4)
                .map(|d| DiskIo {
                    device: format!("nvme{d}n1"),
                    reads_per_second: 900.5,
                    writes_per_second: 1_800.5,
                    read_bytes_per_second: 1.5e8,
                    write_bytes_per_second: 2.5e8,
                    read_latency_ms: 0.35,
                    write_latency_ms: 0.75,
                    utilisation_percent: 45.5,
                })
                .collect(),
            networks: (0..2)
                .map(|n| NetIo {
                    interface: format!("eth{n}"),
                    rx_bytes_total: 10_000_000_000_000,
                    tx_bytes_total: 7_000_000_000_000,
                    rx_bytes_per_second: 4e7,
                    tx_bytes_per_second: 2.5e7,
                    ..Default::default()
                })
                .collect(),
            uptime_seconds: 1_036_800,
            ..Default::default()
        };
        let proto = SampleBatch {
            seq: 1,
            spool_dropped_batches_total: 0,
            samples: (0..50)
                .map(|i| guardian_proto::v1::Sample {
                    observed_at_unix_ms: 1_700_000_000_000 + i,
                    kind: Some(sample::Kind::Host(host.clone())),
                })
                .collect(),
        };
        let agent = proto.encode_to_vec().len();
        let compact = encode(&Batch::from(&proto)).len();
        assert_eq!(compact, 22 + 50 * (8 + 1 + HOST_BODY));
        assert!(compact * 3 < agent, "{compact} vs {agent}");
        let empty = Batch {
            seq: 1,
            ..Batch::default()
        };
        assert_eq!(encode(&empty).len(), 22);
    }

    #[test]
    fn reads_the_agents_encoding_of_older_rows() {
        let batch = mixed();
        let legacy = Bytes::from(batch.to_proto().encode_to_vec());
        assert!(!is_compact(&legacy));
        // Debug, not ==: the samples hold a NaN.
        assert_eq!(
            format!("{:?}", decode(&legacy).expect("decodes")),
            format!("{:?}", Batch::decode(&legacy).expect("ok"))
        );
        assert_eq!(
            decode(&Bytes::new()).expect("empty batch"),
            Batch::default()
        );
    }

    #[test]
    fn every_truncation_and_bad_header_is_an_error() {
        let blob = encode(&mixed());
        for cut in 1..blob.len() {
            let short = blob.slice(..cut);
            assert!(decode(&short).is_err(), "cut at {cut} decoded");
        }
        let mut longer = blob.to_vec();
        longer.push(0);
        assert!(decode(&longer.into()).is_err());
        let mut version = blob.to_vec();
        version[1] = 9;
        let error = decode(&version.into()).expect_err("version 9").to_string();
        assert!(error.contains("version 9"), "{error}");
        let mut kind = blob.to_vec();
        kind[22 + 8] = 42;
        let error = decode(&kind.into()).expect_err("kind 42").to_string();
        assert!(error.contains("unknown sample kind 42"), "{error}");
        let mut count = blob.to_vec();
        count[18..22].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&count.into()).is_err());
        // visit() refuses exactly what decode() refuses.
        for cut in 1..blob.len() {
            assert!(
                visit(&blob.slice(..cut), |_, _, _, _| {}).is_err(),
                "cut at {cut}"
            );
        }
    }

    /// What visit() hands on, as owned values: (seq, index, observed_at, host words or kind).
    type Visited = (u64, u32, i64, Result<Vec<u8>, Kind>);

    fn visited(blob: &Bytes) -> Vec<Visited> {
        let mut out = Vec::new();
        visit(blob, |seq, index, at, sample| {
            let sample = match sample {
                Visit::HostWords(words) => Ok(words.to_vec()),
                Visit::Kind(kind) => Err(kind.clone()),
            };
            out.push((seq, index, at, sample));
        })
        .expect("visits");
        out
    }

    #[test]
    fn visit_hands_on_every_sample_as_decode_reads_it_in_both_formats() {
        let mut batch = mixed();
        // A kind-less sample still takes its index.
        batch.samples.insert(
            1,
            Sample {
                observed_at_unix_ms: 5,
                kind: None,
            },
        );
        let compact = encode(&batch);
        let agents = Bytes::from(batch.to_proto().encode_to_vec());
        let expected: Vec<Visited> = decode(&compact)
            .expect("decodes")
            .samples
            .iter()
            .enumerate()
            .filter_map(|(index, sample)| {
                let kind = sample.kind.as_ref()?;
                let index = u32::try_from(index).expect("small");
                let sample = match kind {
                    Kind::Host(host) => {
                        let mut words = Vec::new();
                        put_host_words(&mut words, &host.values);
                        Ok(words)
                    }
                    other => Err(other.clone()),
                };
                Some((77, index, sample_at(&batch, index), sample))
            })
            .collect();
        assert_eq!(expected.len(), batch.samples.len() - 1);
        let got = visited(&compact);
        assert_eq!(got.len(), expected.len());
        for (got, expected) in got.iter().zip(&expected) {
            assert_eq!((got.0, got.1, got.2), (expected.0, expected.1, expected.2));
            match (&got.3, &expected.3) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "host words bit for bit (NaN included)"),
                (Err(a), Err(b)) => assert_eq!(a, b),
                _ => panic!("host words where a kind was expected, or the reverse"),
            }
        }
        // An agent-encoded row hands on the same samples, hosts as decoded kinds.
        let legacy = visited(&agents);
        assert_eq!(legacy.len(), expected.len());
        for (got, expected) in legacy.iter().zip(&expected) {
            assert_eq!((got.0, got.1, got.2), (expected.0, expected.1, expected.2));
            if let (Err(Kind::Host(host)), Ok(words)) = (&got.3, &expected.3) {
                let mut again = Vec::new();
                put_host_words(&mut again, &host.values);
                assert_eq!(&again, words);
            }
        }
    }

    fn sample_at(batch: &Batch, index: u32) -> i64 {
        batch.samples[index as usize].observed_at_unix_ms
    }
}
