//! Owns the machine findings: `gpu_thermal`, `gpu_errors`, `gpu_idle`, `host_pressure` and
//! `oom_kill`. At most one finding per kind, covering every GPU of the node.
//!
//! - `gpu_thermal`: a device at >= `gpu_temperature_celsius` (warning; critical at +10 C), or
//!   with a thermal/power slowdown throttle reason (warning). Score 0.5 at the limit, 1.0 at
//!   +10 C; 0.5 for a throttle reason alone. `sw_power_cap` is a GPU working at its power
//!   limit, not a fault, and does not count.
//! - `gpu_errors`: `ecc_uncorrected_total` grew against the previous sample of the same
//!   device (uuid), or the newest sample carries Xid events. Critical (score 1) for uncorrected
//!   ECC errors and for the Xids that mean broken hardware or driver state (`CRITICAL_XIDS`);
//!   warning (0.6) for the others (mostly application faults).
//! - `gpu_idle`: a device under `gpu_idle_percent` whose previous sample was over
//!   `gpu_busy_percent` (the work collapsed). Warning, score 0.6.
//! - `host_pressure`: CPU PSI some avg10 > `cpu_psi_percent`, memory PSI full avg10 >
//!   `memory_psi_percent`, or available memory < `min_memory_available_percent` of total.
//!   Warning; critical when available memory is under half that share. Score 0.5 at a
//!   threshold, rising with the excess.
//! - `oom_kill`: the newest host sample's `oom_kills_total` is above the oldest window host
//!   point's (a lower figure is a reboot, not a kill). Warning, 0.6 for one kill, rising.
//!
//! A GPU sample with `available = false` (no NVML, no GPU) gives no GPU finding.

use guardian_proto::v1::{GpuDevice, GpuSample};

use super::{DetectPolicy, Finding, FindingKind, NodeInput, PreviousDevice, PreviousGpu, Severity};
use crate::batch::values::HostValues;

/// Throttle reason names (as the agent's GPU sampler reports them) that mean clocks are held
/// back by heat or by a power brake.
const THERMAL_REASONS: [&str; 4] = [
    "hw_slowdown",
    "sw_thermal_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
];

/// Xid codes that mean broken hardware or driver state rather than a faulting application:
/// 48 double-bit ECC, 61/62 internal micro-controller halt, 63/64 ECC page retirement or row
/// remapping (failure), 74 NVLink error, 79 fallen off the bus, 92 high single-bit ECC rate,
/// 94/95 contained/uncontained ECC error, 119/120 GSP error or timeout.
const CRITICAL_XIDS: [u64; 12] = [48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120];

/// Devices listed by name in evidence, at most.
const MAX_LISTED: usize = 10;

/// Machine findings for one node.
pub fn detect(input: &NodeInput<'_>, policy: &DetectPolicy) -> Vec<Finding> {
    let mut findings = Vec::new();
    if let Some((_, gpu)) = input.gpu.filter(|(_, gpu)| gpu.available) {
        let previous = input
            .previous_gpu
            .filter(|(_, prev)| prev.available)
            .map(|(_, prev)| prev);
        findings.extend(gpu_thermal(gpu, policy));
        findings.extend(gpu_errors(gpu, previous));
        findings.extend(gpu_idle(gpu, previous, policy));
    }
    if let Some((_, host)) = input.host {
        findings.extend(host_pressure(&host, policy));
    }
    findings.extend(oom_kill(input));
    findings
}

/// The same device in an earlier sample.
fn same_device<'a>(
    previous: Option<&'a PreviousGpu>,
    device: &GpuDevice,
) -> Option<&'a PreviousDevice> {
    previous?.devices.iter().find(|d| *d.uuid == *device.uuid)
}

/// `index:uuid`, the name a device goes by in summaries and evidence.
fn label(device: &GpuDevice) -> String {
    format!("{}:{}", device.index, device.uuid)
}

fn list(items: &[String]) -> String {
    let mut text = items
        .iter()
        .take(MAX_LISTED)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > MAX_LISTED {
        text.push_str(&format!(" (+{} more)", items.len() - MAX_LISTED));
    }
    text
}

fn gpu_thermal(gpu: &GpuSample, policy: &DetectPolicy) -> Option<Finding> {
    let limit = policy.gpu_temperature_celsius;
    let mut worst: Option<(Severity, f64, &GpuDevice)> = None;
    let mut hot = Vec::new();
    for device in &gpu.devices {
        let temp = device.temperature_celsius;
        let reasons: Vec<&str> = device
            .throttle_reasons
            .iter()
            .map(String::as_str)
            .filter(|r| THERMAL_REASONS.contains(r))
            .collect();
        let (severity, score) = if temp >= limit + 10.0 {
            (Severity::Critical, 1.0)
        } else if temp >= limit {
            (Severity::Warning, 0.5 + 0.5 * (temp - limit) / 10.0)
        } else if !reasons.is_empty() {
            (Severity::Warning, 0.5)
        } else {
            continue;
        };
        let reasons = if reasons.is_empty() {
            String::new()
        } else {
            format!(" [{}]", reasons.join(" "))
        };
        hot.push(format!("{} {temp:.0}C{reasons}", label(device)));
        if worst.is_none_or(|(s, sc, _)| (severity, score) > (s, sc)) {
            worst = Some((severity, score, device));
        }
    }
    let (severity, score, device) = worst?;
    Some(Finding::new(
        FindingKind::GpuThermal,
        score,
        severity,
        format!(
            "GPU {} runs at {:.0} C (limit {limit:.0} C){}; {} of {} GPUs hot or throttled.",
            label(device),
            device.temperature_celsius,
            if device.throttle_reasons.is_empty() {
                String::new()
            } else {
                format!(", throttled: {}", device.throttle_reasons.join(" "))
            },
            hot.len(),
            gpu.devices.len()
        ),
        [
            ("devices", list(&hot)),
            (
                "max_temperature_celsius",
                format!("{:.1}", device.temperature_celsius),
            ),
            ("gpu_temperature_celsius", format!("{limit:.1}")),
            ("throttle_reasons", device.throttle_reasons.join(" ")),
        ],
    ))
}

fn gpu_errors(gpu: &GpuSample, previous: Option<&PreviousGpu>) -> Option<Finding> {
    let mut severity = Severity::Warning;
    let mut problems = Vec::new();
    let mut xids = Vec::new();
    let mut new_ecc = 0u64;
    for device in &gpu.devices {
        if let Some(prev) = same_device(previous, device) {
            // A lower count is a driver reload (the counters are volatile), not a repair.
            let grown = device
                .ecc_uncorrected_total
                .saturating_sub(prev.ecc_uncorrected_total);
            if grown > 0 {
                new_ecc = new_ecc.saturating_add(grown);
                severity = Severity::Critical;
                problems.push(format!("{} +{grown} uncorrected ECC", label(device)));
            }
        }
        for event in &device.xid_events {
            if CRITICAL_XIDS.contains(&event.xid) {
                severity = Severity::Critical;
            }
            xids.push(event.xid.to_string());
            problems.push(format!("{} Xid {}", label(device), event.xid));
        }
    }
    if problems.is_empty() {
        return None;
    }
    let score = if severity == Severity::Critical {
        1.0
    } else {
        0.6
    };
    Some(Finding::new(
        FindingKind::GpuErrors,
        score,
        severity,
        format!("GPU errors since the previous sample: {}.", list(&problems)),
        [
            ("problems", list(&problems)),
            ("new_ecc_uncorrected", new_ecc.to_string()),
            ("xids", xids.join(" ")),
        ],
    ))
}

fn gpu_idle(
    gpu: &GpuSample,
    previous: Option<&PreviousGpu>,
    policy: &DetectPolicy,
) -> Option<Finding> {
    let mut collapsed = Vec::new();
    let mut first: Option<(f64, f64)> = None;
    for device in &gpu.devices {
        let Some(prev) = same_device(previous, device) else {
            continue;
        };
        let now = device.utilisation_gpu_percent;
        let before = prev.utilisation_gpu_percent;
        if now < policy.gpu_idle_percent && before > policy.gpu_busy_percent {
            collapsed.push(format!("{} {before:.0}% -> {now:.0}%", label(device)));
            first.get_or_insert((before, now));
        }
    }
    let (before, now) = first?;
    Some(Finding::new(
        FindingKind::GpuIdle,
        0.6,
        Severity::Warning,
        format!(
            "GPU utilisation collapsed from {before:.0}% to {now:.0}% on {} of {} GPUs: {}.",
            collapsed.len(),
            gpu.devices.len(),
            list(&collapsed)
        ),
        [
            ("devices", list(&collapsed)),
            ("utilisation_before_percent", format!("{before:.1}")),
            ("utilisation_now_percent", format!("{now:.1}")),
            (
                "gpu_idle_percent",
                format!("{:.1}", policy.gpu_idle_percent),
            ),
            (
                "gpu_busy_percent",
                format!("{:.1}", policy.gpu_busy_percent),
            ),
        ],
    ))
}

/// 0.5 at `limit`, 1.0 at `full`.
fn excess(value: f64, limit: f64, full: f64) -> f64 {
    if full <= limit {
        return 1.0;
    }
    0.5 + 0.5 * ((value - limit) / (full - limit)).clamp(0.0, 1.0)
}

fn host_pressure(host: &HostValues, policy: &DetectPolicy) -> Option<Finding> {
    let mut severity = Severity::Warning;
    let mut score: f64 = 0.0;
    let mut problems = Vec::new();
    let cpu = host.cpu_psi_some_avg10_percent;
    if cpu > policy.cpu_psi_percent {
        score = score.max(excess(cpu, policy.cpu_psi_percent, 100.0));
        problems.push(format!(
            "CPU pressure {cpu:.0}% (limit {:.0}%)",
            policy.cpu_psi_percent
        ));
    }
    let memory = host.memory_psi_full_avg10_percent;
    if memory > policy.memory_psi_percent {
        score = score.max(excess(memory, policy.memory_psi_percent, 100.0));
        problems.push(format!(
            "memory pressure {memory:.0}% (limit {:.0}%)",
            policy.memory_psi_percent
        ));
    }
    let available = (host.mem_total_bytes > 0)
        .then(|| host.mem_available_bytes as f64 / host.mem_total_bytes as f64 * 100.0);
    if let Some(available) = available {
        let min = policy.min_memory_available_percent;
        if available < min {
            // Mirror of `excess`: 0.5 at the minimum, 1.0 with nothing left.
            score = score.max(excess(min - available, 0.0, min));
            if available < min / 2.0 {
                severity = Severity::Critical;
            }
            problems.push(format!(
                "{available:.1}% memory available (minimum {min:.0}%)"
            ));
        }
    }
    if problems.is_empty() {
        return None;
    }
    Some(Finding::new(
        FindingKind::HostPressure,
        score,
        severity,
        format!("Host under pressure: {}.", problems.join("; ")),
        [
            ("cpu_psi_some_avg10_percent", format!("{cpu:.1}")),
            ("memory_psi_full_avg10_percent", format!("{memory:.1}")),
            (
                "memory_available_percent",
                available.map_or_else(|| "unknown".to_owned(), |a| format!("{a:.1}")),
            ),
            ("mem_available_bytes", host.mem_available_bytes.to_string()),
            ("mem_total_bytes", host.mem_total_bytes.to_string()),
        ],
    ))
}

fn oom_kill(input: &NodeInput<'_>) -> Option<Finding> {
    let (newest_at, newest) = match input.host {
        Some((at, host)) => (at, host.oom_kills_total),
        None => input
            .window
            .host()
            .back()
            .map(|(at, v)| (at, v.oom_kills_total))?,
    };
    let (oldest_at, oldest) = input
        .window
        .host()
        .front()
        .map(|(at, v)| (at, v.oom_kills_total))?;
    if oldest_at >= newest_at || newest <= oldest {
        return None;
    }
    let kills = newest - oldest;
    let score = 0.6 + 0.1 * (kills.min(5) - 1) as f64;
    Some(Finding::new(
        FindingKind::OomKill,
        score,
        Severity::Warning,
        format!(
            "The kernel OOM-killed {kills} process(es) in the last {} minutes.",
            (newest_at - oldest_at) / 60_000
        ),
        [
            ("new_oom_kills", kills.to_string()),
            ("oom_kills_total", newest.to_string()),
            ("since_unix_ms", oldest_at.to_string()),
        ],
    ))
}

#[cfg(test)]
mod tests {
    use guardian_proto::v1::{HostSample, Pressure, XidEvent};

    use super::super::block_lag::tests::{NOW, quiet_input, window};
    use super::*;

    fn device(index: u32, utilisation: f64, temperature: f64) -> GpuDevice {
        GpuDevice {
            index,
            uuid: format!("GPU-{index:08x}"),
            name: "NVIDIA H100 80GB HBM3".to_owned(),
            utilisation_gpu_percent: utilisation,
            temperature_celsius: temperature,
            ..GpuDevice::default()
        }
    }

    fn gpus(devices: Vec<GpuDevice>) -> GpuSample {
        GpuSample {
            available: true,
            devices,
            ..GpuSample::default()
        }
    }

    fn run_gpu(gpu: &GpuSample, previous: Option<&GpuSample>) -> Vec<Finding> {
        let window = window();
        let previous = previous.map(PreviousGpu::from);
        let input = NodeInput {
            gpu: Some((NOW, gpu)),
            previous_gpu: previous.as_ref().map(|p| (NOW - 1_000, p)),
            ..quiet_input(&window)
        };
        detect(&input, &DetectPolicy::default())
    }

    fn kinds(findings: &[Finding]) -> Vec<FindingKind> {
        findings.iter().map(|f| f.kind).collect()
    }

    #[test]
    fn busy_cool_gpus_are_quiet() {
        let gpu = gpus(vec![device(0, 95.0, 70.0), device(1, 90.0, 72.0)]);
        assert!(run_gpu(&gpu, Some(&gpu)).is_empty());
    }

    #[test]
    fn gpu_at_the_temperature_limit_is_a_warning() {
        let gpu = gpus(vec![device(0, 95.0, 70.0), device(1, 95.0, 85.0)]);
        let findings = run_gpu(&gpu, None);
        assert_eq!(kinds(&findings), vec![FindingKind::GpuThermal]);
        assert_eq!(findings[0].severity, Severity::Warning);
        assert!(findings[0].summary.contains("1:GPU-00000001"));
    }

    #[test]
    fn gpu_ten_degrees_over_is_critical() {
        let gpu = gpus(vec![device(0, 95.0, 96.0)]);
        let findings = run_gpu(&gpu, None);
        assert_eq!(findings[0].severity, Severity::Critical);
        assert!((findings[0].score - 1.0).abs() < 1e-9);
    }

    #[test]
    fn thermal_throttle_below_the_limit_is_a_warning_but_power_cap_is_not() {
        let throttled = GpuDevice {
            throttle_reasons: vec!["hw_thermal_slowdown".to_owned()],
            ..device(0, 95.0, 80.0)
        };
        let findings = run_gpu(&gpus(vec![throttled]), None);
        assert_eq!(kinds(&findings), vec![FindingKind::GpuThermal]);
        assert_eq!(
            findings[0].evidence["throttle_reasons"],
            "hw_thermal_slowdown"
        );

        let capped = GpuDevice {
            throttle_reasons: vec!["sw_power_cap".to_owned()],
            ..device(0, 95.0, 80.0)
        };
        assert!(run_gpu(&gpus(vec![capped]), None).is_empty());
    }

    #[test]
    fn new_uncorrected_ecc_errors_are_critical() {
        let before = gpus(vec![GpuDevice {
            ecc_uncorrected_total: 2,
            ..device(0, 95.0, 70.0)
        }]);
        let now = gpus(vec![GpuDevice {
            ecc_uncorrected_total: 3,
            ..device(0, 95.0, 70.0)
        }]);
        let findings = run_gpu(&now, Some(&before));
        assert_eq!(kinds(&findings), vec![FindingKind::GpuErrors]);
        assert_eq!(findings[0].severity, Severity::Critical);
        assert_eq!(findings[0].evidence["new_ecc_uncorrected"], "1");
    }

    #[test]
    fn old_ecc_errors_or_a_counter_reset_are_quiet() {
        let before = gpus(vec![GpuDevice {
            ecc_uncorrected_total: 5,
            ..device(0, 95.0, 70.0)
        }]);
        let same = before.clone();
        assert!(run_gpu(&same, Some(&before)).is_empty());
        let reset = gpus(vec![device(0, 95.0, 70.0)]);
        assert!(run_gpu(&reset, Some(&before)).is_empty());
    }

    #[test]
    fn xid_79_is_critical_and_xid_13_a_warning() {
        let with_xid = |xid| {
            gpus(vec![GpuDevice {
                xid_events: vec![XidEvent {
                    xid,
                    observed_at_unix_ms: NOW - 500,
                }],
                ..device(0, 95.0, 70.0)
            }])
        };
        let findings = run_gpu(&with_xid(79), None);
        assert_eq!(kinds(&findings), vec![FindingKind::GpuErrors]);
        assert_eq!(findings[0].severity, Severity::Critical);
        assert_eq!(findings[0].evidence["xids"], "79");

        let findings = run_gpu(&with_xid(13), None);
        assert_eq!(findings[0].severity, Severity::Warning);
    }

    #[test]
    fn utilisation_collapsing_from_busy_to_idle_is_gpu_idle() {
        let before = gpus(vec![device(0, 90.0, 70.0), device(1, 90.0, 70.0)]);
        let now = gpus(vec![device(0, 2.0, 60.0), device(1, 88.0, 70.0)]);
        let findings = run_gpu(&now, Some(&before));
        assert_eq!(kinds(&findings), vec![FindingKind::GpuIdle]);
        assert_eq!(findings[0].evidence["utilisation_before_percent"], "90.0");
    }

    #[test]
    fn gpu_that_was_never_busy_is_not_idle() {
        let before = gpus(vec![device(0, 30.0, 50.0)]);
        let now = gpus(vec![device(0, 1.0, 50.0)]);
        assert!(run_gpu(&now, Some(&before)).is_empty());
    }

    #[test]
    fn unavailable_gpu_sample_gives_nothing() {
        let gpu = GpuSample {
            available: false,
            unavailable_reason: "NVML reports no GPU".to_owned(),
            ..gpus(vec![device(0, 0.0, 120.0)])
        };
        assert!(run_gpu(&gpu, None).is_empty());
    }

    fn host(cpu_psi: f64, memory_psi: f64, available_gib: u64) -> HostSample {
        HostSample {
            mem_total_bytes: 100 << 30,
            mem_available_bytes: available_gib << 30,
            cpu_pressure: Some(Pressure {
                some_avg10_percent: cpu_psi,
                ..Pressure::default()
            }),
            memory_pressure: Some(Pressure {
                full_avg10_percent: memory_psi,
                ..Pressure::default()
            }),
            ..HostSample::default()
        }
    }

    fn run_host(host: &HostSample) -> Vec<Finding> {
        let window = window();
        let input = NodeInput {
            host: Some((NOW, HostValues::of(host))),
            ..quiet_input(&window)
        };
        detect(&input, &DetectPolicy::default())
    }

    #[test]
    fn relaxed_host_is_quiet() {
        assert!(run_host(&host(10.0, 0.0, 50)).is_empty());
    }

    #[test]
    fn cpu_pressure_over_the_limit_is_a_warning() {
        let findings = run_host(&host(70.0, 0.0, 50));
        assert_eq!(kinds(&findings), vec![FindingKind::HostPressure]);
        assert_eq!(findings[0].severity, Severity::Warning);
        assert!((findings[0].score - 0.75).abs() < 1e-9);
    }

    #[test]
    fn memory_stall_is_host_pressure() {
        let findings = run_host(&host(0.0, 12.0, 50));
        assert_eq!(kinds(&findings), vec![FindingKind::HostPressure]);
        assert!(findings[0].summary.contains("memory pressure 12%"));
    }

    #[test]
    fn memory_nearly_exhausted_is_critical_under_half_the_minimum() {
        let findings = run_host(&host(0.0, 0.0, 4));
        assert_eq!(findings[0].severity, Severity::Warning);
        let findings = run_host(&host(0.0, 0.0, 2));
        assert_eq!(findings[0].severity, Severity::Critical);
        assert_eq!(findings[0].evidence["memory_available_percent"], "2.0");
    }

    fn window_of_oom_kills(kills: &[u64]) -> crate::window::Window {
        let mut window = window();
        let start = NOW - 10_000 * (kills.len() as i64 - 1);
        for (i, total) in kills.iter().enumerate() {
            window.record_host(
                start + 10_000 * i as i64,
                HostValues {
                    oom_kills_total: *total,
                    ..HostValues::default()
                },
            );
        }
        window
    }

    #[test]
    fn oom_kill_within_the_window_is_reported() {
        let window = window_of_oom_kills(&[4, 4, 4, 5, 5]);
        let host = HostSample {
            oom_kills_total: 5,
            ..host(0.0, 0.0, 50)
        };
        let input = NodeInput {
            host: Some((NOW, HostValues::of(&host))),
            ..quiet_input(&window)
        };
        let findings = detect(&input, &DetectPolicy::default());
        assert_eq!(kinds(&findings), vec![FindingKind::OomKill]);
        assert_eq!(findings[0].evidence["new_oom_kills"], "1");
    }

    #[test]
    fn old_oom_kills_and_reboots_are_quiet() {
        let window = window_of_oom_kills(&[4, 4, 4, 4]);
        let host = HostSample {
            oom_kills_total: 4,
            ..host(0.0, 0.0, 50)
        };
        let input = NodeInput {
            host: Some((NOW, HostValues::of(&host))),
            ..quiet_input(&window)
        };
        assert!(detect(&input, &DetectPolicy::default()).is_empty());

        let rebooted = window_of_oom_kills(&[9, 9, 0, 0]);
        let host = HostSample {
            oom_kills_total: 0,
            ..host
        };
        let input = NodeInput {
            host: Some((NOW, HostValues::of(&host))),
            ..quiet_input(&rebooted)
        };
        assert!(detect(&input, &DetectPolicy::default()).is_empty());
    }
}
