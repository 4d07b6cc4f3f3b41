//! After the probes are dropped, and after a process holding them is killed
//! with SIGKILL, no Aperture program (name prefix `ap_`) stays loaded.
//! Programs of other Aperture instances that may run on the machine are
//! told apart by id: only ids that appeared while this test attached count.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aperture_probes::{ProbeConfig, Probes, ReaderConfig, RecordBatch};
use common::require_root;

const HOLDER_ENV: &str = "APERTURE_TEST_PROBE_HOLDER";

/// Ids of loaded BPF programs whose name starts with `ap_`.
fn aperture_program_ids() -> BTreeSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("ap_")))
        .map(|p| p.id())
        .collect()
}

/// Waits until none of `ids` is loaded any more (release is deferred by
/// RCU, so it can take a moment); returns the ones still there.
fn wait_gone(ids: &BTreeSet<u32>) -> BTreeSet<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: BTreeSet<u32> = aperture_program_ids().intersection(ids).copied().collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn load_everything() -> anyhow::Result<(Probes, aperture_probes::PerfReader)> {
    let mut probes = Probes::load(&ProbeConfig::default())?;
    let reader = probes.start_reader(&ReaderConfig::default(), |_: RecordBatch| {})?;
    probes.attach()?;
    Ok((probes, reader))
}

#[test]
fn no_program_stays_attached_after_drop_or_sigkill() -> anyhow::Result<()> {
    if !require_root("no_program_stays_attached_after_drop_or_sigkill") {
        return Ok(());
    }
    // 1. In process: load every mode, then drop.
    let before = aperture_program_ids();
    let (probes, reader) = load_everything()?;
    let ours: BTreeSet<u32> = aperture_program_ids().difference(&before).copied().collect();
    assert!(ours.len() >= 5, "expected the cpu, lock and syscall programs, saw ids {ours:?}");
    drop(probes);
    drop(reader);
    let left = wait_gone(&ours);
    assert!(left.is_empty(), "programs {left:?} still loaded after drop");

    // 2. A child process holding the probes, killed with SIGKILL.
    let before = aperture_program_ids();
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--exact", "probe_holder", "--ignored", "--nocapture", "--test-threads=1"])
        .env(HOLDER_ENV, "1")
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let attached =
        BufReader::new(stdout).lines().map_while(Result::ok).any(|l| l.trim_end().ends_with("probe-holder-attached"));
    assert!(attached, "holder child did not attach");
    let ours: BTreeSet<u32> = aperture_program_ids().difference(&before).copied().collect();
    assert!(ours.len() >= 5, "child holds programs {ours:?}");
    child.kill()?; // SIGKILL
    child.wait()?;
    let left = wait_gone(&ours);
    assert!(left.is_empty(), "programs {left:?} still loaded after SIGKILL of their holder");
    Ok(())
}

/// Not a test: the child process of the test above (run with --ignored and
/// the environment variable set). Attaches everything, says so, and waits
/// to be killed.
#[test]
#[ignore = "helper process for no_program_stays_attached_after_drop_or_sigkill"]
fn probe_holder() -> anyhow::Result<()> {
    if std::env::var_os(HOLDER_ENV).is_none() {
        return Ok(());
    }
    let (_probes, _reader) = load_everything()?;
    println!("probe-holder-attached");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}
