//! Running the daemons once their configuration is valid.

use std::process::ExitCode;

use aperture_core::config::{AgentConfig, AggregatorConfig};

use crate::cli::UpArgs;

/// Runs the node agent until SIGTERM or Ctrl-C.
pub fn agent(config: AgentConfig) -> ExitCode {
    tracing::info!(aggregator = %config.aggregator, mode = %config.mode, "agent configured");
    crate::cli::runtime_failure(&anyhow::anyhow!("the agent pipeline is not part of this build yet"))
}

/// Runs the aggregator until SIGTERM or Ctrl-C.
pub fn aggregator(config: AggregatorConfig) -> ExitCode {
    tracing::info!(http = %config.listen.http, "aggregator configured");
    crate::cli::runtime_failure(&anyhow::anyhow!("the aggregator is not part of this build yet"))
}

/// Runs both on loopback.
pub fn up(args: &UpArgs) -> ExitCode {
    tracing::info!(data_dir = %args.data_dir.display(), "up");
    crate::cli::runtime_failure(&anyhow::anyhow!("`aperture up` is not part of this build yet"))
}
