//! The `[commands]` table of the agent config: which signed commands this agent runs, and
//! the checks [`CommandsConfig::validate`] makes on it before anything starts.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Which signed commands this agent runs (see [`crate::command`]). Nothing outside these
/// lists runs, whatever the server signs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// Accept signed commands at all.
    pub enabled: bool,
    /// The server's command verify key: 64 hex characters (`command-verify.pub`).
    pub verify_key_file: PathBuf,
    /// systemd units `restart-unit` may restart.
    pub allowed_units: Vec<String>,
    /// Containers `restart-container` may restart.
    pub allowed_containers: Vec<String>,
    /// Container CLI used for `restart-container` (docker, podman, nerdctl, ...).
    pub container_runtime: String,
    /// Hooks `run-hook` may run: name -> absolute script path.
    pub hooks: BTreeMap<String, PathBuf>,
    /// A hook still running after this many ms is killed (with its process group).
    pub hook_timeout_ms: u64,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            verify_key_file: PathBuf::from("pki/command-verify.pub"),
            allowed_units: Vec::new(),
            allowed_containers: Vec::new(),
            container_runtime: "docker".to_owned(),
            hooks: BTreeMap::new(),
            hook_timeout_ms: 600_000,
        }
    }
}

impl CommandsConfig {
    /// Checks the `[commands]` table (only called when `enabled`).
    ///
    /// # Errors
    /// The first [`ConfigError`] found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::command::load_verify_key(&self.verify_key_file).map_err(|why| {
            ConfigError::new(
                "commands.verify_key_file",
                why.to_string(),
                "point it at the server's command-verify.pub (64 hex characters; guardianctl pki init writes one)",
            )
        })?;
        for (field, names) in [
            ("commands.allowed_units", &self.allowed_units),
            ("commands.allowed_containers", &self.allowed_containers),
        ] {
            if let Some(bad) = names.iter().find(|n| !plain_name(n)) {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "{bad:?} is empty, starts with '-' or holds whitespace or a control character"
                    ),
                    "list exact names, e.g. \"subtensor.service\" or \"validator\"",
                ));
            }
            if let Some(bad) = names.iter().find(|n| has_glob(n)) {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "{bad:?} holds a glob character ('*', '?', '[', ']' or '\\'); systemctl expands such a pattern to every unit that matches"
                    ),
                    "list each name exactly, without patterns, e.g. \"subtensor.service\" or \"validator\"",
                ));
            }
        }
        if !plain_name(&self.container_runtime) {
            return Err(ConfigError::new(
                "commands.container_runtime",
                format!("{:?} is not a program name or path", self.container_runtime),
                "use docker, podman or an absolute path to the CLI",
            ));
        }
        for (name, script) in &self.hooks {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(ConfigError::new(
                    "commands.hooks",
                    format!(
                        "hook name {name:?} is not 1+ characters of A-Z, a-z, 0-9, '-', '_', '.'"
                    ),
                    "rename it, e.g. snapshot-restore",
                ));
            }
            if !script.is_absolute() {
                return Err(ConfigError::new(
                    &format!("commands.hooks.{name}"),
                    format!("{} is not an absolute path", script.display()),
                    "give the script's absolute path (hooks never go through PATH or a shell)",
                ));
            }
        }
        if !(100..=3_600_000).contains(&self.hook_timeout_ms) {
            return Err(ConfigError::new(
                "commands.hook_timeout_ms",
                format!("{} is outside 100..=3600000", self.hook_timeout_ms),
                "use 100 ms to 1 h (default 600000, 10 minutes)",
            ));
        }
        Ok(())
    }
}

/// An allow-list entry: what is listed is passed as one argument, exactly.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Characters `systemctl` treats as a pattern in a unit name (fnmatch, with `\` escaping).
pub(super) const GLOB_CHARS: [char; 5] = ['*', '?', '[', ']', '\\'];

/// Whether `name` would be matched as a pattern rather than named exactly.
pub(super) fn has_glob(name: &str) -> bool {
    name.contains(GLOB_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_hook_path_is_named_when_commands_are_enabled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("command-verify.pub");
        std::fs::write(&key, format!("{}\n", "ab".repeat(32))).expect("write");
        let mut commands = CommandsConfig {
            enabled: true,
            verify_key_file: key,
            hooks: BTreeMap::from([("restore".into(), PathBuf::from("hooks/restore.sh"))]),
            ..CommandsConfig::default()
        };
        assert_eq!(
            commands.validate().expect_err("must fail").field,
            "commands.hooks.restore"
        );
        commands.hooks.clear();
        commands.validate().expect("valid");
        commands.verify_key_file = dir.path().join("missing.pub");
        assert_eq!(
            commands.validate().expect_err("must fail").field,
            "commands.verify_key_file"
        );
    }

    #[test]
    fn an_allow_list_entry_with_a_glob_character_is_refused_naming_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("command-verify.pub");
        std::fs::write(&key, format!("{}\n", "ab".repeat(32))).expect("write");
        let valid = CommandsConfig {
            enabled: true,
            verify_key_file: key,
            allowed_units: vec!["subtensor.service".into(), "node@1.service".into()],
            allowed_containers: vec!["validator".into()],
            ..CommandsConfig::default()
        };
        valid.validate().expect("valid");
        for glob in [
            "*",
            "sub*.service",
            "node?.service",
            "node[12].service",
            "a\\x2d.service",
        ] {
            let units = CommandsConfig {
                allowed_units: vec!["subtensor.service".into(), glob.into()],
                ..valid.clone()
            };
            let error = units.validate().expect_err(glob);
            assert_eq!(error.field, "commands.allowed_units", "{glob}");
            assert!(error.to_string().contains("glob"), "{error}");
            let containers = CommandsConfig {
                allowed_containers: vec![glob.into()],
                ..valid.clone()
            };
            let error = containers.validate().expect_err(glob);
            assert_eq!(error.field, "commands.allowed_containers", "{glob}");
        }
    }
}
