//! Kernel tests of the table-driven user stack walker on programs built
//! the way distributions build them: without frame pointers, or with them
//! but with frameless leaves, calling through a shared library and glibc
//! (run as root; they skip by name otherwise). Each test filters on its own
//! child's pid.

mod common;

use std::path::Path;
use std::time::Duration;

use aperture_core::model::Mode;
use aperture_probes::abi::{EventKind, UnwindStat};
use aperture_probes::{
    Filter, Modes, ProbeConfig, Probes, ReaderConfig, RecordBatch, Symbolizer, UnwindMode, UnwindSettings,
};
use aperture_symbolize::vdso::VdsoSymbols;
use common::{Program, build_c, build_rust, channel_sink, programs_dir, require_root};

/// No frame pointers anywhere.
const OMIT: &[&str] = &["-O2", "-g", "-fomit-frame-pointer", "-pthread"];
/// Frame pointers, but GCC's default of none in leaf functions.
const FP_FRAMELESS_LEAF: &[&str] = &["-O2", "-g", "-fno-omit-frame-pointer", "-pthread"];

fn config(mode: Mode, pid: u32, unwind: UnwindMode) -> ProbeConfig {
    ProbeConfig {
        modes: Modes::only(mode),
        frequency_hz: 199,
        filter: Some(Filter { pids: vec![pid], cgroups: vec![] }),
        unwind: UnwindSettings { mode: unwind, ..UnwindSettings::default() },
        ..ProbeConfig::default()
    }
}

fn reader_config() -> ReaderConfig {
    ReaderConfig { flush_interval: Duration::from_millis(50), ..ReaderConfig::default() }
}

/// The user frames (symbols) of every cpu sample of the program run with
/// `args`, walked with `unwind`.
fn cpu_stacks(bin: &Path, args: &[&str], unwind: UnwindMode) -> anyhow::Result<Vec<Vec<String>>> {
    let mut prog = Program::spawn(bin, args);
    let pid = prog.pid();
    let mut probes = Probes::load(&config(Mode::Cpu, pid, unwind))?;
    let tables = probes.unwind_process(pid)?;
    if unwind == UnwindMode::Tables {
        assert!(tables > 0, "no mapping of the test program got an unwind table");
    }
    let (sink, rx) = channel_sink();
    let reader = probes.start_reader(&reader_config(), sink)?;
    probes.attach()?;
    prog.go();
    assert_eq!(prog.line(), "done");
    std::thread::sleep(Duration::from_millis(100));
    reader.stop()?;
    let stats = probes.unwind_stats();
    println!("unwind stats: {:?}", stats.kernel);
    let mut sym = Symbolizer::new();
    let mut out = Vec::new();
    for batch in rx.try_iter() {
        for e in batch.events.iter().filter(|e| e.kind == EventKind::Cpu && e.raw.pid == pid) {
            let stack = sym.stack(pid, &[], batch.user_stack(e));
            out.push(stack.frames.iter().map(|f| f.symbol.clone()).collect());
        }
    }
    prog.finish();
    Ok(out)
}

/// Share of stacks starting with `chain`, printed; returns (total, matching).
fn chain_share(what: &str, stacks: &[Vec<String>], chain: &[&str]) -> (usize, usize) {
    // A Rust symbol matches by its last path segment.
    let same = |f: &String, c: &&str| f == c || f.ends_with(&format!("::{c}"));
    let starts = |s: &Vec<String>| s.len() >= chain.len() && s.iter().zip(chain).all(|(a, b)| same(a, b));
    let with = stacks.iter().filter(|s| starts(s)).count();
    let example = stacks.iter().find(|s| !starts(s));
    println!(
        "{what}: {with}/{} samples ({:.1}%) show {}; e.g. a miss: {example:?}",
        stacks.len(),
        100.0 * with as f64 / stacks.len().max(1) as f64,
        chain.join(" <- ")
    );
    (stacks.len(), with)
}

fn assert_chain(what: &str, bin: &Path, args: &[&str], chain: &[&str]) -> anyhow::Result<()> {
    let stacks = cpu_stacks(bin, args, UnwindMode::Tables)?;
    let (total, with) = chain_share(what, &stacks, chain);
    assert!(total >= 50, "{what}: only {total} samples");
    assert!(with * 100 >= total * 95, "{what}: {with}/{total} samples show the full chain");
    Ok(())
}

#[test]
fn cpu_chains_without_frame_pointers_are_complete() -> anyhow::Result<()> {
    if !require_root("cpu_chains_without_frame_pointers_are_complete") {
        return Ok(());
    }
    let bin = build_c("unwind_chain_omit", "unwind_chain", OMIT, &[]);
    assert_chain("-O2 -fomit-frame-pointer", &bin, &["1.5"], &["leaf_burn", "middle", "outer", "main"])?;
    // The same program walked by frame pointers, for comparison (not asserted).
    let fp = cpu_stacks(&bin, &["0.5"], UnwindMode::FramePointers)?;
    chain_share("same, frame pointers only", &fp, &["leaf_burn", "middle", "outer", "main"]);
    Ok(())
}

#[test]
fn cpu_chains_with_a_frameless_leaf_are_complete() -> anyhow::Result<()> {
    if !require_root("cpu_chains_with_a_frameless_leaf_are_complete") {
        return Ok(());
    }
    let bin = build_c("unwind_chain_fp", "unwind_chain", FP_FRAMELESS_LEAF, &[]);
    assert_chain("-O2 -fno-omit-frame-pointer", &bin, &["1.5"], &["leaf_burn", "middle", "outer", "main"])
}

#[test]
fn cpu_chains_through_a_shared_library_without_frame_pointers_are_complete() -> anyhow::Result<()> {
    if !require_root("cpu_chains_through_a_shared_library_without_frame_pointers_are_complete") {
        return Ok(());
    }
    let mut lib_flags = OMIT.to_vec();
    lib_flags.extend(["-shared", "-fPIC"]);
    build_c("libunwind_lib.so", "unwind_lib", &lib_flags, &[]);
    let dir = programs_dir();
    let mut flags = OMIT.to_vec();
    flags.push("-DWITH_LIB");
    let link = [format!("-L{}", dir.display()), "-lunwind_lib".to_owned(), format!("-Wl,-rpath,{}", dir.display())];
    let link: Vec<&str> = link.iter().map(String::as_str).collect();
    let bin = build_c("unwind_chain_lib", "unwind_chain", &flags, &link);
    assert_chain("shared library", &bin, &["1.5", "lib"], &["lib_leaf", "lib_middle", "outer", "main"])
}

#[test]
fn cpu_chains_of_an_optimised_rust_binary_are_complete() -> anyhow::Result<()> {
    if !require_root("cpu_chains_of_an_optimised_rust_binary_are_complete") {
        return Ok(());
    }
    // What `cargo build --release` does: opt-level 3, no frame pointers.
    let bin = build_rust("unwind_chain_rs", "unwind_chain_rs", &["-C", "opt-level=3", "-g"]);
    assert_chain("Rust release", &bin, &["1.5"], &["leaf_burn", "middle", "outer", "main"])
}

#[test]
fn stacks_deeper_than_a_record_end_in_a_truncated_marker() -> anyhow::Result<()> {
    if !require_root("stacks_deeper_than_a_record_end_in_a_truncated_marker") {
        return Ok(());
    }
    let bin = build_c("unwind_chain_deep", "unwind_chain", OMIT, &[]);
    let stacks = cpu_stacks(&bin, &["1", "deep"], UnwindMode::Tables)?;
    let in_leaf: Vec<&Vec<String>> = stacks.iter().filter(|s| s.first().is_some_and(|f| f == "leaf_burn")).collect();
    let truncated = in_leaf
        .iter()
        .filter(|s| {
            s.last().is_some_and(|f| f == "[truncated]") && s[1..s.len() - 1].iter().skip(1).all(|f| f == "deep")
        })
        .count();
    println!(
        "deep: {truncated}/{} leaf samples end in [truncated] after deep frames; e.g. {:?}",
        in_leaf.len(),
        in_leaf.first().map(|s| &s[s.len().saturating_sub(3)..])
    );
    assert!(in_leaf.len() >= 50, "only {} samples in leaf_burn", in_leaf.len());
    assert!(truncated * 100 >= in_leaf.len() * 95, "{truncated}/{} end in [truncated]", in_leaf.len());
    // Never a guessed address: every frame of the deep stacks has a name.
    assert!(in_leaf.iter().copied().flatten().all(|f| !f.is_empty()), "a frame without a symbol");
    Ok(())
}

/// Cpu samples of a process the walker has no table for yet keep their
/// frame-pointer stack and are counted; the process is then picked up.
#[test]
fn samples_before_the_table_is_loaded_are_counted_and_the_process_is_picked_up() -> anyhow::Result<()> {
    if !require_root("samples_before_the_table_is_loaded_are_counted_and_the_process_is_picked_up") {
        return Ok(());
    }
    let bin = build_c("unwind_chain_late", "unwind_chain", OMIT, &[]);
    // Long enough for a slow machine (the kernel matrix's guests): the
    // waits below are bounded in attempts and end as soon as they can.
    let mut prog = Program::spawn(&bin, &["60"]);
    let pid = prog.pid();
    let mut probes = Probes::load(&config(Mode::Cpu, pid, UnwindMode::Tables))?;
    let (sink, rx) = channel_sink();
    let reader = probes.start_reader(&reader_config(), sink)?;
    probes.attach()?;
    prog.go();
    let mut before = probes.unwind_stats();
    for _ in 0..1000 {
        if before.get(UnwindStat::NoProcess) > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        before = probes.unwind_stats();
    }
    // The builder thread prepares the tables; refreshes install them.
    for _ in 0..3000 {
        probes.unwind_refresh()?;
        if probes.unwind_stats().processes == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..3000 {
        if probes.unwind_stats().get(UnwindStat::Walked) > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    reader.stop()?;
    let after = probes.unwind_stats();
    drop(prog);
    let batches: Vec<RecordBatch> = rx.try_iter().collect();
    let samples = batches.iter().flat_map(|b| b.events.iter()).filter(|e| e.raw.pid == pid).count();
    println!("before refresh {:?}; after {:?}; {samples} samples", before.kernel, after.kernel);
    assert!(before.get(UnwindStat::NoProcess) > 0, "samples before the table were not counted");
    assert_eq!(after.processes, 1, "the sampled process was picked up");
    assert!(after.get(UnwindStat::Walked) > 0, "no sample was walked with tables after the refresh");
    Ok(())
}

/// The lock wait and the slow call of `libc_calls.c`, both made through
/// glibc (built without frame pointers), carry the call site that called
/// into glibc: `lock_site <- contend_worker` and `sleep_site <- main`.
#[test]
fn lock_and_slow_call_stacks_through_glibc_show_the_call_site() -> anyhow::Result<()> {
    if !require_root("lock_and_slow_call_stacks_through_glibc_show_the_call_site") {
        return Ok(());
    }
    let bin = build_c("libc_calls_omit", "libc_calls", OMIT, &[]);
    let mut prog = Program::spawn(&bin, &[]);
    let pid = prog.pid();
    let mut probes = Probes::load(&ProbeConfig {
        modes: Modes::only(Mode::Lock).with(Mode::Syscall),
        ..config(Mode::Lock, pid, UnwindMode::Tables)
    })?;
    assert!(probes.unwind_process(pid)? > 0);
    let (sink, rx) = channel_sink();
    let reader = probes.start_reader(&reader_config(), sink)?;
    probes.attach()?;
    prog.go();
    assert_eq!(prog.line(), "done");
    let mut locks = probes.drain_lock_stats()?;
    locks.extend(probes.drain_lock_stats()?);
    std::thread::sleep(Duration::from_millis(100));
    reader.stop()?;
    println!("unwind stats: {:?}", probes.unwind_stats().kernel);

    let mut sym = Symbolizer::new();
    let names = |sym: &mut Symbolizer, user: &[u64]| -> Vec<String> {
        sym.stack(pid, &[], user).frames.iter().map(|f| f.symbol.clone()).collect()
    };
    // Aggregated futex waits: every stack through pthread_mutex_lock goes on
    // to lock_site <- contend_worker.
    let (mut mutex_ns, mut at_site_ns) = (0u64, 0u64);
    for s in locks.iter().filter(|s| s.pid == pid) {
        let n = names(&mut sym, &s.stack);
        println!("futex waits: {} x, {} ns: {}", s.count, s.total_ns, n.join(" <- "));
        if let Some(i) = n.iter().rposition(|f| f.contains("mutex_lock") || f.contains("lll_lock")) {
            mutex_ns += s.total_ns;
            if n.get(i + 1).map(String::as_str) == Some("lock_site")
                && n.get(i + 2).map(String::as_str) == Some("contend_worker")
            {
                at_site_ns += s.total_ns;
            }
        }
    }
    println!("mutex waits {mutex_ns} ns, {at_site_ns} ns of them at lock_site <- contend_worker");
    assert!(mutex_ns > 0, "no futex wait through pthread_mutex_lock");
    assert!(at_site_ns * 100 >= mutex_ns * 95, "only {at_site_ns} of {mutex_ns} ns at the call site");

    // Individual records: slow waits and the 30 ms sleep.
    let batches: Vec<RecordBatch> = rx.try_iter().collect();
    let mut slow_waits = (0, 0);
    let mut sleeps = Vec::new();
    for b in &batches {
        for e in b.events.iter().filter(|e| e.raw.pid == pid) {
            let n = names(&mut sym, b.user_stack(e));
            match e.kind {
                EventKind::LockFutex if n.iter().any(|f| f.contains("mutex_lock") || f.contains("lll_lock")) => {
                    slow_waits.0 += 1;
                    slow_waits.1 += usize::from(n.windows(2).any(|w| w[0] == "lock_site" && w[1] == "contend_worker"));
                }
                // clock_nanosleep (230, what glibc's nanosleep calls) or nanosleep (35).
                EventKind::SlowSyscall if e.raw.duration_ns >= 30_000_000 && matches!(e.raw.arg, 35 | 230) => {
                    sleeps.push(n)
                }
                _ => {}
            }
        }
    }
    prog.finish();
    println!("slow mutex waits {} ({} at the call site); slow sleeps {sleeps:?}", slow_waits.0, slow_waits.1);
    assert!(slow_waits.0 > 0 && slow_waits.1 == slow_waits.0, "slow waits {slow_waits:?}");
    assert_eq!(sleeps.len(), 1, "one slow sleep");
    let s = &sleeps[0];
    let site = s.iter().position(|f| f == "sleep_site").expect("sleep_site in the slow call's stack");
    assert!(site > 0 && s[..site].iter().all(|f| f.contains("sleep")), "glibc frames before sleep_site: {s:?}");
    assert_eq!(s.get(site + 1).map(String::as_str), Some("main"), "{s:?}");
    Ok(())
}

/// Top-`depth` chains of `stacks` as shares of all samples.
fn chain_shares(stacks: &[Vec<String>], depth: usize) -> std::collections::HashMap<String, f64> {
    let mut out = std::collections::HashMap::new();
    for s in stacks {
        *out.entry(s.iter().take(depth).cloned().collect::<Vec<_>>().join(" <- ")).or_insert(0.0) +=
            1.0 / stacks.len() as f64;
    }
    out
}

/// `perf record --call-graph dwarf` on the same process over the same
/// interval is the reference: the distributions of the top four frames
/// must agree on at least 95% of the samples.
#[test]
fn chains_agree_with_perf_dwarf_unwinding() -> anyhow::Result<()> {
    if !require_root("chains_agree_with_perf_dwarf_unwinding") {
        return Ok(());
    }
    if std::process::Command::new("perf").arg("--version").output().is_err() {
        println!("skipped: perf is not installed");
        return Ok(());
    }
    let bin = build_c("unwind_chain_perf", "unwind_chain", OMIT, &[]);
    let mut prog = Program::spawn(&bin, &["1.5"]);
    let pid = prog.pid();
    let mut probes = Probes::load(&config(Mode::Cpu, pid, UnwindMode::Tables))?;
    probes.unwind_process(pid)?;
    let (sink, rx) = channel_sink();
    let reader = probes.start_reader(&reader_config(), sink)?;
    probes.attach()?;
    let data = tempfile::tempdir()?;
    let out = data.path().join("perf.data");
    let mut perf = std::process::Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "199", "--call-graph", "dwarf,16384", "-p"])
        .arg(pid.to_string())
        .arg("-o")
        .arg(&out)
        .args(["--", "sleep", "2"])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    prog.go();
    assert_eq!(prog.line(), "done");
    let status = perf.wait()?;
    reader.stop()?;
    assert!(status.success(), "perf record failed: {status}");

    let mut sym = Symbolizer::new();
    let mut ours = Vec::new();
    for batch in rx.try_iter() {
        for e in batch.events.iter().filter(|e| e.kind == EventKind::Cpu && e.raw.pid == pid) {
            ours.push(sym.stack(pid, &[], batch.user_stack(e)).frames.iter().map(|f| f.symbol.clone()).collect());
        }
    }
    prog.finish();
    // User frames only, as ours: perf's cpu-clock stacks start in the kernel
    // when the sample hit there (an interrupt, the scheduler on a busy
    // machine), and those frames are left out of the reference.
    let script = std::process::Command::new("perf").args(["script", "-F", "ip,sym,dso", "-i"]).arg(&out).output()?;
    let text = String::from_utf8_lossy(&script.stdout);
    let reference: Vec<Vec<String>> = text
        .split("\n\n")
        .map(|block| {
            block
                .lines()
                .filter(|l| !l.trim_end().ends_with("([kernel.kallsyms])"))
                .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
                .collect::<Vec<String>>()
        })
        .filter(|s| !s.is_empty())
        .collect();
    let (a, b) = (chain_shares(&ours, 4), chain_shares(&reference, 4));
    let agreement: f64 = a.iter().map(|(k, p)| p.min(b.get(k).copied().unwrap_or(0.0))).sum();
    println!(
        "perf --call-graph dwarf: {} samples, ours {}; top-4 chains agree on {:.1}% (ours {a:?}, perf {b:?})",
        reference.len(),
        ours.len(),
        agreement * 100.0
    );
    assert!(
        reference.len() >= 50 && ours.len() >= 50,
        "too few samples: perf {}, ours {}",
        reference.len(),
        ours.len()
    );
    assert!(agreement >= 0.95, "chains agree on only {:.1}% of samples", agreement * 100.0);
    Ok(())
}

/// With a budget smaller than a process's tables, the least recently
/// sampled tables are evicted and counted, and the budget holds.
#[test]
fn tables_beyond_the_budget_are_evicted_and_counted() -> anyhow::Result<()> {
    if !require_root("tables_beyond_the_budget_are_evicted_and_counted") {
        return Ok(());
    }
    let bin = build_c("unwind_chain_budget", "unwind_chain", OMIT, &[]);
    let mut prog = Program::spawn(&bin, &["0.5"]);
    let pid = prog.pid();
    // libc's table alone is about 190 KB; with the loader's and the
    // program's it cannot all fit in 200 KB.
    const BUDGET: u64 = 200_000;
    let mut probes = Probes::load(&ProbeConfig {
        unwind: UnwindSettings {
            mode: UnwindMode::Tables,
            cache_dir: None,
            budget_bytes: BUDGET,
            ..UnwindSettings::default()
        },
        ..config(Mode::Cpu, pid, UnwindMode::Tables)
    })?;
    probes.unwind_process(pid)?;
    let stats = probes.unwind_stats();
    println!("{stats:?}");
    assert!(stats.table_bytes <= BUDGET, "{} bytes loaded over a {BUDGET} budget", stats.table_bytes);
    assert!(stats.evictions >= 1, "nothing was evicted");
    probes.attach()?;
    prog.go();
    assert_eq!(prog.line(), "done");
    prog.finish();
    let after = probes.unwind_stats();
    println!("after sampling: {:?}", after.kernel);
    // libc's table (the largest, never sampled) went; every stack passes
    // through libc's __libc_start_call_main, and is counted there.
    assert!(after.get(UnwindStat::Evicted) > 0, "no sample counted the evicted table");
    assert!(after.get(UnwindStat::FramesTable) > 0, "the tables that stayed were not used");
    Ok(())
}

/// Tables are read, built and loaded by a thread of the probes' own (named,
/// so the agent accounts its CPU time), and copied into their maps through
/// a memory mapping rather than row by row.
#[test]
fn tables_are_loaded_on_their_own_thread_through_a_mapping() -> anyhow::Result<()> {
    if !require_root("tables_are_loaded_on_their_own_thread_through_a_mapping") {
        return Ok(());
    }
    let bin = build_c("unwind_chain_thread", "unwind_chain", OMIT, &[]);
    let mut prog = Program::spawn(&bin, &["0.2"]);
    let pid = prog.pid();
    let mut probes = Probes::load(&config(Mode::Cpu, pid, UnwindMode::Tables))?;
    let tid = probes.unwind_thread_id().expect("the unwind thread runs");
    let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))?;
    assert_eq!(comm.trim(), "ap-unwind", "thread {tid} is the unwind thread");
    assert!(probes.unwind_process(pid)? > 0, "no mapping got a table");
    let stats = probes.unwind_stats();
    println!("{stats:?}");
    assert!(stats.tables > 0);
    assert_eq!(stats.filled_mapped as usize, stats.tables, "every table copied in through a mapping");
    assert_eq!(stats.filled_batched, 0);
    assert!(stats.thread_cpu_ns > 0, "the thread's CPU time is reported");
    prog.go();
    assert_eq!(prog.line(), "done");
    prog.finish();
    Ok(())
}

/// Samples inside the vDSO (clock_gettime) keep their callers: the vDSO
/// gets a table like any object. (Debian's 6.x vDSO also keeps frame
/// pointers, so on this kernel the fallback alone passes too; the table
/// matters for vDSOs built without them and for samples in a prologue.)
/// Their leaf is named by the vDSO's exported function that glibc calls,
/// `__vdso_clock_gettime` (its weak alias `clock_gettime` is not chosen).
#[test]
fn stacks_through_the_vdso_keep_their_callers() -> anyhow::Result<()> {
    if !require_root("stacks_through_the_vdso_keep_their_callers") {
        return Ok(());
    }
    let bin = build_c("unwind_chain_vdso", "unwind_chain", OMIT, &[]);
    let mut prog = Program::spawn(&bin, &["1", "vdso"]);
    let pid = prog.pid();
    // The image goes to one place in the cache directory, and what earlier
    // agents left there, a directory per run, is removed.
    let cache = tempfile::tempdir()?;
    let left_by_an_earlier_run = cache.path().join("vdso-4242");
    std::fs::create_dir(&left_by_an_earlier_run)?;
    std::fs::write(left_by_an_earlier_run.join("vdso.so"), b"an old image")?;
    let mut probe_config = config(Mode::Cpu, pid, UnwindMode::Tables);
    probe_config.unwind.cache_dir = Some(cache.path().to_owned());
    let mut probes = Probes::load(&probe_config)?;
    probes.unwind_process(pid)?;
    let (sink, rx) = channel_sink();
    let reader = probes.start_reader(&reader_config(), sink)?;
    probes.attach()?;
    prog.go();
    assert_eq!(prog.line(), "done");
    std::thread::sleep(Duration::from_millis(100));
    reader.stop()?;
    let mut sym = Symbolizer::new();
    let own = VdsoSymbols::own().expect("the test reads its own vDSO");
    let (mut in_vdso, mut with_callers, mut named) = (0, 0, 0);
    let mut wrong = Vec::new();
    for batch in rx.try_iter() {
        for e in batch.events.iter().filter(|e| e.kind == EventKind::Cpu && e.raw.pid == pid) {
            let stack = sym.stack(pid, &[], batch.user_stack(e));
            let Some(leaf) = stack.frames.first().filter(|f| f.module == "[vdso]") else { continue };
            in_vdso += 1;
            named += usize::from(leaf.symbol == "__vdso_clock_gettime");
            // Inside an exported function: its name. Elsewhere (a helper
            // that older kernels keep out of line, which .dynsym does not
            // list): no name rather than a wrong one.
            let exported = own.at_offset(leaf.module_offset).map_or("", |s| &*s.name);
            if leaf.symbol != exported {
                wrong.push((leaf.module_offset, leaf.symbol.clone(), exported));
            }
            let names: Vec<&str> = stack.frames.iter().map(|f| f.symbol.as_str()).collect();
            with_callers += usize::from(names.windows(2).any(|w| w == ["vdso_site", "main"]));
        }
    }
    prog.finish();
    println!(
        "{in_vdso} samples in the vDSO, {named} with the leaf __vdso_clock_gettime, \
         {with_callers} with vdso_site <- main"
    );
    assert!(in_vdso >= 20, "only {in_vdso} samples in the vDSO");
    assert!(wrong.is_empty(), "vDSO leaves (offset, name, exported function there): {wrong:?}");
    // Debian's 5.10 and 6.1 vDSOs keep a helper of it out of line, where
    // a few percent of the samples fall, unnamed.
    assert!(named * 100 >= in_vdso * 80, "{named}/{in_vdso} vDSO leaves named __vdso_clock_gettime");
    assert!(with_callers * 100 >= in_vdso * 95, "{with_callers}/{in_vdso} keep vdso_site <- main");
    assert!(cache.path().join("vdso/vdso.so").is_file(), "no vDSO image under the cache directory's vdso/");
    assert!(!left_by_an_earlier_run.exists(), "an earlier run's vdso-<pid> directory is still there");
    Ok(())
}

/// Cost of a cpu sample with each walker at 8, 32 and 128 frames, from the
/// kernel's run-time accounting of the sampling program (tail calls
/// included). Averaged over every sample the program took, other
/// processes' filtered-out ones too, so a lower bound on the difference.
/// A measurement, not a check: run it with `--features bench -- --ignored --nocapture`.
#[cfg(feature = "bench")]
#[test]
#[ignore = "measurement; prints ns per sample"]
fn cost_per_sample_by_depth() -> anyhow::Result<()> {
    if !require_root("cost_per_sample_by_depth") {
        return Ok(());
    }
    let bin = build_c("unwind_chain_cost", "unwind_chain", OMIT, &[]);
    aperture_probes::bench::enable_bpf_stats(true)?;
    for depth in [2, 26, 122] {
        // deep() frames plus middle, leaf_burn, main and libc's three.
        let frames = depth + 6;
        let mut line = format!("{frames} frames:");
        for mode in [UnwindMode::Tables, UnwindMode::FramePointers] {
            let depth = depth.to_string();
            let mut prog = Program::spawn(&bin, &["1", "deep", &depth]);
            let pid = prog.pid();
            let mut probes = Probes::load(&ProbeConfig { frequency_hz: 999, ..config(Mode::Cpu, pid, mode) })?;
            probes.unwind_process(pid)?;
            probes.attach()?;
            prog.go();
            assert_eq!(prog.line(), "done");
            let runs = aperture_probes::bench::program_run_stats("ap_cpu_sample");
            let ns: f64 = runs.iter().map(|r| r.ns_per_run()).sum::<f64>() / runs.len().max(1) as f64;
            line.push_str(&format!(
                " {mode:?} {ns:.0} ns/sample ({} samples);",
                runs.iter().map(|r| r.run_count).sum::<u64>()
            ));
            drop(probes);
            prog.finish();
        }
        println!("{line}");
    }
    aperture_probes::bench::enable_bpf_stats(false)?;
    Ok(())
}

/// exec replaces a known process's mappings: the walker forgets the old
/// ones at once (sched_process_exec) and the new image is walked with its
/// own tables after the next refreshes.
#[test]
fn after_exec_the_new_image_is_walked_with_its_own_tables() -> anyhow::Result<()> {
    if !require_root("after_exec_the_new_image_is_walked_with_its_own_tables") {
        return Ok(());
    }
    let bin = build_c("unwind_chain_exec", "unwind_chain", OMIT, &[]);
    let mut prog = Program::spawn(&bin, &["8", "exec"]);
    let pid = prog.pid();
    let mut probes = Probes::load(&config(Mode::Cpu, pid, UnwindMode::Tables))?;
    probes.unwind_process(pid)?;
    let (sink, rx) = channel_sink();
    let reader = probes.start_reader(&reader_config(), sink)?;
    probes.attach()?;
    assert!(probes.unwind_stats().exec_hook, "exec hook attached");
    prog.go(); // exec
    std::thread::sleep(Duration::from_millis(100));
    let walked_at_exec = probes.unwind_stats().get(UnwindStat::Walked);
    prog.go(); // the new image starts
    // What the agent does every tick, faster, until the new image is walked
    // with tables (bounded in attempts: a slow machine takes longer). The
    // samples taken before keep frame-pointer stacks and are left out.
    for _ in 0..3000 {
        probes.unwind_refresh()?;
        if probes.unwind_stats().get(UnwindStat::Walked) > walked_at_exec {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let skipped = rx.try_iter().count();
    println!("{skipped} batches before the new image's tables were in");
    assert_eq!(prog.line(), "done");
    std::thread::sleep(Duration::from_millis(100));
    reader.stop()?;
    let mut sym = Symbolizer::new();
    let mut stacks = Vec::new();
    for batch in rx.try_iter() {
        for e in batch.events.iter().filter(|e| e.kind == EventKind::Cpu && e.raw.pid == pid) {
            stacks.push(sym.stack(pid, &[], batch.user_stack(e)).frames.iter().map(|f| f.symbol.clone()).collect());
        }
    }
    prog.finish();
    println!("unwind stats: {:?}", probes.unwind_stats().kernel);
    let (total, with) = chain_share("after exec", &stacks, &["leaf_burn", "middle", "outer", "main"]);
    assert!(total >= 50, "only {total} samples");
    assert!(with * 100 >= total * 95, "{with}/{total} samples show the full chain after exec");
    Ok(())
}
