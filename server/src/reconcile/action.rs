//! Owns [`Action`]: what an agent may be asked to do, as the plan names it and the wire
//! carries it. Pure data; signing and delivery belong to the actuator.

use std::fmt;
use std::str::FromStr;

/// What an agent may be asked to do. The strings are the wire values and never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// `systemctl restart UNIT` (parameter `unit`, must be in the agent's allowed_units).
    RestartUnit,
    /// `docker restart NAME` (parameter `container`, must be in allowed_containers).
    RestartContainer,
    /// Runs a hook script named in the agent's config (parameter `hook`), with a timeout.
    RunHook,
    /// Collects a bounded diagnostics text (uname, uptime, df, unit status).
    CollectDiagnostics,
    /// Never runs command `command_id` (parameter), and stops it if it is running.
    CancelCommand,
}

impl Action {
    /// Every action, in a stable order.
    pub const ALL: [Action; 5] = [
        Action::RestartUnit,
        Action::RestartContainer,
        Action::RunHook,
        Action::CollectDiagnostics,
        Action::CancelCommand,
    ];

    /// The wire value: `restart-unit`, `restart-container`, `run-hook`, `collect-diagnostics`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::RestartUnit => "restart-unit",
            Action::RestartContainer => "restart-container",
            Action::RunHook => "run-hook",
            Action::CollectDiagnostics => "collect-diagnostics",
            Action::CancelCommand => "cancel-command",
        }
    }

    /// The parameter this action cannot run without, if any.
    pub fn required_parameter(self) -> Option<&'static str> {
        match self {
            Action::RestartUnit => Some("unit"),
            Action::RestartContainer => Some("container"),
            Action::RunHook => Some("hook"),
            Action::CollectDiagnostics => None,
            Action::CancelCommand => Some("command_id"),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = UnknownAction;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == raw)
            .ok_or_else(|| UnknownAction(raw.to_owned()))
    }
}

/// An action string that is not one of [`Action::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown action {0:?}; use restart-unit, restart-container, run-hook or collect-diagnostics"
)]
pub struct UnknownAction(pub String);
