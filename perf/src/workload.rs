//! Synthetic but realistic data: batches shaped like what a busy node sends.

use aperture_core::model::{Batch, CpuSample, Labels, Stack, StackHash, Target};
use aperture_core::shard::{Flush, LabelsId, RowKey, RowKind, RowValue};

pub use aperture_core::synthetic::realistic_batch;

/// A fleet of simulated nodes sampling at `hz` on `cpus` CPUs: what the
/// storage scenarios write and query.
#[derive(Clone, Copy, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// Nodes.
    pub nodes: usize,
    /// Processes per node.
    pub processes: usize,
    /// Distinct stacks in the whole fleet.
    pub stacks: usize,
    /// Distinct stacks one process shows in one window.
    pub stacks_per_process: usize,
    /// Sampling frequency, Hz.
    pub hz: u32,
    /// CPUs per node.
    pub cpus: u32,
}

impl Fleet {
    /// The stack pool: `stacks` stacks of 12-24 frames.
    pub fn stack_pool(&self) -> Vec<Stack> {
        realistic_batch(0, self.stacks, 1, 3).stacks
    }

    /// The label set of process `p` of node `n`.
    pub fn labels(&self, n: usize, p: usize) -> Labels {
        Labels {
            node: format!("node-{n:03}"),
            namespace: format!("ns-{}", p % 5),
            pod: format!("svc{}-7d9f8-{n:03}{p:02}", p % 7),
            container: "app".into(),
            process: format!("worker-{p}"),
            pid: 1000 + p as u32,
            ..Labels::default()
        }
    }

    /// Samples one node takes in `seconds`.
    pub fn samples_per_node(&self, seconds: u64) -> u64 {
        u64::from(self.hz) * u64::from(self.cpus) * seconds
    }

    /// The aggregated rows of `windows` windows of `window_s` seconds from
    /// `start_s`, as the shards would hand them out: per (window, node,
    /// process, stack) one CPU row, the node's samples spread over them.
    /// `stacks` are the pool's hashes. Yields one flush per window.
    pub fn window_flush(&self, stacks: &[StackHash], window_start_s: u64, window_s: u64) -> Flush {
        let per_node = self.samples_per_node(window_s);
        let per_process = per_node / self.processes.max(1) as u64;
        let mut labels = Vec::with_capacity(self.nodes * self.processes);
        let mut rows = Vec::new();
        for n in 0..self.nodes {
            for p in 0..self.processes {
                let id = labels.len() as LabelsId;
                labels.push(self.labels(n, p));
                let k = self.stacks_per_process.max(1);
                for s in 0..k {
                    // Skewed: the first stack of a process gets the most samples.
                    let count = (per_process / (2 << s.min(10)) as u64).max(1);
                    let stack = stacks[(p * 31 + s * 7 + (window_start_s as usize / 60) % 3) % stacks.len()];
                    let key = RowKey { window_start_s, kind: RowKind::Cpu, labels: id, stack, detail: 0 };
                    let value =
                        RowValue { count, total_ns: count * 1_000_000_000 / u64::from(self.hz), ..Default::default() };
                    rows.push((key, value));
                }
            }
        }
        rows.sort_by_key(|r| r.0);
        rows.dedup_by(|a, b| a.0 == b.0);
        let samples = rows.iter().map(|r| r.1.count).sum();
        Flush { labels, rows, stacks: Vec::new(), frames: Vec::new(), samples }
    }

    /// A batch as the agent of node `n` would send for `millis` ms
    /// starting at `start_ns`: one record per sample tick and CPU.
    pub fn node_batch(&self, n: usize, pool: &[Stack], start_ns: u64, millis: u64) -> Batch {
        let targets: Vec<Target> = (0..self.processes.max(1))
            .map(|p| {
                let l = self.labels(n, p);
                Target { pid: l.pid, process: l.process, namespace: l.namespace, pod: l.pod, container: l.container }
            })
            .collect();
        let k = self.stacks_per_process.max(1);
        // The stacks this node uses, in batch order.
        let used: Vec<usize> = (0..targets.len() * k).map(|i| (n * 13 + i * 7) % pool.len()).collect();
        let mut order: Vec<usize> = used.clone();
        order.sort_unstable();
        order.dedup();
        let stacks: Vec<Stack> = order.iter().map(|&i| pool[i].clone()).collect();
        let index = |pool_i: usize| order.binary_search(&pool_i).unwrap_or(0) as u32;
        let period = 1_000_000_000 / u64::from(self.hz.max(1));
        let ticks = u64::from(self.hz) * millis / 1000;
        // Ticks of the whole run, so the tick pattern goes on from batch to batch.
        let first = start_ns / period;
        let mut cpu = Vec::with_capacity((ticks * u64::from(self.cpus)) as usize);
        for t in first..first + ticks {
            for c in 0..u64::from(self.cpus) {
                let i = (t % 1_000_003 * 7 + c * 3 + (t % 5) * (t % 5) % 5) as usize;
                let target = i % targets.len();
                let s = used[target * k + (i / targets.len()) % k];
                cpu.push(CpuSample {
                    time_ns: t * period,
                    target: target as u32,
                    stack: index(s),
                    count: 1,
                    period_ns: period,
                });
            }
        }
        Batch { node: format!("node-{n:03}"), targets, stacks, cpu, ..Default::default() }
    }
}
