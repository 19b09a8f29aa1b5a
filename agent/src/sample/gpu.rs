//! GPU sampler: owns every call into NVML (`nvml-wrapper`) and turns it into a `GpuSample`.
//!
//! The seam is [`GpuSource`]: [`NvmlSource`] is the real one, tests use a fake. [`GpuSampler`]
//! holds a source and never fails a round: a host without an NVIDIA driver, a driver that cannot be
//! reached, or a GPU that cannot be read all yield `GpuSample { available: false,
//! unavailable_reason, .. }`, so the server sees *why* there is no GPU data.
//!
//! # Guarantees
//! - No log flood. The reason NVML could not be initialised is logged once, when the sampler is
//!   built; initialisation is then retried silently at most every [`INIT_RETRY`] (so a driver
//!   installed later is picked up). After that, only transitions are logged: `GpuAvailable` when
//!   data starts flowing, `GpuUnavailable` when it stops.
//! - One field NVML cannot read on one device (not supported on that model, no permission, ECC
//!   disabled, a symbol missing from an older driver) is left at 0 and its name listed in
//!   `GpuDevice.unsupported_fields`; the rest of the device is still reported. Only conditions that
//!   make the device or the driver unusable (GPU lost, reset required, driver gone) fail the
//!   round, with a reason naming the GPU and the field.
//!
//! # Xid events
//! NVML delivers critical Xid errors through an event set whose lifetime is tied to the `Nvml`
//! handle. The handle is therefore initialised once per process and kept in a `static`
//! ([`std::sync::OnceLock`]), which makes it `'static`: [`NvmlSource`] can own its
//! `EventSet<'static>` without a self-referential struct. The set is built when the device count
//! is first seen (and rebuilt if it changes); every device whose supported event types include
//! `CRITICAL_XID_ERROR` is registered. Each round drains the set without blocking (wait with a
//! timeout of 0) and attaches every event to its device's `xid_events`, stamped with the time it
//! was drained (NVML gives no timestamp). Events drained in a round that then fails are kept and
//! reported with the next successful round. A device that cannot be watched (or every device, when
//! the host has no event-set support) lists `"xid_events"` in `unsupported_fields`.
//!
//! Consequences of the process-wide handle: NVML is never shut down before the process exits, and
//! a driver reloaded under a running agent is not re-attached (restart the agent).

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use guardian_proto::v1::{GpuDevice, GpuProcess, GpuSample, XidEvent, sample};
use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;
use nvml_wrapper::{Device, EventSet, Nvml};

use super::{SampleError, Sampler};

/// How long the sampler waits before trying `nvmlInit` again after it failed.
pub const INIT_RETRY: Duration = Duration::from_secs(60);

/// Reason reported when NVML works but sees no device.
pub const NO_GPU_REASON: &str = "NVML reports no GPU";

/// The Xid value NVML uses for "unknown Xid" (`XidError::Unknown` in nvml-wrapper).
const UNKNOWN_XID: u64 = 999;

/// Upper bound on events drained from the event set in one round, so a storm of Xids cannot keep
/// a round busy forever.
const MAX_XID_EVENTS_PER_ROUND: usize = 1024;

/// Upper bound on Xid events held for one device between successful rounds; the oldest are
/// dropped first.
const MAX_PENDING_XIDS_PER_DEVICE: usize = 256;

/// Throttle (clock-event) reason flags and the names reported in `GpuDevice.throttle_reasons`,
/// in bit order.
const THROTTLE_REASON_NAMES: [(ThrottleReasons, &str); 9] = [
    (ThrottleReasons::GPU_IDLE, "gpu_idle"),
    (
        ThrottleReasons::APPLICATIONS_CLOCKS_SETTING,
        "applications_clocks_setting",
    ),
    (ThrottleReasons::SW_POWER_CAP, "sw_power_cap"),
    (ThrottleReasons::HW_SLOWDOWN, "hw_slowdown"),
    (ThrottleReasons::SYNC_BOOST, "sync_boost"),
    (ThrottleReasons::SW_THERMAL_SLOWDOWN, "sw_thermal_slowdown"),
    (ThrottleReasons::HW_THERMAL_SLOWDOWN, "hw_thermal_slowdown"),
    (
        ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN,
        "hw_power_brake_slowdown",
    ),
    (
        ThrottleReasons::DISPLAY_CLOCK_SETTING,
        "display_clock_setting",
    ),
];

/// Why GPU data could not be read. Its `Display` text becomes `GpuSample.unavailable_reason`.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// `libnvidia-ml.so.1` could not be loaded: the normal state of a host without a GPU.
    #[error("NVML library not found (libnvidia-ml.so.1): no NVIDIA driver on this host")]
    LibraryNotFound,
    /// The NVML library is present but the kernel driver is not loaded.
    #[error("NVIDIA kernel driver is not loaded")]
    DriverNotLoaded,
    /// The NVML library and the loaded kernel driver are different versions.
    #[error(
        "NVML library and NVIDIA kernel driver versions differ (driver upgraded without a reboot?)"
    )]
    DriverMismatch,
    /// The agent's user may not talk to the NVIDIA driver.
    #[error("no permission to talk to the NVIDIA driver")]
    NoPermission,
    /// Any other NVML failure of a whole-host call.
    #[error("NVML {operation} failed: {detail}")]
    Nvml {
        /// The call (`init`, `device_count`, ...).
        operation: &'static str,
        /// NVML's description of the error.
        detail: String,
    },
    /// A device became unusable while it was being read (lost, needs a reset, driver gone).
    #[error("GPU {index} {field}: {detail}")]
    Device {
        /// NVML index of the device.
        index: u32,
        /// The field being read.
        field: &'static str,
        /// NVML's description of the error.
        detail: String,
    },
}

impl GpuError {
    /// Stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::LibraryNotFound => "library_not_found",
            Self::DriverNotLoaded => "driver_not_loaded",
            Self::DriverMismatch => "driver_mismatch",
            Self::NoPermission => "no_permission",
            Self::Nvml { .. } => "nvml",
            Self::Device { .. } => "device",
        }
    }

    /// Classifies an error of a whole-host NVML call.
    fn from_nvml(operation: &'static str, error: &NvmlError) -> Self {
        match error {
            NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound => Self::LibraryNotFound,
            NvmlError::DriverNotLoaded => Self::DriverNotLoaded,
            NvmlError::LibRmVersionMismatch => Self::DriverMismatch,
            NvmlError::NoPermission => Self::NoPermission,
            other => Self::Nvml {
                operation,
                detail: other.to_string(),
            },
        }
    }
}

/// Where GPU data comes from: NVML on a real host, a fake in tests.
pub trait GpuSource: Send {
    /// The NVIDIA driver version (`"550.54.15"`).
    ///
    /// # Errors
    /// A [`GpuError`] when NVML cannot report it.
    fn driver_version(&mut self) -> Result<String, GpuError>;

    /// Every device, fully read, in NVML index order; empty when NVML sees none.
    ///
    /// # Errors
    /// A [`GpuError`] when the devices cannot be listed or one of them has become unusable.
    /// A field a device does not support is not an error (see `GpuDevice.unsupported_fields`).
    fn devices(&mut self) -> Result<Vec<GpuDevice>, GpuError>;
}

/// The process-wide NVML handle, initialised on first successful use and never shut down.
static NVML: OnceLock<Nvml> = OnceLock::new();

/// The process-wide NVML handle, initialising NVML if no call has succeeded yet.
fn shared_nvml() -> Result<&'static Nvml, NvmlError> {
    if let Some(nvml) = NVML.get() {
        return Ok(nvml);
    }
    let nvml = Nvml::init()?;
    // Another thread may have initialised it meanwhile; then ours is dropped, which is harmless
    // because NVML reference-counts initialisation.
    if let Err(duplicate) = NVML.set(nvml) {
        drop(duplicate);
    }
    NVML.get().ok_or(NvmlError::Uninitialized)
}

/// Reads GPUs through NVML.
pub struct NvmlSource {
    /// The process-wide handle.
    nvml: &'static Nvml,
    /// The Xid event set; `None` until the first [`GpuSource::devices`].
    xid: Option<XidWatch>,
    /// Xid events drained but not yet reported, by device index.
    pending_xids: HashMap<u32, Vec<XidEvent>>,
}

impl NvmlSource {
    /// Initialises NVML (once per process) and returns a source reading from it.
    ///
    /// # Errors
    /// [`GpuError::LibraryNotFound`] on a host without the NVIDIA driver, or whatever else
    /// stopped `nvmlInit`.
    pub fn open() -> Result<Self, GpuError> {
        let nvml = shared_nvml().map_err(|error| GpuError::from_nvml("init", &error))?;
        Ok(Self {
            nvml,
            xid: None,
            pending_xids: HashMap::new(),
        })
    }

    /// Drains the Xid event set into `pending_xids`, (re)building the set first if the device
    /// count changed.
    fn collect_xids(&mut self, device_count: u32) {
        if self
            .xid
            .as_ref()
            .is_none_or(|watch| watch.device_count != device_count)
        {
            // Free the old set before registering the devices again.
            self.xid = None;
            self.xid = Some(XidWatch::build(self.nvml, device_count));
        }
        let Some(XidWatch { set: Some(set), .. }) = &self.xid else {
            return;
        };
        let observed_at_unix_ms = now_unix_ms();
        for _ in 0..MAX_XID_EVENTS_PER_ROUND {
            let event = match set.wait(0) {
                Ok(event) => event,
                Err(NvmlError::Timeout) => break,
                Err(error) => {
                    tracing::debug!(error = %error, "cannot drain NVML Xid events this round");
                    break;
                }
            };
            let xid = match event.event_data {
                Some(XidError::Value(xid)) => xid,
                Some(XidError::Unknown) => UNKNOWN_XID,
                None => continue,
            };
            match event.device.index() {
                Ok(index) => {
                    let events = self.pending_xids.entry(index).or_default();
                    if events.len() >= MAX_PENDING_XIDS_PER_DEVICE {
                        events.remove(0);
                    }
                    events.push(XidEvent {
                        xid,
                        observed_at_unix_ms,
                    });
                }
                Err(error) => {
                    tracing::warn!(xid, error = %error, "Xid event from an unindexable GPU");
                }
            }
        }
    }

    /// Whether Xid events of device `index` are being collected.
    fn watches_xids(&self, index: u32) -> bool {
        self.xid.as_ref().is_some_and(|watch| {
            watch.set.is_some() && watch.registered.binary_search(&index).is_ok()
        })
    }
}

impl GpuSource for NvmlSource {
    fn driver_version(&mut self) -> Result<String, GpuError> {
        self.nvml
            .sys_driver_version()
            .map_err(|error| GpuError::from_nvml("sys_driver_version", &error))
    }

    fn devices(&mut self) -> Result<Vec<GpuDevice>, GpuError> {
        let count = self
            .nvml
            .device_count()
            .map_err(|error| GpuError::from_nvml("device_count", &error))?;
        self.collect_xids(count);
        let mut devices = Vec::new();
        for index in 0..count {
            let device = self
                .nvml
                .device_by_index(index)
                .map_err(|error| GpuError::Device {
                    index,
                    field: "handle",
                    detail: error.to_string(),
                })?;
            let mut gpu = read_device(index, &device)?;
            if !self.watches_xids(index) {
                gpu.unsupported_fields.push("xid_events".to_owned());
            }
            devices.push(gpu);
        }
        // Only now that the round succeeded are the drained events handed over.
        for gpu in &mut devices {
            gpu.xid_events = self.pending_xids.remove(&gpu.index).unwrap_or_default();
        }
        self.pending_xids.retain(|index, _| *index < count);
        Ok(devices)
    }
}

/// The Xid event set and which devices feed it.
struct XidWatch {
    /// Device count the set was built for.
    device_count: u32,
    /// The set; `None` when event sets are not supported here.
    set: Option<EventSet<'static>>,
    /// Indices of the devices registered in `set`, ascending.
    registered: Vec<u32>,
}

impl XidWatch {
    /// Creates an event set and registers every device that supports critical Xid events.
    fn build(nvml: &'static Nvml, device_count: u32) -> Self {
        let mut registered = Vec::new();
        let mut set = match nvml.create_event_set() {
            Ok(set) => Some(set),
            Err(error) => {
                tracing::debug!(error = %error, "no NVML event sets; Xid events not collected");
                None
            }
        };
        for index in 0..device_count {
            let Some(current) = set.take() else {
                break;
            };
            let device = match nvml.device_by_index(index) {
                Ok(device) if supports_xid_events(&device) => device,
                _ => {
                    set = Some(current);
                    continue;
                }
            };
            match device.register_events(EventTypes::CRITICAL_XID_ERROR, current) {
                Ok(current) => {
                    set = Some(current);
                    registered.push(index);
                }
                Err(error) => {
                    // A failed registration frees the set: start again with the devices that
                    // registered before this one.
                    tracing::debug!(index, error = %error, "cannot watch Xid events of this GPU");
                    set = rebuild_event_set(nvml, &registered);
                }
            }
        }
        Self {
            device_count,
            set,
            registered,
        }
    }
}

/// Whether `device` can report critical Xid events.
fn supports_xid_events(device: &Device<'_>) -> bool {
    device
        .supported_event_types()
        .is_ok_and(|types| types.contains(EventTypes::CRITICAL_XID_ERROR))
}

/// A fresh event set with the devices at `indices` registered for critical Xid events.
fn rebuild_event_set(nvml: &'static Nvml, indices: &[u32]) -> Option<EventSet<'static>> {
    let mut set = nvml.create_event_set().ok()?;
    for index in indices {
        let device = nvml.device_by_index(*index).ok()?;
        set = device
            .register_events(EventTypes::CRITICAL_XID_ERROR, set)
            .ok()?;
    }
    Some(set)
}

/// Collects the names of fields a device could not report.
struct Fields {
    /// NVML index of the device being read.
    index: u32,
    /// Names of the fields left at 0.
    unsupported: Vec<String>,
}

impl Fields {
    /// The value of one NVML call, or `None` (with `names` recorded as unsupported) when the
    /// device cannot report it.
    ///
    /// # Errors
    /// [`GpuError::Device`] when the error means the device or driver is unusable, not just
    /// that this field is unavailable.
    fn read<T>(
        &mut self,
        names: &[&'static str],
        result: Result<T, NvmlError>,
    ) -> Result<Option<T>, GpuError> {
        match result {
            Ok(value) => Ok(Some(value)),
            Err(error) if makes_device_unusable(&error) => Err(GpuError::Device {
                index: self.index,
                field: names.first().copied().unwrap_or("device"),
                detail: error.to_string(),
            }),
            Err(error) => {
                if !matches!(error, NvmlError::NotSupported | NvmlError::NoPermission) {
                    let index = self.index;
                    tracing::debug!(index, fields = ?names, error = %error, "GPU field unreadable");
                }
                self.unsupported
                    .extend(names.iter().map(|name| (*name).to_owned()));
                Ok(None)
            }
        }
    }
}

/// Whether an NVML error means the whole device (or driver) is gone rather than one field.
fn makes_device_unusable(error: &NvmlError) -> bool {
    matches!(
        error,
        NvmlError::GpuLost
            | NvmlError::ResetRequired
            | NvmlError::Uninitialized
            | NvmlError::DriverNotLoaded
            | NvmlError::LibRmVersionMismatch
    )
}

/// Reads every field of one device except `xid_events`.
fn read_device(index: u32, device: &Device<'_>) -> Result<GpuDevice, GpuError> {
    let mut fields = Fields {
        index,
        unsupported: Vec::new(),
    };
    let uuid = fields.read(&["uuid"], device.uuid())?.unwrap_or_default();
    let name = fields.read(&["name"], device.name())?.unwrap_or_default();
    let utilisation = fields.read(
        &["utilisation_gpu_percent", "utilisation_memory_percent"],
        device.utilization_rates(),
    )?;
    let memory = fields.read(
        &["memory_used_bytes", "memory_total_bytes"],
        device.memory_info(),
    )?;
    let temperature = fields.read(
        &["temperature_celsius"],
        device.temperature(TemperatureSensor::Gpu),
    )?;
    let power_mw = fields.read(&["power_draw_watts"], device.power_usage())?;
    let power_limit_mw = fields.read(&["power_limit_watts"], device.enforced_power_limit())?;
    let sm_clock_mhz = fields
        .read(&["sm_clock_mhz"], device.clock_info(Clock::SM))?
        .unwrap_or(0);
    let throttle = fields
        .read(
            &["throttle_reasons_bitmask", "throttle_reasons"],
            device.current_throttle_reasons(),
        )?
        .map_or(0, |reasons| reasons.bits());
    let ecc_corrected_total = fields
        .read(
            &["ecc_corrected_total"],
            device.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile),
        )?
        .unwrap_or(0);
    let ecc_uncorrected_total = fields
        .read(
            &["ecc_uncorrected_total"],
            device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
        )?
        .unwrap_or(0);
    let pcie_replay_total = fields
        .read(&["pcie_replay_total"], device.pcie_replay_counter())?
        .unwrap_or(0);
    let compute = fields
        .read(&["processes.compute"], device.running_compute_processes())?
        .unwrap_or_default();
    let graphics = fields
        .read(&["processes.graphics"], device.running_graphics_processes())?
        .unwrap_or_default();

    Ok(GpuDevice {
        index,
        uuid,
        name,
        utilisation_gpu_percent: utilisation.as_ref().map_or(0.0, |u| f64::from(u.gpu)),
        utilisation_memory_percent: utilisation.as_ref().map_or(0.0, |u| f64::from(u.memory)),
        memory_used_bytes: memory.as_ref().map_or(0, |m| m.used),
        memory_total_bytes: memory.as_ref().map_or(0, |m| m.total),
        temperature_celsius: temperature.map_or(0.0, f64::from),
        power_draw_watts: power_mw.map_or(0.0, milliwatts_to_watts),
        power_limit_watts: power_limit_mw.map_or(0.0, milliwatts_to_watts),
        sm_clock_mhz,
        throttle_reasons_bitmask: throttle,
        throttle_reasons: throttle_reason_names(throttle),
        ecc_corrected_total,
        ecc_uncorrected_total,
        pcie_replay_total: u64::from(pcie_replay_total),
        xid_events: Vec::new(),
        processes: gpu_processes(compute.iter().chain(graphics.iter())),
        unsupported_fields: fields.unsupported,
    })
}

/// NVML reports power in milliwatts.
fn milliwatts_to_watts(milliwatts: u32) -> f64 {
    f64::from(milliwatts) / 1000.0
}

/// Names of the throttle reasons set in an NVML clock-event bitmask, in bit order.
///
/// Bits this version does not know are reported once as `unknown_0x<bits>`, so they are visible
/// rather than silently dropped. An empty list means the clocks are not throttled.
pub fn throttle_reason_names(bitmask: u64) -> Vec<String> {
    let mut names = Vec::new();
    let mut unknown = bitmask;
    for (flag, name) in THROTTLE_REASON_NAMES {
        if bitmask & flag.bits() != 0 {
            names.push(name.to_owned());
        }
        unknown &= !flag.bits();
    }
    if unknown != 0 {
        names.push(format!("unknown_0x{unknown:x}"));
    }
    names
}

/// Compute and graphics processes, one entry per pid (a process with both kinds of context is
/// listed by NVML twice); the larger memory figure wins. Memory NVML cannot attribute reads 0.
fn gpu_processes<'a>(infos: impl Iterator<Item = &'a ProcessInfo>) -> Vec<GpuProcess> {
    let mut processes: Vec<GpuProcess> = Vec::new();
    for info in infos {
        let used_memory_bytes = match info.used_gpu_memory {
            UsedGpuMemory::Used(bytes) => bytes,
            UsedGpuMemory::Unavailable => 0,
        };
        match processes.iter_mut().find(|p| p.pid == info.pid) {
            Some(known) => known.used_memory_bytes = known.used_memory_bytes.max(used_memory_bytes),
            None => processes.push(GpuProcess {
                pid: info.pid,
                used_memory_bytes,
            }),
        }
    }
    processes
}

/// Milliseconds since the Unix epoch; 0 if the clock is before it.
fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        })
}

/// Opens a source; called at construction and then at most every [`INIT_RETRY`] while it fails.
type Opener = Box<dyn FnMut() -> Result<Box<dyn GpuSource>, GpuError> + Send>;

/// Where the sampler stands with its source.
enum State {
    /// A source is open; every round reads from it.
    Open(Box<dyn GpuSource>),
    /// Opening failed; the reason is reported until the next attempt at `retry_at`.
    Closed {
        /// Why the last attempt failed.
        reason: String,
        /// When to try again.
        retry_at: Instant,
    },
}

/// Samples the host's NVIDIA GPUs; reports `available: false` with a reason when it cannot.
pub struct GpuSampler {
    /// The source, or why there is none.
    state: State,
    /// How to (re)open the source while [`State::Closed`].
    open: Opener,
    /// Whether the previous round reported GPU data; `None` before the first round. Only changes
    /// are logged.
    was_available: Option<bool>,
}

impl GpuSampler {
    /// A sampler reading NVML. Tries `nvmlInit` now; if that fails (no driver on this host) the
    /// reason is logged once and reported by every sample, and initialisation is retried silently
    /// at most every [`INIT_RETRY`].
    pub fn new() -> Self {
        Self::with_opener(
            Box::new(|| NvmlSource::open().map(|source| Box::new(source) as Box<dyn GpuSource>)),
            Instant::now(),
        )
    }

    /// A sampler reading from `source` (a test double, or an already opened [`NvmlSource`]).
    pub fn with_source(source: Box<dyn GpuSource>) -> Self {
        Self {
            state: State::Open(source),
            open: Box::new(|| {
                Err(GpuError::Nvml {
                    operation: "init",
                    detail: "an injected source cannot be reopened".to_owned(),
                })
            }),
            was_available: None,
        }
    }

    /// A sampler that opens its source with `open`, first at `now`.
    fn with_opener(mut open: Opener, now: Instant) -> Self {
        let (state, was_available) = match open() {
            Ok(source) => (State::Open(source), None),
            Err(error) => {
                log_init_failure(&error);
                let state = State::Closed {
                    reason: error.to_string(),
                    retry_at: now + INIT_RETRY,
                };
                (state, Some(false))
            }
        };
        Self {
            state,
            open,
            was_available,
        }
    }

    /// Takes one sample as of `now` (which only drives the init retry). Separate from
    /// [`Sampler::sample`] so tests control the clock.
    fn sample_at(&mut self, now: Instant) -> GpuSample {
        if let State::Closed { retry_at, .. } = &self.state
            && now >= *retry_at
        {
            self.state = match (self.open)() {
                Ok(source) => State::Open(source),
                Err(error) => State::Closed {
                    reason: error.to_string(),
                    retry_at: now + INIT_RETRY,
                },
            };
        }
        let gpu = match &mut self.state {
            State::Closed { reason, .. } => unavailable(reason.clone(), String::new()),
            State::Open(source) => read_source(source.as_mut()),
        };
        self.log_transition(&gpu);
        gpu
    }

    /// Logs `GpuAvailable` / `GpuUnavailable` when availability changes, and nothing otherwise.
    fn log_transition(&mut self, gpu: &GpuSample) {
        if self.was_available == Some(gpu.available) {
            return;
        }
        if gpu.available {
            tracing::info!(
                devices = gpu.devices.len(),
                driver_version = %gpu.driver_version,
                "GpuAvailable"
            );
        } else {
            tracing::warn!(reason = %gpu.unavailable_reason, "GpuUnavailable");
        }
        self.was_available = Some(gpu.available);
    }
}

impl Default for GpuSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl Sampler for GpuSampler {
    fn name(&self) -> &'static str {
        "gpu"
    }

    fn sample(&mut self) -> Result<sample::Kind, SampleError> {
        Ok(sample::Kind::Gpu(self.sample_at(Instant::now())))
    }
}

/// Logs once why NVML could not be initialised. No driver is the normal state of a CPU-only
/// host, so that is `info`; anything else is a broken GPU setup.
fn log_init_failure(error: &GpuError) {
    if matches!(error, GpuError::LibraryNotFound) {
        tracing::info!(reason = %error, kind = error.kind(), "GpuUnavailable");
    } else {
        tracing::warn!(reason = %error, kind = error.kind(), "GpuUnavailable");
    }
}

/// One round from an open source. The driver version is best effort: it is reported when
/// known, and its absence never hides device data.
fn read_source(source: &mut dyn GpuSource) -> GpuSample {
    let devices = source.devices();
    let driver_version = source.driver_version().unwrap_or_default();
    match devices {
        Ok(devices) if devices.is_empty() => unavailable(NO_GPU_REASON.to_owned(), driver_version),
        Ok(devices) => GpuSample {
            available: true,
            unavailable_reason: String::new(),
            driver_version,
            devices,
        },
        Err(error) => unavailable(error.to_string(), driver_version),
    }
}

/// A sample saying there is no GPU data, and why.
fn unavailable(reason: String, driver_version: String) -> GpuSample {
    GpuSample {
        available: false,
        unavailable_reason: reason,
        driver_version,
        devices: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A source returning fixed answers.
    struct FakeSource {
        /// What `driver_version` returns.
        driver_version: String,
        /// What `devices` returns; an error is rebuilt each call.
        devices: Result<Vec<GpuDevice>, &'static str>,
    }

    impl GpuSource for FakeSource {
        fn driver_version(&mut self) -> Result<String, GpuError> {
            Ok(self.driver_version.clone())
        }

        fn devices(&mut self) -> Result<Vec<GpuDevice>, GpuError> {
            self.devices.clone().map_err(|detail| GpuError::Nvml {
                operation: "device_count",
                detail: detail.to_owned(),
            })
        }
    }

    fn device(index: u32, uuid: &str) -> GpuDevice {
        GpuDevice {
            index,
            uuid: uuid.to_owned(),
            name: "NVIDIA H100 80GB HBM3".to_owned(),
            utilisation_gpu_percent: 97.0,
            memory_used_bytes: 40 << 30,
            memory_total_bytes: 80 << 30,
            temperature_celsius: 71.0,
            power_draw_watts: 612.5,
            power_limit_watts: 700.0,
            throttle_reasons_bitmask: 0x4,
            throttle_reasons: vec!["sw_power_cap".to_owned()],
            xid_events: vec![XidEvent {
                xid: 79,
                observed_at_unix_ms: 1_700_000_000_000,
            }],
            processes: vec![GpuProcess {
                pid: 4242,
                used_memory_bytes: 1 << 30,
            }],
            unsupported_fields: vec!["pcie_replay_total".to_owned()],
            ..GpuDevice::default()
        }
    }

    fn gpu(kind: Result<sample::Kind, SampleError>) -> GpuSample {
        match kind {
            Ok(sample::Kind::Gpu(gpu)) => gpu,
            other => panic!("expected a GPU sample, got {other:?}"),
        }
    }

    #[test]
    fn host_without_nvml_reports_unavailable_with_a_reason_every_round() {
        let mut sampler = GpuSampler::new();
        assert_eq!(sampler.name(), "gpu");
        let first = gpu(sampler.sample());
        let second = gpu(sampler.sample());
        assert_eq!(first.available, second.available);
        for round in [&first, &second] {
            if round.available {
                // A host with a GPU: the real NVML path must report sane devices.
                assert!(!round.devices.is_empty());
                assert!(!round.driver_version.is_empty());
                for device in &round.devices {
                    assert!(device.uuid.starts_with("GPU-"), "{device:?}");
                    assert!(device.memory_total_bytes > 0, "{device:?}");
                }
            } else {
                assert!(!round.unavailable_reason.is_empty());
                assert!(round.devices.is_empty());
            }
        }
    }

    #[test]
    fn missing_nvml_library_reason_names_the_library() {
        let sampler_reason = GpuError::LibraryNotFound.to_string();
        assert!(
            sampler_reason.contains("libnvidia-ml.so.1"),
            "{sampler_reason}"
        );
        let mut sampler =
            GpuSampler::with_opener(Box::new(|| Err(GpuError::LibraryNotFound)), Instant::now());
        let sample = sampler.sample_at(Instant::now());
        assert!(!sample.available);
        assert_eq!(sample.unavailable_reason, sampler_reason);
    }

    #[test]
    fn fake_source_with_two_devices_is_reported_with_driver_version() {
        let devices = vec![device(0, "GPU-aaaa"), device(1, "GPU-bbbb")];
        let mut sampler = GpuSampler::with_source(Box::new(FakeSource {
            driver_version: "550.54.15".to_owned(),
            devices: Ok(devices.clone()),
        }));
        let sample = gpu(sampler.sample());
        assert!(sample.available);
        assert_eq!(sample.unavailable_reason, "");
        assert_eq!(sample.driver_version, "550.54.15");
        assert_eq!(sample.devices, devices);
    }

    #[test]
    fn source_error_is_an_unavailable_sample_not_an_err() {
        let mut sampler = GpuSampler::with_source(Box::new(FakeSource {
            driver_version: "550.54.15".to_owned(),
            devices: Err("an internal driver error occurred"),
        }));
        let sample = gpu(sampler.sample());
        assert!(!sample.available);
        assert_eq!(
            sample.unavailable_reason,
            "NVML device_count failed: an internal driver error occurred"
        );
        assert!(sample.devices.is_empty());
        assert_eq!(sample.driver_version, "550.54.15");
    }

    #[test]
    fn nvml_without_devices_is_unavailable_no_gpu() {
        let mut sampler = GpuSampler::with_source(Box::new(FakeSource {
            driver_version: "550.54.15".to_owned(),
            devices: Ok(Vec::new()),
        }));
        let sample = gpu(sampler.sample());
        assert!(!sample.available);
        assert_eq!(sample.unavailable_reason, NO_GPU_REASON);
    }

    #[test]
    fn init_is_retried_at_most_every_minute_and_picks_up_a_late_driver() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&attempts);
        let start = Instant::now();
        let mut sampler = GpuSampler::with_opener(
            Box::new(move || {
                // The driver appears on the third attempt.
                if counter.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(GpuError::DriverNotLoaded)
                } else {
                    Ok(Box::new(FakeSource {
                        driver_version: "550.54.15".to_owned(),
                        devices: Ok(vec![device(0, "GPU-aaaa")]),
                    }) as Box<dyn GpuSource>)
                }
            }),
            start,
        );
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        for seconds in [1, 10, 59] {
            let sample = sampler.sample_at(start + Duration::from_secs(seconds));
            assert!(!sample.available);
            assert_eq!(
                sample.unavailable_reason,
                "NVIDIA kernel driver is not loaded"
            );
        }
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            1,
            "no retry within a minute"
        );
        let sample = sampler.sample_at(start + Duration::from_secs(60));
        assert!(!sample.available);
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        let sample_before = sampler.sample_at(start + Duration::from_secs(119));
        assert!(!sample_before.available);
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        let sample = sampler.sample_at(start + Duration::from_secs(120));
        assert!(sample.available, "{sample:?}");
        assert_eq!(sample.devices.len(), 1);
        sampler.sample_at(start + Duration::from_secs(500));
        assert_eq!(attempts.load(Ordering::SeqCst), 3, "an open source is kept");
    }

    #[test]
    fn throttle_bitmask_maps_to_names_in_bit_order() {
        assert!(throttle_reason_names(0).is_empty(), "0 is not throttled");
        // Values from nvml.h: GpuIdle 0x1, SwPowerCap 0x4, HwSlowdown 0x8, SwThermal 0x20,
        // HwThermal 0x40, HwPowerBrake 0x80, DisplayClockSetting 0x100.
        assert_eq!(
            throttle_reason_names(0x1 | 0x4 | 0x8 | 0x40 | 0x100),
            [
                "gpu_idle",
                "sw_power_cap",
                "hw_slowdown",
                "hw_thermal_slowdown",
                "display_clock_setting"
            ]
        );
        assert_eq!(
            throttle_reason_names(0x2 | 0x10 | 0x20 | 0x80),
            [
                "applications_clocks_setting",
                "sync_boost",
                "sw_thermal_slowdown",
                "hw_power_brake_slowdown"
            ]
        );
        assert_eq!(
            throttle_reason_names(0x4 | 0x1000),
            ["sw_power_cap", "unknown_0x1000"]
        );
    }

    #[test]
    fn unsupported_field_is_named_and_lost_gpu_fails_the_device() {
        let mut fields = Fields {
            index: 3,
            unsupported: Vec::new(),
        };
        let value: Option<u32> = fields
            .read(&["ecc_corrected_total"], Err(NvmlError::NotSupported))
            .expect("not supported is not fatal");
        assert_eq!(value, None);
        let value: Option<u32> = fields
            .read(
                &["memory_used_bytes", "memory_total_bytes"],
                Err(NvmlError::NoPermission),
            )
            .expect("no permission is not fatal");
        assert_eq!(value, None);
        assert_eq!(
            fields
                .read(&["temperature_celsius"], Ok(64_u32))
                .expect("ok"),
            Some(64)
        );
        assert_eq!(
            fields.unsupported,
            [
                "ecc_corrected_total",
                "memory_used_bytes",
                "memory_total_bytes"
            ]
        );
        let error = fields
            .read::<u32>(&["temperature_celsius"], Err(NvmlError::GpuLost))
            .expect_err("a lost GPU is fatal");
        assert_eq!(error.kind(), "device");
        let reason = error.to_string();
        assert!(
            reason.starts_with("GPU 3 temperature_celsius: "),
            "{reason}"
        );
        assert!(reason.contains("fell off the bus"), "{reason}");
    }

    #[test]
    fn processes_in_both_lists_are_reported_once() {
        let info = |pid, used_gpu_memory| ProcessInfo {
            pid,
            used_gpu_memory,
            gpu_instance_id: None,
            compute_instance_id: None,
        };
        let compute = [
            info(10, UsedGpuMemory::Used(100)),
            info(11, UsedGpuMemory::Unavailable),
        ];
        let graphics = [info(10, UsedGpuMemory::Used(300))];
        assert_eq!(
            gpu_processes(compute.iter().chain(graphics.iter())),
            [
                GpuProcess {
                    pid: 10,
                    used_memory_bytes: 300
                },
                GpuProcess {
                    pid: 11,
                    used_memory_bytes: 0
                },
            ]
        );
    }

    #[test]
    fn init_errors_are_classified() {
        assert!(matches!(
            GpuError::from_nvml("init", &NvmlError::LibraryNotFound),
            GpuError::LibraryNotFound
        ));
        assert!(matches!(
            GpuError::from_nvml("init", &NvmlError::LibRmVersionMismatch),
            GpuError::DriverMismatch
        ));
        let other = GpuError::from_nvml("init", &NvmlError::Unknown);
        assert_eq!(
            other.to_string(),
            "NVML init failed: an internal driver error occurred"
        );
        assert!((milliwatts_to_watts(612_500) - 612.5).abs() < 1e-9);
    }
}
