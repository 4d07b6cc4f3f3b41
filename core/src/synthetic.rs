//! Synthetic batches shaped like what a busy node sends, for benchmarks,
//! the perf harness and fuzz seeds. Pure data; nothing here is used by the
//! agent or the aggregator at run time.

use crate::model::{Batch, CpuSample, Stack, StackFrame, Target};

/// A batch of `records` CPU sample records over `stacks` distinct stacks of
/// 12-24 frames and `targets` processes, `seed` varying the stacks.
pub fn realistic_batch(records: usize, stacks: usize, targets: usize, seed: u64) -> Batch {
    let target_list: Vec<Target> = (0..targets.max(1))
        .map(|i| Target {
            pid: 1000 + i as u32,
            process: format!("worker-{i}"),
            namespace: "shop".into(),
            pod: format!("checkout-7d9f8-{i:05}"),
            container: "app".into(),
        })
        .collect();
    let stack_list: Vec<Stack> = (0..stacks.max(1) as u64)
        .map(|s| {
            let depth = 12 + (s % 13) as usize;
            Stack::new(
                (0..depth)
                    .map(|d| StackFrame {
                        address: 0x5555_0000_0000 + s * 0x1000 + d as u64 * 0x40,
                        module_offset: s * 0x1000 + d as u64 * 0x40,
                        symbol: format!("app::module{}::function_{}", d % 7, (s * seed + d as u64) % 97),
                        module: "checkout".into(),
                        file: String::new(),
                        line: 0,
                        kernel: d < 2,
                    })
                    .collect(),
            )
        })
        .collect();
    let cpu = (0..records)
        .map(|i| CpuSample {
            time_ns: 1_700_000_000_000_000_000 + i as u64 * 1_000_000,
            target: (i % target_list.len()) as u32,
            stack: (i * 7 % stack_list.len()) as u32,
            count: 1,
            period_ns: 10_101_010,
        })
        .collect();
    Batch { node: "node-17".into(), targets: target_list, stacks: stack_list, cpu, ..Default::default() }
}
