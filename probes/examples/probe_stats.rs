//! Attaches the given modes (`cpu,lock,syscall` or `all`; default
//! `syscall`), drains the aggregates every second, and on stdin EOF (or
//! after the seconds given as the second argument) prints the per-program
//! run statistics and reader counters. With `APERTURE_BPF_STATS=1` it turns
//! on `kernel.bpf_stats_enabled` so ns per run is measured.
//!
//! `cargo run -p aperture-probes --features bench --example probe_stats -- syscall 10`

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aperture_probes::{Modes, ProbeConfig, Probes, ReaderConfig, RecordBatch, bench};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let modes =
        Modes::parse(args.get(1).map_or("syscall", String::as_str)).map_err(|m| anyhow::anyhow!("unknown mode {m}"))?;
    let seconds: Option<u64> = args.get(2).and_then(|s| s.parse().ok());
    let stats_on = std::env::var_os("APERTURE_BPF_STATS").is_some();
    if stats_on {
        bench::enable_bpf_stats(true)?;
    }
    let mut probes = Probes::load(&ProbeConfig { modes, ..ProbeConfig::default() })?;
    let reader = probes.start_reader(&ReaderConfig::default(), |_: RecordBatch| {})?;
    probes.attach()?;
    println!("attached");
    let done = Arc::new(AtomicBool::new(false));
    if seconds.is_none() {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while std::io::stdin().read(&mut buf).is_ok_and(|n| n > 0) {}
            done.store(true, Ordering::Relaxed);
        });
    }
    let start = Instant::now();
    let (mut calls, mut waits) = (0u64, 0u64);
    while !done.load(Ordering::Relaxed) && seconds.is_none_or(|s| start.elapsed() < Duration::from_secs(s)) {
        std::thread::sleep(Duration::from_millis(250));
        if modes.contains(aperture_core::model::Mode::Syscall) {
            calls += probes.drain_syscall_stats()?.iter().map(|s| s.count).sum::<u64>();
        }
        if modes.contains(aperture_core::model::Mode::Lock) {
            waits += probes.drain_lock_stats()?.iter().map(|s| s.count).sum::<u64>();
        }
    }
    for p in bench::program_run_stats("ap_") {
        println!("{:<16} runs {:>12} ns/run {:>8.1}", p.name, p.run_count, p.ns_per_run());
    }
    let rs = reader.stats();
    println!(
        "syscalls counted {calls}, lock waits {waits}, reader events {} lost {} wakeups {}",
        rs.events.load(Ordering::Relaxed),
        rs.lost.load(Ordering::Relaxed),
        rs.wakeups.load(Ordering::Relaxed)
    );
    if stats_on {
        bench::enable_bpf_stats(false)?;
    }
    Ok(())
}
