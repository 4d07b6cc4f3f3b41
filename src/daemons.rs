//! Running the daemons once their configuration is valid: the agent, the
//! aggregator, and both on one machine (`up`), until a signal stops them.

use std::process::ExitCode;

use anyhow::Context;
use aperture_agent::{LocalAggregator, Shutdown, stop_signals};
use aperture_aggregator::Daemon;
use aperture_core::config::{AgentConfig, AggregatorConfig, FlagValue, Secret};
use aperture_probes::{features, preflight};

use crate::cli::{LoadError, UpArgs, load_config};

/// Runs the node agent until SIGTERM or Ctrl-C.
pub fn agent(config: AgentConfig) -> ExitCode {
    if let Err(code) = node_checks() {
        return code;
    }
    let shutdown = Shutdown::new();
    if let Err(e) = trigger_on_signals(shutdown.clone()) {
        return runtime_failure(&e);
    }
    match aperture_agent::run_agent(config, shutdown) {
        Ok(report) => {
            tracing::info!(%report, "agent stopped");
            ExitCode::SUCCESS
        }
        Err(e) => runtime_failure(&e),
    }
}

/// Runs the aggregator until SIGTERM or Ctrl-C.
pub fn aggregator(config: AggregatorConfig) -> ExitCode {
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let stop = stop_signals().context("listening for SIGTERM and SIGINT")?;
            aperture_aggregator::run_aggregator(config, stop).await
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => runtime_failure(&e),
    }
}

/// The local agent's configuration for `up`: APERTURE_MODE and APERTURE_FREQ
/// apply as for the agent; where to send and with which token is decided by
/// `up` itself.
pub fn up_agent_config(args: &UpArgs) -> Result<AgentConfig, LoadError> {
    let metrics =
        if args.agent_metrics_port == 0 { String::new() } else { format!("127.0.0.1:{}", args.agent_metrics_port) };
    let mut flags = vec![
        FlagValue::new("--data-dir", "data_dir", args.data_dir.join("agent").display().to_string()),
        FlagValue::new("--aggregator", "aggregator", format!("127.0.0.1:{}", args.ingest_port)),
        FlagValue::new("--agent-metrics-port", "metrics.listen", metrics),
    ];
    if args.no_budget {
        flags.push(FlagValue::new("--no-budget", "budget.enabled", "false".to_owned()));
    }
    load_config::<AgentConfig>(None, &flags)
}

/// Runs an aggregator with the embedded store and the local agent `agent`
/// (see [`up_agent_config`]), on loopback.
pub fn up(args: &UpArgs, agent: AgentConfig) -> ExitCode {
    let token = std::env::var("APERTURE_AUTH_TOKEN").ok().filter(|t| !t.is_empty()).unwrap_or_else(generate_token);
    let aggregator_config = match up_aggregator_config(args, &token) {
        Ok(c) => c,
        Err(e) => return runtime_failure(&e),
    };
    if let Err(code) = node_checks() {
        return code;
    }
    match runtime().and_then(|rt| rt.block_on(up_async(aggregator_config, agent, token))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => runtime_failure(&e),
    }
}

fn up_aggregator_config(args: &UpArgs, token: &str) -> anyhow::Result<AggregatorConfig> {
    let mut c = AggregatorConfig::default();
    let ingest = format!("127.0.0.1:{}", args.ingest_port);
    c.listen.quic = ingest.clone();
    c.listen.grpc = ingest;
    c.listen.http = format!("127.0.0.1:{}", args.http_port);
    c.data_dir = args.data_dir.join("aggregator");
    c.auth.token = Secret(token.to_owned());
    std::fs::create_dir_all(&c.data_dir).with_context(|| format!("creating {}", c.data_dir.display()))?;
    Ok(c)
}

async fn up_async(aggregator: AggregatorConfig, agent: AgentConfig, token: String) -> anyhow::Result<()> {
    let stop = stop_signals().context("listening for SIGTERM and SIGINT")?;
    let daemon = Daemon::start(&aggregator).await?;
    let local = LocalAggregator {
        address: daemon.quic_addr().or(daemon.grpc_addr()).map(|a| a.to_string()).context("no ingress address")?,
        token: token.clone(),
        fingerprint: daemon.fingerprint(),
    };
    let (mode, frequency) = (agent.mode, agent.frequency_hz);
    let shutdown = Shutdown::new();
    let agent_shutdown = shutdown.clone();
    let agent_thread = std::thread::Builder::new()
        .name("agent".into())
        .spawn(move || aperture_agent::run_agent_local(agent, &local, agent_shutdown))
        .context("starting the agent thread")?;
    let url = format!("http://{}/", daemon.http_addr());
    println!();
    println!("  Aperture is running on this machine (mode {mode}, {frequency} Hz).");
    println!("  UI:          {}", sign_in_link(&url, &token));
    println!("               (signs this browser tab in; the token after # never reaches the server)");
    println!("  API:         {url}api/v1");
    println!("  Token:       {token}");
    println!("  Example:     curl -H 'Authorization: Bearer {token}' '{url}api/v1/top?mode=cpu'");
    println!("  Stop with Ctrl-C.");
    println!();
    // The agent stops on its own only when start-up fails; then stop too.
    let agent_done = async {
        while !agent_thread.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        () = stop => {}
        () = agent_done => {}
    }
    shutdown.trigger();
    let agent_result = tokio::task::spawn_blocking(move || agent_thread.join())
        .await
        .context("waiting for the agent")?
        .map_err(|_| anyhow::anyhow!("the agent thread panicked"))?;
    let stopped = daemon.shutdown().await;
    let report = agent_result.context("agent")?;
    tracing::info!(%report, "agent stopped");
    stopped
}

/// The UI's address with the token in its fragment (`#token=...`): the UI
/// moves it into the tab's session storage and out of the address bar. The
/// token is percent-encoded, so one from APERTURE_AUTH_TOKEN survives as is.
fn sign_in_link(url: &str, token: &str) -> String {
    let mut link = format!("{url}#token=");
    for b in token.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            link.push(char::from(b));
        } else {
            link.push_str(&format!("%{b:02X}"));
        }
    }
    link
}

/// A random 32-byte token, hex.
fn generate_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Start-up checks of the node; on failure the message and the check's own exit code.
fn node_checks() -> Result<(), ExitCode> {
    match preflight::check() {
        Ok(report) => {
            tracing::info!(
                kernel = %report.kernel_release,
                tracefs = %report.tracefs,
                mounted_tracefs = report.mounted_tracefs,
                "node checks passed"
            );
            for feature in features::detect(&report.kernel_release, std::path::Path::new(&report.tracefs)) {
                match feature.off_because {
                    None => tracing::debug!("kernel feature {feature}"),
                    Some(_) => tracing::warn!("kernel feature {feature}"),
                }
            }
            Ok(())
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1)))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Triggers `shutdown` on SIGTERM or SIGINT, from a small runtime of its own
/// (the agent's hot path is plain threads).
fn trigger_on_signals(shutdown: Shutdown) -> anyhow::Result<()> {
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the signal runtime")?;
    let stop = {
        let _in_runtime = rt.enter();
        stop_signals().context("listening for SIGTERM and SIGINT")?
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(stop);
            shutdown.trigger();
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// Reports a runtime failure with its chain of causes.
fn runtime_failure(e: &anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{sign_in_link, up_agent_config};
    use crate::cli::{Cli, Command};

    fn up_args(args: &[&str]) -> crate::cli::UpArgs {
        match Cli::try_parse_from([&["aperture", "up"], args].concat()).expect("valid arguments").command {
            Command::Up(up) => up,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn up_keeps_the_local_agents_budget_unless_told_not_to() {
        assert!(up_agent_config(&up_args(&[])).expect("loads").budget.enabled);
        assert!(!up_agent_config(&up_args(&["--no-budget"])).expect("loads").budget.enabled);
    }

    #[test]
    fn the_sign_in_link_carries_the_token_in_the_fragment_percent_encoded() {
        assert_eq!(sign_in_link("http://127.0.0.1:9090/", "ab12"), "http://127.0.0.1:9090/#token=ab12");
        assert_eq!(sign_in_link("http://h/", "a+b&c=d e%"), "http://h/#token=a%2Bb%26c%3Dd%20e%25");
    }
}
