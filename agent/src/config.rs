//! The agent's typed configuration: defaults, TOML file, `GUARDIAN_AGENT_*` environment
//! overrides and flags, in that order; [`AgentConfig::validate`] runs before anything starts.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Exit code for invalid configuration (sysexits' EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

/// Sampling intervals accepted, from the config or from a server Welcome: 100 ms to 1 h.
pub const SAMPLE_INTERVAL_MS: std::ops::RangeInclusive<u64> = 100..=3_600_000;

/// Everything `guardian-agent` can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// This node's id; must equal the node id in the agent certificate.
    pub node_id: String,
    /// Chain network the node follows (finney, test, local, ...).
    pub network: String,
    /// Server gRPC URL (https only: the uplink is always mTLS).
    pub server_url: String,
    /// Name the server certificate must carry.
    pub server_name: String,
    /// Sampling interval in milliseconds (a server Welcome may override it).
    pub sample_interval_ms: u64,
    /// The subtensor node's chain-data folder; its filesystem is reported.
    pub chain_data_path: PathBuf,
    /// Where procfs is mounted (a container may mount the host's elsewhere).
    pub proc_root: PathBuf,
    /// The hotkey keystore folder to audit (mode, owner, tmpfs, fingerprints; never key
    /// bytes); empty disables the keystore sampler.
    pub keystore_path: PathBuf,
    /// Sample NVIDIA GPUs through NVML (reports "unavailable" on hosts without a driver).
    pub gpu: bool,
    /// Folder of the on-disk spool (batches awaiting the server's ack); one agent per folder.
    pub spool_dir: PathBuf,
    /// Bytes of batches the spool keeps while the server is unreachable; beyond it the
    /// oldest are dropped and counted.
    pub spool_max_bytes: u64,
    /// The local subtensor node and the validator's on-chain standing.
    pub chain: ChainConfig,
    /// Reconnect backoff.
    pub reconnect: Reconnect,
    /// Signed remote commands: off by default, and then only what is allow-listed here.
    pub commands: CommandsConfig,
    /// TLS material.
    pub tls: AgentTls,
}

/// The `[commands]` table; defined beside its consumer, [`crate::command`]. Re-exported here
/// because `guardian_agent::config::CommandsConfig` is a public path (the `tests` crate uses it).
pub use crate::command::CommandsConfig;

/// Where the subtensor node answers and which validator to follow on chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChainConfig {
    /// Sample the node at all.
    pub enabled: bool,
    /// The node's JSON-RPC WebSocket endpoint.
    pub endpoint: String,
    /// Other endpoints whose tip the node is compared with (another node of yours, a public RPC).
    pub references: Vec<String>,
    /// Time allowed for any one RPC call, ms; a node silent for longer is reported unresponsive.
    pub call_timeout_ms: u64,
    /// The validator hotkey (ss58) whose standing is read; empty reads none.
    pub hotkey_ss58: String,
    /// Subnet of the validator (needed with hotkey_ss58).
    pub netuid: u16,
    /// Standing is re-read every this many blocks (and after a runtime upgrade).
    pub standing_every_blocks: u64,
}

impl Default for ChainConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            endpoint: "ws://127.0.0.1:9944".to_owned(),
            references: Vec::new(),
            call_timeout_ms: 800,
            hotkey_ss58: String::new(),
            netuid: 0,
            standing_every_blocks: 25,
        }
    }
}

/// Jittered exponential backoff between reconnect attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reconnect {
    /// First delay, milliseconds.
    pub initial_ms: u64,
    /// Largest delay, milliseconds.
    pub max_ms: u64,
}

/// PEM files for the agent's client certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentTls {
    /// Fleet CA that signed the server certificate.
    pub ca_file: PathBuf,
    /// This node's certificate.
    pub cert_file: PathBuf,
    /// This node's private key.
    pub key_file: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            node_id: String::new(),
            network: "finney".to_owned(),
            server_url: "https://127.0.0.1:7443".to_owned(),
            server_name: "localhost".to_owned(),
            sample_interval_ms: 1000,
            chain_data_path: PathBuf::from("/var/lib/subtensor"),
            proc_root: PathBuf::from("/proc"),
            keystore_path: PathBuf::new(),
            gpu: true,
            spool_dir: PathBuf::from("/var/lib/guardian-agent/spool"),
            spool_max_bytes: 256 << 20,
            chain: ChainConfig::default(),
            reconnect: Reconnect::default(),
            commands: CommandsConfig::default(),
            tls: AgentTls::default(),
        }
    }
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            initial_ms: 500,
            max_ms: 30_000,
        }
    }
}

impl Default for AgentTls {
    fn default() -> Self {
        Self {
            ca_file: PathBuf::from("pki/ca.pem"),
            cert_file: PathBuf::from("pki/agent.pem"),
            key_file: PathBuf::from("pki/agent-key.pem"),
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
    pub(crate) fn new(field: &str, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    fn from_figment(error: figment::Error) -> Self {
        use figment::error::Kind;
        let mut field = error.path.join(".");
        let fix = match &error.kind {
            Kind::UnknownField(name, expected) => {
                if field.is_empty() {
                    field.clone_from(name);
                }
                format!("remove it or use one of: {}", expected.join(", "))
            }
            _ => "give a value of the expected type (see --print-config)".to_owned(),
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

impl AgentConfig {
    /// Layers defaults, the TOML file (if given), `GUARDIAN_AGENT_*` variables (`__` separates
    /// nested keys, e.g. `GUARDIAN_AGENT_TLS__CA_FILE`) and `overrides`.
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
                    "pass the path of a TOML file (guardian-agent --print-config writes one)",
                ));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment
            // GUARDIAN_AGENT_CONFIG is the --config flag, not a field.
            .merge(
                Env::prefixed("GUARDIAN_AGENT_")
                    .ignore(&["config"])
                    .split("__"),
            )
            .merge(overrides)
            .extract()
            .map_err(ConfigError::from_figment)
    }

    /// Checks every field.
    ///
    /// # Errors
    /// The first [`ConfigError`] found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        guardian_proto::check_name(&self.node_id).map_err(|why| {
            ConfigError::new(
                "node_id",
                format!("{:?} {why}", self.node_id),
                "set node_id to the node id in this agent's certificate",
            )
        })?;
        if !self.server_url.starts_with("https://") {
            return Err(ConfigError::new(
                "server_url",
                format!("{:?} is not an https:// URL", self.server_url),
                "the uplink is always mTLS: use https://HOST:PORT",
            ));
        }
        if !SAMPLE_INTERVAL_MS.contains(&self.sample_interval_ms) {
            return Err(ConfigError::new(
                "sample_interval_ms",
                format!("{} is outside 100..=3600000", self.sample_interval_ms),
                "use 100 ms to 1 h (default 1000)",
            ));
        }
        if !self.chain_data_path.exists() {
            return Err(ConfigError::new(
                "chain_data_path",
                format!("{} does not exist", self.chain_data_path.display()),
                "point it at the subtensor node's data folder (its --base-path)",
            ));
        }
        if !self.proc_root.join("stat").is_file() {
            return Err(ConfigError::new(
                "proc_root",
                format!("{} holds no stat file", self.proc_root.display()),
                "point it at a procfs mount (default /proc)",
            ));
        }
        if self.spool_dir.as_os_str().is_empty() {
            return Err(ConfigError::new(
                "spool_dir",
                "is empty",
                "give a folder only this agent writes (default /var/lib/guardian-agent/spool)",
            ));
        }
        if self.spool_max_bytes < crate::spool::MIN_MAX_BYTES {
            return Err(ConfigError::new(
                "spool_max_bytes",
                format!(
                    "{} is below 1 MiB ({} bytes)",
                    self.spool_max_bytes,
                    crate::spool::MIN_MAX_BYTES
                ),
                "use at least 1048576 (default 268435456, 256 MiB)",
            ));
        }
        if self.reconnect.initial_ms == 0 || self.reconnect.initial_ms > self.reconnect.max_ms {
            return Err(ConfigError::new(
                "reconnect.initial_ms",
                format!(
                    "{} must be > 0 and <= reconnect.max_ms ({})",
                    self.reconnect.initial_ms, self.reconnect.max_ms
                ),
                "e.g. initial_ms = 500, max_ms = 30000",
            ));
        }
        if self.chain.enabled {
            self.validate_chain()?;
        }
        if self.commands.enabled {
            self.commands.validate()?;
        }
        pem_file("tls.ca_file", &self.tls.ca_file, "CERTIFICATE")?;
        pem_file("tls.cert_file", &self.tls.cert_file, "CERTIFICATE")?;
        pem_file("tls.key_file", &self.tls.key_file, "PRIVATE KEY")?;
        Ok(())
    }

    fn validate_chain(&self) -> Result<(), ConfigError> {
        let chain = &self.chain;
        for (field, url) in std::iter::once(("chain.endpoint", &chain.endpoint))
            .chain(chain.references.iter().map(|r| ("chain.references", r)))
        {
            if !(url.starts_with("ws://") || url.starts_with("wss://")) {
                return Err(ConfigError::new(
                    field,
                    format!("{url:?} is not a ws:// or wss:// URL"),
                    "give the node's JSON-RPC WebSocket address, e.g. ws://127.0.0.1:9944",
                ));
            }
        }
        // A silent node must show as unresponsive within one sampling interval.
        if chain.call_timeout_ms < 50 || chain.call_timeout_ms >= self.sample_interval_ms {
            return Err(ConfigError::new(
                "chain.call_timeout_ms",
                format!(
                    "{} is outside 50..{} (sample_interval_ms)",
                    chain.call_timeout_ms, self.sample_interval_ms
                ),
                "use at least 50 ms and less than sample_interval_ms (default 800)",
            ));
        }
        if chain.standing_every_blocks == 0 {
            return Err(ConfigError::new(
                "chain.standing_every_blocks",
                "0 would re-read storage on every sample",
                "use 1 or more (default 25 blocks, about 5 minutes)",
            ));
        }
        if !chain.hotkey_ss58.is_empty() {
            crate::sample::chain::StandingTarget {
                hotkey_ss58: chain.hotkey_ss58.clone(),
                netuid: chain.netuid,
            }
            .validate()
            .map_err(|why| {
                ConfigError::new(
                    "chain.hotkey_ss58",
                    why,
                    "give the validator hotkey's ss58 address (btcli wallet overview shows it)",
                )
            })?;
        }
        Ok(())
    }

    /// The effective configuration as commented TOML.
    pub fn documented_toml(&self) -> String {
        let mut out = String::from(
            "# guardian-agent configuration (effective values; defaults where not set).\n\
             # Environment overrides: GUARDIAN_AGENT_<FIELD>, nested with __ (GUARDIAN_AGENT_TLS__CA_FILE).\n\n",
        );
        let line = |out: &mut String, doc: &str, key: &str, value: toml::Value| {
            out.push_str(&format!("# {doc}\n{key} = {value}\n"));
        };
        let path = |p: &Path| toml::Value::String(p.display().to_string());
        let int = |n: u64| toml::Value::Integer(i64::try_from(n).unwrap_or(i64::MAX));
        line(
            &mut out,
            "This node's id; must equal the node id in the agent certificate (required).",
            "node_id",
            self.node_id.clone().into(),
        );
        line(
            &mut out,
            "Chain network the node follows (default finney).",
            "network",
            self.network.clone().into(),
        );
        line(
            &mut out,
            "Server gRPC URL, https only (default https://127.0.0.1:7443).",
            "server_url",
            self.server_url.clone().into(),
        );
        line(
            &mut out,
            "Name the server certificate must carry (default localhost).",
            "server_name",
            self.server_name.clone().into(),
        );
        line(
            &mut out,
            "Sampling interval, ms (default 1000; a server Welcome may override it).",
            "sample_interval_ms",
            int(self.sample_interval_ms),
        );
        line(
            &mut out,
            "The subtensor node's data folder; its filesystem is reported (default /var/lib/subtensor).",
            "chain_data_path",
            path(&self.chain_data_path),
        );
        line(
            &mut out,
            "Where procfs is mounted (default /proc).",
            "proc_root",
            path(&self.proc_root),
        );
        line(
            &mut out,
            "The hotkey keystore folder to audit (mode, owner, tmpfs, fingerprints; never key bytes); empty disables the keystore sampler (default empty).",
            "keystore_path",
            path(&self.keystore_path),
        );
        line(
            &mut out,
            "Sample NVIDIA GPUs through NVML; reports \"unavailable\" with the reason on hosts without a driver (default true).",
            "gpu",
            self.gpu.into(),
        );
        line(
            &mut out,
            "Folder of the on-disk spool of batches awaiting the server's ack; one agent per folder (default /var/lib/guardian-agent/spool).",
            "spool_dir",
            path(&self.spool_dir),
        );
        line(
            &mut out,
            "Bytes the spool keeps while the server is away; beyond it the oldest batches are dropped and counted; at least 1 MiB (default 268435456).",
            "spool_max_bytes",
            int(self.spool_max_bytes),
        );
        out.push_str("\n[chain]\n");
        line(
            &mut out,
            "Sample the local subtensor node (default true).",
            "enabled",
            self.chain.enabled.into(),
        );
        line(
            &mut out,
            "The node's JSON-RPC WebSocket endpoint (default ws://127.0.0.1:9944).",
            "endpoint",
            self.chain.endpoint.clone().into(),
        );
        line(
            &mut out,
            "Endpoints whose tip the node is compared with (default none).",
            "references",
            toml::Value::Array(
                self.chain
                    .references
                    .iter()
                    .cloned()
                    .map(toml::Value::String)
                    .collect(),
            ),
        );
        line(
            &mut out,
            "Time allowed per RPC call, ms; slower is reported unresponsive; below sample_interval_ms (default 800).",
            "call_timeout_ms",
            int(self.chain.call_timeout_ms),
        );
        line(
            &mut out,
            "Validator hotkey ss58 whose standing is read; empty reads none (default empty).",
            "hotkey_ss58",
            self.chain.hotkey_ss58.clone().into(),
        );
        line(
            &mut out,
            "The validator's subnet (default 0).",
            "netuid",
            int(u64::from(self.chain.netuid)),
        );
        line(
            &mut out,
            "Re-read standing every this many blocks and after runtime upgrades (default 25).",
            "standing_every_blocks",
            int(self.chain.standing_every_blocks),
        );
        out.push_str("\n[reconnect]\n");
        line(
            &mut out,
            "First reconnect delay, ms, doubled per failure with jitter (default 500).",
            "initial_ms",
            int(self.reconnect.initial_ms),
        );
        line(
            &mut out,
            "Largest reconnect delay, ms (default 30000).",
            "max_ms",
            int(self.reconnect.max_ms),
        );
        out.push_str("\n[commands]\n");
        let strings = |items: &[String]| {
            toml::Value::Array(items.iter().cloned().map(toml::Value::String).collect())
        };
        line(
            &mut out,
            "Run signed remote commands, only those allow-listed below (default false).",
            "enabled",
            self.commands.enabled.into(),
        );
        line(
            &mut out,
            "The server's command verify key, 64 hex characters (guardianctl pki init writes command-verify.pub).",
            "verify_key_file",
            path(&self.commands.verify_key_file),
        );
        line(
            &mut out,
            "systemd units restart-unit may restart (default none).",
            "allowed_units",
            strings(&self.commands.allowed_units),
        );
        line(
            &mut out,
            "Containers restart-container may restart (default none).",
            "allowed_containers",
            strings(&self.commands.allowed_containers),
        );
        line(
            &mut out,
            "Container CLI for restart-container (default docker).",
            "container_runtime",
            self.commands.container_runtime.clone().into(),
        );
        line(
            &mut out,
            "A hook still running after this many ms is killed (default 600000).",
            "hook_timeout_ms",
            int(self.commands.hook_timeout_ms),
        );
        out.push_str(
            "# Hooks run-hook may run: name = absolute script path (default none). Parameters reach\n\
             # the script as GUARDIAN_PARAM_<KEY> environment variables, never as arguments.\n\
             [commands.hooks]\n",
        );
        for (name, script) in &self.commands.hooks {
            out.push_str(&format!(
                "{} = {}\n",
                toml::Value::String(name.clone()),
                path(script)
            ));
        }
        out.push_str("\n[tls]\n");
        line(
            &mut out,
            "Fleet CA PEM that signed the server certificate.",
            "ca_file",
            path(&self.tls.ca_file),
        );
        line(
            &mut out,
            "This node's certificate PEM (guardianctl pki init writes node-NAME.pem).",
            "cert_file",
            path(&self.tls.cert_file),
        );
        line(
            &mut out,
            "This node's private key PEM.",
            "key_file",
            path(&self.tls.key_file),
        );
        out
    }
}

/// Checks a path names a readable PEM file holding a block of `label`.
fn pem_file(field: &str, path: &Path, label: &str) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            field,
            format!("cannot read {}: {e}", path.display()),
            "point it at an existing PEM file (guardianctl pki init --dir DIR --node NAME writes a throwaway set)",
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
    use std::collections::BTreeMap;

    #[test]
    fn a_missing_node_id_is_named() {
        let err = AgentConfig::default().validate().expect_err("must fail");
        assert_eq!(err.field, "node_id");
    }

    #[test]
    fn an_unknown_nested_field_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.toml");
        std::fs::write(&file, "node_id = \"a\"\n[tls]\nca = \"x\"\n").expect("write");
        let err = AgentConfig::load(Some(&file), Figment::new()).expect_err("must fail");
        assert_eq!(err.field, "tls.ca");
    }

    #[test]
    fn printed_config_loads_back_to_the_same_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.toml");
        let config = AgentConfig {
            node_id: "n1".into(),
            sample_interval_ms: 250,
            keystore_path: PathBuf::from("/run/validator/keys"),
            gpu: false,
            spool_dir: dir.path().join("spool"),
            spool_max_bytes: 2 << 20,
            commands: CommandsConfig {
                enabled: true,
                allowed_units: vec!["subtensor.service".into()],
                allowed_containers: vec!["validator".into()],
                container_runtime: "podman".into(),
                hooks: BTreeMap::from([
                    (
                        "snapshot-restore".into(),
                        PathBuf::from("/opt/hooks/restore.sh"),
                    ),
                    ("a.b".into(), PathBuf::from("/opt/hooks/a b.sh")),
                ]),
                hook_timeout_ms: 1000,
                ..CommandsConfig::default()
            },
            ..AgentConfig::default()
        };
        std::fs::write(&file, config.documented_toml()).expect("write");
        assert_eq!(
            AgentConfig::load(Some(&file), Figment::new()).expect("load"),
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
        let config = AgentConfig::default();
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
            "guardian-agent --print-config leaves out {missing:?}"
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
