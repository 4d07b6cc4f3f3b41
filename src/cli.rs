//! Command-line parsing, logging set-up and configuration loading shared by
//! the subcommands. Nothing here starts a daemon: `main` dispatches to
//! [`crate::daemons`].

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use aperture_core::config::{ConfigError, FlagValue, Layered, load};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "aperture",
    version,
    about = "Always-on eBPF profiler: CPU, lock contention and syscall latency with stacks"
)]
pub struct Cli {
    /// How log lines are written: `text` (colour only on a terminal) or
    /// `json` (one object per line, for log collectors in clusters).
    #[arg(long, global = true, value_enum, env = "APERTURE_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; ANSI colour only when the output is a terminal.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent (needs root, or CAP_BPF + CAP_PERFMON).
    Agent(AgentArgs),
    /// Run the aggregator: ingress on 50051 (QUIC/UDP and gRPC/TCP), HTTP on 9090.
    Aggregator(AggregatorArgs),
    /// Run an aggregator with the embedded store and a local agent on this machine, on loopback.
    Up(UpArgs),
    /// Check a configuration file (and the environment) and exit.
    CheckConfig(CheckConfigArgs),
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// YAML configuration file.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Aggregator host:port (overrides APERTURE_AGGREGATOR).
    #[arg(long)]
    aggregator: Option<String>,
    /// cpu, lock, syscall or all (overrides APERTURE_MODE).
    #[arg(long)]
    mode: Option<String>,
    /// Sampling frequency in Hz (overrides APERTURE_FREQ).
    #[arg(long)]
    freq: Option<String>,
    /// Node name (overrides NODE_NAME).
    #[arg(long)]
    node_name: Option<String>,
    /// Directory for the agent's identity.
    #[arg(long)]
    data_dir: Option<String>,
    /// Address of the agent's /metrics and /healthz ("" disables).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// auto, quic or grpc.
    #[arg(long)]
    carrier: Option<String>,
}

#[derive(Debug, Args)]
pub struct AggregatorArgs {
    /// YAML configuration file.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// HTTP address (API, UI, metrics, health).
    #[arg(long)]
    http_listen: Option<String>,
    /// gRPC address (TCP).
    #[arg(long)]
    grpc_listen: Option<String>,
    /// QUIC address (UDP).
    #[arg(long)]
    quic_listen: Option<String>,
    /// Data directory (embedded store, generated certificate).
    #[arg(long)]
    data_dir: Option<String>,
    /// ClickHouse HTTP URL (overrides APERTURE_CLICKHOUSE_ENDPOINT).
    #[arg(long)]
    clickhouse_endpoint: Option<String>,
    /// How long data is kept, e.g. 7d.
    #[arg(long)]
    retention: Option<String>,
    /// Accept agents and API clients without a token.
    #[arg(long)]
    no_auth: bool,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Data directory for the embedded store.
    #[arg(long, default_value = "./aperture-data")]
    pub data_dir: PathBuf,
    /// HTTP port on 127.0.0.1 (UI and API).
    #[arg(long, default_value_t = 9090)]
    pub http_port: u16,
    /// Ingress port on 127.0.0.1 (QUIC/UDP and gRPC/TCP).
    #[arg(long, default_value_t = 50051)]
    pub ingest_port: u16,
    /// Agent metrics port on 127.0.0.1 (0 disables).
    #[arg(long, default_value_t = 9091)]
    pub agent_metrics_port: u16,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Which {
    Agent,
    Aggregator,
}

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// Which daemon's configuration.
    pub which: Which,
    /// YAML file to check.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
}

fn flag(out: &mut Vec<FlagValue>, name: &str, key: &str, value: &Option<String>) {
    if let Some(v) = value {
        out.push(FlagValue::new(name, key, v.clone()));
    }
}

impl AgentArgs {
    pub fn flags(&self) -> Vec<FlagValue> {
        let mut f = Vec::new();
        flag(&mut f, "--aggregator", "aggregator", &self.aggregator);
        flag(&mut f, "--mode", "mode", &self.mode);
        flag(&mut f, "--freq", "frequency_hz", &self.freq);
        flag(&mut f, "--node-name", "node_name", &self.node_name);
        flag(&mut f, "--data-dir", "data_dir", &self.data_dir);
        flag(&mut f, "--metrics-listen", "metrics.listen", &self.metrics_listen);
        flag(&mut f, "--carrier", "transport.carrier", &self.carrier);
        f
    }
}

impl AggregatorArgs {
    pub fn flags(&self) -> Vec<FlagValue> {
        let mut f = Vec::new();
        flag(&mut f, "--http-listen", "listen.http", &self.http_listen);
        flag(&mut f, "--grpc-listen", "listen.grpc", &self.grpc_listen);
        flag(&mut f, "--quic-listen", "listen.quic", &self.quic_listen);
        flag(&mut f, "--data-dir", "data_dir", &self.data_dir);
        flag(&mut f, "--clickhouse-endpoint", "clickhouse.endpoint", &self.clickhouse_endpoint);
        flag(&mut f, "--retention", "retention", &self.retention);
        if self.no_auth {
            f.push(FlagValue::new("--no-auth", "auth.disabled", "true"));
        }
        f
    }
}

/// Why a configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A value is wrong.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// Reads the file (if any) and the process environment and applies `flags`.
pub fn load_config<T: Layered>(file: Option<&Path>, flags: &[FlagValue]) -> Result<T, LoadError> {
    let contents = match file {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|source| LoadError::Read { path: p.to_owned(), source })?),
        None => None,
    };
    let path = file.map(|p| p.display().to_string()).unwrap_or_default();
    let env = |k: &str| std::env::var(k).ok();
    Ok(load::<T>(contents.as_deref().map(|c| (path.as_str(), c)), &env, flags)?)
}

/// Sets up logging to standard output, filtered by `APERTURE_LOG` (default
/// `info`). Text lines carry colour only when standard output is a terminal,
/// so `aperture up > log` and container logs stay plain.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("APERTURE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stdout().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}
