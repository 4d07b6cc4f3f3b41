//! SIGTERM with an aggregator that acknowledges slowly: every frame built
//! before the signal is either acknowledged or reported unacknowledged.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use aperture_agent::{Shutdown, run_agent};
use common::{Program, Server, agent_config, build_program, require_root};

#[test]
fn sigterm_accounts_for_every_frame() {
    if !require_root("sigterm_accounts_for_every_frame") {
        return;
    }
    let bin = build_program("ap_burner");
    let burner = Program::spawn(&bin, "30");
    // Each acknowledgement takes 1.5 s; the agent waits at most 1 s at exit.
    let server = Server::start(Duration::from_millis(1500));
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml =
        format!("batch:\n  max_age: 1s\ntransport:\n  shutdown_timeout: 1s\nfilter:\n  pids: [{}]\n", burner.pid());
    let config = agent_config(&server, dir.path(), &yaml, "cpu");

    let shutdown = Shutdown::new();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    rt.block_on(async { shutdown.trigger_on_signals() }).expect("signal handler");
    let flag = shutdown.clone();
    let agent = std::thread::spawn(move || run_agent(config, flag));
    // Let a few frames go out, some acknowledged, some not yet.
    server.wait_for(Duration::from_secs(30), |frames| (frames.len() >= 4).then_some(()));
    // SAFETY: sending a signal to our own process; the handler above turns it into the shutdown flag.
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    // The runtime must be driven for the handler task to run.
    rt.block_on(async {
        while !shutdown.is_triggered() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let report = agent.join().expect("agent thread").expect("agent ran");
    println!("sigterm: {report}");
    assert!(report.frames >= 4, "{report}");
    let unacked: BTreeSet<u64> = report.unacked.iter().map(|id| id.sequence).collect();
    assert_eq!(unacked.len(), report.unacked.len(), "no frame reported twice");
    assert!(unacked.iter().all(|s| (1..=report.frames).contains(s)), "{report}");
    assert_eq!(report.acked + unacked.len() as u64, report.frames, "every frame acked or reported: {report}");
    assert!(!unacked.is_empty(), "the slow server left some frames unacknowledged: {report}");
}
