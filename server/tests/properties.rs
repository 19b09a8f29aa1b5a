//! Property tests of three public seams: the lean batch decoder against prost's generated
//! one, the outbox blob's round trip, and the server's config loading, validation and
//! printing.
//!
//! Each property runs 64 to 512 random cases (see [`cases`]): the whole file takes well
//! under a second in a debug build. The seed is random per run; a failure prints the shrunk
//! input (the decoder properties also print the offending bytes in hex).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use figment::Figment;
use guardian_proto::v1::{
    ChainSample, DiskIo, Filesystem, GpuDevice, GpuProcess, GpuSample, HostSample, KeyFile,
    KeystoreSample, NetIo, Pressure, ReferenceTip, SampleBatch, SamplerUnavailable,
    ValidatorStanding, XidEvent, sample,
};
use guardian_server::batch::{Batch, Host, HostValues, Kind, MAX_SAMPLES_PER_BATCH, Sample};
use guardian_server::config::{ConfigError, ServerConfig};
use guardian_server::store::outbox::blob;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestRunner;
use prost::Message;
use prost::bytes::Bytes;

/// `n` cases: enough to find shape bugs, few enough for a debug run. No regression files:
/// a failure prints its shrunk input.
fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(n)
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies: guardian.v1 messages as agents send them (bounded sizes)
// ---------------------------------------------------------------------------------------------

/// Doubles agents send, and the ones they should not: signed zeros, NaNs of any payload,
/// infinities, subnormals.
fn float() -> BoxedStrategy<f64> {
    prop_oneof![
        3 => (0u32..1_000_000).prop_map(|n| f64::from(n) / 8.0),
        1 => Just(0.0),
        1 => Just(-0.0),
        1 => Just(f64::NAN),
        1 => prop::num::f64::ANY,
        1 => any::<u64>().prop_map(f64::from_bits),
    ]
    .boxed()
}

/// Counters: small, zero, at the top of the range, or anything.
fn count() -> BoxedStrategy<u64> {
    prop_oneof![
        2 => 0u64..1_000_000,
        1 => Just(0u64),
        1 => (0u64..3).prop_map(|d| u64::MAX - d),
        2 => any::<u64>(),
    ]
    .boxed()
}

/// Short strings: empty, ASCII, or any printable Unicode.
fn text() -> BoxedStrategy<String> {
    prop_oneof![
        1 => Just(String::new()),
        2 => "[a-z0-9/._-]{1,10}",
        1 => "\\PC{1,4}",
    ]
    .boxed()
}

fn pressure() -> BoxedStrategy<Pressure> {
    (float(), float(), float(), float(), count())
        .prop_map(|(s10, s60, f10, f60, total)| Pressure {
            some_avg10_percent: s10,
            some_avg60_percent: s60,
            full_avg10_percent: f10,
            full_avg60_percent: f60,
            some_total_microseconds: total,
        })
        .boxed()
}

fn filesystem() -> BoxedStrategy<Filesystem> {
    (text(), count(), count(), float(), count(), count())
        .prop_map(
            |(path, total_bytes, available_bytes, used_percent, inodes_total, inodes_free)| {
                Filesystem {
                    path,
                    total_bytes,
                    available_bytes,
                    used_percent,
                    inodes_total,
                    inodes_free,
                }
            },
        )
        .boxed()
}

fn disk() -> BoxedStrategy<DiskIo> {
    (
        text(),
        float(),
        float(),
        float(),
        float(),
        float(),
        float(),
        float(),
    )
        .prop_map(|(device, r, w, rb, wb, rl, wl, util)| DiskIo {
            device,
            reads_per_second: r,
            writes_per_second: w,
            read_bytes_per_second: rb,
            write_bytes_per_second: wb,
            read_latency_ms: rl,
            write_latency_ms: wl,
            utilisation_percent: util,
        })
        .boxed()
}

fn network() -> BoxedStrategy<NetIo> {
    (
        text(),
        count(),
        count(),
        count(),
        count(),
        count(),
        count(),
        float(),
        float(),
    )
        .prop_map(
            |(interface, rx, tx, rx_err, tx_err, rx_drop, tx_drop, rx_s, tx_s)| NetIo {
                interface,
                rx_bytes_total: rx,
                tx_bytes_total: tx,
                rx_errors_total: rx_err,
                tx_errors_total: tx_err,
                rx_dropped_total: rx_drop,
                tx_dropped_total: tx_drop,
                rx_bytes_per_second: rx_s,
                tx_bytes_per_second: tx_s,
            },
        )
        .boxed()
}

fn host() -> BoxedStrategy<HostSample> {
    let scalars = (
        float(),
        float(),
        any::<u32>(),
        count(),
        count(),
        count(),
        count(),
        float(),
        float(),
        float(),
    );
    let parts = (
        prop::option::of(pressure()),
        prop::option::of(pressure()),
        prop::option::of(pressure()),
        prop::option::of(filesystem()),
        vec(disk(), 0..4),
        vec(network(), 0..3),
        count(),
        count(),
    );
    (scalars, parts)
        .prop_map(
            |(
                (busy, iowait, cpus, mem_total, mem_avail, swap_total, swap_free, l1, l5, l15),
                (cpu_p, mem_p, io_p, chain_data, disks, networks, ooms, uptime),
            )| HostSample {
                cpu_busy_percent: busy,
                cpu_iowait_percent: iowait,
                cpu_count: cpus,
                mem_total_bytes: mem_total,
                mem_available_bytes: mem_avail,
                swap_total_bytes: swap_total,
                swap_free_bytes: swap_free,
                load_avg_1m: l1,
                load_avg_5m: l5,
                load_avg_15m: l15,
                cpu_pressure: cpu_p,
                memory_pressure: mem_p,
                io_pressure: io_p,
                chain_data,
                disks,
                networks,
                oom_kills_total: ooms,
                uptime_seconds: uptime,
            },
        )
        .boxed()
}

fn reference() -> BoxedStrategy<ReferenceTip> {
    (text(), any::<bool>(), count(), text())
        .prop_map(|(endpoint, responsive, best_block, error)| ReferenceTip {
            endpoint,
            responsive,
            best_block,
            error,
        })
        .boxed()
}

fn standing() -> BoxedStrategy<ValidatorStanding> {
    (
        (
            text(),
            any::<u32>(),
            any::<bool>(),
            any::<u32>(),
            count(),
            count(),
            any::<bool>(),
            any::<u32>(),
        ),
        (
            float(),
            count(),
            any::<bool>(),
            count(),
            any::<u32>(),
            any::<u32>(),
            count(),
        ),
    )
        .prop_map(
            |(
                (hotkey, netuid, registered, uid, last_update, since, permit, trust_raw),
                (trust, emission, active, rate_limit, cutoff, tempo, read_at),
            )| ValidatorStanding {
                hotkey_ss58: hotkey,
                netuid,
                registered,
                uid,
                last_update_block: last_update,
                blocks_since_last_update: since,
                validator_permit: permit,
                validator_trust_raw: trust_raw,
                validator_trust_ratio: trust,
                emission_rao: emission,
                active,
                weights_set_rate_limit_blocks: rate_limit,
                activity_cutoff_blocks: cutoff,
                tempo_blocks: tempo,
                read_at_block: read_at,
            },
        )
        .boxed()
}

fn chain() -> BoxedStrategy<ChainSample> {
    (
        (
            text(),
            any::<bool>(),
            text(),
            count(),
            count(),
            count(),
            count(),
            count(),
            any::<u32>(),
            any::<bool>(),
        ),
        (
            any::<bool>(),
            count(),
            any::<bool>(),
            float(),
            any::<u32>(),
            any::<u32>(),
            vec(reference(), 0..3),
            prop::option::of(standing()),
            count(),
        ),
    )
        .prop_map(
            |(
                (
                    endpoint,
                    responsive,
                    error,
                    best,
                    finalized,
                    current,
                    highest,
                    starting,
                    peers,
                    syncing,
                ),
                (
                    should_peer,
                    head_age,
                    subscribed,
                    latency,
                    spec,
                    tx,
                    references,
                    standing,
                    reconnects,
                ),
            )| ChainSample {
                endpoint,
                responsive,
                error,
                best_block: best,
                finalized_block: finalized,
                sync_current_block: current,
                sync_highest_block: highest,
                sync_starting_block: starting,
                peers,
                is_syncing: syncing,
                should_have_peers: should_peer,
                head_age_ms: head_age,
                head_subscribed: subscribed,
                rpc_latency_ms: latency,
                spec_version: spec,
                transaction_version: tx,
                references,
                standing,
                reconnects_total: reconnects,
            },
        )
        .boxed()
}

fn gpu_device() -> BoxedStrategy<GpuDevice> {
    (
        (
            any::<u32>(),
            text(),
            text(),
            float(),
            float(),
            count(),
            count(),
            float(),
            float(),
            float(),
        ),
        (
            any::<u32>(),
            count(),
            vec(text(), 0..3),
            count(),
            count(),
            count(),
            vec(
                (count(), any::<i64>()).prop_map(|(xid, at)| XidEvent {
                    xid,
                    observed_at_unix_ms: at,
                }),
                0..3,
            ),
            vec(
                (any::<u32>(), count()).prop_map(|(pid, used)| GpuProcess {
                    pid,
                    used_memory_bytes: used,
                }),
                0..3,
            ),
            vec(text(), 0..3),
        ),
    )
        .prop_map(
            |(
                (index, uuid, name, util, util_mem, mem_used, mem_total, temp, power, limit),
                (sm, throttle, reasons, ecc_c, ecc_u, replay, xid_events, processes, unsupported),
            )| GpuDevice {
                index,
                uuid,
                name,
                utilisation_gpu_percent: util,
                utilisation_memory_percent: util_mem,
                memory_used_bytes: mem_used,
                memory_total_bytes: mem_total,
                temperature_celsius: temp,
                power_draw_watts: power,
                power_limit_watts: limit,
                sm_clock_mhz: sm,
                throttle_reasons_bitmask: throttle,
                throttle_reasons: reasons,
                ecc_corrected_total: ecc_c,
                ecc_uncorrected_total: ecc_u,
                pcie_replay_total: replay,
                xid_events,
                processes,
                unsupported_fields: unsupported,
            },
        )
        .boxed()
}

fn gpu() -> BoxedStrategy<GpuSample> {
    (any::<bool>(), text(), text(), vec(gpu_device(), 0..3))
        .prop_map(
            |(available, unavailable_reason, driver_version, devices)| GpuSample {
                available,
                unavailable_reason,
                driver_version,
                devices,
            },
        )
        .boxed()
}

fn key_file() -> BoxedStrategy<KeyFile> {
    (
        text(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        count(),
        text(),
        text(),
        any::<i64>(),
    )
        .prop_map(
            |(name, mode, uid, gid, size, sha, ss58, modified)| KeyFile {
                name,
                mode,
                uid,
                gid,
                size_bytes: size,
                sha256_fingerprint: sha,
                ss58_address: ss58,
                modified_unix_ms: modified,
            },
        )
        .boxed()
}

fn keystore() -> BoxedStrategy<KeystoreSample> {
    (
        (
            text(),
            any::<bool>(),
            text(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            vec(key_file(), 0..3),
            any::<u32>(),
            count(),
            any::<bool>(),
            count(),
        ),
    )
        .prop_map(
            |(
                (path, present, fs_type, tmpfs, nodev, nosuid, noexec, read_only),
                (dir_mode, dir_uid, dir_gid, files, file_count, total, swap, swap_total),
            )| KeystoreSample {
                path,
                present,
                filesystem_type: fs_type,
                on_tmpfs: tmpfs,
                mount_nodev: nodev,
                mount_nosuid: nosuid,
                mount_noexec: noexec,
                mount_read_only: read_only,
                dir_mode,
                dir_uid,
                dir_gid,
                files,
                file_count,
                total_bytes: total,
                swap_active: swap,
                swap_total_bytes: swap_total,
            },
        )
        .boxed()
}

fn unavailable() -> BoxedStrategy<SamplerUnavailable> {
    (text(), text())
        .prop_map(|(sampler, reason)| SamplerUnavailable { sampler, reason })
        .boxed()
}

/// A sample's kind: mostly host samples, as in a real batch; sometimes none at all.
fn proto_kind() -> BoxedStrategy<Option<sample::Kind>> {
    prop::option::weighted(
        0.9,
        prop_oneof![
            4 => host().prop_map(sample::Kind::Host),
            1 => chain().prop_map(sample::Kind::Chain),
            1 => gpu().prop_map(sample::Kind::Gpu),
            1 => keystore().prop_map(sample::Kind::Keystore),
            1 => unavailable().prop_map(sample::Kind::Unavailable),
        ],
    )
    .boxed()
}

/// A `SampleBatch` of at most 7 samples (far below [`MAX_SAMPLES_PER_BATCH`]).
fn proto_batch() -> BoxedStrategy<SampleBatch> {
    let sample = (any::<i64>(), proto_kind()).prop_map(|(observed_at_unix_ms, kind)| {
        guardian_proto::v1::Sample {
            observed_at_unix_ms,
            kind,
        }
    });
    (count(), vec(sample, 0..8), count())
        .prop_map(|(seq, samples, spool_dropped_batches_total)| SampleBatch {
            seq,
            samples,
            spool_dropped_batches_total,
        })
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Strategies: raw protobuf, and corruptions of valid encodings
// ---------------------------------------------------------------------------------------------

/// One protobuf field of any wire type, possibly a nested message or group. Tags are mostly
/// the small numbers every guardian.v1 message uses, so nested fields land on real ones
/// (with the right or a wrong wire type), sometimes on unknown ones.
#[derive(Debug, Clone)]
enum Field {
    Varint(u32, u64),
    Fixed64(u32, u64),
    Fixed32(u32, u32),
    Bytes(u32, Vec<u8>),
    Message(u32, Vec<Field>),
    Group(u32, Vec<Field>),
}

fn tag() -> impl Strategy<Value = u32> {
    prop_oneof![
        6 => 1u32..=5,
        3 => 1u32..=19,
        1 => 20u32..(1 << 29),
    ]
}

fn fields() -> BoxedStrategy<Vec<Field>> {
    let payload = prop_oneof![
        "[a-z]{0,6}".prop_map(String::into_bytes),
        vec(any::<u8>(), 0..6),
    ];
    let leaf = prop_oneof![
        (tag(), count()).prop_map(|(t, v)| Field::Varint(t, v)),
        (tag(), any::<u64>()).prop_map(|(t, v)| Field::Fixed64(t, v)),
        (tag(), any::<u32>()).prop_map(|(t, v)| Field::Fixed32(t, v)),
        (tag(), payload).prop_map(|(t, v)| Field::Bytes(t, v)),
    ];
    let field = leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            2 => inner.clone(),
            2 => (tag(), vec(inner.clone(), 0..6)).prop_map(|(t, f)| Field::Message(t, f)),
            1 => (tag(), vec(inner, 0..3)).prop_map(|(t, f)| Field::Group(t, f)),
        ]
    });
    vec(field, 0..8).boxed()
}

fn key(tag: u32, wire_type: u64, out: &mut Vec<u8>) {
    prost::encoding::encode_varint((u64::from(tag) << 3) | wire_type, out);
}

fn encode_fields(fields: &[Field], out: &mut Vec<u8>) {
    for field in fields {
        match field {
            Field::Varint(t, v) => {
                key(*t, 0, out);
                prost::encoding::encode_varint(*v, out);
            }
            Field::Fixed64(t, v) => {
                key(*t, 1, out);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Field::Fixed32(t, v) => {
                key(*t, 5, out);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Field::Bytes(t, v) => {
                key(*t, 2, out);
                prost::encoding::encode_varint(v.len() as u64, out);
                out.extend_from_slice(v);
            }
            Field::Message(t, inner) => {
                let mut body = Vec::new();
                encode_fields(inner, &mut body);
                key(*t, 2, out);
                prost::encoding::encode_varint(body.len() as u64, out);
                out.extend_from_slice(&body);
            }
            Field::Group(t, inner) => {
                key(*t, 3, out);
                encode_fields(inner, out);
                key(*t, 4, out);
            }
        }
    }
}

/// One corruption of an encoding.
#[derive(Debug, Clone)]
enum Mutation {
    /// Cut it short at this position.
    Truncate(Index),
    /// Flip this bit of this byte.
    Flip(Index, u8),
    /// Insert this byte here.
    Insert(Index, u8),
    /// Append another batch's encoding (protobuf merges the two).
    Append(SampleBatch),
}

fn mutation() -> BoxedStrategy<Mutation> {
    prop_oneof![
        2 => any::<Index>().prop_map(Mutation::Truncate),
        3 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip(at, bit)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert(at, byte)),
        1 => proto_batch().prop_map(Mutation::Append),
    ]
    .boxed()
}

fn mutate(bytes: &mut Vec<u8>, mutation: &Mutation) {
    match mutation {
        Mutation::Truncate(at) if !bytes.is_empty() => bytes.truncate(at.index(bytes.len())),
        Mutation::Flip(at, bit) if !bytes.is_empty() => {
            let at = at.index(bytes.len());
            bytes[at] ^= 1 << bit;
        }
        Mutation::Insert(at, byte) => {
            let at = at.index(bytes.len() + 1);
            bytes.insert(at, *byte);
        }
        Mutation::Append(other) => bytes.extend(other.encode_to_vec()),
        Mutation::Truncate(_) | Mutation::Flip(..) => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Comparing the decoders
// ---------------------------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// What both decoders made of `bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Accepted,
    Refused,
}

/// Both decoders refuse `bytes`, or both accept it with the same content: the same batch
/// (compared through its canonical encoding, so NaNs compare bit for bit) and, for each
/// host sample, [`Host::values`] equal to [`HostValues::of`] of the generated decoder's
/// sample and the same disk and interface counts.
fn decoders_agree(bytes: &[u8]) -> Result<Verdict, TestCaseError> {
    let lean = Batch::decode(&Bytes::copy_from_slice(bytes));
    let full = SampleBatch::decode(bytes);
    let (lean, full) = match (lean, full) {
        (Err(_), Err(_)) => return Ok(Verdict::Refused),
        (Ok(lean), Ok(full)) => (lean, full),
        (lean, full) => {
            return Err(TestCaseError::fail(format!(
                "the decoders disagree on {}: lean {:?}, generated {:?}",
                hex(bytes),
                lean.map(|b| b.len()),
                full.map(|b| b.samples.len()),
            )));
        }
    };
    prop_assert_eq!(
        hex(&lean.to_proto().encode_to_vec()),
        hex(&full.encode_to_vec()),
        "different batches from {}",
        hex(bytes)
    );
    prop_assert_eq!(lean.samples.len(), full.samples.len());
    for (l, f) in lean.samples.iter().zip(&full.samples) {
        prop_assert_eq!(l.observed_at_unix_ms, f.observed_at_unix_ms);
        match (&l.kind, &f.kind) {
            (Some(Kind::Host(l)), Some(sample::Kind::Host(f))) => {
                // Debug, not ==: NaN is NaN whichever payload a sum produced, and Debug
                // tells -0.0 from 0.0.
                prop_assert_eq!(
                    format!("{:?}", l.values),
                    format!("{:?}", HostValues::of(f)),
                    "host values differ, from {}",
                    hex(bytes)
                );
                prop_assert_eq!(l.disks, f.disks.len());
                prop_assert_eq!(l.networks, f.networks.len());
            }
            (Some(Kind::Host(_)), other) | (_, other @ Some(sample::Kind::Host(_))) => {
                return Err(TestCaseError::fail(format!(
                    "a host sample on one side only ({other:?}), from {}",
                    hex(bytes)
                )));
            }
            _ => {}
        }
    }
    Ok(Verdict::Accepted)
}

/// Runs `check` on `n` cases of `strategy` and returns how many were accepted and refused.
fn tally<S: Strategy>(
    n: u32,
    strategy: S,
    check: impl Fn(S::Value) -> Result<Verdict, TestCaseError>,
) -> (usize, usize) {
    let accepted = std::cell::Cell::new(0);
    let refused = std::cell::Cell::new(0);
    let mut runner = TestRunner::new(cases(n));
    let result = runner.run(&strategy, |value| {
        match check(value)? {
            Verdict::Accepted => accepted.set(accepted.get() + 1),
            Verdict::Refused => refused.set(refused.get() + 1),
        }
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    (accepted.get(), refused.get())
}

proptest! {
    #![proptest_config(cases(256))]

    /// Every batch an agent can encode decodes, to the values it held, on both decoders.
    #[test]
    fn every_encoded_batch_decodes_alike_on_both_decoders(batch in proto_batch()) {
        prop_assert!(batch.samples.len() < MAX_SAMPLES_PER_BATCH);
        let encoded = batch.encode_to_vec();
        prop_assert_eq!(decoders_agree(&encoded)?, Verdict::Accepted);
        let lean = Batch::decode(&Bytes::from(encoded.clone()));
        let lean = lean.map_err(|e| TestCaseError::fail(e.to_string()))?;
        // prost's encoding is canonical: the decoded batch encodes to the same bytes, so it
        // holds what the agent sent (less -0.0, which protobuf does not carry).
        prop_assert_eq!(hex(&lean.to_proto().encode_to_vec()), hex(&encoded));
    }
}

#[test]
fn arbitrary_bytes_are_accepted_or_refused_alike_by_both_decoders() {
    // Uniform bytes, and bytes drawn from keys and lengths of the batch's own fields (2 % of
    // uniform strings decode; of the second kind, far more).
    let keyish = prop::sample::select(vec![0x00, 0x01, 0x02, 0x05, 0x08, 0x10, 0x12, 0x18, 0x80]);
    let bytes = prop_oneof![vec(any::<u8>(), 0..64), vec(keyish, 0..12)];
    let (accepted, refused) = tally(512, bytes, |bytes| decoders_agree(&bytes));
    assert!(refused > 0, "no random bytes were refused");
    assert!(accepted > 0, "no random bytes were accepted");
}

#[test]
fn arbitrary_protobuf_fields_are_accepted_or_refused_alike_by_both_decoders() {
    let (accepted, refused) = tally(256, fields(), |fields| {
        let mut bytes = Vec::new();
        encode_fields(&fields, &mut bytes);
        decoders_agree(&bytes)
    });
    assert!(refused > 0, "no field soup was refused");
    assert!(accepted > 0, "no field soup was accepted");
}

#[test]
fn corrupted_batches_are_accepted_or_refused_alike_by_both_decoders() {
    let corrupted = (proto_batch(), vec(mutation(), 1..4));
    let (accepted, refused) = tally(256, corrupted, |(batch, mutations)| {
        let mut bytes = batch.encode_to_vec();
        for mutation in &mutations {
            mutate(&mut bytes, mutation);
        }
        decoders_agree(&bytes)
    });
    assert!(refused > 0, "no corrupted batch was refused");
    assert!(accepted > 0, "no corrupted batch was accepted");
}

// ---------------------------------------------------------------------------------------------
// The outbox blob
// ---------------------------------------------------------------------------------------------

/// Host values of any bits (NaNs with payloads, infinities, all of u64).
fn host_values() -> BoxedStrategy<HostValues> {
    let f = || any::<u64>().prop_map(f64::from_bits);
    (
        (
            f(),
            f(),
            any::<u64>(),
            any::<u64>(),
            f(),
            f(),
            f(),
            f(),
            f(),
        ),
        (
            any::<u64>(),
            f(),
            f(),
            f(),
            f(),
            f(),
            any::<u64>(),
            any::<u64>(),
        ),
    )
        .prop_map(
            |((busy, iowait, mem_total, mem_avail, load, cpu_psi, mem_psi, io_psi, used), tail)| {
                let (avail, read_lat, write_lat, util, rx, tx, net_errors, ooms) = tail;
                HostValues {
                    cpu_busy_percent: busy,
                    cpu_iowait_percent: iowait,
                    mem_total_bytes: mem_total,
                    mem_available_bytes: mem_avail,
                    load_avg_1m: load,
                    cpu_psi_some_avg10_percent: cpu_psi,
                    memory_psi_full_avg10_percent: mem_psi,
                    io_psi_full_avg10_percent: io_psi,
                    chain_data_used_percent: used,
                    chain_data_available_bytes: avail,
                    disk_read_latency_ms_max: read_lat,
                    disk_write_latency_ms_max: write_lat,
                    disk_utilisation_percent_max: util,
                    net_rx_bytes_per_second: rx,
                    net_tx_bytes_per_second: tx,
                    net_errors_total: net_errors,
                    oom_kills_total: ooms,
                }
            },
        )
        .boxed()
}

/// A batch as the ledger hands it to the outbox: decoded from an agent's encoding, or built
/// with host values of any bits and disk/interface counts up to `u32::MAX`.
fn ledger_batch() -> BoxedStrategy<Batch> {
    let kind = prop_oneof![
        2 => (host_values(), any::<u32>(), any::<u32>()).prop_map(|(values, disks, networks)| {
            Kind::Host(Host {
                values,
                disks: disks as usize,
                networks: networks as usize,
                encoded: Bytes::new(),
            })
        }),
        1 => chain().prop_map(|c| Kind::Chain(Box::new(c))),
        1 => gpu().prop_map(|g| Kind::Gpu(Box::new(g))),
        1 => keystore().prop_map(|k| Kind::Keystore(Box::new(k))),
        1 => unavailable().prop_map(|u| Kind::Unavailable(Box::new(u))),
    ];
    let sample = (any::<i64>(), prop::option::weighted(0.9, kind)).prop_map(
        |(observed_at_unix_ms, kind)| Sample {
            observed_at_unix_ms,
            kind,
        },
    );
    let built = (count(), vec(sample, 0..8), count()).prop_map(
        |(seq, samples, spool_dropped_batches_total)| Batch {
            seq,
            spool_dropped_batches_total,
            samples,
        },
    );
    prop_oneof![proto_batch().prop_map(|proto| Batch::from(&proto)), built,].boxed()
}

fn host_words(values: &HostValues) -> String {
    let mut words = Vec::new();
    blob::put_host_words(&mut words, values);
    hex(&words)
}

fn kind_name(kind: Option<&Kind>) -> &'static str {
    match kind {
        None => "none",
        Some(Kind::Host(_)) => "host",
        Some(Kind::Chain(_)) => "chain",
        Some(Kind::Gpu(_)) => "gpu",
        Some(Kind::Keystore(_)) => "keystore",
        Some(Kind::Unavailable(_)) => "unavailable",
    }
}

/// `back` is `batch` as the blob module documents its round trip: equal, except that host
/// samples carry no encoded bytes; host values compare bit for bit (NaN payloads included),
/// other kinds through their canonical protobuf encoding.
fn same_as_stored(batch: &Batch, back: &Batch) -> Result<(), TestCaseError> {
    prop_assert_eq!(back.seq, batch.seq);
    prop_assert_eq!(
        back.spool_dropped_batches_total,
        batch.spool_dropped_batches_total
    );
    prop_assert_eq!(back.samples.len(), batch.samples.len());
    for (sent, got) in batch.samples.iter().zip(&back.samples) {
        prop_assert_eq!(got.observed_at_unix_ms, sent.observed_at_unix_ms);
        prop_assert_eq!(kind_name(got.kind.as_ref()), kind_name(sent.kind.as_ref()));
        match (&sent.kind, &got.kind) {
            (Some(Kind::Host(sent)), Some(Kind::Host(got))) => {
                prop_assert_eq!(host_words(&got.values), host_words(&sent.values));
                prop_assert_eq!(got.disks, sent.disks);
                prop_assert_eq!(got.networks, sent.networks);
                prop_assert!(got.encoded.is_empty(), "host bytes kept in the blob");
            }
            _ => prop_assert_eq!(
                hex(&got.to_proto().encode_to_vec()),
                hex(&sent.to_proto().encode_to_vec())
            ),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(128))]

    /// `decode(encode(b))` is `b` less the host samples' encoded bytes, and encoding it
    /// again gives the same blob.
    #[test]
    fn an_outbox_blob_decodes_to_the_batch_it_was_encoded_from(batch in ledger_batch()) {
        let encoded = blob::encode(&batch);
        prop_assert!(blob::is_compact(&encoded));
        let back = blob::decode(&encoded).map_err(|e| TestCaseError::fail(e.to_string()))?;
        same_as_stored(&batch, &back)?;
        prop_assert_eq!(hex(&blob::encode(&back)), hex(&encoded));
    }

    /// A blob cut short anywhere (at least its first byte left: an empty row is an agent's
    /// empty batch), or with a byte too many, is an error, never a short batch.
    #[test]
    fn a_truncated_or_overlong_outbox_blob_is_an_error(
        batch in ledger_batch(),
        cut in any::<Index>(),
        extra in any::<u8>(),
    ) {
        let encoded = blob::encode(&batch);
        let short = encoded.slice(..1 + cut.index(encoded.len() - 1));
        prop_assert!(blob::decode(&short).is_err(), "a {}-byte prefix decoded", short.len());
        let mut long = encoded.to_vec();
        long.push(extra);
        prop_assert!(blob::decode(&Bytes::from(long)).is_err(), "a trailing byte decoded");
    }

    /// Any corruption of a blob decodes or fails without panicking; what decodes is a batch
    /// the blob round trip keeps (a flipped bit in an embedded message may leave protobuf
    /// that is valid but not canonical, so the bytes need not come back).
    #[test]
    fn a_corrupted_outbox_blob_never_panics(
        batch in ledger_batch(),
        flips in vec((any::<Index>(), 0u8..8), 1..4),
    ) {
        let mut bytes = blob::encode(&batch).to_vec();
        for (at, bit) in &flips {
            let at = at.index(bytes.len());
            bytes[at] ^= 1 << bit;
        }
        if let Ok(back) = blob::decode(&Bytes::from(bytes)) {
            let again = blob::decode(&blob::encode(&back));
            let again = again.map_err(|e| TestCaseError::fail(e.to_string()))?;
            same_as_stored(&back, &again)?;
        }
    }

    /// Outbox rows written before the compact format (an agent's encoding) still decode, as
    /// `Batch::decode` decodes them.
    #[test]
    fn an_agent_encoded_outbox_row_decodes_as_the_batch_decoder_does(batch in proto_batch()) {
        let encoded = Bytes::from(batch.encode_to_vec());
        prop_assert!(!blob::is_compact(&encoded));
        let row = blob::decode(&encoded).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let lean = Batch::decode(&encoded).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(format!("{row:?}"), format!("{lean:?}"));
    }
}

// ---------------------------------------------------------------------------------------------
// Server configuration
// ---------------------------------------------------------------------------------------------

/// The integer fields the config properties vary: dotted path, largest value of the field's
/// type, and the documented valid range (`validate()`'s messages and fixes).
struct IntField {
    path: &'static str,
    type_max: u64,
    valid: std::ops::RangeInclusive<u64>,
    /// A value outside `valid` that is accepted too (0 = "off" or "one per core").
    also: Option<u64>,
}

const U32: u64 = u32::MAX as u64;
const USIZE: u64 = usize::MAX as u64;

const INT_FIELDS: [IntField; 14] = [
    IntField {
        path: "max_frame_bytes",
        type_max: USIZE,
        valid: 1024..=64 * 1024 * 1024,
        also: None,
    },
    IntField {
        path: "worker_threads",
        type_max: USIZE,
        valid: 0..=1024,
        also: None,
    },
    IntField {
        path: "sample_interval_ms",
        type_max: U32,
        valid: 100..=3_600_000,
        also: Some(0),
    },
    IntField {
        path: "hello_timeout_ms",
        type_max: u64::MAX,
        valid: 100..=300_000,
        also: None,
    },
    IntField {
        path: "outbox_max_bytes",
        type_max: u64::MAX,
        valid: (1 << 20)..=u64::MAX,
        also: None,
    },
    IntField {
        path: "window_seconds",
        type_max: U32,
        valid: 60..=86_400,
        also: None,
    },
    IntField {
        path: "embedded_retention_days",
        type_max: U32,
        valid: 0..=36_500,
        also: None,
    },
    IntField {
        path: "connections.max_connections",
        type_max: USIZE,
        valid: 1..=USIZE,
        also: None,
    },
    // Also at most max_connections (checked in `out_of_range`).
    IntField {
        path: "connections.max_pending_handshakes",
        type_max: USIZE,
        valid: 1..=USIZE,
        also: None,
    },
    IntField {
        path: "connections.tls_handshake_timeout_ms",
        type_max: u64::MAX,
        valid: 100..=120_000,
        also: None,
    },
    IntField {
        path: "connections.tcp_keepalive_seconds",
        type_max: u64::MAX,
        valid: 1..=7_200,
        also: None,
    },
    IntField {
        path: "connections.max_streams_per_connection",
        type_max: U32,
        valid: 1..=U32,
        also: None,
    },
    IntField {
        path: "connections.max_pending_reset_streams",
        type_max: USIZE,
        valid: 0..=USIZE,
        also: None,
    },
    IntField {
        path: "connections.request_timeout_ms",
        type_max: u64::MAX,
        valid: 1_000..=3_600_000,
        also: None,
    },
];

const SHARE: &str = "detect.fleet_degraded_share";

/// Sets field `path` of `config` (values are within the field's type).
fn set(config: &mut ServerConfig, path: &str, value: u64) {
    let size = usize::try_from(value).unwrap_or(usize::MAX);
    let small = u32::try_from(value).unwrap_or(u32::MAX);
    let limits = &mut config.connections;
    match path {
        "max_frame_bytes" => config.max_frame_bytes = size,
        "worker_threads" => config.worker_threads = size,
        "sample_interval_ms" => config.sample_interval_ms = small,
        "hello_timeout_ms" => config.hello_timeout_ms = value,
        "outbox_max_bytes" => config.outbox_max_bytes = value,
        "window_seconds" => config.window_seconds = small,
        "embedded_retention_days" => config.embedded_retention_days = small,
        "connections.max_connections" => limits.max_connections = size,
        "connections.max_pending_handshakes" => limits.max_pending_handshakes = size,
        "connections.tls_handshake_timeout_ms" => limits.tls_handshake_timeout_ms = value,
        "connections.tcp_keepalive_seconds" => limits.tcp_keepalive_seconds = value,
        "connections.max_streams_per_connection" => limits.max_streams_per_connection = small,
        "connections.max_pending_reset_streams" => limits.max_pending_reset_streams = size,
        "connections.request_timeout_ms" => limits.request_timeout_ms = value,
        other => panic!("no such field {other}"),
    }
}

fn get(config: &ServerConfig, path: &str) -> u64 {
    let limits = &config.connections;
    let size = |n: usize| n as u64;
    match path {
        "max_frame_bytes" => size(config.max_frame_bytes),
        "worker_threads" => size(config.worker_threads),
        "sample_interval_ms" => u64::from(config.sample_interval_ms),
        "hello_timeout_ms" => config.hello_timeout_ms,
        "outbox_max_bytes" => config.outbox_max_bytes,
        "window_seconds" => u64::from(config.window_seconds),
        "embedded_retention_days" => u64::from(config.embedded_retention_days),
        "connections.max_connections" => size(limits.max_connections),
        "connections.max_pending_handshakes" => size(limits.max_pending_handshakes),
        "connections.tls_handshake_timeout_ms" => limits.tls_handshake_timeout_ms,
        "connections.tcp_keepalive_seconds" => limits.tcp_keepalive_seconds,
        "connections.max_streams_per_connection" => u64::from(limits.max_streams_per_connection),
        "connections.max_pending_reset_streams" => size(limits.max_pending_reset_streams),
        "connections.request_timeout_ms" => limits.request_timeout_ms,
        other => panic!("no such field {other}"),
    }
}

/// The varied fields of `config` that are outside their documented range.
fn out_of_range(config: &ServerConfig) -> Vec<&'static str> {
    let mut bad: Vec<&'static str> = INT_FIELDS
        .iter()
        .filter(|f| {
            let value = get(config, f.path);
            !f.valid.contains(&value) && f.also != Some(value)
        })
        .map(|f| f.path)
        .collect();
    let limits = &config.connections;
    if limits.max_pending_handshakes > limits.max_connections {
        bad.push("connections.max_pending_handshakes");
    }
    let share = config.detect.fleet_degraded_share;
    if !(share > 0.0 && share <= 1.0) {
        bad.push(SHARE);
    }
    bad
}

/// A value for `field`: nearly always in its documented range (small values, any, or a
/// bound), so that a good share of configs is valid as a whole; else near a bound of the
/// range (either side) or anywhere in the field's type. At most `top`.
fn int_value(field: &IntField, top: u64) -> BoxedStrategy<u64> {
    let type_max = field.type_max.min(top);
    let (lo, hi) = (*field.valid.start(), (*field.valid.end()).min(type_max));
    let bounds: Vec<u64> = [lo, hi].into_iter().chain(field.also).collect();
    let valid = prop_oneof![
        2 => lo..=lo.saturating_add(100_000).min(hi),
        1 => lo..=hi,
        1 => prop::sample::select(bounds),
    ];
    let edges: Vec<u64> = [lo, hi]
        .into_iter()
        .flat_map(|e| [e.saturating_sub(1), e, e.saturating_add(1).min(type_max)])
        .collect();
    let any = prop_oneof![prop::sample::select(edges), 0..=type_max];
    prop_oneof![12 => valid, 1 => any].boxed()
}

/// `detect.fleet_degraded_share`: nearly always in (0, 1], else 0 or any double.
fn share() -> impl Strategy<Value = f64> {
    prop_oneof![
        10 => (1u32..=1000).prop_map(|n| f64::from(n) / 1000.0),
        2 => Just(1.0),
        1 => Just(0.0),
        1 => prop::num::f64::ANY,
    ]
}

/// PEM files `validate()` accepts, so that only the varied fields decide.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n";
        let key = "-----BEGIN PRIVATE KEY-----\nMA==\n-----END PRIVATE KEY-----\n";
        for (name, text) in [("ca.pem", cert), ("server.pem", cert), ("key.pem", key)] {
            std::fs::write(dir.path().join(name), text).expect("write PEM");
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The default config, pointed at these files.
    fn config(&self) -> ServerConfig {
        let mut config = ServerConfig::default();
        config.tls.ca_file = self.path("ca.pem");
        config.tls.cert_file = self.path("server.pem");
        config.tls.key_file = self.path("key.pem");
        config
    }
}

/// Values of every varied field (integers up to `top`) and the share.
fn config_values(top: u64) -> impl Strategy<Value = (Vec<u64>, f64)> {
    let ints: Vec<BoxedStrategy<u64>> = INT_FIELDS.iter().map(|f| int_value(f, top)).collect();
    (ints, share())
}

fn build(pki: &Pki, ints: &[u64], share: f64) -> ServerConfig {
    let mut config = pki.config();
    for (field, value) in INT_FIELDS.iter().zip(ints) {
        set(&mut config, field.path, *value);
    }
    config.detect.fleet_degraded_share = share;
    config
}

fn load(text: &str, dir: &Path) -> Result<ServerConfig, ConfigError> {
    let file = dir.join("guardian-server.toml");
    std::fs::write(&file, text).expect("write config");
    ServerConfig::load(Some(&file), Figment::new())
}

/// A TOML value as an operator might type it: the right type, or not.
#[derive(Debug, Clone)]
enum Raw {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
}

impl Raw {
    fn toml(&self) -> String {
        match self {
            Raw::Int(n) => toml::Value::Integer(*n).to_string(),
            Raw::Float(f) => toml::Value::Float(*f).to_string(),
            Raw::Str(s) => toml::Value::String(s.clone()).to_string(),
            Raw::Bool(b) => toml::Value::Boolean(*b).to_string(),
        }
    }
}

/// A raw value for `field`: mostly a valid-looking integer, else a negative number, one
/// too large for the type, a float, a string or a boolean.
fn raw_int(field: &IntField) -> impl Strategy<Value = Option<Raw>> {
    let fits = int_value(field, i64::MAX as u64).prop_map(|n| Raw::Int(n as i64));
    let too_large = (field.type_max.min(i64::MAX as u64 - 1) + 1..=i64::MAX as u64)
        .prop_map(|n| Raw::Int(n as i64));
    let wrong = prop_oneof![
        (i64::MIN..0).prop_map(Raw::Int),
        too_large,
        float().prop_map(Raw::Float),
        "[a-z0-9]{0,5}".prop_map(Raw::Str),
        any::<bool>().prop_map(Raw::Bool),
    ];
    prop::option::weighted(0.8, prop_oneof![14 => fits, 1 => wrong])
}

fn raw_share() -> impl Strategy<Value = Option<Raw>> {
    let value = prop_oneof![
        12 => share().prop_map(Raw::Float),
        2 => (-3i64..3).prop_map(Raw::Int),
        1 => "[a-z0-9.]{0,5}".prop_map(Raw::Str),
        1 => any::<bool>().prop_map(Raw::Bool),
    ];
    prop::option::weighted(0.8, value)
}

/// The config file for `raws` (one per [`INT_FIELDS`] entry, then the share; None: not
/// written), with the TLS files of `pki`.
fn config_file(pki: &Pki, raws: &[Option<Raw>]) -> String {
    let mut sections: Vec<(&str, String)> = vec![("", String::new())];
    let paths = INT_FIELDS.iter().map(|f| f.path).chain([SHARE]);
    for (path, raw) in paths.zip(raws) {
        let Some(raw) = raw else { continue };
        let (section, key) = path.rsplit_once('.').unwrap_or(("", path));
        let line = format!("{key} = {}\n", raw.toml());
        match sections.iter_mut().find(|(s, _)| *s == section) {
            Some((_, body)) => body.push_str(&line),
            None => sections.push((section, line)),
        }
    }
    let tls = ["ca.pem", "server.pem", "key.pem"]
        .map(|name| toml::Value::String(pki.path(name).display().to_string()).to_string());
    sections.push((
        "tls",
        format!(
            "ca_file = {}\ncert_file = {}\nkey_file = {}\n",
            tls[0], tls[1], tls[2]
        ),
    ));
    sections
        .into_iter()
        .map(|(section, body)| match section {
            "" => body,
            _ => format!("[{section}]\n{body}"),
        })
        .collect()
}

/// `validate()` passes exactly when no varied field is out of range, and otherwise names one
/// that is (with a fix).
fn validate_names_a_bad_field(config: &ServerConfig) -> Result<(), TestCaseError> {
    let bad = out_of_range(config);
    match config.validate() {
        Ok(()) => prop_assert!(
            bad.is_empty(),
            "validate() passed with {bad:?} out of range"
        ),
        Err(error) => {
            prop_assert!(
                bad.contains(&error.field.as_str()),
                "validate() named {:?} ({}) but the fields out of range are {:?}",
                error.field,
                error,
                bad
            );
            prop_assert!(!error.fix.is_empty());
            prop_assert!(error.to_string().contains(&error.field));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(64))]

    /// Loading a file with any values in the numeric fields never panics: it gives the
    /// values written (defaults elsewhere) when each has the field's type, else an error
    /// naming a field that does not; a loaded config then validates or names a bad field.
    #[test]
    fn loading_any_numeric_values_gives_them_or_names_a_mistyped_field(
        ints in INT_FIELDS.iter().map(raw_int).collect::<Vec<_>>(),
        share in raw_share(),
    ) {
        let pki = Pki::new();
        let mut raws = ints;
        raws.push(share);
        let text = config_file(&pki, &raws);
        let mut expected = pki.config();
        let mut mistyped = Vec::new();
        for (field, raw) in INT_FIELDS.iter().zip(&raws) {
            match raw {
                None => {}
                Some(Raw::Int(n)) if u64::try_from(*n).is_ok_and(|n| n <= field.type_max) => {
                    set(&mut expected, field.path, n.unsigned_abs());
                }
                Some(_) => mistyped.push(field.path),
            }
        }
        match &raws[INT_FIELDS.len()] {
            None => {}
            Some(Raw::Float(f)) => expected.detect.fleet_degraded_share = *f,
            Some(Raw::Int(n)) => expected.detect.fleet_degraded_share = *n as f64,
            Some(_) => mistyped.push(SHARE),
        }
        match load(&text, pki.dir.path()) {
            Ok(config) => {
                prop_assert!(mistyped.is_empty(), "loaded despite {mistyped:?}:\n{text}");
                // Debug, not ==: the share may be NaN.
                prop_assert_eq!(format!("{config:?}"), format!("{expected:?}"));
                validate_names_a_bad_field(&config)?;
            }
            Err(error) => prop_assert!(
                mistyped.contains(&error.field.as_str()),
                "load named {:?} ({}) but the mistyped fields are {:?}:\n{}",
                error.field,
                error,
                mistyped,
                text
            ),
        }
    }

    /// `validate()` on any values of the numeric fields passes exactly when each is in its
    /// documented range, else names one that is not.
    #[test]
    fn validate_passes_in_range_values_and_names_a_field_out_of_range(
        (ints, share) in config_values(u64::MAX),
    ) {
        let pki = Pki::new();
        validate_names_a_bad_field(&build(&pki, &ints, share))?;
    }

    /// What `--print-config` prints (`documented_toml`) loads back to the same config, for
    /// any values of the fields it prints (integers TOML can hold: up to i64::MAX).
    #[test]
    fn the_printed_config_loads_back_to_the_same_config(
        (ints, _) in config_values(i64::MAX as u64),
    ) {
        let pki = Pki::new();
        let config = build(&pki, &ints, ServerConfig::default().detect.fleet_degraded_share);
        let printed = config.documented_toml();
        let loaded = load(&printed, pki.dir.path());
        let loaded = loaded.map_err(|e| TestCaseError::fail(format!("{e}:\n{printed}")))?;
        prop_assert_eq!(loaded, config, "printed:\n{}", printed);
    }
}

/// `--print-config` is documented as showing every field, but `documented_toml()` writes no
/// `[detect]` (nor `[reconcile]`, `[alerts]`) section: a non-default detector threshold is
/// lost when the printed config is saved and loaded again.
#[test]
fn the_printed_config_keeps_detector_thresholds() {
    let pki = Pki::new();
    let mut config = pki.config();
    config.detect.fleet_degraded_share = 0.25;
    let loaded = load(&config.documented_toml(), pki.dir.path()).expect("loads");
    assert_eq!(loaded.detect.fleet_degraded_share, 0.25);
}
