//! `aperture`: the one binary of Aperture. Subcommands:
//!
//! - `aperture agent`: the node agent (one per node, a DaemonSet in Kubernetes);
//! - `aperture aggregator`: ingress, storage and the HTTP API;
//! - `aperture up`: both on one machine, on loopback, with the embedded store;
//! - `aperture check-config`: validate a configuration file and exit.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 configuration error; the
//! agent's start-up checks have codes of their own (see `docs/deploy.md`).

mod cli;
mod run;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
