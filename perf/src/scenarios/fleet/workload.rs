//! The simulated fleet's workload: a shared stack pool, and per node the
//! frames a busy node's agent would send, with stack churn.

use std::time::{SystemTime, UNIX_EPOCH};

use aperture_core::ids::AgentId;
use aperture_core::model::{Batch, CpuSample, Stack, StackFrame, Target};

use super::Params;

/// The stack pool: `n` stacks of 12-24 frames, kernel frames at the root,
/// symbols of a few modules.
pub fn stack_pool(n: usize) -> Vec<Stack> {
    (0..n.max(1) as u64)
        .map(|s| {
            let depth = 12 + (s % 13) as usize;
            Stack::new(
                (0..depth)
                    .map(|d| StackFrame {
                        address: 0x5555_0000_0000 + s * 0x1000 + d as u64 * 0x40,
                        module_offset: s * 0x1000 + d as u64 * 0x40,
                        symbol: format!("svc{}::module{}::function_{}", s % 11, d % 7, (s * 31 + d as u64) % 97),
                        module: if d < 2 { "[kernel]".into() } else { format!("svc{}", s % 11) },
                        kernel: d < 2,
                        ..Default::default()
                    })
                    .collect(),
            )
        })
        .collect()
}

/// What one simulated node sends: its processes and stacks, renewed a few
/// percent per frame.
#[derive(Debug)]
pub struct NodeGen {
    agent: usize,
    batch: Batch,
    counts: Vec<u32>,
    frames: u64,
    new_stacks: u64,
    samples_per_frame: u64,
    churn: f64,
    churn_carry: f64,
}

impl NodeGen {
    /// The generator of agent `agent`.
    pub fn new(agent: usize, p: &Params, pool: &[Stack]) -> NodeGen {
        let targets = (0..p.processes.max(1))
            .map(|q| Target {
                pid: 1000 + q as u32,
                process: format!("svc{}-worker-{q}", q % 7),
                namespace: format!("ns-{}", q % 5),
                pod: format!("svc{}-7d9f8-{agent:05}{q:02}", q % 7),
                container: if q % 3 == 0 { "sidecar".into() } else { "app".into() },
            })
            .collect();
        let stacks = (0..p.stacks.max(1)).map(|s| pool[(agent * 13 + s * 7) % pool.len()].clone()).collect();
        let samples_per_frame = u64::from(p.hz) * u64::from(p.cpus) * p.batch_ms / 1000;
        NodeGen {
            agent,
            batch: Batch { node: node_name(agent), targets, stacks, ..Default::default() },
            counts: vec![0; p.processes.max(1) * p.stacks.max(1)],
            frames: 0,
            new_stacks: 0,
            samples_per_frame,
            churn: p.stacks as f64 * p.churn_pct / 100.0,
            churn_carry: 0.0,
        }
    }

    /// The next batch, its samples ending at `now_ns` (the newest exactly
    /// then) over the `batch_ms` before; with `marker`, one more process
    /// named so holds the newest sample.
    pub fn next(&mut self, now_ns: u64, batch_ms: u64, pool: &[Stack], marker: Option<&str>) -> &Batch {
        self.frames += 1;
        let f = self.frames;
        // Churn: replace a few stacks by stacks never seen before.
        self.churn_carry += self.churn;
        let n = self.batch.stacks.len();
        while self.churn_carry >= 1.0 {
            self.churn_carry -= 1.0;
            self.new_stacks += 1;
            let slot = (f as usize * 7 + self.new_stacks as usize * 11) % n;
            let base = &pool[(self.agent * 31 + self.new_stacks as usize * 17) % pool.len()];
            let mut frames = base.frames.clone();
            if let Some(leaf) = frames.last_mut() {
                leaf.address = 0x7f00_0000_0000 + ((self.agent as u64) << 24) + self.new_stacks * 0x10;
                leaf.symbol = format!("jit::compiled_{}_{}", self.agent, self.new_stacks);
            }
            self.batch.stacks[slot] = Stack::new(frames);
        }
        // Samples: skewed over stacks (the first few hot), spread over processes.
        let (procs, stacks) = (self.batch.targets.len(), n);
        self.counts.iter_mut().for_each(|c| *c = 0);
        for j in 0..self.samples_per_frame {
            let h = (j.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ f.wrapping_mul(0xbf58_476d_1ce4_e5b9)) >> 17;
            let t = (h % procs as u64) as usize;
            // Half the samples in the first eighth of the stacks.
            let s = if h & 0x100 == 0 { (h >> 9) as usize % stacks.div_ceil(8) } else { (h >> 9) as usize % stacks };
            self.counts[t * stacks + s] += 1;
        }
        let period = 1_000_000_000 / 99;
        let span = batch_ms * 1_000_000;
        self.batch.cpu.clear();
        for (i, &c) in self.counts.iter().enumerate() {
            if c > 0 {
                let back = (i as u64).wrapping_mul(0x2545_f491) % span.max(1);
                self.batch.cpu.push(CpuSample {
                    time_ns: now_ns - back.max(1),
                    target: (i / stacks) as u32,
                    stack: (i % stacks) as u32,
                    count: c,
                    period_ns: period,
                });
            }
        }
        self.batch.targets.truncate(procs);
        if let Some(name) = marker {
            self.batch.targets.push(Target { pid: 999_999, process: name.into(), ..Default::default() });
            self.batch.cpu.push(CpuSample {
                time_ns: now_ns,
                target: procs as u32,
                stack: 0,
                count: 1,
                period_ns: period,
            });
        }
        &self.batch
    }

    /// Removes the marker process of the last batch, if any.
    pub(super) fn unmark(&mut self, procs: usize) {
        self.batch.targets.truncate(procs);
    }
}

pub(super) fn node_name(agent: usize) -> String {
    format!("fleet-{agent:05}")
}

pub(super) fn agent_id(i: usize) -> AgentId {
    let mut id = AgentId([0xf1; 16]);
    id.0[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    id
}

pub(super) fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}
