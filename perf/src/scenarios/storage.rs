//! `storage`: stored bytes per ingested sample, ClickHouse and embedded.
//! A real aggregator ([`aperture_aggregator::Daemon`]: ingress, shards,
//! writer, store) runs in this process; simulated agents push the batches of
//! a fleet over QUIC until every frame is acknowledged (that is, committed),
//! the aggregator is stopped (SQLite checkpoints its WAL when the last
//! connection closes; ClickHouse tables are merged with `OPTIMIZE ... FINAL`)
//! and the store's size on disk is divided by the samples sent. The
//! end-to-end ingest rate (push to commit) is reported alongside.
//!
//! Sides: `<store>-<ms>ms`, the store (`clickhouse`, `embedded`) and the
//! frame cadence (the agent's batch age). Paced, each node's frames go out
//! in real time, one per cadence, so a shorter batch age shows as more,
//! smaller rows in the store, as it would in production. Each repetition
//! starts from an empty store (a new database, a new data directory).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use aperture_aggregator::Daemon;
use aperture_core::config::AggregatorConfig;
use aperture_core::frame::{DecodeLimits, FrameId, encode_batch};
use aperture_core::ids::{AgentId, BootId};
use aperture_core::model::Stack;
use aperture_transport::client::{AgentIdentity, CarrierChoice, Client, ClientConfig};
use aperture_transport::tls::ClientTlsConfig;
use serde::Deserialize;

use crate::clickhouse::ClickHouse;
use crate::harness::{Metric, Scenario};
use crate::sys::files_size;
use crate::workload::Fleet;

/// Parameters of the scenario.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The simulated fleet.
    pub fleet: Fleet,
    /// Milliseconds of samples per frame (the agent's batch age); one
    /// side per store and value, named `<store>-<ms>ms`.
    pub frame_ms: Vec<u64>,
    /// Seconds of samples each node sends.
    pub span_s: u64,
    /// Send each node's frames in real time, one every `frame_ms`, as agents
    /// do (rows then reach the store at the cadence they would in
    /// production); otherwise as fast as acknowledgements allow.
    pub paced: bool,
    /// Simulated agents (connections); nodes are spread over them.
    pub agents: usize,
    /// Frames an agent keeps unacknowledged.
    pub in_flight: u64,
    /// Longest a side may take, seconds.
    pub timeout_s: u64,
}

/// The scenario.
#[derive(Debug)]
pub struct Storage {
    params: Params,
    pool: Vec<Stack>,
    server: Option<ClickHouse>,
    rt: Option<tokio::runtime::Runtime>,
    run: u32,
}

impl Storage {
    /// A scenario with these parameters.
    pub fn new(params: Params) -> Storage {
        Storage { params, pool: Vec::new(), server: None, rt: None, run: 0 }
    }
}

/// Splits `clickhouse-500ms` into (store, frame ms).
fn parse_side(side: &str) -> Option<(&str, u64)> {
    let (store, ms) = side.split_once('-')?;
    Some((store, ms.strip_suffix("ms")?.parse().ok()?))
}

/// Pushes the fleet's frames through `daemon` from `agents` clients and
/// waits until all are acknowledged. Returns the samples sent.
fn push_fleet(p: &Params, frame_ms: u64, pool: &[Stack], daemon: &Daemon) -> anyhow::Result<u64> {
    let quic = daemon.quic_addr().context("aggregator without QUIC")?;
    let frame_ms = frame_ms.max(1);
    let span_s = p.span_s;
    let frames = (span_s * 1000).div_ceil(frame_ms);
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let start_ns = (now_s - span_s - 60) / 10 * 10 * 1_000_000_000;
    let deadline = Instant::now() + Duration::from_secs(p.timeout_s);
    let agents = p.agents.clamp(1, p.fleet.nodes.max(1));
    let fingerprint = daemon.fingerprint();
    let started = Instant::now();
    let workers: Vec<_> = (0..agents)
        .map(|a| {
            let (pool, fleet, fingerprint) = (pool.to_vec(), p.fleet, fingerprint.clone());
            let (in_flight, paced) = (p.in_flight.max(1), p.paced);
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let cfg = ClientConfig {
                    aggregator: quic.to_string(),
                    token: None,
                    tls: ClientTlsConfig { fingerprint: Some(fingerprint), ..Default::default() },
                    carrier: CarrierChoice::Quic,
                    quic_port: Some(quic.port()),
                    ..ClientConfig::default()
                };
                let mut agent_id = AgentId([0x5a; 16]);
                agent_id.0[..8].copy_from_slice(&(a as u64 + 1).to_le_bytes());
                let identity = AgentIdentity {
                    agent_id,
                    boot_id: BootId([7; 16]),
                    node: format!("agent-{a}"),
                    agent_version: "perf".into(),
                };
                let client = Client::start(cfg, identity).context("starting a simulated agent")?;
                let (mut seq, mut samples) = (0u64, 0u64);
                for f in 0..frames {
                    if paced {
                        let at = started + Duration::from_millis(f * frame_ms);
                        std::thread::sleep(at.saturating_duration_since(Instant::now()));
                    }
                    for n in (a..fleet.nodes).step_by(agents) {
                        let t0 = start_ns + f * frame_ms * 1_000_000;
                        let batch = fleet.node_batch(n, &pool, t0, frame_ms);
                        samples += batch.sample_count();
                        seq += 1;
                        let id = FrameId { agent_id, boot_id: BootId([7; 16]), sequence: seq };
                        let frame = encode_batch(&batch, id, 0, &DecodeLimits::default())?;
                        while seq - client.stats().session.frames_acked > in_flight {
                            anyhow::ensure!(Instant::now() < deadline, "push did not finish in time");
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        client.send(frame).context("queueing a frame")?;
                    }
                }
                while client.stats().session.frames_acked < seq {
                    anyhow::ensure!(Instant::now() < deadline, "frames not acknowledged in time");
                    std::thread::sleep(Duration::from_millis(10));
                }
                let dropped = client.stats().session.frames_dropped;
                client.shutdown(Duration::from_secs(2));
                anyhow::ensure!(dropped == 0, "{dropped} frames dropped by a simulated agent");
                Ok(samples)
            })
        })
        .collect();
    let mut total = 0;
    for w in workers {
        total += w.join().map_err(|_| anyhow::anyhow!("a simulated agent panicked"))??;
    }
    Ok(total)
}

impl Scenario for Storage {
    fn sides(&self) -> Vec<String> {
        let mut out = Vec::new();
        for store in ["clickhouse", "embedded"] {
            for ms in &self.params.frame_ms {
                out.push(format!("{store}-{ms}ms"));
            }
        }
        out
    }

    fn setup(&mut self) -> anyhow::Result<()> {
        self.pool = self.params.fleet.stack_pool();
        self.server = Some(crate::clickhouse::start()?);
        self.rt = Some(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?);
        Ok(())
    }

    fn run_once(&mut self, side: &str) -> anyhow::Result<Vec<Metric>> {
        let (Some(rt), Some(server)) = (&self.rt, &self.server) else { bail!("setup did not run") };
        self.run += 1;
        let dir = tempfile::Builder::new().prefix("aperture-perf-storage").tempdir()?;
        let database = format!("perf_storage_{}", self.run);
        let mut cfg = AggregatorConfig::default();
        cfg.listen.http = "127.0.0.1:0".into();
        cfg.listen.grpc = "127.0.0.1:0".into();
        cfg.listen.quic = "127.0.0.1:0".into();
        cfg.auth.disabled = true;
        cfg.data_dir = dir.path().to_owned();
        let Some((store, frame_ms)) = parse_side(side) else { bail!("bad side name {side}") };
        match store {
            "clickhouse" => {
                cfg.clickhouse.endpoint = server.endpoint();
                cfg.clickhouse.database = database.clone();
            }
            "embedded" => {}
            other => bail!("unknown store {other}"),
        }
        let daemon = rt.block_on(Daemon::start(&cfg)).context("starting the aggregator")?;
        let start = Instant::now();
        let pushed = push_fleet(&self.params, frame_ms, &self.pool, &daemon);
        let elapsed = start.elapsed().as_secs_f64();
        rt.block_on(daemon.shutdown()).context("stopping the aggregator")?;
        let samples = pushed?;
        let bytes = match store {
            "clickhouse" => crate::clickhouse::database_bytes(server, &database)?,
            _ => files_size(dir.path(), "aperture.db"),
        };
        Ok(vec![
            Metric::new("stored_bytes_per_sample", "B", bytes as f64 / samples as f64),
            Metric::new("stored_mib", "MiB", bytes as f64 / (1 << 20) as f64),
            Metric::new("ingest_to_commit_samples_per_s", "samples/s", samples as f64 / elapsed),
        ])
    }

    fn teardown(&mut self) {
        self.rt = None;
        self.server = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_name_the_store_and_the_frame_cadence() {
        assert_eq!(parse_side("clickhouse-500ms"), Some(("clickhouse", 500)));
        assert_eq!(parse_side("embedded-10000ms"), Some(("embedded", 10_000)));
        assert_eq!(parse_side("embedded"), None);
        assert_eq!(parse_side("embedded-fast"), None);
    }
}
