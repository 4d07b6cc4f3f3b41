//! `freshness`: time from a sample being taken to being visible in the
//! query API. Runs the release binary's `aperture up` (aggregator with the
//! embedded store plus a local agent, on loopback, default flush settings:
//! agent batches at most 10 s old, shard and writer flushes every second),
//! then, several times per repetition, starts a short CPU burner under a
//! process name never used before and polls
//! `GET /api/v1/labels/process/values` until the name is listed. The time
//! from starting the burner (its first sample follows within one 99 Hz
//! period) to the first answer listing it is one observation; each
//! repetition reports p50, p99 and max of its observations.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::burn::{named_burner, spawn_burner};
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
}

/// The scenario.
#[derive(Debug)]
pub struct Freshness {
    params: Params,
    root: PathBuf,
    dir: Option<tempfile::TempDir>,
    up: Option<Guarded>,
    api: Option<(SocketAddr, String)>,
    seq: u32,
}

impl Freshness {
    /// A scenario with these parameters; `root` is the repository.
    pub fn new(params: Params, root: PathBuf) -> Freshness {
        Freshness { params, root, dir: None, up: None, api: None, seq: 0 }
    }
}

impl Scenario for Freshness {
    fn sides(&self) -> Vec<String> {
        vec!["aperture-up-embedded".into()]
    }

    fn setup(&mut self) -> anyhow::Result<()> {
        require_root("freshness")?;
        let dir = tempfile::Builder::new().prefix("aperture-perf-fresh").tempdir()?;
        let bin = snapshot_binary(&aperture_binary(&self.root)?, dir.path())?;
        let (http_port, ingest_port, metrics_port) = (free_port()?, free_port_pair()?, free_port()?);
        let log = std::fs::File::create(dir.path().join("up.log"))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("up")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--http-port", &http_port.to_string(), "--ingest-port", &ingest_port.to_string()])
            .args(["--agent-metrics-port", &metrics_port.to_string()])
            .env("APERTURE_MODE", "cpu")
            .env("APERTURE_FREQ", self.params.frequency_hz.to_string())
            .env_remove("APERTURE_AUTH_TOKEN")
            .stdout(Stdio::piped())
            .stderr(log);
        let mut up = Guarded::spawn("aperture up", &mut cmd)?;
        let stdout = up.take_stdout().context("stdout of aperture up")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(t) = line.trim().strip_prefix("Token:") {
                    let _ = tx.send(t.trim().to_owned());
                }
            }
        });
        let token = rx.recv_timeout(Duration::from_secs(60)).with_context(|| {
            format!("aperture up printed no token within 60 s; see {}", dir.path().join("up.log").display())
        })?;
        let addr = SocketAddr::from(([127, 0, 0, 1], http_port));
        wait_for("aperture up", Duration::from_secs(30), || {
            http(addr, "GET", "/healthz", None, b"", Duration::from_secs(2)).is_ok_and(|r| r.status == 200)
        })?;
        up.check_alive()?;
        self.api = Some((addr, token));
        self.up = Some(up);
        self.dir = Some(dir);
        Ok(())
    }

    fn run_once(&mut self, _side: &str) -> anyhow::Result<Vec<Metric>> {
        let (Some((addr, token)), Some(dir)) = (&self.api, &self.dir) else { bail!("setup did not run") };
        let path = "/api/v1/labels/process/values?mode=cpu&from=-10m";
        let mut seen = Vec::new();
        for _ in 0..self.params.observations {
            self.seq += 1;
            // Unique per run of the harness and per observation; at most 15 characters.
            let name = format!("apf{}x{}", std::process::id() % 100_000, self.seq);
            let program = named_burner(dir.path(), &name)?;
            let start = Instant::now();
            let mut burner = spawn_burner(&program, self.params.burn_seconds, false)?;
            let needle = format!("\"{name}\"");
            let deadline = start + Duration::from_secs(self.params.timeout_s);
            loop {
                let r = http(*addr, "GET", path, Some(token), b"", Duration::from_secs(10))?;
                if r.status == 200 && r.text().contains(&needle) {
                    seen.push(start.elapsed().as_secs_f64());
                    break;
                }
                if r.status != 200 {
                    bail!("{path}: {} {}", r.status, r.text());
                }
                if Instant::now() > deadline {
                    bail!("{name} not visible in the API after {} s", self.params.timeout_s);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            burner.stop();
            if let Some(up) = self.up.as_mut() {
                up.check_alive()?;
            }
        }
        let max = seen.iter().copied().fold(0.0, f64::max);
        Ok(vec![
            Metric::new("freshness_p50_s", "s", percentile(&mut seen, 50.0)),
            Metric::new("freshness_p99_s", "s", percentile(&mut seen, 99.0)),
            Metric::new("freshness_max_s", "s", max),
        ])
    }

    fn teardown(&mut self) {
        if let Some(mut up) = self.up.take() {
            up.stop_with(libc::SIGTERM, Duration::from_secs(20));
        }
        self.dir = None;
    }
}
