//! Kernel test of lock-wait classes (run as root; skips by name otherwise):
//! `lock_classes.c`, built without frame pointers, waits on a mutex, an
//! rwlock, a condition variable, a semaphore and `pthread_join`, each from
//! its own call site and for its own multiple of a time unit. The futex
//! waits the lock programs aggregate, walked with the unwind tables,
//! symbolized and classified as the agent does, must each carry the class
//! of their call site, and the time waited by class must follow the
//! program's proportions. Only futex waits are used, so it holds on kernels
//! without the lock contention tracepoints (5.10) too.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use aperture_core::model::{LockKind, Mode};
use aperture_probes::{Filter, Modes, ProbeConfig, Probes, ReaderConfig, Symbolizer, UnwindMode, UnwindSettings};
use common::{Program, build_c, channel_sink, require_root};

/// No frame pointers anywhere, as distributions build.
const OMIT: &[&str] = &["-O2", "-g", "-fomit-frame-pointer", "-pthread"];

/// Call site, the class its wait must get, and its wait in time units
/// (`UNIT_MS` in the program).
const SITES: [(&str, LockKind, u64); 5] = [
    ("mutex_site", LockKind::Mutex, 1),
    ("rwlock_site", LockKind::RwLock, 2),
    ("cond_site", LockKind::CondVar, 3),
    ("sem_site", LockKind::Semaphore, 4),
    ("join_site", LockKind::Join, 5),
];

#[test]
fn every_lock_wait_gets_the_class_of_its_call_site() -> anyhow::Result<()> {
    if !require_root("every_lock_wait_gets_the_class_of_its_call_site") {
        return Ok(());
    }
    let bin = build_c("lock_classes_omit", "lock_classes", OMIT, &[]);
    let mut prog = Program::spawn(&bin, &[]);
    let pid = prog.pid();
    let mut probes = Probes::load(&ProbeConfig {
        modes: Modes::only(Mode::Lock),
        filter: Some(Filter { pids: vec![pid], cgroups: vec![] }),
        unwind: UnwindSettings { mode: UnwindMode::Tables, ..UnwindSettings::default() },
        ..ProbeConfig::default()
    })?;
    assert!(probes.unwind_process(pid)? > 0, "no mapping of the test program got an unwind table");
    // Slow waits also arrive one by one; this test reads the aggregates.
    let (sink, _rx) = channel_sink();
    let reader = probes
        .start_reader(&ReaderConfig { flush_interval: Duration::from_millis(50), ..ReaderConfig::default() }, sink)?;
    probes.attach()?;
    prog.go();
    assert_eq!(prog.line(), "done");
    // Both slots: the one being filled and the one just switched away from.
    let mut locks = probes.drain_lock_stats()?;
    locks.extend(probes.drain_lock_stats()?);
    reader.stop()?;

    let mut sym = Symbolizer::new();
    // Per call site: ns by class the waits got.
    let mut at_site: BTreeMap<&str, BTreeMap<LockKind, u64>> = BTreeMap::new();
    // The program's threads may also wait on kernel locks (its address
    // space's, while threads start): those are not its call sites' waits.
    for s in locks.iter().filter(|s| s.pid == pid && s.kind == LockKind::Futex) {
        let stack = sym.stack(pid, &[], &s.stack);
        let class = aperture_probes::lock_class(s.kind, &stack.frames);
        let names: Vec<&str> = stack.frames.iter().map(|f| f.symbol.as_str()).collect();
        println!("{:>9} {} x {:>10} ns: {}", class.as_str(), s.count, s.total_ns, names.join(" <- "));
        if let Some((site, _, _)) = SITES.iter().find(|(site, _, _)| names.contains(site)) {
            *at_site.entry(site).or_default().entry(class).or_default() += s.total_ns;
        }
    }
    // Symbolized while the program still runs (its mappings are read from /proc).
    prog.finish();

    let site_ns = |site: &str| at_site.get(site).map_or(0, |by| by.values().sum::<u64>());
    let all_ns: u64 = SITES.iter().map(|(site, _, _)| site_ns(site)).sum();
    let all_units: u64 = SITES.iter().map(|(_, _, units)| units).sum();
    for (site, class, units) in SITES {
        let total = site_ns(site);
        let right = at_site.get(site).and_then(|by| by.get(&class)).copied().unwrap_or(0);
        let share = total as f64 / all_ns.max(1) as f64;
        let expected = units as f64 / all_units as f64;
        println!(
            "{site}: {total} ns, {:.1}% classified {}, {:.1}% of all (program: {:.1}%)",
            100.0 * right as f64 / total.max(1) as f64,
            class.as_str(),
            100.0 * share,
            100.0 * expected
        );
        assert!(total > 0, "no futex wait at {site}: {at_site:?}");
        assert!(right * 100 >= total * 99, "{site}: only {right} of {total} ns classified {class:?}: {at_site:?}");
        // The waits differ by 50 ms each; thread start-up and wake-up
        // latency (longer in an emulated guest) add the same few ms to
        // every wait, moving a share by far less than this.
        assert!(
            (share - expected).abs() < 0.05,
            "{site}: {share:.3} of the wait time, the program waits {expected:.3}"
        );
    }
    let by_site: Vec<u64> = SITES.iter().map(|(site, _, _)| site_ns(site)).collect();
    assert!(by_site.windows(2).all(|w| w[0] < w[1]), "waits grow from mutex to join as in the program: {by_site:?}");
    Ok(())
}
