//! Writes valid frames into a directory, as seeds for the decoder fuzz
//! target: `cargo run -p aperture-core --example fuzz_seeds -- core/fuzz/corpus/decode_frame`.

use aperture_core::frame::{DecodeLimits, FrameId, encode_batch};
use aperture_core::ids::{AgentId, BootId};
use aperture_core::model::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: fuzz_seeds DIR")?;
    std::fs::create_dir_all(&dir)?;
    let stack = Stack::new(vec![
        StackFrame {
            address: 0x401000,
            module_offset: 0x1000,
            symbol: "leaf".into(),
            module: "app".into(),
            file: "app.c".into(),
            line: 3,
            kernel: false,
        },
        StackFrame {
            address: 0xffff_ffff_8100_0000,
            symbol: "do_syscall_64".into(),
            module: "[kernel]".into(),
            kernel: true,
            ..Default::default()
        },
    ]);
    let target =
        Target { pid: 7, process: "app".into(), namespace: "ns".into(), pod: "pod".into(), container: "c".into() };
    let batches = [
        Batch::default(),
        Batch {
            node: "n".into(),
            targets: vec![target.clone()],
            stacks: vec![stack.clone()],
            cpu: vec![CpuSample { time_ns: 1, target: 0, stack: 0, count: 3, period_ns: 10 }],
            ..Default::default()
        },
        Batch {
            node: "n".into(),
            targets: vec![target],
            stacks: vec![stack],
            locks: vec![LockWait {
                time_ns: 1,
                target: 0,
                stack: 0,
                kind: LockKind::KernelMutex,
                count: 2,
                wait_ns: 9,
                max_wait_ns: 5,
            }],
            syscalls: vec![SyscallStat {
                time_ns: 1,
                target: 0,
                nr: 0,
                name: "read".into(),
                count: 1,
                errors: 0,
                total_ns: 4,
                histogram: [1; LATENCY_BUCKETS],
            }],
            slow_calls: vec![SlowCall {
                time_ns: 1,
                target: 0,
                tid: 8,
                stack: 0,
                nr: 35,
                name: "nanosleep".into(),
                duration_ns: 20_000_000,
                ret: 0,
            }],
            ..Default::default()
        },
    ];
    for (i, b) in batches.iter().enumerate() {
        let frame = encode_batch(
            b,
            FrameId { agent_id: AgentId([1; 16]), boot_id: BootId([2; 16]), sequence: i as u64 + 1 },
            0,
            &DecodeLimits::default(),
        )?;
        std::fs::write(format!("{dir}/seed-{i}"), &frame[..])?;
    }
    Ok(())
}
