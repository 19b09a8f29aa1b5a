//! The server's decoded form of a `guardian.v1.SampleBatch`.
//!
//! Nearly every sample of a batch is a host sample, and the server needs ~17 flat values of
//! each ([`HostValues`]: the window, the raw rows) but the generated decoder builds every
//! disk, interface and string of it (~3 us per sample, ~15 % of the server's CPU at 50 k
//! samples/s). [`Batch::decode`] reads a host sample straight into its [`HostValues`] and
//! keeps the sample's encoded bytes (a zero-copy slice of the frame) for the few places that
//! need all of it ([`Host::sample`]: the node's newest host sample, when the node is read). The
//! other kinds (one chain sample per interval, GPU, keystore, unavailable) decode as
//! generated.
//!
//! # Guarantees
//! - Accepts exactly the bytes the generated decoder accepts (wire types checked per field,
//!   strings checked for UTF-8, unknown fields skipped, merge semantics for repeated
//!   occurrences of a field), so [`Host::sample`] cannot fail on a batch that decoded; the
//!   tests compare both decoders on random and corrupted batches.
//! - [`Host::values`] equals [`HostValues::of`] of the fully decoded sample.

use guardian_proto::v1::{
    self, ChainSample, GpuSample, HostSample, KeystoreSample, SampleBatch, SamplerUnavailable,
    sample,
};
use prost::Message;
use prost::bytes::{Buf, Bytes};
use prost::encoding::{
    DecodeContext, WireType, check_wire_type, decode_key, decode_varint, double, int64, message,
    skip_field, uint32, uint64,
};

pub mod values;

pub use values::HostValues;

/// Most samples one batch may carry. Both decoders stop at the first sample beyond it, so a
/// frame of millions of tiny samples costs a bounded amount of memory before it is refused.
pub const MAX_SAMPLES_PER_BATCH: usize = 10_000;

/// Why a batch does not decode.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Bad protobuf framing or wire types.
    #[error(transparent)]
    Proto(#[from] prost::DecodeError),
    /// A string field holds bytes that are not UTF-8.
    #[error("invalid string value: {0} is not UTF-8 encoded")]
    NotUtf8(&'static str),
    /// Unknown groups nested deeper than the generated decoder allows, or a group that does
    /// not end with its own tag.
    #[error("invalid group in an unknown field (nested too deep, or unbalanced)")]
    Group,
    /// More than [`MAX_SAMPLES_PER_BATCH`] samples (decoding stopped there).
    #[error(
        "it carries more than {MAX_SAMPLES_PER_BATCH} samples; at most {MAX_SAMPLES_PER_BATCH} are accepted (send smaller batches)"
    )]
    TooManySamples,
    /// An outbox blob in the server's own format is malformed ([`crate::store::outbox::blob`]).
    #[error("outbox blob: {0}")]
    Outbox(String),
}

/// A decoded `SampleBatch`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// `seq`.
    pub seq: u64,
    /// `spool_dropped_batches_total`.
    pub spool_dropped_batches_total: u64,
    /// `samples`, in order.
    pub samples: Vec<Sample>,
}

/// A decoded `Sample`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// `observed_at_unix_ms`.
    pub observed_at_unix_ms: i64,
    /// The `kind` oneof (None: the agent set none).
    pub kind: Option<Kind>,
}

/// The `Sample.kind` oneof; host samples flattened.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// A host sample: its values and (from ingest) encoded bytes.
    Host(Host),
    /// A chain sample.
    Chain(Box<ChainSample>),
    /// A GPU sample.
    Gpu(Box<GpuSample>),
    /// A keystore sample.
    Keystore(Box<KeystoreSample>),
    /// A sampler that could not sample.
    Unavailable(Box<SamplerUnavailable>),
}

/// A host sample as the server keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    /// The values the server stores and windows.
    pub values: HostValues,
    /// How many disks it reports.
    pub disks: usize,
    /// How many network interfaces it reports.
    pub networks: usize,
    /// The encoded `HostSample`, as the agent sent it; empty in a batch read from the
    /// ClickHouse outbox, which keeps the values only (`store::outbox::blob`): do not call
    /// [`Host::sample`] there.
    pub encoded: Bytes,
}

impl Host {
    fn decode(encoded: Bytes) -> Result<Self, DecodeError> {
        let (values, disks, networks) = host_values(&encoded)?;
        Ok(Self {
            values,
            disks,
            networks,
            encoded,
        })
    }

    /// The whole sample. The bytes passed the same checks as the generated decoder's when the
    /// batch decoded, so this does not fail; if it ever did, the error is logged and an empty
    /// sample returned rather than dropping the batch that carries it.
    pub fn sample(&self) -> HostSample {
        HostSample::decode(self.encoded.clone()).unwrap_or_else(|error| {
            tracing::error!(%error, "HostSampleUndecodable: accepted by the lean decoder only");
            HostSample::default()
        })
    }
}

impl Batch {
    /// Decodes an encoded `SampleBatch` (`frame`'s bytes are shared, not copied, by host
    /// samples).
    ///
    /// # Errors
    /// [`DecodeError`] where the generated decoder fails too.
    pub fn decode(frame: &Bytes) -> Result<Self, DecodeError> {
        fast::batch(frame).map_or_else(|| Self::decode_checked(frame), Ok)
    }

    /// [`Batch::decode`] built from prost's field readers: the reference the fast path
    /// ([`fast`]) is tested against, and what decodes (or refuses, with prost's error) every
    /// batch the fast path leaves.
    fn decode_checked(frame: &Bytes) -> Result<Self, DecodeError> {
        let ctx = DecodeContext::default;
        let mut buf: &[u8] = frame;
        let mut batch = Self {
            samples: Vec::with_capacity(count_field(buf, 2).min(4096)),
            ..Self::default()
        };
        while buf.has_remaining() {
            let (tag, wire_type) = decode_key(&mut buf)?;
            match tag {
                1 => uint64::merge(wire_type, &mut batch.seq, &mut buf, ctx())?,
                2 => {
                    if batch.samples.len() >= MAX_SAMPLES_PER_BATCH {
                        return Err(DecodeError::TooManySamples);
                    }
                    let at = buf;
                    let body = delimited(wire_type, &mut buf)?;
                    let sample = if host_only(body) {
                        Sample::decode_host(frame, body)?
                    } else {
                        // Anything else (chain, GPU, keystore, unavailable, unknown fields):
                        // the generated decoder, entered exactly as `SampleBatch::decode`
                        // enters it, so its nesting limits apply unchanged.
                        let mut proto = v1::Sample::default();
                        let mut at = at;
                        message::merge(wire_type, &mut proto, &mut at, ctx())?;
                        Sample::from_proto(proto)
                    };
                    batch.samples.push(sample);
                }
                3 => uint64::merge(
                    wire_type,
                    &mut batch.spool_dropped_batches_total,
                    &mut buf,
                    ctx(),
                )?,
                _ => skip_field(wire_type, tag, &mut buf, ctx())?,
            }
        }
        Ok(batch)
    }

    /// The generated form of the whole batch (when its encoded bytes are not at hand).
    pub fn to_proto(&self) -> SampleBatch {
        SampleBatch {
            seq: self.seq,
            samples: self.samples.iter().map(Sample::to_proto).collect(),
            spool_dropped_batches_total: self.spool_dropped_batches_total,
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True without samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

impl From<&SampleBatch> for Batch {
    /// Through its encoding (tests and the one-batch commit path).
    fn from(batch: &SampleBatch) -> Self {
        let encoded = Bytes::from(batch.encode_to_vec());
        // A message prost encoded from Rust values (valid UTF-8 strings) always decodes.
        Self::decode(&encoded).unwrap_or_default()
    }
}

impl Sample {
    /// A sample with only `observed_at_unix_ms` and `host` fields ([`host_only`]).
    fn decode_host(frame: &Bytes, body: &[u8]) -> Result<Self, DecodeError> {
        let mut buf = body;
        let mut out = Self {
            observed_at_unix_ms: 0,
            kind: None,
        };
        while buf.has_remaining() {
            let (tag, wire_type) = decode_key(&mut buf)?;
            match (tag, &mut out.kind) {
                (1, _) => int64::merge(
                    wire_type,
                    &mut out.observed_at_unix_ms,
                    &mut buf,
                    DecodeContext::default(),
                )?,
                (2, kind) => {
                    let body = delimited(wire_type, &mut buf)?;
                    let encoded = match kind {
                        // A oneof field seen again merges into the same variant; merging two
                        // encodings of a message is parsing their concatenation.
                        Some(Kind::Host(host)) => {
                            let mut both = Vec::with_capacity(host.encoded.len() + body.len());
                            both.extend_from_slice(&host.encoded);
                            both.extend_from_slice(body);
                            Bytes::from(both)
                        }
                        _ => frame.slice_ref(body),
                    };
                    *kind = Some(Kind::Host(Host::decode(encoded)?));
                }
                // host_only() let no other field through.
                _ => skip(wire_type, tag, &mut buf, SAMPLE_DEPTH)?,
            }
        }
        Ok(out)
    }

    /// From the generated type.
    fn from_proto(sample: v1::Sample) -> Self {
        let kind = sample.kind.map(|kind| match kind {
            sample::Kind::Host(host) => Kind::Host(Host {
                values: HostValues::of(&host),
                disks: host.disks.len(),
                networks: host.networks.len(),
                encoded: Bytes::from(host.encode_to_vec()),
            }),
            sample::Kind::Chain(chain) => Kind::Chain(Box::new(chain)),
            sample::Kind::Gpu(gpu) => Kind::Gpu(Box::new(gpu)),
            sample::Kind::Keystore(keystore) => Kind::Keystore(Box::new(keystore)),
            sample::Kind::Unavailable(why) => Kind::Unavailable(Box::new(why)),
        });
        Self {
            observed_at_unix_ms: sample.observed_at_unix_ms,
            kind,
        }
    }

    /// The generated form of this sample (for the few consumers that store or show it whole).
    pub fn to_proto(&self) -> guardian_proto::v1::Sample {
        let kind = self.kind.as_ref().map(|kind| match kind {
            Kind::Host(host) => sample::Kind::Host(host.sample()),
            Kind::Chain(chain) => sample::Kind::Chain(chain.as_ref().clone()),
            Kind::Gpu(gpu) => sample::Kind::Gpu(gpu.as_ref().clone()),
            Kind::Keystore(keystore) => sample::Kind::Keystore(keystore.as_ref().clone()),
            Kind::Unavailable(why) => sample::Kind::Unavailable(why.as_ref().clone()),
        });
        guardian_proto::v1::Sample {
            observed_at_unix_ms: self.observed_at_unix_ms,
            kind,
        }
    }
}

/// The recursion budget prost's `SampleBatch::decode` has left when it skips an unknown field
/// in a `Sample` (100 at the batch, one less per message level).
const SAMPLE_DEPTH: u32 = 99;
/// ... in a `HostSample`.
const HOST_DEPTH: u32 = 98;
/// ... in a `Pressure`, `Filesystem`, `DiskIo` or `NetIo`.
const HOST_PART_DEPTH: u32 = 97;

/// True when a `Sample` holds only fields 1 (`observed_at_unix_ms`) and 2 (`host`): the lean
/// path. Anything else, or bytes that do not walk, go to the generated decoder.
fn host_only(mut buf: &[u8]) -> bool {
    while buf.has_remaining() {
        match decode_key(&mut buf) {
            Ok((tag @ (1 | 2), wire_type)) => {
                if skip_field(wire_type, tag, &mut buf, DecodeContext::default()).is_err() {
                    return false;
                }
            }
            _ => return false,
        }
    }
    true
}

/// prost's `skip_field` with the recursion budget `depth` it would have at that point (its
/// own context type cannot be built with less than the full budget).
fn skip(wire_type: WireType, tag: u32, buf: &mut &[u8], depth: u32) -> Result<(), DecodeError> {
    if depth == 0 {
        return Err(DecodeError::Group);
    }
    if wire_type != WireType::StartGroup {
        skip_field(wire_type, tag, buf, DecodeContext::default())?;
        return Ok(());
    }
    loop {
        let (inner_tag, inner_wire_type) = decode_key(buf)?;
        if inner_wire_type == WireType::EndGroup {
            return if inner_tag == tag {
                Ok(())
            } else {
                Err(DecodeError::Group)
            };
        }
        skip(inner_wire_type, inner_tag, buf, depth - 1)?;
    }
}

/// How many times field `tag` occurs at the top level of `buf` (stops at the first error,
/// which the real decode then reports).
fn count_field(mut buf: &[u8], tag: u32) -> usize {
    let mut count = 0;
    while buf.has_remaining() {
        let Ok((seen, wire_type)) = decode_key(&mut buf) else {
            break;
        };
        count += usize::from(seen == tag);
        if skip_field(wire_type, seen, &mut buf, DecodeContext::default()).is_err() {
            break;
        }
    }
    count
}

/// The body of a length-delimited field whose key was just read; advances past it.
fn delimited<'a>(wire_type: WireType, buf: &mut &'a [u8]) -> Result<&'a [u8], DecodeError> {
    check_wire_type(WireType::LengthDelimited, wire_type)?;
    let start = *buf;
    let mut header = start;
    let len = decode_varint(&mut header)?;
    // Checks the length against what is left (BufferUnderflow) exactly as prost does.
    skip_field(wire_type, 1, buf, DecodeContext::default())?;
    let offset = start.len() - header.len();
    // skip_field succeeded, so `len` fits in what was left.
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    Ok(&start[offset..offset + len])
}

/// Skips a string field, checking it is UTF-8 as the generated decoder does.
fn string(wire_type: WireType, buf: &mut &[u8], field: &'static str) -> Result<(), DecodeError> {
    let body = delimited(wire_type, buf)?;
    std::str::from_utf8(body).map_err(|_| DecodeError::NotUtf8(field))?;
    Ok(())
}

/// Reads a scalar field into a value nobody keeps (still checked as the generated decoder
/// checks it).
fn ignore_u64(wire_type: WireType, buf: &mut &[u8]) -> Result<(), DecodeError> {
    uint64::merge(wire_type, &mut 0, buf, DecodeContext::default())?;
    Ok(())
}

fn ignore_f64(wire_type: WireType, buf: &mut &[u8]) -> Result<(), DecodeError> {
    double::merge(wire_type, &mut 0.0, buf, DecodeContext::default())?;
    Ok(())
}

/// Walks the fields of one embedded message, `each(tag, wire_type, buf)` reading or skipping
/// each one.
fn fields(
    body: &[u8],
    depth: u32,
    mut each: impl FnMut(u32, WireType, &mut &[u8]) -> Result<bool, DecodeError>,
) -> Result<(), DecodeError> {
    let mut buf = body;
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        if !each(tag, wire_type, &mut buf)? {
            skip(wire_type, tag, &mut buf, depth)?;
        }
    }
    Ok(())
}

/// `HostValues::of` of an encoded `HostSample`, plus its disk and interface counts.
fn host_values(encoded: &[u8]) -> Result<(HostValues, usize, usize), DecodeError> {
    let ctx = DecodeContext::default;
    let mut v = HostValues::default();
    let (mut disks, mut networks) = (0usize, 0usize);
    // Repeated occurrences of a message field merge: fields read later overwrite, the others
    // stay, which is what updating these in place does.
    let (mut cpu_some10, mut mem_full10, mut io_full10) = (0.0, 0.0, 0.0);
    let (mut fs_used, mut fs_available) = (0.0, 0u64);
    let (mut read_max, mut write_max, mut util_max) = (0.0f64, 0.0f64, 0.0f64);
    // -0.0: the neutral element `Iter::sum` of f64 starts from, so an empty list sums alike.
    let (mut rx, mut tx, mut errors) = (-0.0f64, -0.0f64, 0u64);
    fields(encoded, HOST_DEPTH, |tag, wt, buf| {
        match tag {
            1 => double::merge(wt, &mut v.cpu_busy_percent, buf, ctx())?,
            2 => double::merge(wt, &mut v.cpu_iowait_percent, buf, ctx())?,
            3 => uint32::merge(wt, &mut 0, buf, ctx())?,
            4 => uint64::merge(wt, &mut v.mem_total_bytes, buf, ctx())?,
            5 => uint64::merge(wt, &mut v.mem_available_bytes, buf, ctx())?,
            6 | 7 | 18 => ignore_u64(wt, buf)?,
            8 => double::merge(wt, &mut v.load_avg_1m, buf, ctx())?,
            9 | 10 => ignore_f64(wt, buf)?,
            11 => pressure(delimited(wt, buf)?, &mut cpu_some10, 1)?,
            12 => pressure(delimited(wt, buf)?, &mut mem_full10, 3)?,
            13 => pressure(delimited(wt, buf)?, &mut io_full10, 3)?,
            14 => fields(delimited(wt, buf)?, HOST_PART_DEPTH, |tag, wt, buf| {
                match tag {
                    1 => string(wt, buf, "Filesystem.path")?,
                    2 | 5 | 6 => ignore_u64(wt, buf)?,
                    3 => uint64::merge(wt, &mut fs_available, buf, ctx())?,
                    4 => double::merge(wt, &mut fs_used, buf, ctx())?,
                    _ => return Ok(false),
                }
                Ok(true)
            })?,
            15 => {
                disks += 1;
                let (mut read, mut write, mut util) = (0.0, 0.0, 0.0);
                fields(delimited(wt, buf)?, HOST_PART_DEPTH, |tag, wt, buf| {
                    match tag {
                        1 => string(wt, buf, "DiskIo.device")?,
                        2..=5 => ignore_f64(wt, buf)?,
                        6 => double::merge(wt, &mut read, buf, ctx())?,
                        7 => double::merge(wt, &mut write, buf, ctx())?,
                        8 => double::merge(wt, &mut util, buf, ctx())?,
                        _ => return Ok(false),
                    }
                    Ok(true)
                })?;
                read_max = read_max.max(read);
                write_max = write_max.max(write);
                util_max = util_max.max(util);
            }
            16 => {
                networks += 1;
                let (mut rx_errors, mut tx_errors, mut rx_rate, mut tx_rate) = (0, 0, 0.0, 0.0);
                fields(delimited(wt, buf)?, HOST_PART_DEPTH, |tag, wt, buf| {
                    match tag {
                        1 => string(wt, buf, "NetIo.interface")?,
                        2 | 3 | 6 | 7 => ignore_u64(wt, buf)?,
                        4 => uint64::merge(wt, &mut rx_errors, buf, ctx())?,
                        5 => uint64::merge(wt, &mut tx_errors, buf, ctx())?,
                        8 => double::merge(wt, &mut rx_rate, buf, ctx())?,
                        9 => double::merge(wt, &mut tx_rate, buf, ctx())?,
                        _ => return Ok(false),
                    }
                    Ok(true)
                })?;
                rx += rx_rate;
                tx += tx_rate;
                errors = errors.saturating_add(u64::saturating_add(rx_errors, tx_errors));
            }
            17 => uint64::merge(wt, &mut v.oom_kills_total, buf, ctx())?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    v.cpu_psi_some_avg10_percent = cpu_some10;
    v.memory_psi_full_avg10_percent = mem_full10;
    v.io_psi_full_avg10_percent = io_full10;
    v.chain_data_used_percent = fs_used;
    v.chain_data_available_bytes = fs_available;
    v.disk_read_latency_ms_max = read_max;
    v.disk_write_latency_ms_max = write_max;
    v.disk_utilisation_percent_max = util_max;
    v.net_rx_bytes_per_second = rx;
    v.net_tx_bytes_per_second = tx;
    v.net_errors_total = errors;
    Ok((v, disks, networks))
}

/// Reads field `keep` (a double) of an encoded `Pressure` into `value`; checks the rest.
fn pressure(body: &[u8], value: &mut f64, keep: u32) -> Result<(), DecodeError> {
    fields(body, HOST_PART_DEPTH, |tag, wt, buf| {
        match tag {
            t if t == keep => double::merge(wt, value, buf, DecodeContext::default())?,
            1..=4 => ignore_f64(wt, buf)?,
            5 => ignore_u64(wt, buf)?,
            _ => return Ok(false),
        }
        Ok(true)
    })
}

/// The decoder for batches as agents write them: every field with the wire type its
/// `.proto` gives it, known fields only, each host sample's `host` once. It reads keys,
/// varints and doubles with a few byte compares instead of prost's generic readers
/// (~2x faster on the load generator's batches). Anything else (an unknown field, a wire
/// type off, a truncated or over-long varint, bad UTF-8, a repeated oneof) makes it give up
/// (`None`) and [`Batch::decode_checked`] decodes the whole batch instead, so it accepts and
/// refuses exactly what that does, with the same errors. Samples that are not host-only go
/// to the generated decoder, entered exactly as there.
mod fast {
    use prost::bytes::Bytes;
    use prost::encoding::{DecodeContext, WireType, message};

    use super::{Batch, Host, Kind, Sample, v1};
    use crate::batch::values::HostValues;

    /// A varint as prost reads it (at most 10 bytes, the 10th at most 1).
    #[inline]
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let first = *buf.first()?;
        if first < 0x80 {
            *buf = &buf[1..];
            return Some(u64::from(first));
        }
        let mut value = 0u64;
        for (i, &byte) in buf.iter().take(10).enumerate() {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                if i == 9 && byte > 1 {
                    return None;
                }
                *buf = &buf[i + 1..];
                return Some(value);
            }
        }
        None
    }

    #[inline]
    fn double(buf: &mut &[u8]) -> Option<f64> {
        let (bytes, rest) = buf.split_first_chunk::<8>()?;
        *buf = rest;
        Some(f64::from_le_bytes(*bytes))
    }

    /// The body of a length-delimited field whose key was just read.
    #[inline]
    fn delimited<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = usize::try_from(varint(buf)?).ok()?;
        if len > buf.len() {
            return None;
        }
        let (body, rest) = buf.split_at(len);
        *buf = rest;
        Some(body)
    }

    /// A string field: UTF-8 checked (device and interface names are ASCII, checked in one
    /// pass).
    #[inline]
    fn string(buf: &mut &[u8]) -> Option<()> {
        let body = delimited(buf)?;
        (body.is_ascii() || std::str::from_utf8(body).is_ok()).then_some(())
    }

    /// How many `samples` (field 2, length-delimited) a batch holds, for the Vec's capacity;
    /// stops early at anything unusual (the count is only a hint).
    fn count_samples(mut buf: &[u8]) -> usize {
        let mut count = 0;
        while !buf.is_empty() {
            let skipped = match varint(&mut buf).map(split) {
                Some((2, LEN)) => {
                    count += 1;
                    delimited(&mut buf)
                }
                Some((_, VARINT)) => varint(&mut buf).map(|_| &[][..]),
                _ => None,
            };
            if skipped.is_none() {
                break;
            }
        }
        count
    }

    /// A key as (tag, wire type): varint 0, fixed64 1, length-delimited 2.
    #[inline]
    const fn split(key: u64) -> (u64, u64) {
        (key >> 3, key & 7)
    }
    const VARINT: u64 = 0;
    const FIXED64: u64 = 1;
    const LEN: u64 = 2;

    pub(super) fn batch(frame: &Bytes) -> Option<Batch> {
        let mut buf: &[u8] = frame;
        let mut batch = Batch {
            samples: Vec::with_capacity(count_samples(buf).min(4096)),
            ..Batch::default()
        };
        while !buf.is_empty() {
            match split(varint(&mut buf)?) {
                (1, VARINT) => batch.seq = varint(&mut buf)?,
                (2, LEN) => {
                    // Over the limit: the checked path refuses it with the reason.
                    if batch.samples.len() >= super::MAX_SAMPLES_PER_BATCH {
                        return None;
                    }
                    let at = buf;
                    let body = delimited(&mut buf)?;
                    batch.samples.push(sample(frame, at, body)?);
                }
                (3, VARINT) => batch.spool_dropped_batches_total = varint(&mut buf)?,
                _ => return None,
            }
        }
        Some(batch)
    }

    /// One `Sample` (`at`: its length prefix onwards, `body`: its bytes).
    fn sample(frame: &Bytes, at: &[u8], body: &[u8]) -> Option<Sample> {
        let mut buf = body;
        let mut out = Sample {
            observed_at_unix_ms: 0,
            kind: None,
        };
        while !buf.is_empty() {
            match split(varint(&mut buf)?) {
                // int64: the varint's bits as two's complement.
                (1, VARINT) => {
                    out.observed_at_unix_ms = varint(&mut buf)?.cast_signed();
                }
                (2, LEN) if out.kind.is_none() => {
                    let encoded = delimited(&mut buf)?;
                    let (values, disks, networks) = host(encoded)?;
                    out.kind = Some(Kind::Host(Host {
                        values,
                        disks,
                        networks,
                        encoded: frame.slice_ref(encoded),
                    }));
                }
                // A repeated `host` merges: the checked path concatenates.
                (2, LEN) => return None,
                _ => return generated(at),
            }
        }
        Some(out)
    }

    /// A sample that is not host-only, through the generated decoder as `SampleBatch::decode`
    /// enters it.
    fn generated(at: &[u8]) -> Option<Sample> {
        let mut proto = v1::Sample::default();
        let mut at = at;
        message::merge(
            WireType::LengthDelimited,
            &mut proto,
            &mut at,
            DecodeContext::default(),
        )
        .ok()?;
        Some(Sample::from_proto(proto))
    }

    /// Consumes `key` (a one-byte field key) if it comes next.
    #[inline(always)]
    fn key1(buf: &mut &[u8], key: u8) -> bool {
        match buf.split_first() {
            Some((&first, rest)) if first == key => {
                *buf = rest;
                true
            }
            _ => false,
        }
    }

    /// Consumes `key` (a two-byte field key: fields 16 and up) if it comes next.
    #[inline(always)]
    fn key2(buf: &mut &[u8], key: [u8; 2]) -> bool {
        match buf.split_first_chunk::<2>() {
            Some((first, rest)) if *first == key => {
                *buf = rest;
                true
            }
            _ => false,
        }
    }

    /// `HostValues` of an encoded `HostSample`, plus its disk and interface counts (the
    /// same arithmetic as `super::host_values`).
    ///
    /// Each message is read in two steps: first its fields in number order, as prost (and
    /// any encoder following the spec's advice) writes them, each an expected one-byte key
    /// and a well-predicted branch; then, for whatever is left (fields out of order or
    /// repeated, unknown ones), the general key-by-key walk. Both steps apply the fields in
    /// the order they appear, so the result equals the general walk's alone.
    fn host(encoded: &[u8]) -> Option<(HostValues, usize, usize)> {
        let mut v = HostValues::default();
        let mut acc = HostAcc::default();
        let mut buf = encoded;
        if key1(&mut buf, 0x09) {
            v.cpu_busy_percent = double(&mut buf)?;
        }
        if key1(&mut buf, 0x11) {
            v.cpu_iowait_percent = double(&mut buf)?;
        }
        if key1(&mut buf, 0x18) {
            varint(&mut buf)?;
        }
        if key1(&mut buf, 0x20) {
            v.mem_total_bytes = varint(&mut buf)?;
        }
        if key1(&mut buf, 0x28) {
            v.mem_available_bytes = varint(&mut buf)?;
        }
        if key1(&mut buf, 0x30) {
            varint(&mut buf)?;
        }
        if key1(&mut buf, 0x38) {
            varint(&mut buf)?;
        }
        if key1(&mut buf, 0x41) {
            v.load_avg_1m = double(&mut buf)?;
        }
        if key1(&mut buf, 0x49) {
            double(&mut buf)?;
        }
        if key1(&mut buf, 0x51) {
            double(&mut buf)?;
        }
        if key1(&mut buf, 0x5a) {
            pressure(delimited(&mut buf)?, &mut acc.cpu_some10, 1)?;
        }
        if key1(&mut buf, 0x62) {
            pressure(delimited(&mut buf)?, &mut acc.mem_full10, 3)?;
        }
        if key1(&mut buf, 0x6a) {
            pressure(delimited(&mut buf)?, &mut acc.io_full10, 3)?;
        }
        if key1(&mut buf, 0x72) {
            acc.filesystem(delimited(&mut buf)?)?;
        }
        while key1(&mut buf, 0x7a) {
            acc.disk(delimited(&mut buf)?)?;
        }
        while key2(&mut buf, [0x82, 0x01]) {
            acc.net(delimited(&mut buf)?)?;
        }
        if key2(&mut buf, [0x88, 0x01]) {
            v.oom_kills_total = varint(&mut buf)?;
        }
        if key2(&mut buf, [0x90, 0x01]) {
            varint(&mut buf)?;
        }
        while !buf.is_empty() {
            match split(varint(&mut buf)?) {
                (1, FIXED64) => v.cpu_busy_percent = double(&mut buf)?,
                (2, FIXED64) => v.cpu_iowait_percent = double(&mut buf)?,
                (4, VARINT) => v.mem_total_bytes = varint(&mut buf)?,
                (5, VARINT) => v.mem_available_bytes = varint(&mut buf)?,
                (3, VARINT) | (6, VARINT) | (7, VARINT) | (18, VARINT) => {
                    varint(&mut buf)?;
                }
                (8, FIXED64) => v.load_avg_1m = double(&mut buf)?,
                (9, FIXED64) | (10, FIXED64) => {
                    double(&mut buf)?;
                }
                (11, LEN) => pressure(delimited(&mut buf)?, &mut acc.cpu_some10, 1)?,
                (12, LEN) => pressure(delimited(&mut buf)?, &mut acc.mem_full10, 3)?,
                (13, LEN) => pressure(delimited(&mut buf)?, &mut acc.io_full10, 3)?,
                (14, LEN) => acc.filesystem(delimited(&mut buf)?)?,
                (15, LEN) => acc.disk(delimited(&mut buf)?)?,
                (16, LEN) => acc.net(delimited(&mut buf)?)?,
                (17, VARINT) => v.oom_kills_total = varint(&mut buf)?,
                _ => return None,
            }
        }
        v.cpu_psi_some_avg10_percent = acc.cpu_some10;
        v.memory_psi_full_avg10_percent = acc.mem_full10;
        v.io_psi_full_avg10_percent = acc.io_full10;
        v.chain_data_used_percent = acc.fs_used;
        v.chain_data_available_bytes = acc.fs_available;
        v.disk_read_latency_ms_max = acc.read_max;
        v.disk_write_latency_ms_max = acc.write_max;
        v.disk_utilisation_percent_max = acc.util_max;
        v.net_rx_bytes_per_second = acc.rx;
        v.net_tx_bytes_per_second = acc.tx;
        v.net_errors_total = acc.errors;
        Some((v, acc.disks, acc.networks))
    }

    /// What a host sample's nested messages add up to.
    struct HostAcc {
        disks: usize,
        networks: usize,
        cpu_some10: f64,
        mem_full10: f64,
        io_full10: f64,
        fs_used: f64,
        fs_available: u64,
        read_max: f64,
        write_max: f64,
        util_max: f64,
        rx: f64,
        tx: f64,
        errors: u64,
    }

    impl Default for HostAcc {
        fn default() -> Self {
            Self {
                disks: 0,
                networks: 0,
                cpu_some10: 0.0,
                mem_full10: 0.0,
                io_full10: 0.0,
                fs_used: 0.0,
                fs_available: 0,
                read_max: 0.0,
                write_max: 0.0,
                util_max: 0.0,
                // As `HostValues::of` sums: from -0.0, so no interfaces give -0.0.
                rx: -0.0,
                tx: -0.0,
                errors: 0,
            }
        }
    }

    impl HostAcc {
        /// A `Filesystem` (`chain_data`; a repeated one merges into the same values).
        fn filesystem(&mut self, mut fs: &[u8]) -> Option<()> {
            if key1(&mut fs, 0x0a) {
                string(&mut fs)?;
            }
            if key1(&mut fs, 0x10) {
                varint(&mut fs)?;
            }
            if key1(&mut fs, 0x18) {
                self.fs_available = varint(&mut fs)?;
            }
            if key1(&mut fs, 0x21) {
                self.fs_used = double(&mut fs)?;
            }
            if key1(&mut fs, 0x28) {
                varint(&mut fs)?;
            }
            if key1(&mut fs, 0x30) {
                varint(&mut fs)?;
            }
            while !fs.is_empty() {
                match split(varint(&mut fs)?) {
                    (1, LEN) => string(&mut fs)?,
                    (2, VARINT) | (5, VARINT) | (6, VARINT) => {
                        varint(&mut fs)?;
                    }
                    (3, VARINT) => self.fs_available = varint(&mut fs)?,
                    (4, FIXED64) => self.fs_used = double(&mut fs)?,
                    _ => return None,
                }
            }
            Some(())
        }

        /// One `DiskIo`.
        fn disk(&mut self, mut disk: &[u8]) -> Option<()> {
            self.disks += 1;
            let (mut read, mut write, mut util) = (0.0, 0.0, 0.0);
            if key1(&mut disk, 0x0a) {
                string(&mut disk)?;
            }
            for key in [0x11, 0x19, 0x21, 0x29] {
                if key1(&mut disk, key) {
                    double(&mut disk)?;
                }
            }
            if key1(&mut disk, 0x31) {
                read = double(&mut disk)?;
            }
            if key1(&mut disk, 0x39) {
                write = double(&mut disk)?;
            }
            if key1(&mut disk, 0x41) {
                util = double(&mut disk)?;
            }
            while !disk.is_empty() {
                match split(varint(&mut disk)?) {
                    (1, LEN) => string(&mut disk)?,
                    (2..=5, FIXED64) => {
                        double(&mut disk)?;
                    }
                    (6, FIXED64) => read = double(&mut disk)?,
                    (7, FIXED64) => write = double(&mut disk)?,
                    (8, FIXED64) => util = double(&mut disk)?,
                    _ => return None,
                }
            }
            self.read_max = self.read_max.max(read);
            self.write_max = self.write_max.max(write);
            self.util_max = self.util_max.max(util);
            Some(())
        }

        /// One `NetIo`.
        fn net(&mut self, mut net: &[u8]) -> Option<()> {
            self.networks += 1;
            let (mut rx_errors, mut tx_errors, mut rx_rate, mut tx_rate) = (0, 0, 0.0, 0.0);
            if key1(&mut net, 0x0a) {
                string(&mut net)?;
            }
            if key1(&mut net, 0x10) {
                varint(&mut net)?;
            }
            if key1(&mut net, 0x18) {
                varint(&mut net)?;
            }
            if key1(&mut net, 0x20) {
                rx_errors = varint(&mut net)?;
            }
            if key1(&mut net, 0x28) {
                tx_errors = varint(&mut net)?;
            }
            if key1(&mut net, 0x30) {
                varint(&mut net)?;
            }
            if key1(&mut net, 0x38) {
                varint(&mut net)?;
            }
            if key1(&mut net, 0x41) {
                rx_rate = double(&mut net)?;
            }
            if key1(&mut net, 0x49) {
                tx_rate = double(&mut net)?;
            }
            while !net.is_empty() {
                match split(varint(&mut net)?) {
                    (1, LEN) => string(&mut net)?,
                    (2, VARINT) | (3, VARINT) | (6, VARINT) | (7, VARINT) => {
                        varint(&mut net)?;
                    }
                    (4, VARINT) => rx_errors = varint(&mut net)?,
                    (5, VARINT) => tx_errors = varint(&mut net)?,
                    (8, FIXED64) => rx_rate = double(&mut net)?,
                    (9, FIXED64) => tx_rate = double(&mut net)?,
                    _ => return None,
                }
            }
            self.rx += rx_rate;
            self.tx += tx_rate;
            self.errors = self
                .errors
                .saturating_add(u64::saturating_add(rx_errors, tx_errors));
            Some(())
        }
    }

    /// Field `keep` (a double) of an encoded `Pressure` into `value`.
    fn pressure(mut buf: &[u8], value: &mut f64, keep: u64) -> Option<()> {
        for (tag, key) in [(1, 0x09), (2, 0x11), (3, 0x19), (4, 0x21)] {
            if key1(&mut buf, key) {
                let read = double(&mut buf)?;
                if tag == keep {
                    *value = read;
                }
            }
        }
        if key1(&mut buf, 0x28) {
            varint(&mut buf)?;
        }
        while !buf.is_empty() {
            match split(varint(&mut buf)?) {
                (tag, FIXED64) if tag == keep => *value = double(&mut buf)?,
                (1..=4, FIXED64) => {
                    double(&mut buf)?;
                }
                (5, VARINT) => {
                    varint(&mut buf)?;
                }
                _ => return None,
            }
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use guardian_proto::v1::{
        DiskIo, Filesystem, GpuDevice, NetIo, Pressure, ReferenceTip, Sample as ProtoSample,
    };

    use super::*;

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        fn f64(&mut self) -> f64 {
            match self.below(8) {
                0 => 0.0,
                1 => -0.0,
                2 => f64::NAN,
                _ => (self.next() % 1_000_000) as f64 / 7.0,
            }
        }
        fn u64(&mut self) -> u64 {
            match self.below(4) {
                0 => 0,
                1 => u64::MAX - self.below(3),
                _ => self.next() >> self.below(64),
            }
        }
        fn text(&mut self) -> String {
            (0..self.below(12))
                .map(|_| char::from(b'a' + (self.below(26) as u8)))
                .collect()
        }
    }

    fn pressure(rng: &mut Rng) -> Option<Pressure> {
        (rng.below(4) > 0).then(|| Pressure {
            some_avg10_percent: rng.f64(),
            some_avg60_percent: rng.f64(),
            full_avg10_percent: rng.f64(),
            full_avg60_percent: rng.f64(),
            some_total_microseconds: rng.u64(),
        })
    }

    fn host(rng: &mut Rng) -> HostSample {
        HostSample {
            cpu_busy_percent: rng.f64(),
            cpu_iowait_percent: rng.f64(),
            cpu_count: rng.next() as u32,
            mem_total_bytes: rng.u64(),
            mem_available_bytes: rng.u64(),
            swap_total_bytes: rng.u64(),
            swap_free_bytes: rng.u64(),
            load_avg_1m: rng.f64(),
            load_avg_5m: rng.f64(),
            load_avg_15m: rng.f64(),
            cpu_pressure: pressure(rng),
            memory_pressure: pressure(rng),
            io_pressure: pressure(rng),
            chain_data: (rng.below(3) > 0).then(|| Filesystem {
                path: rng.text(),
                total_bytes: rng.u64(),
                available_bytes: rng.u64(),
                used_percent: rng.f64(),
                inodes_total: rng.u64(),
                inodes_free: rng.u64(),
            }),
            disks: (0..rng.below(6))
                .map(|_| DiskIo {
                    device: rng.text(),
                    reads_per_second: rng.f64(),
                    writes_per_second: rng.f64(),
                    read_bytes_per_second: rng.f64(),
                    write_bytes_per_second: rng.f64(),
                    read_latency_ms: rng.f64(),
                    write_latency_ms: rng.f64(),
                    utilisation_percent: rng.f64(),
                })
                .collect(),
            networks: (0..rng.below(4))
                .map(|_| NetIo {
                    interface: rng.text(),
                    rx_bytes_total: rng.u64(),
                    tx_bytes_total: rng.u64(),
                    rx_errors_total: rng.u64(),
                    tx_errors_total: rng.u64(),
                    rx_dropped_total: rng.u64(),
                    tx_dropped_total: rng.u64(),
                    rx_bytes_per_second: rng.f64(),
                    tx_bytes_per_second: rng.f64(),
                })
                .collect(),
            oom_kills_total: rng.u64(),
            uptime_seconds: rng.u64(),
        }
    }

    fn batch(rng: &mut Rng) -> SampleBatch {
        let samples = (0..rng.below(12))
            .map(|_| ProtoSample {
                observed_at_unix_ms: rng.next() as i64,
                kind: match rng.below(6) {
                    0 => Some(sample::Kind::Chain(ChainSample {
                        endpoint: rng.text(),
                        best_block: rng.u64(),
                        references: vec![ReferenceTip {
                            endpoint: rng.text(),
                            responsive: true,
                            best_block: rng.u64(),
                            error: String::new(),
                        }],
                        ..ChainSample::default()
                    })),
                    1 => Some(sample::Kind::Gpu(GpuSample {
                        available: true,
                        devices: vec![GpuDevice {
                            index: 3,
                            uuid: rng.text(),
                            ..GpuDevice::default()
                        }],
                        ..GpuSample::default()
                    })),
                    2 => Some(sample::Kind::Unavailable(SamplerUnavailable {
                        sampler: rng.text(),
                        reason: rng.text(),
                    })),
                    3 if rng.below(4) == 0 => None,
                    _ => Some(sample::Kind::Host(host(rng))),
                },
            })
            .collect();
        SampleBatch {
            seq: rng.u64(),
            samples,
            spool_dropped_batches_total: rng.u64(),
        }
    }

    /// Equal, telling -0.0 from 0.0 (Debug does) and taking any NaN as NaN (which NaN an
    /// addition yields is up to the compiler: `fadd` commutes).
    fn same_values(a: &HostValues, b: &HostValues) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    /// Both decoders agree on `bytes`: both fail, or both succeed with the same content.
    fn agree(bytes: &[u8]) -> bool {
        let frame = Bytes::copy_from_slice(bytes);
        // The fast path, where it decodes, gives exactly what the checked path gives.
        if let Some(fast) = fast::batch(&frame) {
            let checked = Batch::decode_checked(&frame);
            if format!("{checked:?}") != format!("{:?}", Ok::<_, DecodeError>(&fast)) {
                eprintln!("fast path differs on {bytes:02x?}: fast {fast:?}, checked {checked:?}");
                return false;
            }
        }
        match (Batch::decode(&frame), SampleBatch::decode(bytes)) {
            (Err(_), Err(_)) => true,
            (Ok(lean), Ok(full)) => {
                let same = lean.seq == full.seq
                    && lean.spool_dropped_batches_total == full.spool_dropped_batches_total
                    && lean.samples.len() == full.samples.len()
                    && lean.samples.iter().zip(&full.samples).all(|(l, f)| {
                        l.observed_at_unix_ms == f.observed_at_unix_ms
                            && match (&l.kind, &f.kind) {
                                (Some(Kind::Host(l)), Some(sample::Kind::Host(f))) => {
                                    same_values(&l.values, &HostValues::of(f))
                                        && l.disks == f.disks.len()
                                        && l.networks == f.networks.len()
                                        && format!("{:?}", l.sample()) == format!("{f:?}")
                                }
                                (None, None) => true,
                                (Some(_), Some(_)) => {
                                    format!("{:?}", l.to_proto()) == format!("{f:?}")
                                }
                                _ => false,
                            }
                    });
                if !same {
                    eprintln!("differ on {bytes:02x?}: lean {lean:?}, generated {full:?}");
                }
                same
            }
            (lean, full) => {
                eprintln!("disagree on {bytes:02x?}: lean {lean:?}, generated {full:?}");
                false
            }
        }
    }

    #[test]
    fn host_values_match_the_generated_decoder_on_random_batches() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..2_000 {
            let encoded = batch(&mut rng).encode_to_vec();
            assert!(agree(&encoded));
            // What prost encodes, agents included, takes the fast path.
            assert!(fast::batch(&Bytes::from(encoded.clone())).is_some());
            let lean = Batch::decode(&Bytes::from(encoded.clone())).unwrap_or_default();
            assert_eq!(lean.to_proto().encode_to_vec(), encoded);
        }
    }

    #[test]
    fn corrupted_batches_fail_or_pass_exactly_as_with_the_generated_decoder() {
        let mut rng = Rng(0xD1B5_4A32_D192_ED03);
        let (mut refused, mut fast_accepted, mut fast_left) = (0, 0, 0);
        for _ in 0..20_000 {
            let mut bytes = batch(&mut rng).encode_to_vec();
            if bytes.is_empty() {
                continue;
            }
            match rng.below(4) {
                0 => bytes.truncate(rng.below(bytes.len() as u64) as usize),
                1 => {
                    let at = rng.below(bytes.len() as u64) as usize;
                    bytes.insert(at, rng.next() as u8);
                }
                _ => {
                    for _ in 0..=rng.below(3) {
                        let at = rng.below(bytes.len() as u64) as usize;
                        bytes[at] ^= 1 << rng.below(8);
                    }
                }
            }
            refused += usize::from(SampleBatch::decode(bytes.as_slice()).is_err());
            let fast = fast::batch(&Bytes::copy_from_slice(&bytes)).is_some();
            fast_accepted += usize::from(fast);
            fast_left +=
                usize::from(!fast && Batch::decode(&Bytes::copy_from_slice(&bytes)).is_ok());
            assert!(agree(&bytes));
        }
        // The corruptions exercise every outcome: refused, accepted by the fast path, and
        // accepted only by the checked path (e.g. an unknown field).
        assert!(
            refused > 1_000,
            "only {refused} corrupted batches were refused"
        );
        assert!(
            fast_accepted > 1_000,
            "fast path accepted only {fast_accepted}"
        );
        assert!(
            fast_left > 100,
            "checked path alone accepted only {fast_left}"
        );
    }

    #[test]
    fn repeated_fields_merge_and_unknown_fields_are_skipped_as_generated() {
        let mut rng = Rng(42);
        let first = host(&mut rng);
        let second = HostSample {
            cpu_pressure: Some(Pressure {
                some_avg10_percent: 9.5,
                ..Pressure::default()
            }),
            disks: vec![DiskIo {
                read_latency_ms: 1e9,
                ..DiskIo::default()
            }],
            ..HostSample::default()
        };
        // One Sample whose host field appears twice (merge), a Pressure appearing twice, and
        // unknown fields at every level (a newer agent).
        let mut host_bytes = first.encode_to_vec();
        host_bytes.extend(
            HostSample {
                memory_pressure: Some(Pressure {
                    full_avg60_percent: 3.0,
                    ..Pressure::default()
                }),
                ..HostSample::default()
            }
            .encode_to_vec(),
        );
        host_bytes.extend([0xF8, 0x06, 0x2A]); // field 111, varint 42
        let mut sample_bytes = Vec::new();
        prost::encoding::encode_key(2, WireType::LengthDelimited, &mut sample_bytes);
        prost::encoding::encode_varint(host_bytes.len() as u64, &mut sample_bytes);
        sample_bytes.extend(&host_bytes);
        sample_bytes.extend(
            ProtoSample {
                observed_at_unix_ms: 7,
                kind: Some(sample::Kind::Host(second)),
            }
            .encode_to_vec(),
        );
        prost::encoding::string::encode(99, &"from the future".to_owned(), &mut sample_bytes);
        let mut batch_bytes = SampleBatch {
            seq: 3,
            ..SampleBatch::default()
        }
        .encode_to_vec();
        prost::encoding::encode_key(2, WireType::LengthDelimited, &mut batch_bytes);
        prost::encoding::encode_varint(sample_bytes.len() as u64, &mut batch_bytes);
        batch_bytes.extend(&sample_bytes);
        prost::encoding::uint64::encode(200, &5, &mut batch_bytes);
        assert!(agree(&batch_bytes));
        let lean = Batch::decode(&Bytes::from(batch_bytes)).map_err(|e| e.to_string());
        let Ok(Batch { samples, .. }) = lean else {
            panic!("does not decode: {lean:?}");
        };
        let Some(Kind::Host(host)) = &samples[0].kind else {
            panic!("not a host sample: {samples:?}");
        };
        assert_eq!(host.values.cpu_psi_some_avg10_percent, 9.5);
        assert_eq!(host.values.disk_read_latency_ms_max, 1e9);
        assert_eq!(host.disks, first.disks.len() + 1);
    }

    /// An unknown field 6 holding groups nested `depth` deep.
    /// `SampleBatch { seq: 3, samples: [Sample { <sample_bytes> }] }`, encoded by hand.
    fn one_sample_batch(sample_bytes: &[u8]) -> Vec<u8> {
        let mut batch_bytes = SampleBatch {
            seq: 3,
            ..SampleBatch::default()
        }
        .encode_to_vec();
        prost::encoding::encode_key(2, WireType::LengthDelimited, &mut batch_bytes);
        prost::encoding::encode_varint(sample_bytes.len() as u64, &mut batch_bytes);
        batch_bytes.extend(sample_bytes);
        batch_bytes
    }

    #[test]
    fn the_fast_path_merges_repeated_fields_as_the_checked_decoder_does() {
        let mut rng = Rng(7);
        let first = host(&mut rng);
        // The Pressure, Filesystem and scalar fields of a host sample appear twice (a
        // HostSample's encoding concatenated with another one's), no unknown field.
        let mut host_bytes = first.encode_to_vec();
        host_bytes.extend(
            HostSample {
                cpu_busy_percent: 12.5,
                memory_pressure: Some(Pressure {
                    full_avg60_percent: 3.0,
                    ..Pressure::default()
                }),
                io_pressure: Some(Pressure {
                    full_avg10_percent: 4.0,
                    ..Pressure::default()
                }),
                chain_data: Some(Filesystem {
                    used_percent: 55.0,
                    ..Filesystem::default()
                }),
                ..HostSample::default()
            }
            .encode_to_vec(),
        );
        let mut sample_bytes = Vec::new();
        prost::encoding::int64::encode(1, &5, &mut sample_bytes);
        prost::encoding::encode_key(2, WireType::LengthDelimited, &mut sample_bytes);
        prost::encoding::encode_varint(host_bytes.len() as u64, &mut sample_bytes);
        sample_bytes.extend(&host_bytes);
        prost::encoding::int64::encode(1, &-9, &mut sample_bytes);
        let batch_bytes = one_sample_batch(&sample_bytes);
        let Some(fast) = fast::batch(&Bytes::from(batch_bytes.clone())) else {
            panic!("the fast path gave up on known fields only");
        };
        assert!(agree(&batch_bytes));
        let Some(Kind::Host(host)) = &fast.samples[0].kind else {
            panic!("not a host sample: {fast:?}");
        };
        assert_eq!(fast.samples[0].observed_at_unix_ms, -9);
        assert_eq!(host.values.cpu_busy_percent, 12.5);
        assert_eq!(host.values.io_psi_full_avg10_percent, 4.0);
        assert_eq!(host.values.chain_data_used_percent, 55.0);
        // The second memory Pressure lacks full_avg10: the first one's value stays.
        assert_eq!(
            host.values.memory_psi_full_avg10_percent,
            first.memory_pressure.unwrap_or_default().full_avg10_percent
        );
    }

    #[test]
    fn edge_encodings_decode_or_fail_alike_on_both_paths() {
        let ten_bytes = |last: u8| {
            let mut v = vec![0x08];
            v.extend([0x80; 9]);
            v.push(last);
            v
        };
        let host_ts = |key: &[u8], value: &[u8]| {
            let mut sample = key.to_vec();
            sample.extend(value);
            one_sample_batch(&sample)
        };
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("10-byte varint, 10th byte 1", ten_bytes(0x01), true),
            ("10-byte varint, 10th byte 2", ten_bytes(0x02), false),
            ("over-long key for seq", vec![0x88, 0x80, 0x00, 0x05], true),
            ("over-long length of a sample", vec![0x12, 0x80, 0x00], true),
            ("truncated varint", vec![0x08, 0x80], false),
            (
                "key above u32::MAX",
                vec![0x88, 0x80, 0x80, 0x80, 0x80, 0x01, 0x00],
                false,
            ),
            ("tag 0", vec![0x00, 0x01], false),
            ("wire type 7", vec![0x0f], false),
            ("empty sample", one_sample_batch(&[]), true),
            (
                "observed_at twice",
                host_ts(&[0x08, 0x01, 0x08], &[0x7f]),
                true,
            ),
            ("observed_at as fixed64", host_ts(&[0x09], &[0; 8]), false),
            ("host as varint", host_ts(&[0x10], &[0x01]), false),
        ];
        for (what, bytes, decodes) in cases {
            assert!(agree(&bytes), "{what}: the decoders disagree");
            let decoded = Batch::decode(&Bytes::from(bytes.clone()));
            assert_eq!(decoded.is_ok(), decodes, "{what}: {decoded:?}");
            if decodes {
                assert!(
                    fast::batch(&Bytes::from(bytes)).is_some(),
                    "{what}: known fields only, yet the fast path gave up"
                );
            }
        }
    }

    fn nested_groups(depth: usize) -> Vec<u8> {
        let mut bytes = vec![0x33];
        bytes.extend(std::iter::repeat_n(0x0B, depth));
        bytes.extend(std::iter::repeat_n(0x0C, depth));
        bytes.push(0x34);
        bytes
    }

    /// `inner` as the body of field `tag` of `outer` (appended).
    fn wrap(tag: u32, inner: &[u8], mut outer: Vec<u8>) -> Vec<u8> {
        prost::encoding::encode_key(tag, WireType::LengthDelimited, &mut outer);
        prost::encoding::encode_varint(inner.len() as u64, &mut outer);
        outer.extend_from_slice(inner);
        outer
    }

    #[test]
    fn unknown_groups_nest_exactly_as_deep_as_the_generated_decoder_allows() {
        let mut refused = 0;
        for depth in 90..=101 {
            let groups = nested_groups(depth);
            let host = |inner: Vec<u8>| wrap(2, &wrap(2, &inner, Vec::new()), Vec::new());
            let cases = [
                // In the batch, in a sample, in a host sample, in its pressure and its disk,
                // and in a chain sample (the generated path).
                groups.clone(),
                wrap(2, &groups, Vec::new()),
                host(groups.clone()),
                host(wrap(11, &groups, Vec::new())),
                host(wrap(15, &groups, Vec::new())),
                wrap(2, &wrap(3, &groups, Vec::new()), Vec::new()),
            ];
            for bytes in cases {
                assert!(agree(&bytes), "depth {depth}");
                let full = SampleBatch::decode(bytes.as_slice());
                refused += usize::from(full.is_err());
                // What the lean path accepts, the stored host sample decodes alone too (the
                // ledger reads it back at start).
                if let Ok(batch) = Batch::decode(&Bytes::from(bytes)) {
                    for sample in &batch.samples {
                        if let Some(Kind::Host(host)) = &sample.kind {
                            assert!(HostSample::decode(host.encoded.clone()).is_ok());
                        }
                    }
                }
            }
        }
        assert!(refused > 0 && refused < 6 * 12, "refused {refused}");
    }

    #[test]
    fn a_string_that_is_not_utf8_is_refused_with_its_field() {
        let host = HostSample {
            disks: vec![DiskIo {
                device: "sda".into(),
                ..DiskIo::default()
            }],
            ..HostSample::default()
        };
        let mut bytes = SampleBatch {
            seq: 1,
            samples: vec![ProtoSample {
                observed_at_unix_ms: 1,
                kind: Some(sample::Kind::Host(host)),
            }],
            spool_dropped_batches_total: 0,
        }
        .encode_to_vec();
        let at = bytes.windows(3).position(|w| w == b"sda").unwrap_or(0);
        bytes[at] = 0xFF;
        assert!(agree(&bytes));
        let error = Batch::decode(&Bytes::from(bytes)).map(|_| ());
        assert_eq!(
            error.map_err(|e| e.to_string()),
            Err("invalid string value: DiskIo.device is not UTF-8 encoded".to_owned())
        );
    }
}
