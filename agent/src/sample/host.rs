//! Host sampler: owns reading `/proc` and the chain-data filesystem into a `HostSample`.
//!
//! It reads CPU, memory, load, pressure-stall, disk, network, OOM-kill and uptime figures from a
//! proc root (normally `/proc`; tests point it at a directory of fixtures) and `statvfs(2)` of the
//! configured chain-data path. Kernel counters only ever grow, so the sampler keeps the previous
//! round's counters and reports percentages and rates over the interval between two successful
//! samples; the first sample reports them as 0.
//!
//! Every file format is handled by a small pure parser (`parse_*`) that returns what was wrong as
//! a string; [`HostSampler`] attaches the file path to it as [`SampleError::Parse`].

use std::collections::{HashMap, HashSet};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use guardian_proto::v1::{DiskIo, Filesystem, HostSample, NetIo, Pressure, sample};

use super::{SampleError, Sampler};

/// `/proc/diskstats` counts sectors of 512 bytes whatever the device's real sector size.
const SECTOR_BYTES: u64 = 512;

/// `/proc/meminfo` says "kB" but means KiB.
const KIB: u64 = 1024;

/// Device-name prefixes in `/proc/diskstats` that are never real disks: loop devices, RAM disks,
/// compressed RAM swap, floppies and optical drives.
const PSEUDO_DISK_PREFIXES: [&str; 5] = ["loop", "ram", "zram", "fd", "sr"];

/// Samples the host from a proc root and the chain-data filesystem.
///
/// Holds the previous round's counters so that CPU percentages and disk/network rates cover the
/// interval since the previous successful sample. A failed round leaves them untouched, so the
/// next success reports the mean over the whole gap.
#[derive(Debug)]
pub struct HostSampler {
    /// Where `stat`, `meminfo`, `pressure/`, ... live (normally `/proc`).
    proc_root: PathBuf,
    /// Any path on the filesystem holding the chain data.
    chain_data_path: PathBuf,
    /// Counters from the previous successful sample; `None` before the first.
    previous: Option<Counters>,
}

impl HostSampler {
    /// A sampler reading from `proc_root` (normally `/proc`) and reporting the filesystem that
    /// holds `chain_data_path`. Reads nothing until the first [`Sampler::sample`].
    pub fn new(proc_root: impl Into<PathBuf>, chain_data_path: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            chain_data_path: chain_data_path.into(),
            previous: None,
        }
    }

    /// Takes one sample as of `now`; rates are computed over `now` minus the previous sample's
    /// time. Separate from [`Sampler::sample`] so tests control the clock.
    fn sample_at(&mut self, now: Instant) -> Result<HostSample, SampleError> {
        let stat = self.read_parsed("stat", parse_stat)?;
        let memory = self.read_parsed("meminfo", parse_meminfo)?;
        let load = self.read_parsed("loadavg", parse_loadavg)?;
        let cpu_pressure = self.read_pressure("cpu")?;
        let memory_pressure = self.read_pressure("memory")?;
        let io_pressure = self.read_pressure("io")?;
        let disks = whole_disks(self.read_parsed("diskstats", parse_diskstats)?);
        let networks: Vec<(String, NetCounters)> = self
            .read_parsed("net/dev", parse_net_dev)?
            .into_iter()
            .filter(|(interface, _)| interface != "lo")
            .collect();
        let oom_kills_total = self.read_parsed("vmstat", parse_vmstat_oom_kills)?;
        let uptime_seconds = self.read_parsed("uptime", parse_uptime)?;
        let chain_data = self.chain_data()?;

        let previous = self.previous.as_ref();
        let elapsed = previous.map_or(Duration::ZERO, |p| now.saturating_duration_since(p.at));
        let (cpu_busy_percent, cpu_iowait_percent) =
            previous.map_or((0.0, 0.0), |p| cpu_percents(&p.cpu, &stat.times));
        let disk_samples = disks
            .iter()
            .map(|(device, current)| {
                let before = previous.and_then(|p| p.disks.get(device));
                disk_io(device, current, before, elapsed)
            })
            .collect();
        let network_samples = networks
            .iter()
            .map(|(interface, current)| {
                let before = previous.and_then(|p| p.networks.get(interface));
                net_io(interface, current, before, elapsed)
            })
            .collect();

        let host = HostSample {
            cpu_busy_percent,
            cpu_iowait_percent,
            cpu_count: stat.cpu_count,
            mem_total_bytes: memory.total_bytes,
            mem_available_bytes: memory.available_bytes,
            swap_total_bytes: memory.swap_total_bytes,
            swap_free_bytes: memory.swap_free_bytes,
            load_avg_1m: load[0],
            load_avg_5m: load[1],
            load_avg_15m: load[2],
            cpu_pressure,
            memory_pressure,
            io_pressure,
            chain_data: Some(chain_data),
            disks: disk_samples,
            networks: network_samples,
            oom_kills_total,
            uptime_seconds,
        };
        self.previous = Some(Counters {
            at: now,
            cpu: stat.times,
            disks: disks.into_iter().collect(),
            networks: networks.into_iter().collect(),
        });
        Ok(host)
    }

    /// Reads `<proc_root>/<relative>` and parses it, attaching the path to any error.
    fn read_parsed<T>(
        &self,
        relative: &str,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<T, SampleError> {
        let path = self.proc_root.join(relative);
        match std::fs::read_to_string(&path) {
            Ok(text) => parse(&text).map_err(|detail| SampleError::Parse { path, detail }),
            Err(source) => Err(SampleError::Read { path, source }),
        }
    }

    /// Reads `<proc_root>/pressure/<resource>`.
    ///
    /// `None` when the kernel has no pressure-stall information (file absent, or PSI disabled,
    /// which reads as "operation not supported"); that is a property of the host, not a failure.
    fn read_pressure(&self, resource: &str) -> Result<Option<Pressure>, SampleError> {
        let path = self.proc_root.join("pressure").join(resource);
        match std::fs::read_to_string(&path) {
            Ok(text) => parse_pressure(&text)
                .map(Some)
                .map_err(|detail| SampleError::Parse { path, detail }),
            Err(error) if matches!(error.kind(), ErrorKind::NotFound | ErrorKind::Unsupported) => {
                Ok(None)
            }
            Err(source) => Err(SampleError::Read { path, source }),
        }
    }

    /// `statvfs(2)` of the chain-data path.
    fn chain_data(&self) -> Result<Filesystem, SampleError> {
        let path = &self.chain_data_path;
        let stats = rustix::fs::statvfs(path).map_err(|errno| {
            let source = if errno == rustix::io::Errno::NOENT {
                std::io::Error::new(ErrorKind::NotFound, "the chain-data path does not exist")
            } else {
                errno.into()
            };
            SampleError::Statfs {
                path: path.clone(),
                source,
            }
        })?;
        let block_bytes = if stats.f_frsize != 0 {
            stats.f_frsize
        } else {
            stats.f_bsize
        };
        Ok(filesystem_usage(
            path,
            &FsStats {
                block_bytes,
                blocks: stats.f_blocks,
                blocks_free: stats.f_bfree,
                blocks_available: stats.f_bavail,
                inodes: stats.f_files,
                inodes_free: stats.f_ffree,
            },
        ))
    }
}

impl Sampler for HostSampler {
    fn name(&self) -> &'static str {
        "host"
    }

    fn sample(&mut self) -> Result<sample::Kind, SampleError> {
        self.sample_at(Instant::now()).map(sample::Kind::Host)
    }
}

/// Cumulative counters kept from one sample to the next.
#[derive(Debug)]
struct Counters {
    /// When they were read.
    at: Instant,
    /// Aggregate CPU time.
    cpu: CpuTimes,
    /// Whole disks by device name.
    disks: HashMap<String, DiskCounters>,
    /// Interfaces (loopback excluded) by name.
    networks: HashMap<String, NetCounters>,
}

/// Aggregate CPU time from the `cpu` line of `/proc/stat`, in clock ticks since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuTimes {
    /// user + nice + system + irq + softirq + steal (guest time is already inside user/nice).
    busy: u64,
    /// idle.
    idle: u64,
    /// iowait.
    iowait: u64,
}

/// What the host sample needs from `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuStat {
    /// The aggregate `cpu` line.
    times: CpuTimes,
    /// Number of `cpuN` lines.
    cpu_count: u32,
}

/// What the host sample needs from `/proc/meminfo`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MemInfo {
    /// MemTotal.
    total_bytes: u64,
    /// MemAvailable.
    available_bytes: u64,
    /// SwapTotal.
    swap_total_bytes: u64,
    /// SwapFree.
    swap_free_bytes: u64,
}

/// Cumulative counters of one device from `/proc/diskstats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct DiskCounters {
    /// Reads completed.
    reads: u64,
    /// Sectors (512 bytes) read.
    read_sectors: u64,
    /// Milliseconds spent reading.
    read_ms: u64,
    /// Writes completed.
    writes: u64,
    /// Sectors (512 bytes) written.
    write_sectors: u64,
    /// Milliseconds spent writing.
    write_ms: u64,
    /// Milliseconds with I/O in flight.
    io_ms: u64,
}

/// Cumulative counters of one interface from `/proc/net/dev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct NetCounters {
    /// Bytes received.
    rx_bytes: u64,
    /// Receive errors.
    rx_errors: u64,
    /// Received packets dropped.
    rx_dropped: u64,
    /// Bytes transmitted.
    tx_bytes: u64,
    /// Transmit errors.
    tx_errors: u64,
    /// Transmit packets dropped.
    tx_dropped: u64,
}

/// The `statvfs(2)` figures the host sample uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FsStats {
    /// Fragment size: the unit of the block counts.
    block_bytes: u64,
    /// Blocks in the filesystem.
    blocks: u64,
    /// Free blocks, including those reserved for root.
    blocks_free: u64,
    /// Free blocks available to unprivileged users.
    blocks_available: u64,
    /// Inodes in the filesystem.
    inodes: u64,
    /// Free inodes.
    inodes_free: u64,
}

/// One line of a pressure file (`some ...` or `full ...`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct PsiLine {
    /// `avg10=`, percent.
    avg10: f64,
    /// `avg60=`, percent.
    avg60: f64,
    /// `total=`, microseconds.
    total: u64,
}

/// Parses one whitespace-separated field as a number; `what` names it in the error.
fn number<T: FromStr>(field: &str, what: &str) -> Result<T, String> {
    field
        .parse()
        .map_err(|_| format!("{what}: `{field}` is not a valid number"))
}

/// Parses a float field and refuses NaN and infinities, which `f64::from_str` accepts.
fn finite(field: &str, what: &str) -> Result<f64, String> {
    let value: f64 = number(field, what)?;
    if value.is_finite() {
        Ok(value)
    } else {
        Err(format!("{what}: `{field}` is not a finite number"))
    }
}

/// Parses `/proc/stat`: the aggregate `cpu` line and the number of `cpuN` lines.
///
/// The `cpu` line needs at least user, nice, system and idle (very old kernels stop there);
/// later columns that are missing count as 0.
fn parse_stat(text: &str) -> Result<CpuStat, String> {
    let mut times = None;
    let mut cpu_count: u32 = 0;
    for line in text.lines() {
        let mut fields = line.split_ascii_whitespace();
        let Some(label) = fields.next() else {
            continue;
        };
        if label == "cpu" {
            // user nice system idle iowait irq softirq steal [guest guest_nice]
            let values = fields
                .take(8)
                .map(|field| number::<u64>(field, "`cpu` line"))
                .collect::<Result<Vec<u64>, String>>()?;
            if values.len() < 4 {
                return Err(format!(
                    "`cpu` line has {} values, expected at least 4 (user nice system idle)",
                    values.len()
                ));
            }
            let column = |index: usize| values.get(index).copied().unwrap_or(0);
            let busy = [0, 1, 2, 5, 6, 7]
                .into_iter()
                .fold(0_u64, |sum, index| sum.saturating_add(column(index)));
            times = Some(CpuTimes {
                busy,
                idle: column(3),
                iowait: column(4),
            });
        } else if label
            .strip_prefix("cpu")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            cpu_count = cpu_count.saturating_add(1);
        }
    }
    let times = times.ok_or("no aggregate `cpu` line")?;
    if cpu_count == 0 {
        return Err("no per-CPU `cpuN` lines".to_owned());
    }
    Ok(CpuStat { times, cpu_count })
}

/// Parses `/proc/meminfo`; MemTotal, MemAvailable, SwapTotal and SwapFree must all be present,
/// in kB.
fn parse_meminfo(text: &str) -> Result<MemInfo, String> {
    let mut wanted: [(&str, Option<u64>); 4] = [
        ("MemTotal", None),
        ("MemAvailable", None),
        ("SwapTotal", None),
        ("SwapFree", None),
    ];
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let Some(slot) = wanted.iter_mut().find(|(name, _)| *name == key.trim()) else {
            continue;
        };
        let mut fields = rest.split_ascii_whitespace();
        let (Some(value), Some("kB"), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(format!(
                "{}: expected `<number> kB`, got `{}`",
                slot.0,
                rest.trim()
            ));
        };
        let kib: u64 = number(value, slot.0)?;
        slot.1 = Some(kib.saturating_mul(KIB));
    }
    let mut values = [0_u64; 4];
    for (value, (name, found)) in values.iter_mut().zip(wanted) {
        *value = found.ok_or_else(|| format!("no {name} line"))?;
    }
    let [
        total_bytes,
        available_bytes,
        swap_total_bytes,
        swap_free_bytes,
    ] = values;
    Ok(MemInfo {
        total_bytes,
        available_bytes,
        swap_total_bytes,
        swap_free_bytes,
    })
}

/// Parses `/proc/loadavg`: the 1, 5 and 15 minute load averages.
fn parse_loadavg(text: &str) -> Result<[f64; 3], String> {
    let mut fields = text.split_ascii_whitespace();
    let mut load = [0.0; 3];
    for (value, name) in load.iter_mut().zip(["1m", "5m", "15m"]) {
        let what = format!("{name} load average");
        let field = fields.next().ok_or_else(|| format!("no {what}"))?;
        *value = finite(field, &what)?;
    }
    Ok(load)
}

/// Parses one `some`/`full` line of a pressure file after its label.
fn parse_psi_line<'a>(
    label: &str,
    fields: impl Iterator<Item = &'a str>,
) -> Result<PsiLine, String> {
    let (mut avg10, mut avg60, mut total) = (None, None, None);
    for field in fields {
        let Some((key, value)) = field.split_once('=') else {
            return Err(format!("`{label}` line: `{field}` is not key=value"));
        };
        let what = format!("`{label}` {key}");
        match key {
            "avg10" => avg10 = Some(finite(value, &what)?),
            "avg60" => avg60 = Some(finite(value, &what)?),
            "total" => total = Some(number::<u64>(value, &what)?),
            _ => {}
        }
    }
    let missing = |key: &str| format!("`{label}` line has no {key}=");
    Ok(PsiLine {
        avg10: avg10.ok_or_else(|| missing("avg10"))?,
        avg60: avg60.ok_or_else(|| missing("avg60"))?,
        total: total.ok_or_else(|| missing("total"))?,
    })
}

/// Parses a `/proc/pressure/<resource>` file. The `some` line is required; `full` is absent
/// from `cpu` on older kernels (and all zeros on newer ones), so a missing one reads as 0.
fn parse_pressure(text: &str) -> Result<Pressure, String> {
    let (mut some, mut full) = (None, None);
    for line in text.lines() {
        let mut fields = line.split_ascii_whitespace();
        match fields.next() {
            Some("some") => some = Some(parse_psi_line("some", fields)?),
            Some("full") => full = Some(parse_psi_line("full", fields)?),
            // Blank lines and labels a future kernel may add carry nothing we report.
            _ => {}
        }
    }
    let some = some.ok_or("no `some` line")?;
    let full = full.unwrap_or_default();
    Ok(Pressure {
        some_avg10_percent: some.avg10,
        some_avg60_percent: some.avg60,
        full_avg10_percent: full.avg10,
        full_avg60_percent: full.avg60,
        some_total_microseconds: some.total,
    })
}

/// Parses `/proc/diskstats` into every device's counters, in file order.
fn parse_diskstats(text: &str) -> Result<Vec<(String, DiskCounters)>, String> {
    let mut devices = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        // major minor name reads merged sectors ms writes merged sectors ms in_flight io_ms ...
        if fields.len() < 13 {
            return Err(format!(
                "line {}: {} fields, expected at least 13",
                index + 1,
                fields.len()
            ));
        }
        let name = fields[2];
        let field =
            |column: usize, what: &str| number::<u64>(fields[column], &format!("{name} {what}"));
        devices.push((
            name.to_owned(),
            DiskCounters {
                reads: field(3, "reads completed")?,
                read_sectors: field(5, "sectors read")?,
                read_ms: field(6, "ms reading")?,
                writes: field(7, "writes completed")?,
                write_sectors: field(9, "sectors written")?,
                write_ms: field(10, "ms writing")?,
                io_ms: field(12, "ms doing I/O")?,
            },
        ));
    }
    Ok(devices)
}

/// Keeps whole, real disks: drops loop/RAM/zram/floppy/optical devices and partitions.
///
/// `/sys/block` is not under the proc root, so partitions are recognised by name: `<disk><N>`
/// when the disk's name ends in a letter (`sda1`), `<disk>p<N>` when it ends in a digit
/// (`nvme0n1p1`, `mmcblk0p2`), where `<disk>` is another device in the same file. This keeps
/// `dm-10` and `md12` even though `dm-1` and `md1` exist.
fn whole_disks(devices: Vec<(String, DiskCounters)>) -> Vec<(String, DiskCounters)> {
    let names: HashSet<String> = devices.iter().map(|(name, _)| name.clone()).collect();
    devices
        .into_iter()
        .filter(|(name, _)| {
            !PSEUDO_DISK_PREFIXES
                .iter()
                .any(|prefix| name.starts_with(prefix))
                && !is_partition(name, &names)
        })
        .collect()
}

/// Whether `name` is a partition of another device in `names` (see [`whole_disks`]).
fn is_partition(name: &str, names: &HashSet<String>) -> bool {
    let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
    if stem.len() == name.len() || stem.is_empty() {
        return false;
    }
    let ends_in_digit = |s: &str| s.ends_with(|c: char| c.is_ascii_digit());
    // sda1 -> sda
    if !ends_in_digit(stem) && names.contains(stem) {
        return true;
    }
    // nvme0n1p1 -> nvme0n1
    stem.strip_suffix('p')
        .is_some_and(|disk| ends_in_digit(disk) && names.contains(disk))
}

/// Parses `/proc/net/dev` into every interface's counters, in file order.
fn parse_net_dev(text: &str) -> Result<Vec<(String, NetCounters)>, String> {
    let mut interfaces = Vec::new();
    for (index, line) in text.lines().enumerate() {
        // The two header lines are the only ones with `|`.
        if line.trim().is_empty() || line.contains('|') {
            continue;
        }
        let Some((name, rest)) = line.split_once(':') else {
            return Err(format!("line {}: no `interface:` prefix", index + 1));
        };
        let name = name.trim();
        let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
        // rx: bytes packets errs drop fifo frame compressed multicast, then tx: bytes packets
        // errs drop fifo colls carrier compressed.
        if fields.len() < 16 {
            return Err(format!(
                "interface {name}: {} counters, expected 16",
                fields.len()
            ));
        }
        let field =
            |column: usize, what: &str| number::<u64>(fields[column], &format!("{name} {what}"));
        interfaces.push((
            name.to_owned(),
            NetCounters {
                rx_bytes: field(0, "rx bytes")?,
                rx_errors: field(2, "rx errs")?,
                rx_dropped: field(3, "rx drop")?,
                tx_bytes: field(8, "tx bytes")?,
                tx_errors: field(10, "tx errs")?,
                tx_dropped: field(11, "tx drop")?,
            },
        ));
    }
    Ok(interfaces)
}

/// Parses the `oom_kill` counter from `/proc/vmstat`; 0 on kernels that lack it (before 4.13).
fn parse_vmstat_oom_kills(text: &str) -> Result<u64, String> {
    for line in text.lines() {
        let mut fields = line.split_ascii_whitespace();
        if fields.next() == Some("oom_kill") {
            let value = fields.next().ok_or("`oom_kill` line has no value")?;
            return number(value, "oom_kill");
        }
    }
    Ok(0)
}

/// Parses `/proc/uptime`: whole seconds since boot.
fn parse_uptime(text: &str) -> Result<u64, String> {
    let field = text
        .split_ascii_whitespace()
        .next()
        .ok_or("empty file, expected seconds since boot")?;
    let seconds = finite(field, "uptime")?;
    if seconds < 0.0 {
        return Err(format!("uptime: `{field}` is negative"));
    }
    // Truncation to whole seconds is intended; `as` saturates at u64::MAX.
    Ok(seconds as u64)
}

/// Busy and iowait percentages of all CPU time between two readings of the `cpu` line.
///
/// Each counter's delta saturates at 0: iowait is known to step backwards on some kernels.
fn cpu_percents(before: &CpuTimes, now: &CpuTimes) -> (f64, f64) {
    let busy = now.busy.saturating_sub(before.busy);
    let idle = now.idle.saturating_sub(before.idle);
    let iowait = now.iowait.saturating_sub(before.iowait);
    let total = busy.saturating_add(idle).saturating_add(iowait);
    if total == 0 {
        return (0.0, 0.0);
    }
    let total = total as f64;
    (busy as f64 / total * 100.0, iowait as f64 / total * 100.0)
}

/// `delta` per second over `elapsed`; 0 for an empty interval.
fn per_second(delta: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        delta as f64 / seconds
    } else {
        0.0
    }
}

/// `total / count`, or 0 when nothing was counted.
fn mean(total: u64, count: u64) -> f64 {
    if count == 0 {
        0.0
    } else {
        total as f64 / count as f64
    }
}

/// One disk's rates over `elapsed`; all 0 without a previous reading (first sample, new device).
///
/// A counter that went backwards (device re-attached, 32-bit wrap) counts as no activity.
fn disk_io(
    device: &str,
    now: &DiskCounters,
    before: Option<&DiskCounters>,
    elapsed: Duration,
) -> DiskIo {
    let Some(before) = before else {
        return DiskIo {
            device: device.to_owned(),
            ..DiskIo::default()
        };
    };
    let reads = now.reads.saturating_sub(before.reads);
    let writes = now.writes.saturating_sub(before.writes);
    let read_bytes = now
        .read_sectors
        .saturating_sub(before.read_sectors)
        .saturating_mul(SECTOR_BYTES);
    let write_bytes = now
        .write_sectors
        .saturating_sub(before.write_sectors)
        .saturating_mul(SECTOR_BYTES);
    let read_ms = now.read_ms.saturating_sub(before.read_ms);
    let write_ms = now.write_ms.saturating_sub(before.write_ms);
    let io_ms = now.io_ms.saturating_sub(before.io_ms);
    let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
    let utilisation_percent = if elapsed_ms > 0.0 {
        (io_ms as f64 / elapsed_ms * 100.0).min(100.0)
    } else {
        0.0
    };
    DiskIo {
        device: device.to_owned(),
        reads_per_second: per_second(reads, elapsed),
        writes_per_second: per_second(writes, elapsed),
        read_bytes_per_second: per_second(read_bytes, elapsed),
        write_bytes_per_second: per_second(write_bytes, elapsed),
        read_latency_ms: mean(read_ms, reads),
        write_latency_ms: mean(write_ms, writes),
        utilisation_percent,
    }
}

/// One interface's totals and its byte rates over `elapsed`; rates are 0 without a previous
/// reading, and a counter that went backwards (interface re-created) counts as no traffic.
fn net_io(
    interface: &str,
    now: &NetCounters,
    before: Option<&NetCounters>,
    elapsed: Duration,
) -> NetIo {
    let (rx_bytes_per_second, tx_bytes_per_second) = before.map_or((0.0, 0.0), |before| {
        (
            per_second(now.rx_bytes.saturating_sub(before.rx_bytes), elapsed),
            per_second(now.tx_bytes.saturating_sub(before.tx_bytes), elapsed),
        )
    });
    NetIo {
        interface: interface.to_owned(),
        rx_bytes_total: now.rx_bytes,
        tx_bytes_total: now.tx_bytes,
        rx_errors_total: now.rx_errors,
        tx_errors_total: now.tx_errors,
        rx_dropped_total: now.rx_dropped,
        tx_dropped_total: now.tx_dropped,
        rx_bytes_per_second,
        tx_bytes_per_second,
    }
}

/// Sizes and usage of a filesystem from its `statvfs` figures.
///
/// `used_percent` follows df: used / (used + available to users), so blocks reserved for root
/// count neither as used nor as available.
fn filesystem_usage(path: &Path, stats: &FsStats) -> Filesystem {
    let used_blocks = stats.blocks.saturating_sub(stats.blocks_free);
    let usable_blocks = used_blocks.saturating_add(stats.blocks_available);
    Filesystem {
        path: path.to_string_lossy().into_owned(),
        total_bytes: stats.blocks.saturating_mul(stats.block_bytes),
        available_bytes: stats.blocks_available.saturating_mul(stats.block_bytes),
        used_percent: mean(used_blocks, usable_blocks) * 100.0,
        inodes_total: stats.inodes,
        inodes_free: stats.inodes_free,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tempfile::TempDir;

    /// A fake proc root in a temporary directory.
    struct FakeProc {
        /// Owns the directory; dropped with the test.
        dir: TempDir,
    }

    impl FakeProc {
        /// A proc root with a plausible, idle two-CPU host and no pressure files.
        fn new() -> Self {
            let proc = Self {
                dir: tempfile::tempdir().expect("tempdir"),
            };
            proc.write("stat", &stat("cpu  100 0 100 700 100 0 0 0 0 0"));
            proc.write(
                "meminfo",
                "MemTotal:       16000000 kB\nMemFree:         1000000 kB\n\
                 MemAvailable:    8000000 kB\nSwapTotal:       2000000 kB\n\
                 SwapFree:        1500000 kB\nHugePages_Total:       0\n",
            );
            proc.write("loadavg", "0.50 0.25 0.10 1/234 5678\n");
            proc.write("diskstats", &diskstats(100, 0, 0, 50, 0, 0, 0));
            proc.write("net/dev", &net_dev(1000, 5000));
            proc.write("vmstat", "nr_free_pages 1234\noom_kill 3\n");
            proc.write("uptime", "12345.67 54321.00\n");
            proc
        }

        /// Writes `contents` to `<root>/<relative>`, creating directories.
        fn write(&self, relative: &str, contents: &str) {
            let path = self.dir.path().join(relative);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("create fixture dir");
            }
            std::fs::write(path, contents).expect("write fixture");
        }

        /// A sampler over this root whose chain data is the temp dir itself.
        fn sampler(&self) -> HostSampler {
            HostSampler::new(self.dir.path(), self.dir.path())
        }
    }

    /// `/proc/stat` with the given aggregate line and two CPUs.
    fn stat(cpu_line: &str) -> String {
        format!(
            "{cpu_line}\ncpu0 50 0 50 350 50 0 0 0 0 0\ncpu1 50 0 50 350 50 0 0 0 0 0\n\
             intr 12345\nctxt 6789\nbtime 1700000000\n"
        )
    }

    /// `/proc/diskstats` with `sda` carrying the given counters, plus a partition and a loop device.
    fn diskstats(
        reads: u64,
        read_sectors: u64,
        read_ms: u64,
        writes: u64,
        write_sectors: u64,
        write_ms: u64,
        io_ms: u64,
    ) -> String {
        format!(
            "   8       0 sda {reads} 0 {read_sectors} {read_ms} {writes} 0 {write_sectors} {write_ms} 0 {io_ms} 0 0 0 0 0 0 0\n\
             \x20  8       1 sda1 10 0 80 5 5 0 40 3 0 8 8 0 0 0 0 0 0\n\
             \x20  7       0 loop0 1 0 2 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        )
    }

    /// `/proc/net/dev` with `lo` and `eth0` at the given byte counters.
    fn net_dev(rx_bytes: u64, tx_bytes: u64) -> String {
        format!(
            "Inter-|   Receive                                                |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
             lo: 999 9 0 0 0 0 0 0 999 9 0 0 0 0 0 0\n  \
             eth0: {rx_bytes} 10 1 2 0 0 0 0 {tx_bytes} 20 3 4 0 0 0 0\n"
        )
    }

    /// Float equality within rounding.
    fn approx(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() < 1e-9
    }

    #[test]
    fn first_sample_has_zero_rates_and_fills_totals() {
        let proc = FakeProc::new();
        let host = proc.sampler().sample_at(Instant::now()).expect("sample");
        assert!(approx(host.cpu_busy_percent, 0.0));
        assert!(approx(host.cpu_iowait_percent, 0.0));
        assert_eq!(host.cpu_count, 2);
        assert_eq!(host.mem_total_bytes, 16_000_000 * 1024);
        assert_eq!(host.mem_available_bytes, 8_000_000 * 1024);
        assert_eq!(host.swap_total_bytes, 2_000_000 * 1024);
        assert_eq!(host.swap_free_bytes, 1_500_000 * 1024);
        assert!(approx(host.load_avg_1m, 0.5));
        assert!(approx(host.load_avg_5m, 0.25));
        assert!(approx(host.load_avg_15m, 0.1));
        assert_eq!(host.oom_kills_total, 3);
        assert_eq!(host.uptime_seconds, 12345);
        assert_eq!(host.disks.len(), 1);
        assert_eq!(host.disks[0].device, "sda");
        assert!(approx(host.disks[0].reads_per_second, 0.0));
        assert_eq!(host.networks.len(), 1);
        let eth0 = &host.networks[0];
        assert_eq!(eth0.interface, "eth0");
        assert_eq!(
            (eth0.rx_bytes_total, eth0.tx_bytes_total),
            (1000, 5000),
            "totals are reported even on the first sample"
        );
        assert_eq!((eth0.rx_errors_total, eth0.rx_dropped_total), (1, 2));
        assert_eq!((eth0.tx_errors_total, eth0.tx_dropped_total), (3, 4));
        assert!(approx(eth0.rx_bytes_per_second, 0.0));
        let chain_data = host.chain_data.expect("chain data");
        assert_eq!(chain_data.path, proc.dir.path().to_string_lossy());
        assert!(chain_data.total_bytes > 0);
    }

    #[test]
    fn cpu_busy_and_iowait_cover_the_interval_between_samples() {
        let proc = FakeProc::new();
        let mut sampler = proc.sampler();
        let start = Instant::now();
        sampler.sample_at(start).expect("first sample");
        // +100 busy (user 60, system 30, softirq 10), +50 idle, +50 iowait: 200 ticks in all.
        proc.write("stat", &stat("cpu  160 0 130 750 150 0 10 0 0 0"));
        let host = sampler
            .sample_at(start + Duration::from_secs(2))
            .expect("second sample");
        assert!(
            approx(host.cpu_busy_percent, 50.0),
            "{}",
            host.cpu_busy_percent
        );
        assert!(
            approx(host.cpu_iowait_percent, 25.0),
            "{}",
            host.cpu_iowait_percent
        );
    }

    #[test]
    fn iowait_stepping_backwards_does_not_push_percentages_out_of_range() {
        let before = CpuTimes {
            busy: 100,
            idle: 100,
            iowait: 100,
        };
        let now = CpuTimes {
            busy: 150,
            idle: 150,
            iowait: 90,
        };
        let (busy, iowait) = cpu_percents(&before, &now);
        assert!(approx(busy, 50.0));
        assert!(approx(iowait, 0.0));
        assert_eq!(cpu_percents(&now, &now), (0.0, 0.0));
    }

    #[test]
    fn disk_rates_latency_and_utilisation_cover_the_interval() {
        let proc = FakeProc::new();
        let mut sampler = proc.sampler();
        let start = Instant::now();
        sampler.sample_at(start).expect("first sample");
        // Over 2 s: 200 reads of 4 KiB taking 1000 ms in all, 100 writes taking 200 ms,
        // I/O in flight for 1000 ms.
        proc.write(
            "diskstats",
            &diskstats(300, 1600, 1000, 150, 800, 200, 1000),
        );
        let host = sampler
            .sample_at(start + Duration::from_secs(2))
            .expect("second sample");
        let sda = &host.disks[0];
        assert_eq!(sda.device, "sda");
        assert!(approx(sda.reads_per_second, 100.0));
        assert!(approx(sda.writes_per_second, 50.0));
        assert!(approx(sda.read_bytes_per_second, 1600.0 * 512.0 / 2.0));
        assert!(approx(sda.write_bytes_per_second, 800.0 * 512.0 / 2.0));
        assert!(approx(sda.read_latency_ms, 5.0));
        assert!(approx(sda.write_latency_ms, 2.0));
        assert!(approx(sda.utilisation_percent, 50.0));
    }

    #[test]
    fn disk_utilisation_is_clamped_and_idle_disk_has_zero_latency() {
        let before = DiskCounters::default();
        let now = DiskCounters {
            io_ms: 3000,
            ..DiskCounters::default()
        };
        let io = disk_io("nvme0n1", &now, Some(&before), Duration::from_secs(1));
        assert!(approx(io.utilisation_percent, 100.0));
        assert!(approx(io.read_latency_ms, 0.0));
        assert!(approx(io.write_latency_ms, 0.0));
        let reset = disk_io("nvme0n1", &before, Some(&now), Duration::from_secs(1));
        assert!(
            approx(reset.utilisation_percent, 0.0),
            "reset counter is no activity"
        );
        let same_instant = disk_io("nvme0n1", &now, Some(&before), Duration::ZERO);
        assert!(approx(same_instant.utilisation_percent, 0.0));
    }

    #[test]
    fn network_rates_skip_loopback_and_treat_counter_reset_as_zero() {
        let proc = FakeProc::new();
        let mut sampler = proc.sampler();
        let start = Instant::now();
        sampler.sample_at(start).expect("first sample");
        // rx grew by 2000 bytes; tx went from 5000 to 100 (interface re-created).
        proc.write("net/dev", &net_dev(3000, 100));
        let host = sampler
            .sample_at(start + Duration::from_secs(2))
            .expect("second sample");
        assert_eq!(host.networks.len(), 1, "lo is skipped");
        let eth0 = &host.networks[0];
        assert!(approx(eth0.rx_bytes_per_second, 1000.0));
        assert!(approx(eth0.tx_bytes_per_second, 0.0));
        assert_eq!(eth0.tx_bytes_total, 100);
    }

    #[test]
    fn partitions_loops_ram_disks_and_optical_drives_are_not_reported() {
        let names = [
            "sda",
            "sda1",
            "sda2",
            "nvme0n1",
            "nvme0n1p1",
            "mmcblk0",
            "mmcblk0p1",
            "loop0",
            "loop0p1",
            "ram0",
            "zram0",
            "sr0",
            "fd0",
            "dm-0",
            "dm-1",
            "dm-10",
            "md1",
            "md12",
            "sdp",
            "sdp1",
            "vdb",
        ];
        let devices = names
            .iter()
            .map(|name| ((*name).to_owned(), DiskCounters::default()))
            .collect();
        let kept: Vec<String> = whole_disks(devices)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(
            kept,
            [
                "sda", "nvme0n1", "mmcblk0", "dm-0", "dm-1", "dm-10", "md1", "md12", "sdp", "vdb"
            ]
        );
    }

    #[test]
    fn absent_pressure_files_are_none_not_an_error() {
        let proc = FakeProc::new();
        let host = proc.sampler().sample_at(Instant::now()).expect("sample");
        assert_eq!(host.cpu_pressure, None);
        assert_eq!(host.memory_pressure, None);
        assert_eq!(host.io_pressure, None);
    }

    #[test]
    fn pressure_files_are_read_and_a_missing_full_line_reads_as_zero() {
        let proc = FakeProc::new();
        proc.write(
            "pressure/cpu",
            "some avg10=1.50 avg60=0.75 avg300=0.10 total=123456\n",
        );
        proc.write(
            "pressure/memory",
            "some avg10=2.00 avg60=1.00 avg300=0.50 total=42\n\
             full avg10=0.50 avg60=0.25 avg300=0.10 total=7\n",
        );
        let host = proc.sampler().sample_at(Instant::now()).expect("sample");
        let cpu = host.cpu_pressure.expect("cpu pressure");
        assert!(approx(cpu.some_avg10_percent, 1.5));
        assert!(approx(cpu.some_avg60_percent, 0.75));
        assert_eq!(cpu.some_total_microseconds, 123_456);
        assert!(approx(cpu.full_avg10_percent, 0.0));
        let memory = host.memory_pressure.expect("memory pressure");
        assert!(approx(memory.full_avg10_percent, 0.5));
        assert!(approx(memory.full_avg60_percent, 0.25));
        assert_eq!(memory.some_total_microseconds, 42);
        assert_eq!(host.io_pressure, None);
    }

    #[test]
    fn malformed_meminfo_is_a_parse_error_naming_the_file() {
        let proc = FakeProc::new();
        proc.write(
            "meminfo",
            "MemTotal: lots kB\nMemAvailable: 1 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n",
        );
        let error = proc
            .sampler()
            .sample_at(Instant::now())
            .expect_err("malformed meminfo");
        let SampleError::Parse { path, detail } = &error else {
            panic!("expected a parse error, got {error:?}");
        };
        assert_eq!(path, &proc.dir.path().join("meminfo"));
        assert!(detail.contains("MemTotal"), "{detail}");
        assert!(detail.contains("lots"), "{detail}");
        assert_eq!(error.kind(), "parse");
    }

    #[test]
    fn missing_proc_file_is_a_read_error() {
        let proc = FakeProc::new();
        std::fs::remove_file(proc.dir.path().join("uptime")).expect("remove uptime");
        let error = proc
            .sampler()
            .sample_at(Instant::now())
            .expect_err("no uptime");
        assert!(
            matches!(&error, SampleError::Read { path, .. } if path.ends_with("uptime")),
            "{error:?}"
        );
    }

    #[test]
    fn missing_chain_data_path_is_a_statfs_error_that_says_so() {
        let proc = FakeProc::new();
        let missing = proc.dir.path().join("no-such-chain-data");
        let mut sampler = HostSampler::new(proc.dir.path(), &missing);
        let error = sampler.sample().expect_err("missing chain data");
        assert!(
            matches!(&error, SampleError::Statfs { path, .. } if path == &missing),
            "{error:?}"
        );
        assert!(error.to_string().contains("does not exist"), "{error}");
        assert_eq!(error.kind(), "statfs");
    }

    #[test]
    fn failed_round_keeps_previous_counters_for_the_next_rates() {
        let proc = FakeProc::new();
        let mut sampler = proc.sampler();
        let start = Instant::now();
        sampler.sample_at(start).expect("first sample");
        proc.write("loadavg", "garbage\n");
        sampler
            .sample_at(start + Duration::from_secs(1))
            .expect_err("bad loadavg");
        proc.write("loadavg", "0.50 0.25 0.10 1/234 5678\n");
        proc.write("net/dev", &net_dev(5000, 5000));
        let host = sampler
            .sample_at(start + Duration::from_secs(4))
            .expect("third sample");
        // 4000 bytes over the 4 s since the last success.
        assert!(approx(host.networks[0].rx_bytes_per_second, 1000.0));
    }

    #[test]
    fn sampler_is_named_host_and_yields_a_host_kind() {
        let proc = FakeProc::new();
        let mut sampler = proc.sampler();
        assert_eq!(sampler.name(), "host");
        assert!(matches!(sampler.sample(), Ok(sample::Kind::Host(_))));
    }

    #[test]
    fn truncated_or_non_numeric_input_is_an_error_not_a_panic() {
        assert!(parse_stat("").is_err());
        assert!(parse_stat("cpu 1 2\ncpu0 1 2 3 4\n").is_err());
        assert!(parse_stat("cpu 1 2 x 4\ncpu0 1 2 3 4\n").is_err());
        assert!(parse_stat("cpu 1 2 3 4\n").is_err(), "no cpuN lines");
        assert!(parse_meminfo("MemTotal: 1 kB\n").is_err());
        assert!(parse_meminfo("MemTotal:\nMemAvailable: 1 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: 1 MB\n").is_err());
        assert!(parse_loadavg("0.1 0.2").is_err());
        assert!(parse_loadavg("0.1 NaN 0.3").is_err());
        assert!(parse_pressure("").is_err());
        assert!(parse_pressure("some avg10=1.0\n").is_err());
        assert!(parse_pressure("some avg10=x avg60=1 total=1\n").is_err());
        assert!(parse_pressure("some avg10 avg60=1 total=1\n").is_err());
        assert!(parse_diskstats("8 0 sda 1 2 3\n").is_err());
        assert!(parse_diskstats("8 0 sda 1 0 2 3 4 0 5 6 0 -7 0 0 0\n").is_err());
        assert!(parse_net_dev("eth0 1 2 3\n").is_err());
        assert!(parse_net_dev("eth0: 1 2 3\n").is_err());
        assert!(parse_net_dev("eth0: 1 0 0 0 0 0 0 0 z 0 0 0 0 0 0 0\n").is_err());
        assert!(parse_vmstat_oom_kills("oom_kill\n").is_err());
        assert!(parse_vmstat_oom_kills("oom_kill many\n").is_err());
        assert!(parse_uptime("").is_err());
        assert!(parse_uptime("-1 0").is_err());
        assert!(parse_uptime("inf 0").is_err());
    }

    #[test]
    fn old_kernel_formats_are_accepted() {
        assert_eq!(parse_vmstat_oom_kills("nr_free_pages 1\n"), Ok(0));
        let stat = parse_stat("cpu 10 20 30 40\ncpu0 10 20 30 40\n").expect("4-column cpu line");
        assert_eq!(
            stat.times,
            CpuTimes {
                busy: 60,
                idle: 40,
                iowait: 0
            }
        );
        let disks = parse_diskstats("   8       0 sda 1 0 2 3 4 0 5 6 0 7 8\n")
            .expect("14-field diskstats");
        assert_eq!(disks[0].1.io_ms, 7);
    }

    #[test]
    fn filesystem_used_percent_follows_df() {
        let fs = filesystem_usage(
            Path::new("/var/lib/chain"),
            &FsStats {
                block_bytes: 4096,
                blocks: 1000,
                blocks_free: 300,
                blocks_available: 250,
                inodes: 500,
                inodes_free: 100,
            },
        );
        assert_eq!(fs.path, "/var/lib/chain");
        assert_eq!(fs.total_bytes, 4_096_000);
        assert_eq!(fs.available_bytes, 1_024_000);
        // 700 used / (700 used + 250 available).
        assert!(approx(fs.used_percent, 700.0 / 950.0 * 100.0));
        assert_eq!((fs.inodes_total, fs.inodes_free), (500, 100));
        let empty = filesystem_usage(
            Path::new("/"),
            &FsStats {
                block_bytes: 4096,
                blocks: 0,
                blocks_free: 0,
                blocks_available: 0,
                inodes: 0,
                inodes_free: 0,
            },
        );
        assert!(approx(empty.used_percent, 0.0));
    }

    #[test]
    fn real_proc_and_root_filesystem_give_sane_values() {
        let mut sampler = HostSampler::new("/proc", "/");
        let start = Instant::now();
        let first = sampler
            .sample_at(start)
            .expect("first sample of real /proc");
        assert!(first.mem_total_bytes > 0);
        assert!(first.mem_available_bytes <= first.mem_total_bytes);
        assert!(first.cpu_count >= 1);
        assert!(first.uptime_seconds > 0);
        assert!(first.load_avg_1m >= 0.0);
        let root = first.chain_data.expect("root filesystem");
        assert!(root.total_bytes > 0);
        assert!((0.0..=100.0).contains(&root.used_percent));
        assert!(first.networks.iter().all(|n| n.interface != "lo"));
        let second = sampler
            .sample_at(Instant::now())
            .expect("second sample of real /proc");
        assert!((0.0..=100.0).contains(&second.cpu_busy_percent));
        assert!((0.0..=100.0).contains(&second.cpu_iowait_percent));
        assert!(
            second.disks.iter().all(
                |d| (0.0..=100.0).contains(&d.utilisation_percent) && d.reads_per_second >= 0.0
            )
        );
    }
}
