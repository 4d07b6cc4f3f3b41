//! `freshness`: time from a sample being taken to being visible in the
//! query API, with default flush settings, on both stores.
//!
//! Sides: `aperture-embedded` and `aperture-clickhouse`: the release
//! binary's `aperture aggregator` with the embedded store or writing to a
//! throwaway clickhouse-server (started in setup), and `aperture agent`
//! (cpu mode) pushing to it, as two processes on loopback with default
//! flush settings. The agent's overhead budget is off, so it samples at the
//! configured frequency throughout (on a loaded machine the budget lowers
//! it, and a new process's first sample then comes later: that is the
//! budget at work, not the delay measured here).
//!
//! Each repetition starts the side's processes, waits until the agent's
//! first samples are queryable, then, several times, starts a short CPU
//! burner under a process name never used before and polls
//! `GET /api/v1/labels/process/values` until the name is listed. The time
//! from starting the burner (its first sample follows within one 99 Hz
//! period) to the first answer listing it is one observation; each
//! repetition reports p50, p99 and max of its observations. The processes
//! are stopped at the end of the repetition, so only one agent samples at a
//! time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::burn::{named_burner, spawn_burner};
use crate::clickhouse::ClickHouse;
use crate::harness::{Metric, Scenario};
use crate::stats::percentile;
use crate::sys::{Guarded, aperture_binary, free_port, free_port_pair, http, require_root, snapshot_binary, wait_for};

/// Parameters of the scenario.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Observations per repetition.
    pub observations: usize,
    /// Seconds each burner runs.
    pub burn_seconds: f64,
    /// Longest wait for one observation, seconds.
    pub timeout_s: u64,
    /// Sampling frequency of the agent, Hz.
    pub frequency_hz: u32,
    /// Also run every store with a small burner (a `dash` loop under the
    /// new name, a 125 KB binary) besides `aperture-perf burn` (a ~95 MB
    /// binary with debug info), as sides `<side>-dash`: shows what the first
    /// symbolization of a large new binary adds.
    #[serde(default)]
    pub small_burner: bool,
    /// Pause between two polls of the API, ms (the resolution of an observation).
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
}

fn default_poll_ms() -> u64 {
    50
}

/// The small burner's shell.
const DASH: &str = "/bin/dash";

/// The label query polled.
const LABELS: &str = "/api/v1/labels/process/values?mode=cpu&from=-10m";

/// Where the aggregator stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Store {
    Embedded,
    ClickHouse,
}

/// The agent's configuration: trust the aggregator's generated certificate,
/// and keep sampling at the configured frequency (the overhead budget would
/// lower it on this shared machine, delaying a new process's first sample,
/// which is not what is measured here).
const AGENT_YAML: &str = "transport:\n  insecure_skip_verify: true\nbudget:\n  enabled: false\n";

/// The processes of one side while it runs.
struct Running {
    /// Stopped in reverse order (agent before aggregator).
    procs: Vec<Guarded>,
    addr: SocketAddr,
}

impl Running {
    fn check_alive(&mut self) -> anyhow::Result<()> {
        self.procs.iter_mut().try_for_each(Guarded::check_alive)
    }

    fn stop(mut self) {
        while let Some(mut p) = self.procs.pop() {
            p.stop_with(libc::SIGTERM, Duration::from_secs(20));
        }
    }
}

/// The scenario.
#[derive(Debug)]
pub struct Freshness {
    params: Params,
    root: PathBuf,
    bin: PathBuf,
    dir: Option<tempfile::TempDir>,
    clickhouse: Option<ClickHouse>,
    seq: u32,
    runs: u32,
}

impl Freshness {
    /// A scenario with these parameters; `root` is the repository.
    pub fn new(params: Params, root: PathBuf) -> Freshness {
        Freshness { params, root, bin: PathBuf::new(), dir: None, clickhouse: None, seq: 0, runs: 0 }
    }

    /// `aperture aggregator` on `store` plus `aperture agent`, as two processes.
    fn start(&self, dir: &Path, store: Store) -> anyhow::Result<Running> {
        let (http_port, ingest, metrics_port) = (free_port()?, free_port_pair()?, free_port()?);
        let run = self.runs;
        let agg_log = std::fs::File::create(dir.join(format!("aggregator-{run}.log")))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("aggregator")
            .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
            .args(["--grpc-listen", &format!("127.0.0.1:{ingest}"), "--quic-listen", &format!("127.0.0.1:{ingest}")])
            .arg("--data-dir")
            .arg(dir.join(format!("aggregator-{run}")))
            .arg("--no-auth")
            .env_remove("APERTURE_AUTH_TOKEN")
            .env_remove("APERTURE_CLICKHOUSE_ENDPOINT")
            .stdout(Stdio::null())
            .stderr(agg_log);
        if store == Store::ClickHouse {
            let Some(server) = &self.clickhouse else { bail!("setup did not start clickhouse-server") };
            cmd.env("APERTURE_CLICKHOUSE_ENDPOINT", server.endpoint())
                .env("APERTURE_CLICKHOUSE_DATABASE", format!("perf_fresh_{run}"));
        }
        let aggregator = Guarded::spawn("aperture aggregator", &mut cmd)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], http_port));
        let mut running = Running { procs: vec![aggregator], addr };
        wait_for("aperture aggregator", Duration::from_secs(30), || {
            http(addr, "GET", "/healthz", None, b"", Duration::from_secs(2)).is_ok_and(|r| r.status == 200)
        })?;
        running.check_alive()?;
        let agent_log = std::fs::File::create(dir.join(format!("agent-{run}.log")))?;
        let agent = Guarded::spawn(
            "aperture agent",
            Command::new(&self.bin)
                .arg("agent")
                .arg("-c")
                .arg(dir.join("agent.yaml"))
                .args(["--aggregator", &format!("127.0.0.1:{ingest}")])
                .args(["--mode", "cpu", "--freq", &self.params.frequency_hz.to_string()])
                .arg("--data-dir")
                .arg(dir.join(format!("agent-{run}")))
                .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
                .env_remove("APERTURE_AUTH_TOKEN")
                .stdout(Stdio::null())
                .stderr(agent_log),
        )?;
        running.procs.push(agent);
        Ok(running)
    }
}

/// Label values of `process` answered now, or an error naming the reply.
fn labels(running: &Running) -> anyhow::Result<String> {
    let r = http(running.addr, "GET", LABELS, None, b"", Duration::from_secs(10))?;
    if r.status != 200 {
        bail!("{LABELS}: {} {}", r.status, r.text());
    }
    Ok(r.text())
}

impl Scenario for Freshness {
    fn sides(&self) -> Vec<String> {
        let mut out = Vec::new();
        for store in ["embedded", "clickhouse"] {
            out.push(format!("aperture-{store}"));
            if self.params.small_burner {
                out.push(format!("aperture-{store}-dash"));
            }
        }
        out
    }

    fn setup(&mut self) -> anyhow::Result<()> {
        require_root("freshness")?;
        let dir = tempfile::Builder::new().prefix("aperture-perf-fresh").tempdir()?;
        self.bin = snapshot_binary(&aperture_binary(&self.root)?, dir.path())?;
        std::fs::write(dir.path().join("agent.yaml"), AGENT_YAML)?;
        self.clickhouse = Some(crate::clickhouse::start()?);
        self.dir = Some(dir);
        Ok(())
    }

    fn run_once(&mut self, side: &str) -> anyhow::Result<Vec<Metric>> {
        let Some(dir) = &self.dir else { bail!("setup did not run") };
        let dir = dir.path().to_owned();
        self.runs += 1;
        let (store, small) = match side.strip_suffix("-dash") {
            Some(s) => (s, true),
            None => (side, false),
        };
        let mut running = match store {
            "aperture-embedded" => self.start(&dir, Store::Embedded)?,
            "aperture-clickhouse" => self.start(&dir, Store::ClickHouse)?,
            other => bail!("unknown side {other}"),
        };
        let observed = self.observe(&dir, &mut running, small);
        running.stop();
        let mut seen = observed?;
        let max = seen.iter().copied().fold(0.0, f64::max);
        Ok(vec![
            Metric::new("freshness_p50_s", "s", percentile(&mut seen, 50.0)),
            Metric::new("freshness_p99_s", "s", percentile(&mut seen, 99.0)),
            Metric::new("freshness_max_s", "s", max),
        ])
    }

    fn teardown(&mut self) {
        self.clickhouse = None;
        self.dir = None;
    }
}

impl Freshness {
    /// Waits for the agent's first data, then takes the observations (seconds).
    fn observe(&mut self, dir: &Path, running: &mut Running, small: bool) -> anyhow::Result<Vec<f64>> {
        // Start-up (probes loading, connecting) is not part of an observation:
        // wait until some process of this machine is queryable.
        wait_for("the first samples in the API", Duration::from_secs(60), || {
            labels(running).is_ok_and(|t| t.contains("\"values\":[\""))
        })
        .with_context(|| format!("see the logs in {}", dir.display()))?;
        let poll = Duration::from_millis(self.params.poll_ms.max(1));
        let mut seen = Vec::new();
        for _ in 0..self.params.observations {
            self.seq += 1;
            // Unique per run of the harness and per observation; at most 15 characters.
            let name = format!("apf{}x{}", std::process::id() % 100_000, self.seq);
            let start;
            let mut burner = if small {
                let program = dir.join(&name);
                std::os::unix::fs::symlink(DASH, &program).with_context(|| format!("linking {}", program.display()))?;
                start = Instant::now();
                let mut cmd = Command::new(&program);
                cmd.args(["-c", "while :; do :; done"]).stdout(Stdio::null()).stderr(Stdio::null());
                Guarded::spawn("burner", &mut cmd)?
            } else {
                let program = named_burner(dir, &name)?;
                start = Instant::now();
                spawn_burner(&program, self.params.burn_seconds, false)?
            };
            let needle = format!("\"{name}\"");
            let deadline = start + Duration::from_secs(self.params.timeout_s);
            loop {
                if labels(running)?.contains(&needle) {
                    let s = start.elapsed().as_secs_f64();
                    eprintln!("  observation {}: {s:.3} s", seen.len() + 1);
                    seen.push(s);
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{name} not visible in the API after {} s", self.params.timeout_s);
                }
                std::thread::sleep(poll);
            }
            burner.stop();
            running.check_alive()?;
        }
        Ok(seen)
    }
}
