//! Throughput of the core hot path, in samples per second: frame encode,
//! decode + validate, ring hand-off between threads, shard aggregation.
//!
//! Run: `cargo bench -p aperture-core --bench core`.

use std::hint::black_box;
use std::time::Duration;

use aperture_core::frame::{DecodeLimits, FrameId, decode, encode_batch};
use aperture_core::ids::{AgentId, BootId};
use aperture_core::model::Batch;
use aperture_core::ring::ring;
use aperture_core::shard::{Shard, ShardConfig};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

/// Ten seconds of a busy node: 10k CPU sample records over 500 distinct
/// stacks of 12-24 frames and 40 processes.
fn realistic_batch(records: usize) -> Batch {
    aperture_core::synthetic::realistic_batch(records, 500, 40, 1)
}

fn id(seq: u64) -> FrameId {
    FrameId { agent_id: AgentId([1; 16]), boot_id: BootId([2; 16]), sequence: seq }
}

fn frame_codec(c: &mut Criterion) {
    let batch = realistic_batch(10_000);
    let limits = DecodeLimits::default();
    let buf = encode_batch(&batch, id(1), 0, &limits).expect("encode");
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("encode_10k", |b| b.iter(|| encode_batch(black_box(&batch), id(1), 0, &limits).expect("encode")));
    g.bench_function("decode_validate_10k", |b| {
        b.iter(|| {
            let view = decode(black_box(&buf), &limits).expect("decode");
            black_box(view.batch.cpu.len())
        })
    });
    g.finish();
}

fn ring_handoff(c: &mut Criterion) {
    // Batches of 256 events, as a reader thread hands them over.
    const BATCH: usize = 256;
    const BATCHES: usize = 1_000;
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements((BATCH * BATCHES) as u64));
    g.bench_function("handoff_256_event_batches", |b| {
        b.iter_batched(
            || (0..BATCHES).map(|i| vec![i as u64; BATCH]).collect::<Vec<_>>(),
            |batches| {
                // Room for every batch: this measures hand-off, not drops.
                let (tx, rx) = ring::<Vec<u64>>(BATCHES);
                let producer = std::thread::spawn(move || {
                    for b in batches {
                        let _ = tx.push(b);
                    }
                });
                let mut got = 0usize;
                loop {
                    match rx.pop_timeout(Duration::from_millis(50)) {
                        aperture_core::ring::Pop::Batch(b) => got += b.len(),
                        aperture_core::ring::Pop::Empty => {}
                        aperture_core::ring::Pop::Closed => break,
                    }
                }
                let _ = producer.join();
                black_box(got)
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn shard_aggregation(c: &mut Criterion) {
    let batch = realistic_batch(10_000);
    let limits = DecodeLimits::default();
    let buf = encode_batch(&batch, id(1), 0, &limits).expect("encode");
    let mut g = c.benchmark_group("shard");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("ingest_10k_then_flush", |b| {
        let mut shard = Shard::new(ShardConfig::default());
        let mut seq = 0;
        b.iter(|| {
            seq += 1;
            let view = decode(&buf, &limits).expect("decode");
            shard.ingest(0, id(seq), view.batch).expect("ingest");
            if seq % 10 == 0 {
                black_box(shard.take());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, frame_codec, ring_handoff, shard_aggregation);
criterion_main!(benches);
