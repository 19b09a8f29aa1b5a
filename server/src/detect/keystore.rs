//! Owns `keystore`: whether the hotkey keystore is where it should be and guarded as it
//! should be. One combined finding per node listing every problem, with the worst severity:
//!
//! - missing (`present` false): critical (nothing else is judged);
//! - not on tmpfs (the key survives on a disk): critical;
//! - directory or any file readable/writable by group or others (mode & 0o077): warning;
//! - swap active while the keystore is on tmpfs (tmpfs pages can be swapped to disk): warning;
//! - key fingerprints changed within `keystore_rotation_hold_ms` of now: warning;
//! - mount without `nodev`, `nosuid` or `noexec`: info.
//!
//! Score: 1.0 when critical, 0.6 when a warning, 0.2 when info, plus 0.05 per further problem.
//! Evidence holds one key per problem; the samples never carry key bytes, and evidence holds
//! only paths, file names, modes and fingerprints.

use guardian_proto::v1::KeystoreSample;

use super::{DetectPolicy, Finding, FindingKind, NodeInput, Severity};

/// Mode bits granting anything to group or others.
const LOOSE_MODE_BITS: u32 = 0o077;
/// Files named in evidence, at most.
const MAX_LISTED: usize = 10;
/// Hex digits of a fingerprint shown in evidence (enough to tell keys apart).
const FINGERPRINT_DIGITS: usize = 16;

/// One problem: how bad, its evidence, and its phrase in the summary.
struct Problem {
    severity: Severity,
    evidence: Vec<(&'static str, String)>,
    phrase: String,
}

/// `keystore` findings for one node (at most one).
pub fn detect(input: &NodeInput<'_>, policy: &DetectPolicy) -> Vec<Finding> {
    let Some((_, keystore)) = input.keystore else {
        return Vec::new();
    };
    let problems = problems(input, keystore, policy);
    let Some(worst) = problems.iter().map(|p| p.severity).max() else {
        return Vec::new();
    };
    let base = match worst {
        Severity::Critical => 1.0,
        Severity::Warning => 0.6,
        Severity::Info => 0.2,
    };
    let score = base + 0.05 * (problems.len() - 1) as f64;
    let summary = format!(
        "Keystore {}: {}.",
        keystore.path,
        problems
            .iter()
            .map(|p| p.phrase.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    );
    let mut evidence = vec![("path", keystore.path.clone())];
    evidence.extend(problems.into_iter().flat_map(|p| p.evidence));
    vec![Finding::new(
        FindingKind::Keystore,
        score,
        worst,
        summary,
        evidence,
    )]
}

fn problems(
    input: &NodeInput<'_>,
    keystore: &KeystoreSample,
    policy: &DetectPolicy,
) -> Vec<Problem> {
    if !keystore.present {
        return vec![Problem {
            severity: Severity::Critical,
            evidence: vec![("missing", "true".to_owned())],
            phrase: "missing: the validator has no hotkey to sign with".to_owned(),
        }];
    }
    let mut problems = Vec::new();
    if !keystore.on_tmpfs {
        problems.push(Problem {
            severity: Severity::Critical,
            evidence: vec![("filesystem_type", keystore.filesystem_type.clone())],
            phrase: format!(
                "on {}, not tmpfs: the key survives on disk",
                keystore.filesystem_type
            ),
        });
    }
    if keystore.dir_mode & LOOSE_MODE_BITS != 0 {
        problems.push(Problem {
            severity: Severity::Warning,
            evidence: vec![("dir_mode", format!("{:04o}", keystore.dir_mode))],
            phrase: format!(
                "directory mode {:04o} lets group or others in",
                keystore.dir_mode
            ),
        });
    }
    let loose: Vec<String> = keystore
        .files
        .iter()
        .filter(|f| f.mode & LOOSE_MODE_BITS != 0)
        .map(|f| format!("{}:{:04o}", f.name, f.mode))
        .collect();
    if !loose.is_empty() {
        let mut value = loose
            .iter()
            .take(MAX_LISTED)
            .cloned()
            .collect::<Vec<_>>()
            .join(",");
        if loose.len() > MAX_LISTED {
            value.push_str(&format!(",+{} more", loose.len() - MAX_LISTED));
        }
        problems.push(Problem {
            severity: Severity::Warning,
            evidence: vec![("loose_files", value)],
            phrase: format!("{} file(s) readable by group or others", loose.len()),
        });
    }
    if keystore.on_tmpfs && keystore.swap_active {
        problems.push(Problem {
            severity: Severity::Warning,
            evidence: vec![("swap_total_bytes", keystore.swap_total_bytes.to_string())],
            phrase: "swap is active, so tmpfs pages holding the key can reach disk".to_owned(),
        });
    }
    if let Some(changed) = input.keystore_changed_unix_ms {
        let age = input.now_unix_ms.saturating_sub(changed);
        if (0..=policy.keystore_rotation_hold_ms).contains(&age) {
            let fingerprints = keystore
                .files
                .iter()
                .take(MAX_LISTED)
                .map(|f| {
                    let short = f
                        .sha256_fingerprint
                        .get(..FINGERPRINT_DIGITS)
                        .unwrap_or(&f.sha256_fingerprint);
                    format!("{}:{short}", f.name)
                })
                .collect::<Vec<_>>()
                .join(",");
            problems.push(Problem {
                severity: Severity::Warning,
                evidence: vec![
                    ("key_changed_unix_ms", changed.to_string()),
                    ("fingerprints", fingerprints),
                ],
                phrase: format!("key fingerprints changed {} s ago", age / 1000),
            });
        }
    }
    let missing_flags: Vec<&str> = [
        ("nodev", keystore.mount_nodev),
        ("nosuid", keystore.mount_nosuid),
        ("noexec", keystore.mount_noexec),
    ]
    .into_iter()
    .filter(|(_, set)| !set)
    .map(|(name, _)| name)
    .collect();
    if !missing_flags.is_empty() {
        problems.push(Problem {
            severity: Severity::Info,
            evidence: vec![("mount_flags_missing", missing_flags.join(","))],
            phrase: format!("mounted without {}", missing_flags.join(", ")),
        });
    }
    problems
}

#[cfg(test)]
mod tests {
    use guardian_proto::v1::KeyFile;

    use super::super::block_lag::tests::{NOW, quiet_input, window};
    use super::*;

    /// A keystore as it should be: tmpfs, nodev/nosuid/noexec, 0700 directory, one 0600 key,
    /// no swap.
    fn guarded() -> KeystoreSample {
        KeystoreSample {
            path: "/run/keystore".to_owned(),
            present: true,
            filesystem_type: "tmpfs".to_owned(),
            on_tmpfs: true,
            mount_nodev: true,
            mount_nosuid: true,
            mount_noexec: true,
            dir_mode: 0o700,
            files: vec![KeyFile {
                name: "hotkeys/default".to_owned(),
                mode: 0o600,
                size_bytes: 400,
                sha256_fingerprint: "ab".repeat(32),
                ..KeyFile::default()
            }],
            file_count: 1,
            total_bytes: 400,
            ..KeystoreSample::default()
        }
    }

    fn run(keystore: &KeystoreSample, changed: Option<i64>) -> Vec<Finding> {
        let window = window();
        let input = NodeInput {
            keystore: Some((NOW, keystore)),
            keystore_changed_unix_ms: changed,
            ..quiet_input(&window)
        };
        detect(&input, &DetectPolicy::default())
    }

    #[test]
    fn guarded_keystore_is_quiet() {
        assert!(run(&guarded(), None).is_empty());
    }

    #[test]
    fn keystore_on_disk_is_critical() {
        let keystore = KeystoreSample {
            filesystem_type: "ext4".to_owned(),
            on_tmpfs: false,
            ..guarded()
        };
        let findings = run(&keystore, None);
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert_eq!(findings[0].kind, FindingKind::Keystore);
        assert_eq!(findings[0].severity, Severity::Critical);
        assert_eq!(findings[0].evidence["filesystem_type"], "ext4");
    }

    #[test]
    fn missing_keystore_is_critical_and_nothing_else() {
        let keystore = KeystoreSample {
            path: "/run/keystore".to_owned(),
            present: false,
            ..KeystoreSample::default()
        };
        let findings = run(&keystore, None);
        assert_eq!(findings[0].severity, Severity::Critical);
        assert_eq!(findings[0].evidence.len(), 2, "{:?}", findings[0].evidence);
        assert_eq!(findings[0].evidence["missing"], "true");
    }

    #[test]
    fn group_readable_files_are_a_warning_naming_them() {
        let mut keystore = KeystoreSample {
            dir_mode: 0o750,
            ..guarded()
        };
        keystore.files[0].mode = 0o640;
        let findings = run(&keystore, None);
        assert_eq!(findings[0].severity, Severity::Warning);
        assert_eq!(findings[0].evidence["dir_mode"], "0750");
        assert_eq!(findings[0].evidence["loose_files"], "hotkeys/default:0640");
        assert!((findings[0].score - 0.65).abs() < 1e-9);
    }

    #[test]
    fn swap_under_a_tmpfs_keystore_is_a_warning() {
        let keystore = KeystoreSample {
            swap_active: true,
            swap_total_bytes: 8 << 30,
            ..guarded()
        };
        let findings = run(&keystore, None);
        assert_eq!(findings[0].severity, Severity::Warning);
        assert_eq!(
            findings[0].evidence["swap_total_bytes"],
            (8u64 << 30).to_string()
        );
    }

    #[test]
    fn mount_without_noexec_is_info() {
        let keystore = KeystoreSample {
            mount_noexec: false,
            ..guarded()
        };
        let findings = run(&keystore, None);
        assert_eq!(findings[0].severity, Severity::Info);
        assert_eq!(findings[0].evidence["mount_flags_missing"], "noexec");
    }

    #[test]
    fn rotated_key_is_a_warning_while_the_hold_lasts() {
        let findings = run(&guarded(), Some(NOW - 60_000));
        assert_eq!(findings[0].severity, Severity::Warning);
        assert_eq!(
            findings[0].evidence["fingerprints"],
            "hotkeys/default:abababababababab"
        );
        assert!(run(&guarded(), Some(NOW - 600_001)).is_empty());
    }

    #[test]
    fn several_problems_make_one_finding_with_the_worst_severity() {
        let keystore = KeystoreSample {
            filesystem_type: "ext4".to_owned(),
            on_tmpfs: false,
            mount_nodev: false,
            dir_mode: 0o755,
            swap_active: true,
            ..guarded()
        };
        let findings = run(&keystore, None);
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].severity, Severity::Critical);
        // Swap matters only for tmpfs: on disk the key is exposed anyway.
        assert!(!findings[0].evidence.contains_key("swap_total_bytes"));
        assert!(findings[0].evidence.contains_key("dir_mode"));
        assert!(findings[0].evidence.contains_key("mount_flags_missing"));
    }
}
