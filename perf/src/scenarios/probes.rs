//! `probes`: the cost of the BPF side. For each side — no tracing,
//! Aperture's syscall mode, Aperture with every mode, bpftrace counting the
//! same tracepoints, bpftrace keeping a latency histogram per syscall — it
//! times a syscall storm (`dd bs=1`) and a CPU-bound load, and reads the
//! kernel's own run-time accounting (`kernel.bpf_stats_enabled`) for ns per
//! program run. Needs root.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aperture_core::model::Mode;
use aperture_probes::{Modes, ProbeConfig, Probes, ReaderConfig, RecordBatch, bench};
use serde::Deserialize;

use crate::harness::{Metric, Scenario};

/// Parameters of the scenario.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Bytes `dd` copies one at a time (two syscalls per byte).
    pub storm_bytes: u64,
    /// Rounds of the CPU-bound loop (each a few ms).
    pub cpu_rounds: u64,
}

/// bpftrace counting syscalls at the same hooks, and nothing else.
const BPFTRACE_COUNT: &str = "tracepoint:raw_syscalls:sys_enter { @enter[pid] = count(); } tracepoint:raw_syscalls:sys_exit { @exit[pid] = count(); }";
/// bpftrace doing comparable work to Aperture's syscall mode: per (pid,
/// syscall) count, errors and a log2 latency histogram.
const BPFTRACE_LATENCY: &str = "tracepoint:raw_syscalls:sys_enter { @start[tid] = nsecs; } \
     tracepoint:raw_syscalls:sys_exit /@start[tid]/ { $d = nsecs - @start[tid]; @lat[pid, args->id] = hist($d); \
     @errors[pid, args->id] = sum(args->ret < 0); delete(@start[tid]); }";

/// The scenario.
#[derive(Debug)]
pub struct ProbesScenario {
    params: Params,
}

impl ProbesScenario {
    /// A scenario with these parameters.
    pub fn new(params: Params) -> ProbesScenario {
        ProbesScenario { params }
    }
}

/// Whatever traces the system during one measurement; dropped to stop it.
enum Tracer {
    None,
    Aperture(Box<Probes>, aperture_probes::PerfReader),
    Bpftrace(Child),
}

impl Tracer {
    fn start(side: &str) -> anyhow::Result<Tracer> {
        Ok(match side {
            "none" => Tracer::None,
            "aperture-syscall" | "aperture-all" => {
                let modes = if side == "aperture-all" { Modes::ALL } else { Modes::only(Mode::Syscall) };
                let mut probes = Probes::load(&ProbeConfig { modes, ..ProbeConfig::default() })
                    .context("loading Aperture's probes")?;
                let reader = probes.start_reader(&ReaderConfig::default(), |_: RecordBatch| {})?;
                probes.attach()?;
                Tracer::Aperture(Box::new(probes), reader)
            }
            "bpftrace-count" | "bpftrace-latency" => {
                let script = if side == "bpftrace-count" { BPFTRACE_COUNT } else { BPFTRACE_LATENCY };
                let mut child = Command::new("bpftrace")
                    .arg("-e")
                    .arg(script)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting bpftrace (apt-get install bpftrace)")?;
                // bpftrace prints "Attaching N probes..." once its programs are attached.
                let out = child.stdout.take().context("bpftrace stdout")?;
                let mut line = String::new();
                let mut reader = BufReader::new(out);
                reader.read_line(&mut line)?;
                if !line.contains("Attaching") {
                    let _ = child.kill();
                    bail!("bpftrace did not attach: {line}");
                }
                // Keep reading: on SIGINT bpftrace prints its maps, which can
                // exceed a pipe's buffer and would block it (and its exit).
                std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
                std::thread::sleep(Duration::from_millis(300));
                Tracer::Bpftrace(child)
            }
            other => bail!("unknown side {other}"),
        })
    }

    fn stop(self) {
        match self {
            Tracer::None => {}
            Tracer::Aperture(probes, reader) => {
                let _ = reader.stop();
                drop(probes);
            }
            Tracer::Bpftrace(mut child) => {
                // SIGINT lets bpftrace print its maps and detach; wait for it.
                // SAFETY: kill(2) on a pid we own; no memory is touched.
                unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
                if child.wait().is_err() {
                    let _ = child.kill();
                }
            }
        }
    }
}

fn storm(bytes: u64) -> anyhow::Result<f64> {
    let start = Instant::now();
    let status = Command::new("dd")
        .args(["if=/dev/zero", "of=/dev/null", "bs=1", &format!("count={bytes}")])
        .stderr(Stdio::null())
        .status()
        .context("running dd")?;
    anyhow::ensure!(status.success(), "dd failed: {status}");
    Ok(start.elapsed().as_secs_f64())
}

fn cpu_load(rounds: u64) -> f64 {
    let start = Instant::now();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..rounds * 1_000_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    std::hint::black_box(x);
    start.elapsed().as_secs_f64()
}

/// ns per run of the programs attached to syscall entry and exit: Aperture's
/// by name, bpftrace's as the programs that appeared since `before`.
fn syscall_ns_per_run(side: &str, before: &[u32]) -> Vec<Metric> {
    let progs = bench::program_run_stats("");
    let mut enter = Vec::new();
    let mut exit = Vec::new();
    for p in progs.iter().filter(|p| !before.contains(&p.id) && p.run_count > 0) {
        let name = p.name.as_str();
        let is_enter =
            if side.starts_with("aperture") { name.starts_with("ap_sysent") } else { name.contains("sys_enter") };
        let is_exit =
            if side.starts_with("aperture") { name.starts_with("ap_sysexit") } else { name.contains("sys_exit") };
        if is_enter {
            enter.push(p.ns_per_run());
        } else if is_exit {
            exit.push(p.ns_per_run());
        }
    }
    let mut out = Vec::new();
    if let Some(v) = enter.first() {
        out.push(Metric::new("sys_enter_ns_per_run", "ns", *v));
    }
    if let Some(v) = exit.first() {
        out.push(Metric::new("sys_exit_ns_per_run", "ns", *v));
    }
    out
}

impl Scenario for ProbesScenario {
    fn sides(&self) -> Vec<String> {
        ["none", "aperture-syscall", "aperture-all", "bpftrace-count", "bpftrace-latency"].map(String::from).to_vec()
    }

    fn setup(&mut self) -> anyhow::Result<()> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the probes scenario loads BPF programs: run it as root");
        }
        bench::enable_bpf_stats(true).context("enabling kernel.bpf_stats_enabled")
    }

    fn run_once(&mut self, side: &str) -> anyhow::Result<Vec<Metric>> {
        let before: Vec<u32> = bench::program_run_stats("").iter().map(|p| p.id).collect();
        let tracer = Tracer::start(side)?;
        let storm_s = storm(self.params.storm_bytes);
        let cpu_s = cpu_load(self.params.cpu_rounds);
        let per_run = syscall_ns_per_run(side, &before);
        tracer.stop();
        let storm_s = storm_s?;
        let mut metrics = vec![
            Metric::new("storm_seconds", "s", storm_s),
            Metric::new("storm_syscalls_per_s", "calls/s", 2.0 * self.params.storm_bytes as f64 / storm_s),
            Metric::new("cpu_load_seconds", "s", cpu_s),
        ];
        metrics.extend(per_run);
        Ok(metrics)
    }

    fn teardown(&mut self) {
        let _ = bench::enable_bpf_stats(false);
    }
}
