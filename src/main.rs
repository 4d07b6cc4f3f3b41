//! `aperture`: the one binary of Aperture. Subcommands:
//!
//! - `aperture agent`: the node agent (one per node, a DaemonSet in Kubernetes);
//! - `aperture aggregator`: ingress, storage and the HTTP API;
//! - `aperture up`: both on one machine, on loopback, with the embedded store;
//! - `aperture check-config`: validate a configuration file and exit.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 configuration error; the
//! agent's start-up checks have codes of their own (see `docs/deploy.md`).
//!
//! `cli` parses the command line and loads configuration, `daemons` runs
//! what was asked for; only this file knows both.

mod cli;
mod daemons;

use std::process::ExitCode;

use aperture_core::config::{AgentConfig, AggregatorConfig};
use clap::Parser;

use cli::{Cli, Command, LoadError, Which, load_config};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_logging(cli.log_format);
    match cli.command {
        Command::Agent(args) => match load_config::<AgentConfig>(args.config.as_deref(), &args.flags()) {
            Ok(config) => daemons::agent(config),
            Err(e) => config_failure(&e),
        },
        Command::Aggregator(args) => match load_config::<AggregatorConfig>(args.config.as_deref(), &args.flags()) {
            Ok(config) => daemons::aggregator(config),
            Err(e) => config_failure(&e),
        },
        Command::Up(args) => match daemons::up_agent_config(&args) {
            Ok(agent) => daemons::up(&args, agent),
            Err(e) => config_failure(&e),
        },
        Command::CheckConfig(args) => {
            let result = match args.which {
                Which::Agent => load_config::<AgentConfig>(args.config.as_deref(), &[]).map(drop),
                Which::Aggregator => load_config::<AggregatorConfig>(args.config.as_deref(), &[]).map(drop),
            };
            match result {
                Ok(()) => {
                    println!("configuration ok");
                    ExitCode::SUCCESS
                }
                Err(e) => config_failure(&e),
            }
        }
    }
}

/// Exit code for configuration mistakes.
const EXIT_CONFIG: u8 = 2;

fn config_failure(e: &LoadError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_CONFIG)
}
