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
    /// Second HTTP address for Pyroscope's routes, e.g. 0.0.0.0:4040 (overrides APERTURE_PYROSCOPE_LISTEN).
    #[arg(long)]
    pyroscope_listen: Option<String>,
    /// Data directory (embedded store, generated certificate).
    #[arg(long)]
    data_dir: Option<String>,
    /// ClickHouse HTTP URL (overrides APERTURE_CLICKHOUSE_ENDPOINT).
    #[arg(long)]
    clickhouse_endpoint: Option<String>,
    /// ClickHouse cluster name: tables ON CLUSTER behind Distributed tables (overrides APERTURE_CLICKHOUSE_CLUSTER).
    #[arg(long)]
    clickhouse_cluster: Option<String>,
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
    /// Turn the local agent's overhead budget off: sampling frequency and
    /// lock and syscall thresholds stay as configured however much the
    /// agent costs (for a short investigation, or a slow machine).
    #[arg(long)]
    pub no_budget: bool,
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
        flag(&mut f, "--pyroscope-listen", "pyroscope.listen", &self.pyroscope_listen);
        flag(&mut f, "--data-dir", "data_dir", &self.data_dir);
        flag(&mut f, "--clickhouse-endpoint", "clickhouse.endpoint", &self.clickhouse_endpoint);
        flag(&mut f, "--clickhouse-cluster", "clickhouse.cluster", &self.clickhouse_cluster);
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
    /// A `<VAR>_FILE` variable names a file that cannot be used.
    #[error("{var}_FILE={path}: {problem}; point it at a readable file holding the value of {var}")]
    ValueFile {
        /// The variable the file stands for.
        var: String,
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Both `<VAR>` and `<VAR>_FILE` are set.
    #[error("both {var} and {var}_FILE are set: keep one")]
    Both {
        /// The variable.
        var: String,
    },
    /// A value is wrong.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// The environment as configuration sees it: each variable `T` reads may
/// instead be given as `<VAR>_FILE`, the path of a file holding its value
/// (a Kubernetes secret mounted as a file), without the trailing newline.
fn environment<T: Layered>(
    get: &dyn Fn(&str) -> Option<String>,
    read: &dyn Fn(&Path) -> std::io::Result<String>,
) -> Result<Vec<(String, String)>, LoadError> {
    let mut vars = Vec::new();
    for (var, _) in T::ENV {
        let direct = get(var);
        let Some(path) = get(&format!("{var}_FILE")).filter(|p| !p.is_empty()) else {
            vars.extend(direct.map(|v| (var.to_string(), v)));
            continue;
        };
        if direct.is_some_and(|v| !v.is_empty()) {
            return Err(LoadError::Both { var: var.to_string() });
        }
        let path = PathBuf::from(path);
        let bad = |problem: String| LoadError::ValueFile { var: var.to_string(), path: path.clone(), problem };
        let text = read(&path).map_err(|e| bad(format!("cannot be read: {e}")))?;
        let value = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
        if value.is_empty() {
            return Err(bad("the file is empty".into()));
        }
        vars.push((var.to_string(), value.to_owned()));
    }
    Ok(vars)
}

/// Reads the file (if any) and the process environment and applies `flags`.
pub fn load_config<T: Layered>(file: Option<&Path>, flags: &[FlagValue]) -> Result<T, LoadError> {
    let contents = match file {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|source| LoadError::Read { path: p.to_owned(), source })?),
        None => None,
    };
    let path = file.map(|p| p.display().to_string()).unwrap_or_default();
    let vars = environment::<T>(&|k| std::env::var(k).ok(), &|p| std::fs::read_to_string(p))?;
    let env = |k: &str| vars.iter().find(|(v, _)| v == k).map(|(_, value)| value.clone());
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

#[cfg(test)]
mod tests {
    use super::*;
    use aperture_core::config::AggregatorConfig;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    fn files(path: &Path) -> std::io::Result<String> {
        match path.to_str() {
            Some("/run/secrets/ch") => Ok("s3cret\n".into()),
            Some("/run/secrets/empty") => Ok("\n".into()),
            _ => Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        }
    }

    #[test]
    fn a_value_file_stands_for_its_variable_without_the_newline() {
        let env = env_of(&[("APERTURE_CLICKHOUSE_PASSWORD_FILE", "/run/secrets/ch"), ("APERTURE_AUTH_TOKEN", "t")]);
        let vars = environment::<AggregatorConfig>(&env, &files).expect("valid");
        assert!(vars.contains(&("APERTURE_CLICKHOUSE_PASSWORD".into(), "s3cret".into())), "{vars:?}");
        assert!(vars.contains(&("APERTURE_AUTH_TOKEN".into(), "t".into())), "{vars:?}");
    }

    #[test]
    fn value_files_that_cannot_be_used_are_named() {
        let err = |vars: &[(&str, &str)]| {
            environment::<AggregatorConfig>(&env_of(vars), &files).expect_err("must be refused").to_string()
        };
        assert_eq!(
            err(&[("APERTURE_AUTH_TOKEN", "t"), ("APERTURE_AUTH_TOKEN_FILE", "/run/secrets/ch")]),
            "both APERTURE_AUTH_TOKEN and APERTURE_AUTH_TOKEN_FILE are set: keep one"
        );
        let missing = err(&[("APERTURE_READ_TOKEN_FILE", "/nope")]);
        assert!(missing.starts_with("APERTURE_READ_TOKEN_FILE=/nope: cannot be read"), "{missing}");
        assert!(err(&[("APERTURE_INGEST_TOKEN_FILE", "/run/secrets/empty")]).contains("the file is empty"));
    }
}
