//! Loads every mode, attaches, prints what arrives for a few seconds.
use std::time::Duration;

use aperture_probes::{ProbeConfig, Probes, ReaderConfig, RecordBatch};

fn main() -> anyhow::Result<()> {
    let mut probes = Probes::load(&ProbeConfig::default())?;
    let reader = probes.start_reader(&ReaderConfig::default(), |b: RecordBatch| {
        println!("batch: {} events, lost {}", b.len(), b.lost);
    })?;
    probes.attach()?;
    println!("{:#?}", probes.attachments());
    std::thread::sleep(Duration::from_secs(2));
    let s = probes.drain_syscall_stats()?;
    println!("syscall stats: {} keys, {} calls", s.len(), s.iter().map(|x| x.count).sum::<u64>());
    let l = probes.drain_lock_stats()?;
    println!("lock stats: {} keys", l.len());
    println!("drops: {:?}", probes.drop_counts()?);
    drop(reader);
    Ok(())
}
