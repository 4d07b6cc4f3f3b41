//! `writer`: the aggregator's ClickHouse writer (`ClickHouseStore::write`,
//! the `clickhouse` crate over HTTP, RowBinary) next to `clickhouse-client`
//! inserting the same rows (RowBinary, native protocol) into the same table,
//! in the same batches, and the embedded store's rows/s. Rows are CPU rows
//! of a simulated fleet, as the shards hand them to the writer.
//!
//! Sides: `aperture-clickhouse`, `clickhouse-client`, `aperture-embedded`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use aperture_aggregator::ClickHouseSettings;
use aperture_aggregator::store::clickhouse::ClickHouseStore;
use aperture_aggregator::store::sqlite::SqliteStore;
use aperture_aggregator::store::{Store, WriteBatch};
use aperture_core::model::StackHash;
use aperture_core::shard::Flush;
use serde::Deserialize;

use crate::clickhouse::ClickHouse;
use crate::harness::{Metric, Scenario};
use crate::workload::Fleet;

/// Parameters of the scenario.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Rows per insert (the writer's default batch is 50 000).
    pub batch_rows: usize,
    /// Inserts per measurement.
    pub batches: usize,
    /// Shape of the simulated fleet the rows come from.
    pub fleet: Fleet,
}

/// The scenario.
#[derive(Debug)]
pub struct Writer {
    params: Params,
    batches: Vec<Flush>,
    server: Option<ClickHouse>,
    rt: Option<tokio::runtime::Runtime>,
    clickhouse: Option<Arc<ClickHouseStore>>,
}

impl Writer {
    /// A scenario with these parameters.
    pub fn new(params: Params) -> Writer {
        Writer { params, batches: Vec::new(), server: None, rt: None, clickhouse: None }
    }
}

/// Appends `v` as an unsigned LEB128 varint (RowBinary lengths).
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// The rows of `flush` in RowBinary, in the column order of the `samples`
/// table (see `docs/storage.md`).
pub fn row_binary(flush: &Flush) -> Vec<u8> {
    let mut out = Vec::with_capacity(flush.rows.len() * 120);
    for (key, value) in &flush.rows {
        let Some(l) = flush.labels.get(key.labels as usize) else { continue };
        out.extend_from_slice(&u32::try_from(key.window_start_s).unwrap_or(u32::MAX).to_le_bytes());
        out.push(key.kind as u8);
        for s in [&l.node, &l.namespace, &l.pod, &l.container, &l.process] {
            put_str(&mut out, s);
        }
        out.extend_from_slice(&l.pid.to_le_bytes());
        out.extend_from_slice(&key.stack.0.to_le_bytes());
        out.extend_from_slice(&key.detail.to_le_bytes());
        put_str(&mut out, &value.name);
        for v in [value.count, value.total_ns, value.errors, value.max_ns] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        put_varint(&mut out, value.histogram.len() as u64);
        for v in &value.histogram {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Cuts `flush` into flushes of at most `n` rows (labels shared).
fn chunks(flush: &Flush, n: usize) -> Vec<Flush> {
    flush
        .rows
        .chunks(n.max(1))
        .map(|rows| Flush {
            labels: flush.labels.clone(),
            rows: rows.to_vec(),
            samples: rows.iter().map(|r| r.1.count).sum(),
            ..Default::default()
        })
        .collect()
}

fn write_batch(flush: &Flush) -> WriteBatch {
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    WriteBatch { flushes: vec![flush.clone()], runs: Vec::new(), now_s, ..WriteBatch::default() }
}

impl Scenario for Writer {
    fn sides(&self) -> Vec<String> {
        ["aperture-clickhouse", "clickhouse-client", "aperture-embedded"].map(String::from).to_vec()
    }

    fn setup(&mut self) -> anyhow::Result<()> {
        if !crate::sys::on_path("clickhouse-client") {
            bail!("clickhouse-client not found: apt-get install clickhouse-client");
        }
        let p = &self.params;
        let pool: Vec<StackHash> = p.fleet.stack_pool().iter().map(|s| s.hash).collect();
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() / 10 * 10;
        let (mut rows, mut labels, mut w) = (Vec::new(), Vec::new(), 0);
        while rows.len() < p.batch_rows * p.batches {
            // Every window of a fleet lists the same label sets in the same order.
            let mut f = p.fleet.window_flush(&pool, now - 3600 + w * 10, 10);
            labels = std::mem::take(&mut f.labels);
            rows.append(&mut f.rows);
            w += 1;
        }
        rows.truncate(p.batch_rows * p.batches);
        self.batches = chunks(&Flush { labels, rows, ..Default::default() }, p.batch_rows);
        let server = crate::clickhouse::start()?;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let store = rt
            .block_on(ClickHouseStore::open(&ClickHouseSettings::new(server.endpoint())))
            .context("opening the ClickHouse store")?;
        self.clickhouse = Some(Arc::new(store));
        self.server = Some(server);
        self.rt = Some(rt);
        Ok(())
    }

    fn run_once(&mut self, side: &str) -> anyhow::Result<Vec<Metric>> {
        let (Some(rt), Some(server), Some(ch)) = (&self.rt, &self.server, &self.clickhouse) else {
            bail!("setup did not run")
        };
        let rows: usize = self.batches.iter().map(|b| b.rows.len()).sum();
        let elapsed = match side {
            "aperture-clickhouse" => {
                let batches: Vec<WriteBatch> = self.batches.iter().map(write_batch).collect();
                let start = Instant::now();
                for b in &batches {
                    rt.block_on(ch.write(b)).context("ClickHouse writer")?;
                }
                start.elapsed()
            }
            "clickhouse-client" => {
                let bodies: Vec<Vec<u8>> = self.batches.iter().map(row_binary).collect();
                let port = server.tcp_port().to_string();
                let start = Instant::now();
                for body in &bodies {
                    let mut child = Command::new("clickhouse-client")
                        .args(["--host", "127.0.0.1", "--port", &port])
                        .args(["--query", "INSERT INTO aperture.samples (window_start, kind, node, namespace, pod, container, process, pid, \
                         stack_hash, detail, name, count, total_ns, errors, max_ns, histogram) FORMAT RowBinary"])
                        .stdin(Stdio::piped())
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped())
                        .spawn()
                        .context("starting clickhouse-client")?;
                    child.stdin.take().context("clickhouse-client stdin")?.write_all(body)?;
                    let out = child.wait_with_output()?;
                    if !out.status.success() {
                        bail!("clickhouse-client failed: {}", String::from_utf8_lossy(&out.stderr).trim());
                    }
                }
                start.elapsed()
            }
            "aperture-embedded" => {
                let dir = tempfile::Builder::new().prefix("aperture-perf-writer").tempdir()?;
                let store = SqliteStore::open(dir.path())?;
                let batches: Vec<WriteBatch> = self.batches.iter().map(write_batch).collect();
                let start = Instant::now();
                for b in &batches {
                    rt.block_on(store.write(b)).context("embedded store")?;
                }
                start.elapsed()
            }
            other => bail!("unknown side {other}"),
        };
        Ok(vec![Metric::new("rows_per_s", "rows/s", rows as f64 / elapsed.as_secs_f64())])
    }

    fn teardown(&mut self) {
        self.clickhouse = None;
        self.rt = None;
        self.server = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_leb128() {
        let mut v = Vec::new();
        put_varint(&mut v, 0);
        put_varint(&mut v, 127);
        put_varint(&mut v, 300);
        assert_eq!(v, [0x00, 0x7f, 0xac, 0x02]);
    }

    #[test]
    fn row_binary_has_fixed_and_length_prefixed_columns() {
        let fleet = Fleet { nodes: 1, processes: 1, stacks: 4, stacks_per_process: 1, hz: 99, cpus: 2 };
        let pool: Vec<StackHash> = fleet.stack_pool().iter().map(|s| s.hash).collect();
        let flush = fleet.window_flush(&pool, 1_700_000_000, 10);
        assert_eq!(flush.rows.len(), 1);
        let l = &flush.labels[0];
        let strings: usize =
            [&l.node, &l.namespace, &l.pod, &l.container, &l.process].iter().map(|s| 1 + s.len()).sum();
        // window 4, kind 1, strings, pid 4, hash 8, detail 4, name 1, four u64 32, histogram 1.
        assert_eq!(row_binary(&flush).len(), 4 + 1 + strings + 4 + 8 + 4 + 1 + 32 + 1);
    }
}
