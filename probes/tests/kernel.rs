//! Kernel tests of the three modes, each on a small C program with a known
//! behaviour (run as root; they skip by name otherwise). Each test filters
//! on its own child's pid, so they run in parallel without seeing each
//! other.

mod common;

use std::time::Duration;

use aperture_core::model::{LockKind, Mode, Stack};
use aperture_probes::abi::EventKind;
use aperture_probes::{Filter, Modes, ProbeConfig, Probes, ReaderConfig, RecordBatch, Symbolizer};
use common::{Program, build_program, channel_sink, require_root};

fn config(mode: Mode, pid: u32) -> ProbeConfig {
    ProbeConfig {
        modes: Modes::only(mode),
        filter: Some(Filter { pids: vec![pid], cgroups: vec![] }),
        ..ProbeConfig::default()
    }
}

fn reader_config() -> ReaderConfig {
    ReaderConfig { flush_interval: Duration::from_millis(50), ..ReaderConfig::default() }
}

fn symbols(stack: &Stack) -> Vec<&str> {
    stack.frames.iter().map(|f| f.symbol.as_str()).collect()
}

#[test]
fn cpu_samples_of_a_burner_have_its_leaf_function() -> anyhow::Result<()> {
    if !require_root("cpu_samples_of_a_burner_have_its_leaf_function") {
        return Ok(());
    }
    let bin = build_program("cpu_burner");
    let mut prog = Program::spawn(&bin, &["2"]);
    let pid = prog.pid();
    let mut probes = Probes::load(&ProbeConfig { frequency_hz: 199, ..config(Mode::Cpu, pid) })?;
    let (sink, rx) = channel_sink();
    let reader = probes.start_reader(&reader_config(), sink)?;
    probes.attach()?;
    prog.go();
    assert_eq!(prog.line(), "done");
    std::thread::sleep(Duration::from_millis(100));
    reader.stop()?;

    let mut sym = Symbolizer::new();
    let (mut total, mut with_leaf, mut with_chain) = (0, 0, 0);
    let mut example = None;
    for batch in rx.try_iter() {
        for e in batch.events.iter().filter(|e| e.kind == EventKind::Cpu && e.raw.pid == pid) {
            let stack = sym.stack(pid, batch.kernel_stack(e), batch.user_stack(e));
            let user: Vec<&str> = stack.frames.iter().filter(|f| !f.kernel).map(|f| f.symbol.as_str()).collect();
            total += 1;
            if user.first() == Some(&"leaf_burn") {
                with_leaf += 1;
                if user.starts_with(&["leaf_burn", "middle", "outer", "main"]) {
                    with_chain += 1;
                }
            }
            if example.is_none() {
                example = Some(symbols(&stack).join(" <- "));
            }
        }
    }
    prog.finish();
    println!("cpu: {total} samples, {with_leaf} in leaf_burn, {with_chain} with the full chain; e.g. {example:?}");
    assert!(total >= 100, "only {total} samples in 2 s at 199 Hz");
    assert!(with_leaf * 10 >= total * 9, "{with_leaf}/{total} samples have leaf_burn as leaf");
    assert!(with_chain * 10 >= total * 9, "{with_chain}/{total} samples have leaf_burn<-middle<-outer<-main");
    Ok(())
}

/// Whether a futex wait's user stack is the contended call site of
/// `mutex_contend.c`: `lock_site` (which calls `pthread_mutex_lock`), called
/// from `contend_worker`.
///
/// Stacks are walked by frame pointers. Debian's glibc is built without
/// them, so the wait's stack starts in libc (`__lll_lock_wait`) and the
/// next frame recovered is the return address saved in the frame that
/// `%rbp` still points to: `lock_site`'s own frame, which holds the return
/// into `contend_worker`. `lock_site` itself is therefore only visible when
/// libc keeps frame pointers; both shapes are the call site.
fn at_call_site(names: &[&str]) -> bool {
    let worker = names.iter().position(|n| *n == "contend_worker");
    let site = names.iter().position(|n| *n == "lock_site");
    match (site, worker) {
        (Some(s), Some(w)) => s + 1 == w,
        (None, Some(w)) => w > 0 && names[..w].iter().all(|n| n.contains("lll_lock") || n.contains("mutex_lock")),
        _ => false,
    }
}

#[test]
fn mutex_waits_are_attributed_to_the_contended_call_site() -> anyhow::Result<()> {
    if !require_root("mutex_waits_are_attributed_to_the_contended_call_site") {
        return Ok(());
    }
    let bin = build_program("mutex_contend");
    let mut prog = Program::spawn(&bin, &[]);
    let pid = prog.pid();
    let mut probes = Probes::load(&config(Mode::Lock, pid))?;
    let (sink, rx) = channel_sink();
    let reader = probes.start_reader(&reader_config(), sink)?;
    probes.attach()?;
    prog.go();
    let line = prog.line();
    let measured: u64 = line.strip_prefix("wait_ns ").and_then(|v| v.parse().ok()).expect("wait_ns line");
    let mut stats = probes.drain_lock_stats()?;
    stats.extend(probes.drain_lock_stats()?);
    reader.stop()?;

    let mut sym = Symbolizer::new();
    let (mut at_site, mut elsewhere) = (0u64, 0u64);
    for s in stats.iter().filter(|s| s.pid == pid && s.kind == LockKind::Futex) {
        let stack = sym.stack(pid, &[], &s.stack);
        let names = symbols(&stack);
        println!("futex waits: {} x, {} ns: {}", s.count, s.total_ns, names.join(" <- "));
        if at_call_site(&names) {
            at_site += s.total_ns;
        } else {
            elsewhere += s.total_ns;
        }
    }
    // Individual slow waits carry the same stacks.
    let slow: Vec<RecordBatch> = rx.try_iter().collect();
    let slow_at_site = slow
        .iter()
        .flat_map(|b| b.events.iter().map(move |e| (b, e)))
        .filter(|(_, e)| e.kind == EventKind::LockFutex && e.raw.pid == pid)
        .filter(|(b, e)| at_call_site(&symbols(&sym.stack(pid, &[], b.user_stack(e)))))
        .count();
    prog.finish();
    println!("program measured {measured} ns; futex waits at the call site {at_site} ns, elsewhere {elsewhere} ns");
    assert!(measured > 0);
    assert!(
        at_site * 2 >= measured && at_site <= measured * 2,
        "wait at the call site {at_site} ns is not within 2x of the measured {measured} ns"
    );
    assert!(slow_at_site > 0, "no individual slow wait attributed to the call site");
    Ok(())
}

#[test]
fn syscall_counts_are_exact_and_slow_calls_come_with_their_stack() -> anyhow::Result<()> {
    if !require_root("syscall_counts_are_exact_and_slow_calls_come_with_their_stack") {
        return Ok(());
    }
    const N: u64 = 12_345;
    const GETPPID: u32 = 110;
    const NANOSLEEP: u32 = 35;
    let bin = build_program("syscall_count");
    let mut prog = Program::spawn(&bin, &[&N.to_string()]);
    let pid = prog.pid();
    let mut probes = Probes::load(&config(Mode::Syscall, pid))?;
    let (sink, rx) = channel_sink();
    let reader = probes.start_reader(&reader_config(), sink)?;
    probes.attach()?;
    prog.go();
    assert_eq!(prog.line(), "done 1");
    let mut stats = probes.drain_syscall_stats()?;
    stats.extend(probes.drain_syscall_stats()?);
    std::thread::sleep(Duration::from_millis(100));
    reader.stop()?;

    let count: u64 = stats.iter().filter(|s| s.pid == pid && s.nr == GETPPID).map(|s| s.count).sum();
    let hist: u64 = stats.iter().filter(|s| s.pid == pid && s.nr == GETPPID).flat_map(|s| s.histogram).sum();
    assert_eq!(count, N, "getppid count");
    assert_eq!(hist, N, "histogram total");
    assert_eq!(aperture_probes::syscall_name(GETPPID), Some("getppid"));

    let mut sym = Symbolizer::new();
    let mut slow = Vec::new();
    for batch in rx.try_iter() {
        for e in batch.events.iter().filter(|e| e.kind == EventKind::SlowSyscall && e.raw.pid == pid) {
            if e.raw.arg == NANOSLEEP {
                let stack = sym.stack(pid, batch.kernel_stack(e), batch.user_stack(e));
                slow.push((e.raw.duration_ns, symbols(&stack).iter().map(|s| s.to_string()).collect::<Vec<_>>()));
            }
        }
    }
    prog.finish();
    println!("slow nanosleep calls: {slow:?}");
    assert_eq!(slow.len(), 1, "one slow nanosleep");
    let (duration, stack) = &slow[0];
    assert!(*duration >= 20_000_000, "duration {duration}");
    assert_eq!(stack.first().map(String::as_str), Some("slow_call_site"), "stack {stack:?}");
    assert!(stack.iter().any(|s| s == "main"), "stack {stack:?}");
    Ok(())
}

#[test]
fn preflight_passes_on_this_node() -> anyhow::Result<()> {
    if !require_root("preflight_passes_on_this_node") {
        return Ok(());
    }
    let report = aperture_probes::preflight::check()?;
    println!("{report:?}");
    assert!(report.kernel_version >= aperture_probes::preflight::MIN_KERNEL);
    Ok(())
}

/// Slow nanosleep calls of `pid` reported individually in `batches`.
fn slow_sleeps(batches: &[RecordBatch], pid: u32) -> usize {
    const NANOSLEEP: u32 = 35;
    batches
        .iter()
        .flat_map(|b| b.events.iter())
        .filter(|e| e.kind == EventKind::SlowSyscall && e.raw.pid == pid && e.raw.arg == NANOSLEEP)
        .count()
}

#[test]
fn raising_the_slow_syscall_threshold_live_stops_individual_reports() -> anyhow::Result<()> {
    if !require_root("raising_the_slow_syscall_threshold_live_stops_individual_reports") {
        return Ok(());
    }
    let bin = build_program("syscall_count");
    let mut first = Program::spawn(&bin, &["10"]);
    let mut second = Program::spawn(&bin, &["10"]);
    let (p1, p2) = (first.pid(), second.pid());
    let mut probes = Probes::load(&ProbeConfig {
        modes: Modes::only(Mode::Syscall),
        filter: Some(Filter { pids: vec![p1, p2], cgroups: vec![] }),
        ..ProbeConfig::default()
    })?;
    let (sink, rx) = channel_sink();
    let reader = probes.start_reader(&reader_config(), sink)?;
    probes.attach()?;

    // Attached with the default 10 ms threshold; raise it to 1 s while the
    // programs stay attached: the 20 ms sleep is only counted.
    probes.set_thresholds(Duration::from_millis(1), Duration::from_secs(1))?;
    assert_eq!(probes.config().slow_syscall_threshold, Duration::from_secs(1));
    first.go();
    assert_eq!(first.line(), "done 1");
    // Lower it again, still without re-attaching: the next sleep is reported.
    probes.set_thresholds(Duration::from_millis(1), Duration::from_millis(10))?;
    second.go();
    assert_eq!(second.line(), "done 1");
    let mut stats = probes.drain_syscall_stats()?;
    stats.extend(probes.drain_syscall_stats()?);
    std::thread::sleep(Duration::from_millis(100));
    reader.stop()?;
    first.finish();
    second.finish();

    let batches: Vec<RecordBatch> = rx.try_iter().collect();
    const NANOSLEEP: u32 = 35;
    let counted = |pid| stats.iter().filter(|s| s.pid == pid && s.nr == NANOSLEEP).map(|s| s.count).sum::<u64>();
    assert!(counted(p1) >= 1, "the sleep under the raised threshold is still counted");
    assert_eq!(slow_sleeps(&batches, p1), 0, "no individual report above a 1 s threshold");
    assert_eq!(slow_sleeps(&batches, p2), 1, "reported again once the threshold is lowered");
    assert_eq!(probes.attachments().len(), 2, "nothing was re-attached");
    Ok(())
}

#[test]
fn cpu_sampling_frequency_changes_while_attached() -> anyhow::Result<()> {
    if !require_root("cpu_sampling_frequency_changes_while_attached") {
        return Ok(());
    }
    // Filtered on a program that only waits, so this test burns no CPU of
    // its own next to the sampling test above.
    let bin = build_program("syscall_count");
    let mut prog = Program::spawn(&bin, &["1"]);
    let mut probes = Probes::load(&ProbeConfig { frequency_hz: 199, ..config(Mode::Cpu, prog.pid()) })?;
    probes.set_frequency(99)?;
    assert_eq!(probes.config().frequency_hz, 99, "before attach it is what attach will use");
    probes.attach()?;
    let online = aya::util::online_cpus().map_err(|(_, e)| e)?.len();
    assert_eq!(probes.cpu_event_count(), online, "one cpu-clock event per online CPU");
    // Unfiltered for a second at 20 Hz: no CPU can give more than 20
    // samples a second however busy the machine is (a period mistaken for
    // a frequency gives thousands).
    let mut all =
        Probes::load(&ProbeConfig { frequency_hz: 99, modes: Modes::only(Mode::Cpu), ..ProbeConfig::default() })?;
    let (sink, rx) = channel_sink();
    let reader = all.start_reader(&reader_config(), sink)?;
    all.attach()?;
    all.set_frequency(20)?;
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    all.set_frequency(1)?;
    let elapsed = started.elapsed().as_secs_f64();
    drop(all);
    reader.stop()?;
    let samples: usize = rx.try_iter().map(|b| b.events.iter().filter(|e| e.kind == EventKind::Cpu).count()).sum();
    let bound = (20.0 * online as f64 * (elapsed + 0.5)).ceil() as usize + 2 * online;
    assert!(samples <= bound, "{samples} samples in {elapsed:.2} s at 20 Hz on {online} CPUs (at most {bound})");

    probes.set_frequency(49)?;
    assert_eq!(probes.config().frequency_hz, 49);
    probes.set_frequency(0)?;
    assert_eq!(probes.config().frequency_hz, 1, "0 is clamped to 1 Hz");
    assert_eq!(probes.attachments().len(), 1, "nothing was re-attached");
    prog.go();
    assert_eq!(prog.line(), "done 1");
    prog.finish();
    Ok(())
}
