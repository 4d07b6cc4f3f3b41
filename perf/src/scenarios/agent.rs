//! `agent`: the agent's own cost. `aperture aggregator` runs as a separate
//! process (so the measured process is only the agent); for each mode at the
//! configured frequency an `aperture agent` process is started, given a
//! warm-up, and its CPU time (`/proc/<pid>/stat` utime + stime, as % of one
//! core) and memory (`/proc/<pid>/status` VmRSS and VmHWM) are read over the
//! interval. The peer is `perf record -F <hz> -a -g` writing to a file over
//! an interval of the same length (and, with `compare_perf_dwarf`, `perf
//! record --call-graph dwarf`, which copies each sampled stack to its file
//! and unwinds it later; the bytes each perf wrote are reported). Each side
//! runs on an idle machine and under a busy load (a CPU burner plus a syscall
//! loop, one per core of the two). The kernel-side cost of Aperture's BPF
//! programs over the interval (`kernel.bpf_stats_enabled`) is reported as its
//! own metric, and so is each process's CPU over its whole life (start-up and
//! shutdown included), read from this process's reaped-children times: `perf
//! record` does most of its work when it stops. For the agent, smaps is
//! sampled every 200 ms for a peak split into BPF map pages mapped into it
//! (unwind tables being filled: the table budget's part) and the rest, and
//! the CPU of its main (start-up), `ap-unwind` and pipeline threads is
//! reported.
//!
//! The warm-up starts once the agent's pipeline thread exists (its probes
//! are loaded), not when /healthz first answers.
//!
//! The agents run with the overhead budget off, so they sample at the
//! configured frequency throughout. Sides `aperture_warm…` start with an
//! unwind-table disk cache filled in setup; with `APERTURE_BASELINE_BIN`
//! set, that binary runs as `aperture_baseline…` in the same run.
//!
//! Needs root and the release binary (`cargo build --release -p aperture`,
//! or `APERTURE_BIN`); built on first use when missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aperture_probes::bench;
use serde::Deserialize;

use crate::burn::spawn_burner;
use crate::harness::{Metric, Scenario};
use crate::sys::{
    Guarded, aperture_binary, free_port, free_port_pair, http, on_path, proc_usage, reaped_children_cpu_s,
    require_root, snapshot_binary, wait_for,
};

/// Parameters of the scenario.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Agent modes measured (`cpu`, `lock`, `syscall`, `all`).
    pub modes: Vec<String>,
    /// Machine states: `idle`, `busy`.
    pub loads: Vec<String>,
    /// Sampling frequency, Hz.
    pub frequency_hz: u32,
    /// Seconds between start and the measured interval.
    pub warmup_s: f64,
    /// Length of the measured interval, seconds.
    pub interval_s: f64,
    /// Also measure the agent with `batch.max_age` set to this (e.g. `10s`),
    /// as sides `aperture_batch<age>-<mode>-<load>`: the cost of the
    /// default batch age against another in the same run.
    #[serde(default)]
    pub compare_batch_max_age: Option<String>,
    /// Also measure the agent with a warm unwind-table disk cache (filled by
    /// one agent run in setup, shared by all its runs), as sides
    /// `aperture_warm-<mode>-<load>`: the steady state of an agent that
    /// restarts, against a first start (`aperture-…`, a fresh data dir, every
    /// table built).
    #[serde(default)]
    pub compare_warm_cache: bool,
    /// Also measure `perf record -F <hz> -a --call-graph dwarf` as side
    /// `perf_dwarf-record-<load>`: the peer that unwinds without frame
    /// pointers, as Aperture's tables do, by copying stacks to a file.
    #[serde(default)]
    pub compare_perf_dwarf: bool,
}

/// The measured agents' configuration (plus `batch.max_age` for the
/// `aperture_batch…` sides).
const AGENT_YAML: &str = "transport:\n  insecure_skip_verify: true\nbudget:\n  enabled: false\n";

/// A second `aperture` binary measured in the same run as sides
/// `aperture_baseline…` (e.g. the build before a change).
pub const BASELINE_ENV: &str = "APERTURE_BASELINE_BIN";

/// The scenario.
#[derive(Debug)]
pub struct AgentScenario {
    params: Params,
    root: PathBuf,
    bin: PathBuf,
    /// From [`BASELINE_ENV`], snapshotted.
    baseline: Option<PathBuf>,
    dir: Option<tempfile::TempDir>,
    aggregator: Option<Guarded>,
    ingest_port: u16,
    runs: u32,
}

impl AgentScenario {
    /// A scenario with these parameters; `root` is the repository.
    pub fn new(params: Params, root: PathBuf) -> AgentScenario {
        AgentScenario {
            params,
            root,
            bin: PathBuf::new(),
            baseline: None,
            dir: None,
            aggregator: None,
            ingest_port: 0,
            runs: 0,
        }
    }
}

/// Splits `aperture-cpu-idle` / `perf-record-busy` into (tool, mode, load).
pub fn parse_side(side: &str) -> Option<(&str, &str, &str)> {
    let (rest, load) = side.rsplit_once('-')?;
    let (tool, mode) = rest.split_once('-')?;
    Some((tool, mode, load))
}

/// The value of counter `name` in a Prometheus text exposition (0 when absent).
pub fn counter(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

/// (frames built, frame bytes) so far, from the agent's /metrics.
fn agent_frames(addr: SocketAddr) -> anyhow::Result<(f64, f64)> {
    let r = http(addr, "GET", "/metrics", None, b"", Duration::from_secs(5))?;
    let text = r.text();
    Ok((counter(&text, "aperture_agent_frames_built_total"), counter(&text, "aperture_agent_frame_bytes_total")))
}

/// Sum of run time (ns) of the BPF programs whose name starts with `ap_`.
fn aperture_bpf_ns() -> u64 {
    bench::program_run_stats("ap_").iter().map(|p| p.run_time_ns).sum()
}

/// Peak resident memory of a process seen by sampling its smaps, split into
/// BPF map pages mapped into it (the agent maps an unwind-table map while it
/// fills it: the table budget's part) and the rest.
#[derive(Debug, Default)]
struct MemoryPeak {
    total_kib: u64,
    table_maps_kib: u64,
    rest_kib: u64,
}

impl MemoryPeak {
    /// Samples `/proc/<pid>/smaps` every 200 ms for `d`.
    fn sample_for(&mut self, pid: u32, d: Duration) {
        let end = Instant::now() + d;
        loop {
            if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) {
                let (total, maps) = smaps_rss_kib(&text);
                self.total_kib = self.total_kib.max(total);
                self.table_maps_kib = self.table_maps_kib.max(maps);
                self.rest_kib = self.rest_kib.max(total - maps);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(200)));
        }
    }
}

/// (all, BPF maps') resident KiB from the text of `/proc/<pid>/smaps`.
pub fn smaps_rss_kib(text: &str) -> (u64, u64) {
    let (mut total, mut maps, mut in_map) = (0u64, 0u64, false);
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("Rss:") {
            let kib = v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
            total += kib;
            if in_map {
                maps += kib;
            }
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|t| t.contains('-') && t.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
        {
            // A mapping's header: `start-end perms offset dev inode [name]`.
            in_map = line.contains("bpf-map");
        }
    }
    (total, maps)
}

/// The name the agent's main thread is reported under (its `comm` is the
/// binary's file name, which the snapshot copies change).
const MAIN_THREAD: &str = "(main)";

/// The agent's pipeline thread (`aperture-pipeline`, cut to 15 bytes).
const PIPELINE_THREAD: &str = "aperture-pipeli";

/// CPU seconds of each thread of `pid` so far, by name; the thread whose id
/// is the process's is named [`MAIN_THREAD`].
fn thread_cpu_s(pid: u32) -> Vec<(String, f64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    dir.filter_map(Result::ok)
        .filter_map(|e| {
            let tid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ticks = crate::load::stat_cpu_ticks(&stat)?;
            let name = if tid == pid {
                MAIN_THREAD.to_owned()
            } else {
                std::fs::read_to_string(e.path().join("comm")).ok()?.trim().to_owned()
            };
            Some((name, ticks as f64 / crate::sys::TICKS_PER_SEC))
        })
        .collect()
}

impl AgentScenario {
    /// Starts `aperture agent` from `bin` in `mode`.
    fn spawn_agent(
        &self,
        bin: &Path,
        config: &str,
        mode: &str,
        data_dir: &Path,
        metrics_port: u16,
        log: std::fs::File,
    ) -> anyhow::Result<Guarded> {
        let Some(dir) = &self.dir else { bail!("setup did not run") };
        Guarded::spawn(
            "aperture agent",
            Command::new(bin)
                .arg("agent")
                .arg("-c")
                .arg(dir.path().join(config))
                .args(["--aggregator", &format!("127.0.0.1:{}", self.ingest_port)])
                .args(["--mode", mode, "--freq", &self.params.frequency_hz.to_string()])
                .arg("--data-dir")
                .arg(data_dir)
                .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
                .env_remove("APERTURE_AUTH_TOKEN")
                .stdout(Stdio::null())
                .stderr(log),
        )
    }

    /// Fills the shared unwind cache of `tool`'s warm sides: one cpu-mode
    /// agent from `bin` runs as long as a measured side, with the cache
    /// directory as its data dir's `unwind`.
    fn fill_cache(&self, tool: &str, bin: &Path) -> anyhow::Result<()> {
        let Some(dir) = &self.dir else { bail!("setup did not run") };
        let cache = dir.path().join(format!("unwind-{tool}"));
        std::fs::create_dir_all(&cache)?;
        let data_dir = dir.path().join(format!("fill-{tool}"));
        std::fs::create_dir_all(&data_dir)?;
        std::os::unix::fs::symlink(&cache, data_dir.join("unwind"))?;
        let log = std::fs::File::create(dir.path().join(format!("fill-{tool}.log")))?;
        let port = free_port()?;
        let mut child = self.spawn_agent(bin, "agent.yaml", "cpu", &data_dir, port, log)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_for("aperture agent", Duration::from_secs(60), || {
            http(addr, "GET", "/healthz", None, b"", Duration::from_secs(2)).is_ok_and(|r| r.status == 200)
        })?;
        std::thread::sleep(Duration::from_secs_f64(self.params.warmup_s + self.params.interval_s));
        child.check_alive()?;
        child.stop_with(libc::SIGTERM, Duration::from_secs(15));
        Ok(())
    }
}

impl Scenario for AgentScenario {
    fn sides(&self) -> Vec<String> {
        let mut out = Vec::new();
        for load in &self.params.loads {
            for mode in &self.params.modes {
                let mut tools = vec!["aperture"];
                if std::env::var_os(BASELINE_ENV).is_some() {
                    tools.push("aperture_baseline");
                }
                for tool in tools {
                    out.push(format!("{tool}-{mode}-{load}"));
                    if self.params.compare_warm_cache {
                        out.push(format!("{tool}_warm-{mode}-{load}"));
                    }
                }
                if let Some(age) = &self.params.compare_batch_max_age {
                    out.push(format!("aperture_batch{age}-{mode}-{load}"));
                }
            }
            out.push(format!("perf-record-{load}"));
            if self.params.compare_perf_dwarf {
                out.push(format!("perf_dwarf-record-{load}"));
            }
        }
        out
    }

    fn setup(&mut self) -> anyhow::Result<()> {
        require_root("agent")?;
        if !on_path("perf") {
            bail!("perf not found: apt-get install linux-perf");
        }
        let dir = tempfile::Builder::new().prefix("aperture-perf-agent").tempdir()?;
        self.bin = snapshot_binary(&aperture_binary(&self.root)?, dir.path())?;
        if let Some(base) = std::env::var_os(BASELINE_ENV) {
            let copy = dir.path().join("aperture-baseline");
            std::fs::copy(&base, &copy)
                .with_context(|| format!("copying {BASELINE_ENV}={}", base.to_string_lossy()))?;
            self.baseline = Some(copy);
        }
        let (http_port, ingest) = (free_port()?, free_port_pair()?);
        let log = std::fs::File::create(dir.path().join("aggregator.log"))?;
        let mut agg = Guarded::spawn(
            "aperture aggregator",
            Command::new(&self.bin)
                .arg("aggregator")
                .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
                .args([
                    "--grpc-listen",
                    &format!("127.0.0.1:{ingest}"),
                    "--quic-listen",
                    &format!("127.0.0.1:{ingest}"),
                ])
                .arg("--data-dir")
                .arg(dir.path().join("aggregator"))
                .arg("--no-auth")
                .env_remove("APERTURE_AUTH_TOKEN")
                .env_remove("APERTURE_CLICKHOUSE_ENDPOINT")
                .stdout(Stdio::null())
                .stderr(log),
        )?;
        let addr = SocketAddr::from(([127, 0, 0, 1], http_port));
        wait_for("aperture aggregator", Duration::from_secs(30), || {
            http(addr, "GET", "/healthz", None, b"", Duration::from_secs(2)).is_ok_and(|r| r.status == 200)
        })?;
        agg.check_alive()?;
        // The overhead budget is off: it would lower the frequency of an
        // agent over 1%, and the cost at the configured frequency is what
        // is measured.
        std::fs::write(dir.path().join("agent.yaml"), AGENT_YAML)?;
        if let Some(age) = &self.params.compare_batch_max_age {
            std::fs::write(
                dir.path().join(format!("agent-batch{age}.yaml")),
                format!("{AGENT_YAML}batch:\n  max_age: {age}\n"),
            )?;
        }
        bench::enable_bpf_stats(true).context("enabling kernel.bpf_stats_enabled")?;
        self.ingest_port = ingest;
        self.aggregator = Some(agg);
        self.dir = Some(dir);
        if self.params.compare_warm_cache {
            let bins: Vec<(&str, PathBuf)> =
                [("aperture", Some(self.bin.clone())), ("aperture_baseline", self.baseline.clone())]
                    .into_iter()
                    .filter_map(|(tool, bin)| Some((tool, bin?)))
                    .collect();
            for (tool, bin) in bins {
                self.fill_cache(tool, &bin)?;
            }
        }
        Ok(())
    }

    fn run_once(&mut self, side: &str) -> anyhow::Result<Vec<Metric>> {
        let Some(dir) = &self.dir else { bail!("setup did not run") };
        let Some((tool, mode, load)) = parse_side(side) else { bail!("bad side name {side}") };
        let p = &self.params;
        self.runs += 1;
        let total = p.warmup_s + p.interval_s + 5.0;
        let exe = std::env::current_exe()?;
        let _load: Vec<Guarded> = match load {
            "idle" => Vec::new(),
            "busy" => vec![spawn_burner(&exe, total, false)?, spawn_burner(&exe, total, true)?],
            other => bail!("unknown load {other}"),
        };
        let log = std::fs::File::create(dir.path().join(format!("{side}.log")))?;
        let metrics_port = free_port()?;
        // `aperture` with defaults, `aperture_batch10s` with that batch age;
        // `…_warm` with the shared unwind cache, `aperture_baseline…` the
        // other binary.
        let (base, warm) = match tool.strip_suffix("_warm") {
            Some(t) => (t, true),
            None => (tool, false),
        };
        let config = match base.strip_prefix("aperture_batch") {
            Some(age) => format!("agent-batch{age}.yaml"),
            None => "agent.yaml".to_owned(),
        };
        let bin = match base {
            "aperture_baseline" => self.baseline.clone().with_context(|| format!("{side} needs {BASELINE_ENV}"))?,
            _ => self.bin.clone(),
        };
        let data_dir = dir.path().join(format!("agent-{}", self.runs));
        if warm {
            std::fs::create_dir_all(&data_dir)?;
            std::os::unix::fs::symlink(dir.path().join(format!("unwind-{base}")), data_dir.join("unwind"))?;
        }
        let perf_data = dir.path().join(format!("{side}-{}.data", self.runs));
        let started = Instant::now();
        let mut child = match tool {
            "aperture_batch" => bail!("bad side name {side}"),
            t if t.starts_with("aperture") => self.spawn_agent(&bin, &config, mode, &data_dir, metrics_port, log)?,
            "perf" | "perf_dwarf" => {
                let call_graph: &[&str] = if tool == "perf" { &["-g"] } else { &["--call-graph", "dwarf"] };
                Guarded::spawn(
                    "perf record",
                    Command::new("perf")
                        .args(["record", "-F", &p.frequency_hz.to_string(), "-a"])
                        .args(call_graph)
                        .arg("-o")
                        .arg(&perf_data)
                        .stdout(Stdio::null())
                        .stderr(log),
                )?
            }
            other => bail!("unknown tool {other}"),
        };
        if tool.starts_with("aperture") {
            let addr = SocketAddr::from(([127, 0, 0, 1], metrics_port));
            wait_for("aperture agent", Duration::from_secs(60), || {
                http(addr, "GET", "/healthz", None, b"", Duration::from_secs(2)).is_ok_and(|r| r.status == 200)
            })
            .with_context(|| format!("see {}", dir.path().join(format!("{side}.log")).display()))?;
            // /healthz answers before the probes are loaded (the pipeline
            // has no heartbeat yet); start-up (BPF verification) is over once
            // the pipeline thread exists. Without this wait a slow start on
            // a busy machine spilled into the measured interval.
            let pid = child.pid();
            wait_for("the agent's pipeline thread", Duration::from_secs(60), || {
                thread_cpu_s(pid).iter().any(|(name, _)| name == PIPELINE_THREAD)
            })
            .with_context(|| format!("see {}", dir.path().join(format!("{side}.log")).display()))?;
        }
        let pid = child.pid();
        let mut memory = MemoryPeak::default();
        memory.sample_for(pid, Duration::from_secs_f64(p.warmup_s));
        child.check_alive()?;
        let metrics_addr = SocketAddr::from(([127, 0, 0, 1], metrics_port));
        let is_agent = tool.starts_with("aperture");
        let frames0 = if is_agent { agent_frames(metrics_addr)? } else { (0.0, 0.0) };
        let (u0, bpf0, t0) = (proc_usage(pid)?, aperture_bpf_ns(), Instant::now());
        memory.sample_for(pid, Duration::from_secs_f64(p.interval_s));
        let (u1, bpf1, dt) = (proc_usage(pid)?, aperture_bpf_ns(), t0.elapsed().as_secs_f64());
        let threads = thread_cpu_s(pid);
        let frames1 = if is_agent { agent_frames(metrics_addr)? } else { (0.0, 0.0) };
        child.check_alive()?;
        // perf writes its file on SIGINT; the agent flushes and exits on SIGTERM.
        let signal = if tool.starts_with("perf") { libc::SIGINT } else { libc::SIGTERM };
        let c0 = reaped_children_cpu_s();
        child.stop_with(signal, Duration::from_secs(15));
        // Whole life: start-up, warm-up, interval and shutdown (perf record
        // does most of its work when it stops: it writes build ids then).
        let lifetime_cpu_s = reaped_children_cpu_s() - c0;
        let lifetime_s = started.elapsed().as_secs_f64();
        let mut out = vec![
            Metric::new("cpu_pct_of_one_core", "%", (u1.cpu_s - u0.cpu_s) / dt * 100.0),
            Metric::new("lifetime_cpu_s", "CPU-s", lifetime_cpu_s),
            Metric::new("rss_mib", "MiB", u1.rss_kib as f64 / 1024.0),
            Metric::new("peak_rss_mib", "MiB", u1.hwm_kib as f64 / 1024.0),
        ];
        if is_agent {
            // VmHWM is one number; the split comes from smaps sampled every
            // 200 ms (a peak shorter than that can be missed by both parts).
            out.push(Metric::new("sampled_peak_rss_mib", "MiB", memory.total_kib as f64 / 1024.0));
            out.push(Metric::new("sampled_peak_table_maps_mib", "MiB", memory.table_maps_kib as f64 / 1024.0));
            out.push(Metric::new("sampled_peak_rest_mib", "MiB", memory.rest_kib as f64 / 1024.0));
            // Whole life up to the end of the interval, per thread.
            let of = |name: &str| threads.iter().filter(|(n, _)| n == name).map(|(_, c)| c).sum::<f64>();
            out.push(Metric::new("main_thread_cpu_s", "CPU-s", of(MAIN_THREAD)));
            out.push(Metric::new("unwind_thread_cpu_s", "CPU-s", of("ap-unwind")));
            out.push(Metric::new("pipeline_thread_cpu_s", "CPU-s", of(PIPELINE_THREAD)));
            out.push(Metric::new("bpf_cpu_pct_of_one_core", "%", bpf1.saturating_sub(bpf0) as f64 / 1e9 / dt * 100.0));
            out.push(Metric::new("frames_per_s", "frames/s", (frames1.0 - frames0.0) / dt));
            out.push(Metric::new("frame_kib_per_s", "KiB/s", (frames1.1 - frames0.1) / 1024.0 / dt));
        } else {
            // What perf wrote over its whole life, per second of it.
            let bytes = std::fs::metadata(&perf_data).map(|m| m.len()).unwrap_or(0);
            let _ = std::fs::remove_file(&perf_data);
            out.push(Metric::new("written_kib_per_s", "KiB/s", bytes as f64 / 1024.0 / lifetime_s));
        }
        Ok(out)
    }

    fn teardown(&mut self) {
        let _ = bench::enable_bpf_stats(false);
        self.aggregator = None;
        self.dir = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_from_the_exposition() {
        let text = "# HELP aperture_agent_frames_built_total Frames encoded.\n\
                    # TYPE aperture_agent_frames_built_total counter\n\
                    aperture_agent_frames_built_total 42\n\
                    aperture_agent_frames_built_total_other 7\n";
        assert_eq!(counter(text, "aperture_agent_frames_built_total"), 42.0);
        assert_eq!(counter(text, "aperture_agent_frame_bytes_total"), 0.0);
    }

    #[test]
    fn smaps_split_bpf_maps_from_the_rest() {
        let text = "55f0-55f1 r-xp 00000000 fe:01 123 /usr/bin/aperture\n\
                    Size:                100 kB\n\
                    Rss:                  40 kB\n\
                    7f00-7f10 rw-s 00000000 00:0f 456 anon_inode:bpf-map\n\
                    Rss:                1024 kB\n\
                    Pss:                1024 kB\n\
                    7f20-7f30 rw-p 00000000 00:00 0 \n\
                    Rss:                   8 kB\n\
                    VmFlags: rd wr mr mw me ac sd\n";
        assert_eq!(smaps_rss_kib(text), (1072, 1024));
        assert_eq!(smaps_rss_kib(""), (0, 0));
    }

    #[test]
    fn sides_split_into_tool_mode_and_load() {
        assert_eq!(parse_side("aperture-cpu-idle"), Some(("aperture", "cpu", "idle")));
        assert_eq!(parse_side("perf-record-busy"), Some(("perf", "record", "busy")));
        assert_eq!(parse_side("perf_dwarf-record-idle"), Some(("perf_dwarf", "record", "idle")));
        assert_eq!(parse_side("aperture_batch10s-cpu-idle"), Some(("aperture_batch10s", "cpu", "idle")));
        assert_eq!(parse_side("aperture_baseline_warm-cpu-busy"), Some(("aperture_baseline_warm", "cpu", "busy")));
        assert_eq!(parse_side("nonsense"), None);
    }
}
