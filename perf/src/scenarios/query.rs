//! `query`: flame-graph query latency over one hour of data from a simulated
//! fleet (default 100 nodes at 99 Hz on 2 CPUs), ClickHouse and embedded.
//! Setup writes the hour straight through the stores' public `write` (the
//! rows the shards would have produced, per 10 s window, node, process and
//! stack, plus the stacks), then starts an aggregator's HTTP API on each
//! store ([`aperture_aggregator::Aggregator::start_with_store`]) and times
//! `GET /api/v1/profile?format=json` (the flame-graph tree) for the whole
//! fleet and for one node, and `GET /api/v1/top`.
//!
//! Sides: `clickhouse`, `embedded`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use aperture_aggregator::store::clickhouse::ClickHouseStore;
use aperture_aggregator::store::sqlite::SqliteStore;
use aperture_aggregator::store::{Store, WriteBatch};
use aperture_aggregator::{Aggregator, AggregatorHandle, ClickHouseSettings, Settings};
use aperture_core::model::StackHash;
use serde::Deserialize;

use crate::clickhouse::ClickHouse;
use crate::harness::{Metric, Scenario};
use crate::sys::http;
use crate::workload::Fleet;

/// Parameters of the scenario.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The simulated fleet.
    pub fleet: Fleet,
    /// Seconds of data.
    pub seconds: u64,
    /// Windows per store write.
    pub windows_per_write: usize,
}

/// The scenario.
#[derive(Debug)]
pub struct Query {
    params: Params,
    range: (u64, u64),
    rt: Option<tokio::runtime::Runtime>,
    server: Option<ClickHouse>,
    dir: Option<tempfile::TempDir>,
    apis: Vec<(String, AggregatorHandle)>,
}

impl Query {
    /// A scenario with these parameters.
    pub fn new(params: Params) -> Query {
        Query { params, range: (0, 0), rt: None, server: None, dir: None, apis: Vec::new() }
    }
}

/// Writes `p.seconds` of the fleet from `start_s` into `store`; returns the rows written.
async fn load(store: &dyn Store, p: &Params, start_s: u64) -> anyhow::Result<usize> {
    let pool = p.fleet.stack_pool();
    let hashes: Vec<StackHash> = pool.iter().map(|s| s.hash).collect();
    let windows = p.seconds.div_ceil(10);
    let mut rows = 0;
    let mut w = 0;
    while w < windows {
        let mut flushes = Vec::new();
        for _ in 0..p.windows_per_write.max(1) {
            if w < windows {
                flushes.push(p.fleet.window_flush(&hashes, start_s + w * 10, 10));
                w += 1;
            }
        }
        if rows == 0
            && let Some(first) = flushes.first_mut()
        {
            first.stacks = pool.clone();
        }
        let batch = WriteBatch { flushes, runs: Vec::new(), now_s: start_s, ..WriteBatch::default() };
        rows += batch.row_count();
        store.write(&batch).await.with_context(|| format!("writing to the {} store", store.kind().as_str()))?;
    }
    Ok(rows)
}

fn timed_get(addr: SocketAddr, path: &str) -> anyhow::Result<f64> {
    let start = Instant::now();
    let r = http(addr, "GET", path, None, b"", Duration::from_secs(300))?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if r.status != 200 {
        bail!("GET {path}: {} {}", r.status, r.text().chars().take(200).collect::<String>());
    }
    anyhow::ensure!(r.body.len() > 100, "GET {path}: nearly empty answer: {}", r.text());
    Ok(ms)
}

impl Scenario for Query {
    fn sides(&self) -> Vec<String> {
        vec!["clickhouse".into(), "embedded".into()]
    }

    fn setup(&mut self) -> anyhow::Result<()> {
        let p = &self.params;
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let start_s = (now - p.seconds - 60) / 10 * 10;
        self.range = (start_s, start_s + p.seconds.div_ceil(10) * 10);
        let server = crate::clickhouse::start()?;
        let dir = tempfile::Builder::new().prefix("aperture-perf-query").tempdir()?;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let ch: Arc<dyn Store> = Arc::new(rt.block_on(ClickHouseStore::open(&ClickHouseSettings {
            database: "perf_query".into(),
            ..ClickHouseSettings::new(server.endpoint())
        }))?);
        let sqlite: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path())?);
        for (name, store) in [("clickhouse", ch), ("embedded", sqlite)] {
            let t = Instant::now();
            let rows = rt.block_on(load(store.as_ref(), p, start_s))?;
            eprintln!("[query] {name}: {rows} rows written in {:.1} s", t.elapsed().as_secs_f64());
            let mut settings = Settings::new(dir.path().join(name));
            settings.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
            settings.auth_token = None;
            let api = rt.block_on(Aggregator::start_with_store(settings, store)).context("starting the query API")?;
            self.apis.push((name.to_owned(), api));
        }
        self.server = Some(server);
        self.dir = Some(dir);
        self.rt = Some(rt);
        Ok(())
    }

    fn run_once(&mut self, side: &str) -> anyhow::Result<Vec<Metric>> {
        let Some((_, api)) = self.apis.iter().find(|(n, _)| n == side) else { bail!("unknown side {side}") };
        let addr = api.http_addr();
        let (from, to) = self.range;
        let range = format!("mode=cpu&from={from}&to={to}");
        Ok(vec![
            Metric::new("flamegraph_fleet_ms", "ms", timed_get(addr, &format!("/api/v1/profile?{range}&format=json"))?),
            Metric::new(
                "flamegraph_one_node_ms",
                "ms",
                timed_get(addr, &format!("/api/v1/profile?{range}&format=json&node=node-001"))?,
            ),
            Metric::new("top_functions_fleet_ms", "ms", timed_get(addr, &format!("/api/v1/top?{range}&limit=50"))?),
        ])
    }

    fn teardown(&mut self) {
        if let Some(rt) = &self.rt {
            for (_, api) in self.apis.drain(..) {
                let _ = rt.block_on(api.shutdown());
            }
        }
        self.rt = None;
        self.server = None;
        self.dir = None;
    }
}
