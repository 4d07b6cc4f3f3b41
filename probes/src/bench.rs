//! Pieces the perf harness calls to measure the probes; no policy here.
//!
//! - [`enable_bpf_stats`] + [`program_run_stats`]: ns per program run, from
//!   the kernel's own accounting (`kernel.bpf_stats_enabled=1`), for
//!   Aperture's programs or any other (bpftrace's) by name prefix.
//! - [`decode_throughput`]: events/s the reader's decode path sustains on a
//!   synthetic ring, without a kernel. Live throughput comes from
//!   [`crate::ReaderStats`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::abi::{EventKind, RawEvent};
use crate::reader::{Collector, ReaderStats, RecordBatch, SplitBytes};

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Run-time accounting of one loaded BPF program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramRunStats {
    /// Kernel program id.
    pub id: u32,
    /// Program name (at most 15 bytes).
    pub name: String,
    /// Runs counted while bpf stats were enabled.
    pub run_count: u64,
    /// Total run time, ns.
    pub run_time_ns: u64,
}

impl ProgramRunStats {
    /// Mean ns per run (0 when never run).
    pub fn ns_per_run(&self) -> f64 {
        if self.run_count == 0 { 0.0 } else { self.run_time_ns as f64 / self.run_count as f64 }
    }
}

/// Turns the kernel's per-program run-time accounting on or off (writes
/// `kernel.bpf_stats_enabled`; needs root). It costs two clock reads per
/// program run while on.
pub fn enable_bpf_stats(on: bool) -> std::io::Result<()> {
    std::fs::write(BPF_STATS_SYSCTL, if on { "1" } else { "0" })
}

/// Every loaded program whose name starts with `prefix` (`ap_` for
/// Aperture's), with its run count and run time.
pub fn program_run_stats(prefix: &str) -> Vec<ProgramRunStats> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| {
            let name = p.name_as_str()?.to_owned();
            name.starts_with(prefix).then(|| ProgramRunStats {
                id: p.id(),
                name,
                run_count: p.run_count(),
                run_time_ns: u64::try_from(p.run_time().as_nanos()).unwrap_or(u64::MAX),
            })
        })
        .collect()
}

/// Result of [`decode_throughput`].
#[derive(Clone, Copy, Debug)]
pub struct DecodeThroughput {
    /// Events decoded.
    pub events: u64,
    /// Wall time spent.
    pub elapsed: Duration,
}

impl DecodeThroughput {
    /// Events per second.
    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Frames and decodes `rounds` times a synthetic ring of `events_per_round`
/// cpu-sample records with `frames` user and kernel frames each, through
/// the same code the reader thread runs, into reused batches.
pub fn decode_throughput(events_per_round: usize, frames: usize, rounds: usize) -> DecodeThroughput {
    let frames = frames.min(crate::abi::MAX_FRAMES);
    let mut record = Vec::new();
    let raw = RawEvent {
        kind: EventKind::Cpu as u16,
        n_kernel: frames as u16,
        n_user: frames as u16,
        pid: 1,
        ..RawEvent::default()
    };
    // SAFETY: RawEvent is repr(C) plain integers with explicit padding, so
    // viewing it as bytes reads only initialised memory.
    let header = unsafe { std::slice::from_raw_parts((&raw const raw).cast::<u8>(), size_of::<RawEvent>()) };
    let payload_len = header.len() + frames * 16;
    let size = (8 + 4 + payload_len).div_ceil(8) * 8;
    record.extend_from_slice(&9u32.to_le_bytes()); // PERF_RECORD_SAMPLE
    record.extend_from_slice(&0u16.to_le_bytes());
    record.extend_from_slice(&(size as u16).to_le_bytes());
    record.extend_from_slice(&((size - 12) as u32).to_le_bytes());
    record.extend_from_slice(header);
    for i in 0..frames * 2 {
        record.extend_from_slice(&(0x40_0000 + i as u64).to_le_bytes());
    }
    record.resize(size, 0);
    let ring: Vec<u8> = record.iter().copied().cycle().take(record.len() * events_per_round).collect();

    let stats = Arc::new(ReaderStats::default());
    /// Hands every batch straight back, as a consumer recycling batches would.
    struct Recycle(Option<RecordBatch>);
    impl crate::reader::BatchSink for Recycle {
        fn deliver(&mut self, batch: RecordBatch) {
            self.0 = Some(batch);
        }
        fn recycle(&mut self) -> Option<RecordBatch> {
            self.0.take()
        }
    }
    let mut collector = Collector::new(Recycle(None), events_per_round.max(1), Arc::clone(&stats));
    struct Once<'a>(&'a [u8], bool);
    impl crate::reader::RingSource for Once<'_> {
        fn consume(&mut self, read: &mut dyn FnMut(SplitBytes<'_>) -> usize) -> usize {
            if self.1 {
                return 0;
            }
            self.1 = true;
            read(SplitBytes::new(self.0, &[]))
        }
    }
    let start = Instant::now();
    for _ in 0..rounds {
        collector.read(&mut Once(&ring, false));
        collector.flush();
    }
    DecodeThroughput { events: stats.events.load(std::sync::atomic::Ordering::Relaxed), elapsed: start.elapsed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_decode_counts_every_event() {
        let t = decode_throughput(100, 20, 3);
        assert_eq!(t.events, 300);
        assert!(t.events_per_sec() > 0.0);
    }
}
