//! The server's typed configuration: defaults, TOML file, `GUARDIAN_SERVER_*` environment
//! overrides and flags, in that order; [`ServerConfig::validate`] runs before any port is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::store::Backend;
use crate::store::clickhouse::ClickHouseSettings;

/// Exit code for invalid configuration (EX_USAGE... sysexits' EX_USAGE is 64).
pub const EXIT_CONFIG: i32 = 64;

/// Everything `guardian-server` can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// mTLS gRPC address for agents (Uplink) and operators (Fleet API).
    pub listen: SocketAddr,
    /// Plain HTTP admin address: /metrics, /healthz, /readyz. Keep it on loopback or a private network.
    pub admin_listen: SocketAddr,
    /// Ledger and embedded telemetry store: `sqlite://PATH` (created on first run) or `postgres://...`.
    pub ledger_url: String,
    /// Largest frame accepted from a client, in bytes; larger frames end that stream.
    pub max_frame_bytes: usize,
    /// Sampling interval asked of agents in Welcome, in milliseconds; 0 lets each agent keep its own.
    pub sample_interval_ms: u32,
    /// How long an agent may take to send Hello after opening a stream, in milliseconds.
    pub hello_timeout_ms: u64,
    /// With ClickHouse: most bytes of acked batches the outbox may hold while ClickHouse is
    /// behind or down; beyond it ingest pauses (agents keep spooling).
    pub outbox_max_bytes: u64,
    /// How far back the in-memory per-node windows reach, in seconds (rebuilt from the
    /// store at start).
    pub window_seconds: u32,
    /// Embedded store: days of samples kept, by observed time; 0 = forever. Runs with
    /// ClickHouse too, for rows stored before it was configured.
    pub embedded_retention_days: u32,
    /// Ed25519 PKCS#8 key that signs remote commands; empty = remote commands off.
    pub command_signing_key_file: PathBuf,
    /// Async worker threads; 0 = one per CPU core. Fewer than the cores helps where the
    /// server shares a small machine with ClickHouse (each extra worker costs wake-ups).
    pub worker_threads: usize,
    /// ClickHouse telemetry store; off (embedded store) while `url` is empty.
    pub clickhouse: ClickHouseSettings,
    /// Detector thresholds (`[detect]`).
    pub detect: crate::detect::DetectPolicy,
    /// The reconciler and the fleet's default sync policy (`[reconcile]`).
    pub reconcile: crate::reconcile::ReconcileSettings,
    /// Webhook for alerts (`[alerts]`).
    pub alerts: crate::actuate::alert::AlertSettings,
    /// Append-only file the audit chain's head is anchored in (outside the ledger); empty =
    /// `<ledger file>.audit-anchor` for SQLite, off for PostgreSQL.
    pub audit_anchor_file: PathBuf,
    /// How often the audit head is anchored, in seconds (when it moved).
    pub audit_anchor_every_seconds: u64,
    /// Limits of the gRPC listener (`[connections]`).
    pub connections: crate::listen::ConnectionLimits,
    /// Wait as a standby while another server holds the ledger (instead of refusing to start),
    /// and take over when it stops: active/passive failover on one PostgreSQL ledger (or one
    /// SQLite file on shared storage). The standby neither listens nor acts until then.
    pub standby: bool,
    /// Kubernetes clusters the server may remediate in (`[kubernetes]`); none = off.
    pub kubernetes: crate::actuate::kubernetes::KubeSettings,
    /// The HTTPS analysis endpoint for rollout gates (`[analysis]`); off by default.
    pub analysis: crate::analysis::AnalysisSettings,
    /// The HTTPS fleet web page (`[web]`); off by default.
    pub web: crate::web::WebSettings,
    /// TLS material.
    pub tls: ServerTls,
}

/// PEM files for the server's mTLS endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerTls {
    /// Fleet CA: only client certificates chained to it are accepted.
    pub ca_file: PathBuf,
    /// The server's certificate (chain).
    pub cert_file: PathBuf,
    /// The server's private key.
    pub key_file: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7444)),
            ledger_url: "sqlite://guardian-data/guardian.db".to_owned(),
            max_frame_bytes: guardian_proto::DEFAULT_MAX_FRAME_BYTES,
            sample_interval_ms: 0,
            hello_timeout_ms: 10_000,
            outbox_max_bytes: 1 << 30,
            window_seconds: 1800,
            embedded_retention_days: 30,
            command_signing_key_file: PathBuf::new(),
            worker_threads: 0,
            clickhouse: ClickHouseSettings::default(),
            detect: crate::detect::DetectPolicy::default(),
            reconcile: crate::reconcile::ReconcileSettings::default(),
            alerts: crate::actuate::alert::AlertSettings::default(),
            kubernetes: crate::actuate::kubernetes::KubeSettings::default(),
            analysis: crate::analysis::AnalysisSettings::default(),
            web: crate::web::WebSettings::default(),
            standby: false,
            audit_anchor_file: PathBuf::new(),
            audit_anchor_every_seconds: 60,
            connections: crate::listen::ConnectionLimits::default(),
            tls: ServerTls::default(),
        }
    }
}

impl ServerConfig {
    /// Where the audit head is anchored: `audit_anchor_file`, or beside a SQLite ledger.
    pub fn audit_anchor_path(&self) -> Option<PathBuf> {
        if self.audit_anchor_file.as_os_str().is_empty() {
            crate::store::anchor::default_file(&self.ledger_url)
        } else {
            Some(self.audit_anchor_file.clone())
        }
    }
}

impl Default for ServerTls {
    fn default() -> Self {
        Self {
            ca_file: PathBuf::from("pki/ca.pem"),
            cert_file: PathBuf::from("pki/server.pem"),
            key_file: PathBuf::from("pki/server-key.pem"),
        }
    }
}

/// Invalid configuration: which field, what is wrong, how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config: field `{field}`: {problem}; fix: {fix}")]
pub struct ConfigError {
    /// Dotted field path, e.g. `tls.ca_file`.
    pub field: String,
    /// What is wrong.
    pub problem: String,
    /// How to fix it.
    pub fix: String,
}

impl ConfigError {
    fn new(field: &str, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// Maps a figment error (unknown field, wrong type, unreadable file) to a field-naming error.
    pub fn from_figment(error: figment::Error) -> Self {
        use figment::error::Kind;
        let mut field = error.path.join(".");
        let fix = match &error.kind {
            Kind::UnknownField(name, expected) => {
                if field.is_empty() {
                    field.clone_from(name);
                }
                format!("remove it or use one of: {}", expected.join(", "))
            }
            Kind::InvalidType(..) | Kind::InvalidValue(..) => {
                "give a value of the expected type (see --print-config)".to_owned()
            }
            _ => "see --print-config for the accepted fields and defaults".to_owned(),
        };
        if field.is_empty() {
            field = "(file)".to_owned();
        }
        Self {
            field,
            problem: error.kind.to_string(),
            fix,
        }
    }
}

/// The comment printed above each field of the serialized sections of `--print-config`
/// (taken from the fields' doc comments); a test fails for a field without one.
const FIELD_DOCS: &[(&str, &str)] = &[
    (
        "detect.max_block_lag",
        "Absolute block lag at which `block_lag` fires (warning; critical at 3x). Default 10 (two minutes of 12 s blocks). The reconciler's `max_block_lag` overrides it per node.",
    ),
    (
        "detect.lag_z_threshold",
        "z-score of the current lag behind the node's own sources (sync state, references; as the window records it) against the window, above which `block_lag` fires even below `max_block_lag` (needs >= 6 window points and that lag >= 3). Default 3.0.",
    ),
    (
        "detect.frozen_head_ms",
        "Head age (ms) beyond which a non-syncing node's head counts as frozen. Default 60 000 (5 blocks).",
    ),
    (
        "detect.max_finality_lag",
        "best - finalized (blocks) beyond which finality counts as stalled. Default 30.",
    ),
    (
        "detect.syncing_too_long_minutes",
        "Minutes of continuous syncing before `syncing_too_long`. Default 120.",
    ),
    (
        "detect.silent_after_ms",
        "No sample for this long (ms) -> `agent_silent`. Default 30 000.",
    ),
    (
        "detect.gpu_temperature_celsius",
        "GPU temperature (Celsius) for `gpu_thermal` warning (critical at +10). Default 85.",
    ),
    (
        "detect.gpu_idle_percent",
        "GPU utilisation (%) under which, after a window mean above `gpu_busy_percent`, it counts as collapsed. Default 5.",
    ),
    (
        "detect.gpu_busy_percent",
        "See `gpu_idle_percent`. Default 40.",
    ),
    (
        "detect.cpu_psi_percent",
        "CPU PSI some avg10 (%) for `host_pressure`. Default 40.",
    ),
    (
        "detect.memory_psi_percent",
        "Memory PSI full avg10 (%) for `host_pressure`. Default 10.",
    ),
    (
        "detect.min_memory_available_percent",
        "Available memory share (%) under which memory counts as nearly exhausted. Default 5.",
    ),
    (
        "detect.disk_latency_ms",
        "Disk read/write latency (ms) for `storage_slow`. Default 50.",
    ),
    (
        "detect.disk_utilisation_percent",
        "Disk utilisation (%) for `storage_slow`. Default 95.",
    ),
    (
        "detect.storage_full_within_hours",
        "Forecast time-to-full (hours) under which `storage_full` fires. Default 24.",
    ),
    (
        "detect.storage_used_percent",
        "Used share (%) of the chain data filesystem for `storage_full` regardless of trend. Default 95.",
    ),
    (
        "detect.min_peers",
        "Peer count at or under which the node counts as isolated. Default 3.",
    ),
    (
        "detect.peers_median_share",
        "Share of the network's median peer count under which the node counts as isolated. Default 0.25.",
    ),
    (
        "detect.fleet_degraded_share",
        "Fraction of nodes of one network degraded together for a fleet finding. Default 0.5.",
    ),
    (
        "detect.fleet_min_nodes",
        "Fewest nodes of a network for fleet correlation to apply. Default 3.",
    ),
    (
        "detect.fleet_tip_agreement",
        "How many connected nodes of a network must have reached a block for it to count as the network's tip (the k-th highest best block). Default 2: one agent that lies about its best block (or a node on a fork racing ahead) cannot make the others look behind. With fewer nodes than this the fleet sets no tip (each node's own `highestBlock` and its reference endpoints still do).",
    ),
    (
        "detect.keystore_rotation_hold_ms",
        "How long a changed key fingerprint stays a finding (ms). Default 600 000.",
    ),
    (
        "detect.clock_skew_warn_ms",
        "Agent clock offset (ms) over which `clock_skew` warns. Default 10 000.",
    ),
    (
        "detect.clock_skew_critical_ms",
        "Agent clock offset (ms) at which `clock_skew` is critical (agents refuse commands beyond 30 s). Default 25 000.",
    ),
    (
        "reconcile.enabled",
        "Run detectors and the reconciler. Default true.",
    ),
    (
        "reconcile.dry_run",
        "Decide and record everything, send no command. Default false.",
    ),
    (
        "reconcile.max_concurrent_remediations",
        "Most nodes in `recovering` at once across the fleet. Default 5.",
    ),
    (
        "reconcile.evaluate_interval_ms",
        "How often every node is evaluated even without a new sample (silent agents, cooldowns, budget resets), ms. Default 1000.",
    ),
    ("reconcile.policy", "Fleet defaults."),
    (
        "reconcile.nodes",
        "Per-node overrides of single fields: `[reconcile.nodes.NODE_ID]`.",
    ),
    (
        "reconcile.policy.max_block_lag",
        "Blocks behind the reference tip that count as out of sync. Default 10.",
    ),
    (
        "reconcile.policy.recovery_strategy",
        "`restart` | `snapshot-restore` | `cordon-and-alert`. Default `restart`.",
    ),
    (
        "reconcile.policy.max_restart_attempts",
        "Remediations before the node is `failed`. Default 3.",
    ),
    (
        "reconcile.policy.probe_interval_seconds",
        "Seconds after a remediation before judging it (and the per-node cooldown between attempts). Default 30.",
    ),
    (
        "reconcile.policy.sync_timeout_minutes",
        "Minutes a node may stay syncing/recovering while catching up. Default 120.",
    ),
    (
        "reconcile.policy.stable_reset_seconds",
        "Seconds of `synced` after which the attempt budget resets. Default 1800.",
    ),
    (
        "reconcile.policy.confirm_samples",
        "Consecutive bad evaluations before `degraded` (hysteresis). Default 2.",
    ),
    (
        "reconcile.policy.recover_samples",
        "Consecutive good evaluations before `synced` again (hysteresis). Default 3.",
    ),
    (
        "reconcile.policy.restart_unit",
        "systemd unit the `restart` strategy restarts. Default `subtensor.service`.",
    ),
    (
        "reconcile.policy.restart_container",
        "Container the `restart` strategy restarts instead of a unit, when set. Default empty.",
    ),
    (
        "reconcile.policy.snapshot_hook",
        "Agent hook the `snapshot-restore` strategy runs. Default `snapshot-restore`.",
    ),
    (
        "alerts.webhook_url",
        "Where alerts are POSTed (`http://` or `https://`); empty = log and metric only.",
    ),
    (
        "alerts.min_severity",
        "Findings at or over this severity alert too (`info`, `warning`, `critical`). Default critical.",
    ),
    (
        "alerts.timeout_ms",
        "Per-request timeout, ms. Default 5000.",
    ),
    (
        "alerts.attempts",
        "Tries per alert before it is given up (counted). Default 3.",
    ),
    (
        "alerts.queue",
        "Alerts that may wait; beyond it new ones are dropped (counted). Default 1000.",
    ),
    (
        "kubernetes.clusters",
        "`[kubernetes.clusters.NAME]`, one per cluster; none = Kubernetes off.",
    ),
    (
        "kubernetes.request_timeout_ms",
        "Bound on every call to an API server, ms. Default 5000.",
    ),
    (
        "kubernetes.watch_timeout_seconds",
        "How long one watch of TaoNodes stays open before it is renewed (from where it was), s. Default 290.",
    ),
    (
        "kubernetes.health_interval_seconds",
        "How often each cluster's reachability and permissions are checked, s. Default 60.",
    ),
    (
        "kubernetes.oom_check_interval_ms",
        "How often the pods of TaoNodes with a `memoryCeiling` are read for OOM kills, ms. Default 10000.",
    ),
    (
        "alerts.routes",
        "Routes to Slack, Discord, PagerDuty or webhooks: [[alerts.routes]] with name, service (webhook, slack, discord, pagerduty), url, routing_key (PagerDuty), min_severity, networks, max_per_minute (default 30), repeat_after_seconds (default 3600).",
    ),
    (
        "analysis.listen",
        "HTTPS address of the analysis endpoint for rollout gates (GET /api/v1/risk?node=|network=|selector=; server certificate, bearer token); empty = off.",
    ),
    (
        "analysis.token_sha256",
        "Hex SHA-256 of each accepted bearer token (printf %s TOKEN | sha256sum); never the token itself.",
    ),
    (
        "web.listen",
        "HTTPS address of the read-only fleet web page (server certificate); empty = off.",
    ),
    (
        "web.token_sha256",
        "Hex SHA-256 of each access token the sign-in form (or an Authorization: Bearer header) accepts; never the token itself.",
    ),
    (
        "web.client_certificates",
        "Also let in browsers presenting an operator client certificate from the fleet CA.",
    ),
];

/// Comments above the tables that are maps of the operator's own entries (empty by default).
const TABLE_DOCS: &[(&str, &str)] = &[
    (
        "reconcile.nodes",
        "Per-node overrides of [reconcile.policy]: [reconcile.nodes.NODE_ID] with any of its fields.",
    ),
    (
        "kubernetes.clusters",
        "Clusters to act through: [kubernetes.clusters.NAME] with kubeconfig + context, or in_cluster = true.",
    ),
];

/// `tables` (serialized TOML) with each field's doc comment above it.
fn with_field_docs(tables: &str) -> String {
    let mut out = String::with_capacity(tables.len() * 3);
    let mut section = "";
    for line in tables.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name;
            if let Some((_, doc)) = TABLE_DOCS.iter().find(|(t, _)| *t == name) {
                out.push_str(&format!("# {doc}\n"));
            }
        } else if let Some((key, _)) = line.split_once(" = ") {
            let path = format!("{section}.{key}");
            if let Some((_, doc)) = FIELD_DOCS.iter().find(|(p, _)| *p == path) {
                out.push_str(&format!("# {doc}\n"));
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

impl ServerConfig {
    /// Layers defaults, the TOML file (if given), `GUARDIAN_SERVER_*` variables
    /// (`__` separates nested keys, e.g. `GUARDIAN_SERVER_TLS__CA_FILE`) and `overrides`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the offending field.
    pub fn load(file: Option<&Path>, overrides: Figment) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Self::default()));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError::new(
                    "--config",
                    format!("{} does not exist or is not a file", file.display()),
                    "pass the path of a TOML file (guardian-server --print-config writes one)",
                ));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment
            // GUARDIAN_SERVER_CONFIG is the --config flag and GUARDIAN_SERVER_URL is
            // guardianctl's: neither is a config field.
            .merge(
                Env::prefixed("GUARDIAN_SERVER_")
                    .ignore(&["config", "url"])
                    .split("__"),
            )
            .merge(overrides)
            .extract()
            .map_err(ConfigError::from_figment)
    }

    /// Checks every field; run before binding anything.
    ///
    /// # Errors
    /// The first [`ConfigError`] found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.analysis.validate().map_err(|(field, problem)| {
            ConfigError::new(
                field,
                problem,
                "see [analysis] in --print-config, or remove analysis.listen to turn the endpoint off",
            )
        })?;
        self.web.validate().map_err(|(field, problem)| {
            ConfigError::new(
                field,
                problem,
                "see [web] in --print-config, or remove web.listen to turn the page off",
            )
        })?;
        if !(1024..=64 * 1024 * 1024).contains(&self.max_frame_bytes) {
            return Err(ConfigError::new(
                "max_frame_bytes",
                format!("{} is outside 1024..=67108864", self.max_frame_bytes),
                "use a size between 1 KiB and 64 MiB (default 4194304)",
            ));
        }
        if self.worker_threads > 1024 {
            return Err(ConfigError::new(
                "worker_threads",
                format!("{} is more than 1024", self.worker_threads),
                "use 0 (one per CPU core, the default) or 1 to 1024",
            ));
        }
        if self.sample_interval_ms != 0 && !(100..=3_600_000).contains(&self.sample_interval_ms) {
            return Err(ConfigError::new(
                "sample_interval_ms",
                format!("{} is outside 100..=3600000", self.sample_interval_ms),
                "use 0 (agents keep their own) or 100 ms to 1 h",
            ));
        }
        if !(100..=300_000).contains(&self.hello_timeout_ms) {
            return Err(ConfigError::new(
                "hello_timeout_ms",
                format!("{} is outside 100..=300000", self.hello_timeout_ms),
                "use 100 ms to 5 min (default 10000)",
            ));
        }
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            return Err(ConfigError::new(
                "admin_listen",
                format!("same address as listen ({})", self.listen),
                "give the admin HTTP port its own address",
            ));
        }
        Backend::from_url(&self.ledger_url).map_err(|e| {
            ConfigError::new(
                "ledger_url",
                e.to_string(),
                "e.g. sqlite://guardian-data/guardian.db",
            )
        })?;
        if self.outbox_max_bytes < 1 << 20 {
            return Err(ConfigError::new(
                "outbox_max_bytes",
                format!("{} is below 1 MiB", self.outbox_max_bytes),
                "allow at least 1048576 bytes (default 1073741824: minutes of a large fleet)",
            ));
        }
        if self.embedded_retention_days > 36_500 {
            return Err(ConfigError::new(
                "embedded_retention_days",
                format!("{} is more than 36500", self.embedded_retention_days),
                "use 0 (keep samples forever) or 1 to 36500 days (default 30)",
            ));
        }
        if !(60..=86_400).contains(&self.window_seconds) {
            return Err(ConfigError::new(
                "window_seconds",
                format!("{} is outside 60..=86400", self.window_seconds),
                "use 60 s to 1 day (default 1800)",
            ));
        }
        if !self.command_signing_key_file.as_os_str().is_empty()
            && !self.command_signing_key_file.is_file()
        {
            return Err(ConfigError::new(
                "command_signing_key_file",
                format!("{} does not exist", self.command_signing_key_file.display()),
                "point it at the PKCS#8 key (guardianctl pki init writes command-signing-key.pk8), or leave it empty to keep remote commands off",
            ));
        }
        if let Some(problem) = self.reconcile.problems().into_iter().next() {
            return Err(ConfigError::new(
                "reconcile",
                problem,
                "fix the [reconcile] section (defaults are documented in README.md)",
            ));
        }
        if let Some(problem) = self.alerts.problem() {
            return Err(ConfigError::new(
                "alerts",
                problem,
                "e.g. webhook_url = \"https://hooks.example.com/guardian\", or leave it empty",
            ));
        }
        if !(0.0..=1.0).contains(&self.detect.fleet_degraded_share)
            || self.detect.fleet_degraded_share == 0.0
        {
            return Err(ConfigError::new(
                "detect.fleet_degraded_share",
                format!("{} is outside (0, 1]", self.detect.fleet_degraded_share),
                "use a share such as 0.5 (half of a network's nodes degraded together)",
            ));
        }
        if !(1..=86_400).contains(&self.audit_anchor_every_seconds) {
            return Err(ConfigError::new(
                "audit_anchor_every_seconds",
                format!("{} is outside 1..=86400", self.audit_anchor_every_seconds),
                "use the default 60",
            ));
        }
        self.kubernetes.validate().map_err(|problem| {
            ConfigError::new(
                "kubernetes",
                problem,
                "fix the [kubernetes] section (README: Kubernetes), or remove it",
            )
        })?;
        if let Some((field, problem, fix)) = self.connections.problem() {
            return Err(ConfigError::new(field, problem, fix));
        }
        if self.detect.fleet_tip_agreement == 0 {
            return Err(ConfigError::new(
                "detect.fleet_tip_agreement",
                "0 nodes cannot agree on a tip",
                "use 2 (the default: one lying agent cannot set the fleet tip) or more",
            ));
        }
        if self.clickhouse.enabled() {
            self.clickhouse.validate().map_err(|problem| {
                ConfigError::new(
                    "clickhouse",
                    problem,
                    "fix the [clickhouse] section, or remove url to use the embedded store",
                )
            })?;
        }
        pem_file("tls.ca_file", &self.tls.ca_file, "CERTIFICATE")?;
        pem_file("tls.cert_file", &self.tls.cert_file, "CERTIFICATE")?;
        pem_file("tls.key_file", &self.tls.key_file, "PRIVATE KEY")?;
        Ok(())
    }

    /// The effective configuration as commented TOML.
    pub fn documented_toml(&self) -> String {
        let mut out = String::from(
            "# guardian-server configuration (effective values; defaults where not set).\n\
             # Environment overrides: GUARDIAN_SERVER_<FIELD>, nested with __ (GUARDIAN_SERVER_TLS__CA_FILE).\n\n",
        );
        let line = |out: &mut String, doc: &str, key: &str, value: toml::Value| {
            out.push_str(&format!("# {doc}\n{key} = {value}\n"));
        };
        line(
            &mut out,
            "mTLS gRPC address for agents (Uplink) and operators (Fleet API).",
            "listen",
            self.listen.to_string().into(),
        );
        line(
            &mut out,
            "Plain HTTP admin address: /metrics, /healthz, /readyz (default 127.0.0.1:7444).",
            "admin_listen",
            self.admin_listen.to_string().into(),
        );
        line(
            &mut out,
            "Ledger + embedded telemetry: sqlite://PATH (created on first run) or postgres://USER@HOST:PORT/DB.",
            "ledger_url",
            crate::store::redact(&self.ledger_url).into(),
        );
        line(
            &mut out,
            "Largest accepted frame in bytes; a larger frame ends that stream (default 4194304).",
            "max_frame_bytes",
            to_value(self.max_frame_bytes),
        );
        line(
            &mut out,
            "Async worker threads; 0 = one per CPU core (default 0). 1 suits a small machine shared with ClickHouse.",
            "worker_threads",
            to_value(self.worker_threads),
        );
        line(
            &mut out,
            "Sampling interval asked of agents, ms; 0 = agents keep their own (default 0).",
            "sample_interval_ms",
            i64::from(self.sample_interval_ms).into(),
        );
        line(
            &mut out,
            "Time allowed between opening a stream and Hello, ms (default 10000).",
            "hello_timeout_ms",
            to_value(self.hello_timeout_ms),
        );
        line(
            &mut out,
            "With ClickHouse: bytes of acked batches the outbox may hold while ClickHouse is behind (default 1 GiB).",
            "outbox_max_bytes",
            to_value(self.outbox_max_bytes),
        );
        line(
            &mut out,
            "Reach of the in-memory per-node windows, s, rebuilt from the store at start (default 1800).",
            "window_seconds",
            i64::from(self.window_seconds).into(),
        );
        line(
            &mut out,
            "Embedded store (no ClickHouse): days of samples kept, by observed time; 0 = forever (default 30).",
            "embedded_retention_days",
            i64::from(self.embedded_retention_days).into(),
        );
        line(
            &mut out,
            "Ed25519 PKCS#8 key signing remote commands; empty = remote commands off.",
            "command_signing_key_file",
            self.command_signing_key_file.display().to_string().into(),
        );
        line(
            &mut out,
            "Audit chain anchor file (outside the ledger); empty = <ledger file>.audit-anchor for SQLite, off for PostgreSQL.",
            "audit_anchor_file",
            self.audit_anchor_file.display().to_string().into(),
        );
        line(
            &mut out,
            "How often the audit head is anchored, s (default 60).",
            "audit_anchor_every_seconds",
            to_value(self.audit_anchor_every_seconds),
        );
        line(
            &mut out,
            "Wait as a standby while another server holds the ledger, and take over when it stops (default false: refuse to start).",
            "standby",
            self.standby.into(),
        );
        let limits = &self.connections;
        out.push_str("\n# Limits of the gRPC listener: a connection flood cannot lock agents out.\n[connections]\n");
        line(
            &mut out,
            "Most connections held at once, pending or served (default 16384; lowered to fit the descriptor limit).",
            "max_connections",
            to_value(limits.max_connections),
        );
        line(
            &mut out,
            "Most TLS handshakes pending at once; beyond it the oldest is dropped (default 1024).",
            "max_pending_handshakes",
            to_value(limits.max_pending_handshakes),
        );
        line(
            &mut out,
            "Time a client has to complete its TLS handshake, ms (default 10000).",
            "tls_handshake_timeout_ms",
            to_value(limits.tls_handshake_timeout_ms),
        );
        line(
            &mut out,
            "Idle time before TCP keepalive probes start, s (default 60).",
            "tcp_keepalive_seconds",
            to_value(limits.tcp_keepalive_seconds),
        );
        line(
            &mut out,
            "Most concurrent HTTP/2 streams per connection (an agent uses 1; default 64).",
            "max_streams_per_connection",
            i64::from(limits.max_streams_per_connection).into(),
        );
        line(
            &mut out,
            "Most HTTP/2 streams a client may reset before they are accepted (default 32).",
            "max_pending_reset_streams",
            to_value(limits.max_pending_reset_streams),
        );
        line(
            &mut out,
            "Time a request may take to produce its response, ms; streams are not cut (default 60000).",
            "request_timeout_ms",
            to_value(limits.request_timeout_ms),
        );
        let ch = &self.clickhouse;
        out.push_str("\n# ClickHouse telemetry store for fleets; url = \"\" keeps the embedded store (ledger_url).\n[clickhouse]\n");
        line(
            &mut out,
            "HTTP URL, e.g. http://127.0.0.1:8123; empty = off.",
            "url",
            ch.url.clone().into(),
        );
        line(
            &mut out,
            "Database (created if missing).",
            "database",
            ch.database.clone().into(),
        );
        line(&mut out, "User.", "user", ch.user.clone().into());
        line(
            &mut out,
            "Password (set it through GUARDIAN_SERVER_CLICKHOUSE__PASSWORD rather than here).",
            "password",
            if ch.password.is_empty() { "" } else { "***" }.into(),
        );
        line(
            &mut out,
            "Cluster name for ON CLUSTER DDL, Replicated*MergeTree and Distributed tables; empty = one server.",
            "cluster",
            ch.cluster.clone().into(),
        );
        line(
            &mut out,
            "Raw samples kept, days (default 30).",
            "raw_retention_days",
            i64::from(ch.raw_retention_days).into(),
        );
        line(
            &mut out,
            "1-minute rollups kept, days (default 180).",
            "rollup_1m_retention_days",
            i64::from(ch.rollup_1m_retention_days).into(),
        );
        line(
            &mut out,
            "1-hour rollups kept, days (default 730).",
            "rollup_1h_retention_days",
            i64::from(ch.rollup_1h_retention_days).into(),
        );
        line(
            &mut out,
            "An insert goes when this many rows wait (default 50000)...",
            "insert_max_rows",
            to_value(ch.insert_max_rows),
        );
        line(
            &mut out,
            "...or when the oldest waiting batch is this old, ms (default 1000).",
            "insert_max_delay_ms",
            to_value(ch.insert_max_delay_ms),
        );
        line(
            &mut out,
            "Committed batches kept in memory for the sink, bytes; 0 = read them back from the outbox (default 256 MiB).",
            "handoff_max_bytes",
            to_value(ch.handoff_max_bytes),
        );
        line(
            &mut out,
            "Time allowed for one ClickHouse request, ms (default 10000).",
            "request_timeout_ms",
            to_value(ch.request_timeout_ms),
        );
        line(
            &mut out,
            "auto = LZ4 unless the server is on a loopback address; lz4; none (default auto).",
            "compression",
            ch.compression.clone().into(),
        );
        // The detector, reconciler and alert tables, every field with its effective value
        // (meanings: the doc comments of their types and the README).
        #[derive(Serialize)]
        struct Sections<'a> {
            detect: &'a crate::detect::DetectPolicy,
            reconcile: &'a crate::reconcile::ReconcileSettings,
            alerts: &'a crate::actuate::alert::AlertSettings,
            kubernetes: &'a crate::actuate::kubernetes::KubeSettings,
            analysis: &'a crate::analysis::AnalysisSettings,
            web: &'a crate::web::WebSettings,
        }
        match toml::to_string(&Sections {
            detect: &self.detect,
            reconcile: &self.reconcile,
            alerts: &self.alerts,
            kubernetes: &self.kubernetes,
            analysis: &self.analysis,
            web: &self.web,
        }) {
            Ok(tables) => {
                out.push_str(
                    "\n# Detector thresholds ([detect]), the reconciler and the fleet's sync policy ([reconcile],\n\
                     # [reconcile.policy], per node [reconcile.nodes.NODE]), alerts ([alerts]) and Kubernetes\n\
                     # clusters ([kubernetes]); README \"Detection and remediation\" and \"Kubernetes\" say more.\n",
                );
                out.push_str(&with_field_docs(&tables));
            }
            Err(error) => out.push_str(&format!(
                "\n# [detect], [reconcile] and [alerts] could not be printed: {error}\n"
            )),
        }
        out.push_str("\n[tls]\n");
        line(
            &mut out,
            "Fleet CA PEM: only client certificates chained to it are accepted.",
            "ca_file",
            self.tls.ca_file.display().to_string().into(),
        );
        line(
            &mut out,
            "Server certificate PEM.",
            "cert_file",
            self.tls.cert_file.display().to_string().into(),
        );
        line(
            &mut out,
            "Server private key PEM.",
            "key_file",
            self.tls.key_file.display().to_string().into(),
        );
        out
    }
}

fn to_value(n: impl TryInto<i64>) -> toml::Value {
    toml::Value::Integer(n.try_into().unwrap_or(i64::MAX))
}

/// Checks a path names a readable PEM file holding a block of `label`.
fn pem_file(field: &str, path: &Path, label: &str) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            field,
            format!("cannot read {}: {e}", path.display()),
            "point it at an existing PEM file (guardianctl pki init --dir DIR writes a throwaway set)",
        )
    })?;
    if !text.contains("-----BEGIN ") || !text.contains(label) {
        return Err(ConfigError::new(
            field,
            format!("{} holds no PEM {label} block", path.display()),
            format!("point it at a PEM file with a {label}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_field_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:1\"\nlisten_adress = 3\n").expect("write");
        let err = ServerConfig::load(Some(&file), Figment::new()).expect_err("must fail");
        assert_eq!(err.field, "listen_adress");
    }

    #[test]
    fn a_bad_value_is_named_with_a_fix() {
        let config = ServerConfig {
            max_frame_bytes: 10,
            ..ServerConfig::default()
        };
        let err = config.validate().expect_err("must fail");
        assert_eq!(err.field, "max_frame_bytes");
        assert!(err.to_string().contains("fix:"));
    }

    #[test]
    fn too_many_worker_threads_are_refused_with_the_fix() {
        let config = ServerConfig {
            worker_threads: 100_000,
            ..ServerConfig::default()
        };
        let err = config.validate().expect_err("must fail");
        assert_eq!(err.field, "worker_threads");
        assert!(err.to_string().contains("one per CPU core"));
    }

    #[test]
    fn printed_config_loads_back_to_the_same_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        let config = ServerConfig {
            max_frame_bytes: 2048,
            worker_threads: 3,
            embedded_retention_days: 7,
            ..ServerConfig::default()
        };
        std::fs::write(&file, config.documented_toml()).expect("write");
        assert_eq!(
            ServerConfig::load(Some(&file), Figment::new()).expect("load"),
            config
        );
    }

    /// Every leaf key of `value`, dotted (`detect.max_block_lag`).
    fn leaf_keys(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        if let toml::Value::Table(table) = value {
            for (key, value) in table {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                match value {
                    toml::Value::Table(t) if !t.is_empty() => leaf_keys(value, &path, out),
                    _ => out.push(path),
                }
            }
        }
    }

    /// A new field cannot be left out of `--print-config`: every field of the config types
    /// (as serde sees them, with the defaults) is printed, with a comment above it.
    #[test]
    fn print_config_prints_every_field_with_a_comment() {
        let config = ServerConfig::default();
        let mut want = Vec::new();
        leaf_keys(
            &toml::Value::try_from(&config).expect("serializes"),
            "",
            &mut want,
        );
        let printed = config.documented_toml();
        let mut got = Vec::new();
        leaf_keys(
            &toml::from_str(&printed).expect("printed TOML parses"),
            "",
            &mut got,
        );
        let missing: Vec<&String> = want.iter().filter(|k| !got.contains(k)).collect();
        assert!(
            missing.is_empty(),
            "guardian-server --print-config leaves out {missing:?}"
        );
        let lines: Vec<&str> = printed.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let is_key = line.contains(" = ") && !line.starts_with('#') && !line.starts_with(' ');
            if is_key {
                assert!(
                    i > 0 && lines[i - 1].starts_with('#'),
                    "no comment above {line:?}"
                );
            }
        }
    }
}
