//! `aperture-perf`: runs the benchmark scenarios under `perf/scenarios/` and
//! reports median and spread of every metric per side, with the targets from
//! the issues judged against the medians.
//!
//! ```text
//! aperture-perf list
//! aperture-perf run codec [--quick] [--reps N] [--set KEY=VALUE]... [--results DIR]
//! ```
//!
//! Scenarios: `codec`, `probes`, `ingest`, `writer`, `storage`, `query`,
//! `freshness`, `agent`, `ingest_formats` (see `perf/README.md` for what each measures and
//! how). Every comparison runs its sides in the same run, alternating, and
//! every load generator is bounded in time and count and sends only to
//! loopback. Scenarios that load BPF programs or start the agent need root;
//! the storage scenarios start Debian's `clickhouse-server` on loopback.

mod burn;
mod clickhouse;
mod formats;
mod harness;
mod load;
mod push;
mod scenarios;
mod stats;
mod sys;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "aperture-perf", about = "Reproducible performance scenarios for Aperture and its peers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the scenarios.
    List,
    /// Run a scenario.
    Run {
        /// Scenario name (a file perf/scenarios/<name>.yaml).
        scenario: String,
        /// Short run with the scenario's quick parameters and one repetition.
        #[arg(long)]
        quick: bool,
        /// Repetitions (default: the scenario's).
        #[arg(long)]
        reps: Option<usize>,
        /// Override a parameter of the scenario file, `key=value` (YAML), e.g.
        /// `--set agents=[5000]`; repeatable. Applied before `--quick`'s overrides.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Directory for the JSON and Markdown results.
        #[arg(long, default_value = "perf/results")]
        results: PathBuf,
    },
    /// Load program used by the scenarios: spin on the CPU (or on a cheap
    /// syscall) for a bounded time.
    #[command(hide = true)]
    Burn {
        /// Seconds to run (at most 600).
        #[arg(long)]
        seconds: f64,
        /// Loop on getppid(2) instead of arithmetic.
        #[arg(long)]
        syscalls: bool,
    },
}

fn repo_root() -> PathBuf {
    // The binary runs from the repository (cargo run) or is told where it is.
    std::env::var_os("APERTURE_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from("."))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let root = repo_root();
    match cli.command {
        Command::Burn { seconds, syscalls } => {
            burn::burn(seconds, syscalls);
            Ok(())
        }
        Command::List => {
            for name in scenarios::NAMES {
                let file = harness::ScenarioFile::load(&root, name)?;
                println!("{name:<12} {}", file.description.split_whitespace().collect::<Vec<_>>().join(" "));
            }
            Ok(())
        }
        Command::Run { scenario, quick, reps, set, results } => {
            let mut file = harness::ScenarioFile::load(&root, &scenario)?;
            for assignment in &set {
                file.set(assignment)?;
            }
            let mut s = scenarios::build(&file, quick, &root)?;
            let reps = reps.unwrap_or(if quick { 1 } else { file.repetitions }).max(1);
            if cfg!(debug_assertions) {
                eprintln!("this is a debug build: its timings say nothing of Aperture's speed (build with --release)");
            }
            eprintln!("load average before: {}", sys::load_average());
            let report = harness::run_scenario(&file, s.as_mut(), reps, &root)?;
            eprintln!("load average after: {}", sys::load_average());
            println!("{}", report.table());
            let dir = if results.is_absolute() { results } else { root.join(results) };
            let (json, md) = report.write(&dir).context("writing results")?;
            println!("results: {} {}", json.display(), md.display());
            Ok(())
        }
    }
}
