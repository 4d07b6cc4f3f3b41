//! `aperture-perf`: runs the benchmark scenarios under `perf/scenarios/` and
//! reports median and spread of every metric per side, with the targets from
//! the issues judged against the medians.
//!
//! ```text
//! aperture-perf list
//! aperture-perf run codec [--quick] [--reps N] [--results DIR]
//! ```

mod harness;
mod scenarios;
mod stats;
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
        /// Directory for the JSON and Markdown results.
        #[arg(long, default_value = "perf/results")]
        results: PathBuf,
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
        Command::List => {
            for name in scenarios::NAMES {
                let file = harness::ScenarioFile::load(&root, name)?;
                println!("{name:<12} {}", file.description.split_whitespace().collect::<Vec<_>>().join(" "));
            }
            Ok(())
        }
        Command::Run { scenario, quick, reps, results } => {
            let file = harness::ScenarioFile::load(&root, &scenario)?;
            let mut s = scenarios::build(&file, quick, &root)?;
            let reps = reps.unwrap_or(if quick { 1 } else { file.repetitions }).max(1);
            let report = harness::run(&file, s.as_mut(), reps, &root)?;
            println!("{}", report.table());
            let dir = if results.is_absolute() { results } else { root.join(results) };
            let (json, md) = report.write(&dir).context("writing results")?;
            println!("results: {} {}", json.display(), md.display());
            Ok(())
        }
    }
}
