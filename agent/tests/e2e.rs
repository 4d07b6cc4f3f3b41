//! End to end on this machine (as root): the agent with real probes sends
//! frames over real QUIC to a transport server on loopback, and the test
//! programs' stacks arrive with the right process name and pid.

mod common;

use std::time::Duration;

use aperture_agent::{Shutdown, run_agent};
use aperture_core::model::{Batch, LockKind};
use common::{Program, Server, agent_config, build_program, require_root};

/// Bounded wait for data: several flush intervals, never a pass/fail timing.
const WAIT: Duration = Duration::from_secs(30);

fn symbols(batch: &Batch, stack: u32) -> Vec<String> {
    batch.stacks[stack as usize].frames.iter().map(|f| f.symbol.clone()).collect()
}

fn summary(server: &Server) -> String {
    let frames = server.recorded.frames.lock().expect("lock");
    let mut out = format!("{} frames", frames.len());
    for (_, b) in frames.iter().take(3) {
        out += &format!(
            "; targets {:?} cpu {} locks {} syscalls {} slow {}",
            b.targets.iter().map(|t| (&t.process, t.pid)).collect::<Vec<_>>(),
            b.cpu.len(),
            b.locks.len(),
            b.syscalls.len(),
            b.slow_calls.len()
        );
        if let Some(l) = b.locks.first() {
            out += &format!(" lock stack {:?}", symbols(b, l.stack));
        }
        if let Some(c) = b.slow_calls.first() {
            out += &format!(" slow stack {:?}", symbols(b, c.stack));
        }
    }
    out
}

fn start_agent(
    config: aperture_core::config::AgentConfig,
) -> (Shutdown, std::thread::JoinHandle<anyhow::Result<aperture_agent::ExitReport>>) {
    let shutdown = Shutdown::new();
    let flag = shutdown.clone();
    (shutdown, std::thread::spawn(move || run_agent(config, flag)))
}

/// A loopback address with a port free at the time of the call.
fn free_local_addr() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

/// The value of `series` on the agent's `/metrics` once it is above zero
/// (metrics are mirrored once per second), or the last value seen within
/// [`WAIT`].
fn wait_for_metric(addr: std::net::SocketAddr, series: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let until = std::time::Instant::now() + WAIT;
    let mut last = None;
    while std::time::Instant::now() < until {
        let mut body = String::new();
        if let Ok(mut conn) = std::net::TcpStream::connect(addr) {
            let _ = conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n");
            let _ = conn.read_to_string(&mut body);
        }
        last = body.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse::<f64>().ok())).or(last);
        if last.is_some_and(|n| n > 0.0) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    last
}

#[test]
fn cpu_mode_stack_arrives_with_process_name_and_pid() {
    if !require_root("cpu_mode_stack_arrives_with_process_name_and_pid") {
        return;
    }
    let bin = build_program("ap_burner");
    let server = Server::start(Duration::ZERO);
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = "frequency_hz: 99\nbatch:\n  max_age: 2s\nfilter:\n  processes: [ap_burner]\n";
    let mut config = agent_config(&server, dir.path(), yaml, "cpu");
    let metrics = free_local_addr();
    config.metrics.listen = metrics.to_string();
    let (shutdown, agent) = start_agent(config);
    let burner = Program::spawn(&bin, "20");
    let pid = burner.pid();
    let found = server.wait_for(WAIT, |frames| {
        frames.iter().find_map(|(_, b)| {
            b.cpu.iter().find_map(|s| {
                let t = &b.targets[s.target as usize];
                let stack = symbols(b, s.stack);
                (t.pid == pid && stack.iter().any(|f| f == "leaf_burn")).then(|| (t.clone(), stack, s.period_ns))
            })
        })
    });
    // The table walker's counters reach the agent's own /metrics.
    let walked = wait_for_metric(metrics, "aperture_agent_unwind_stacks_total{outcome=\"walked\"}");
    let tables = wait_for_metric(metrics, "aperture_agent_unwind_tables");
    shutdown.trigger();
    let report = agent.join().expect("agent thread").expect("agent ran");
    let (target, stack, period) = found.expect("a CPU sample of ap_burner with leaf_burn arrived");
    assert!(walked.is_some_and(|n| n > 0.0), "stacks walked with tables are counted: {walked:?}");
    assert!(tables.is_some_and(|n| n > 0.0), "loaded tables are published: {tables:?}");
    println!("cpu: {target:?} {stack:?}; {report}");
    assert_eq!(target.process, "ap_burner");
    let chain: Vec<&str> = stack.iter().map(String::as_str).skip_while(|s| *s != "leaf_burn").take(4).collect();
    assert_eq!(chain, ["leaf_burn", "middle", "outer", "main"]);
    assert_eq!(period, 1_000_000_000 / 99);
    // Only the selected process was sent.
    for (_, b) in server.recorded.frames.lock().expect("lock").iter() {
        assert!(b.targets.iter().all(|t| t.process == "ap_burner"), "{:?}", b.targets);
    }
    assert!(report.unacked.is_empty(), "{report}");
}

#[test]
fn lock_mode_futex_waits_arrive_with_their_stack() {
    if !require_root("lock_mode_futex_waits_arrive_with_their_stack") {
        return;
    }
    let server = Server::start(Duration::ZERO);
    let wait = locker_wait(&server);
    assert_eq!(wait.kind, LockKind::Mutex, "a wait in pthread_mutex_lock is classified as mutex contention");
}

#[test]
fn lock_mode_sends_an_older_aggregator_no_lock_classes() {
    if !require_root("lock_mode_sends_an_older_aggregator_no_lock_classes") {
        return;
    }
    // An aggregator of the first release: its validator would refuse kinds
    // 5..=9 and close the session. It gets the same wait as other futex.
    let server = Server::start_older(Duration::ZERO);
    let wait = locker_wait(&server);
    assert_eq!(wait.kind, LockKind::Futex, "a class is sent as other futex to an aggregator without lock classes");
    for (id, b) in server.recorded.frames.lock().expect("lock").iter() {
        assert!(b.locks.iter().all(|l| !l.kind.is_futex_class()), "frame {} holds a lock class", id.sequence);
    }
}

/// Runs ap_locker under the agent in lock mode and returns its wait in
/// `hold_lock`, as `server` received it.
fn locker_wait(server: &Server) -> aperture_core::model::LockWait {
    let bin = build_program("ap_locker");
    let dir = tempfile::tempdir().expect("tempdir");
    let locker = Program::spawn(&bin, "20");
    let pid = locker.pid();
    let yaml = format!("batch:\n  max_age: 2s\nsyscall:\n  drain_interval: 1s\nfilter:\n  pids: [{pid}]\n");
    let (shutdown, agent) = start_agent(agent_config(server, dir.path(), &yaml, "lock"));
    let found = server.wait_for(WAIT, |frames| {
        frames.iter().find_map(|(_, b)| {
            b.locks.iter().find_map(|l| {
                let t = &b.targets[l.target as usize];
                let stack = symbols(b, l.stack);
                // glibc has no frame pointers: the wait's stack may skip
                // hold_lock and go from libc to its caller, worker.
                let at_site = stack.iter().any(|f| f == "hold_lock" || f == "worker");
                (t.pid == pid && at_site).then(|| (t.clone(), l.clone(), stack))
            })
        })
    });
    shutdown.trigger();
    let report = agent.join().expect("agent thread").expect("agent ran");
    let (target, wait, stack) =
        found.unwrap_or_else(|| panic!("no futex wait of ap_locker at hold_lock: {}", summary(server)));
    println!("lock: {target:?} {wait:?} {stack:?}; {report}");
    assert_eq!(target.process, "ap_locker");
    assert!(wait.count > 0 && wait.wait_ns > 0);
    wait
}

#[test]
fn syscall_mode_slow_calls_and_counts_arrive() {
    if !require_root("syscall_mode_slow_calls_and_counts_arrive") {
        return;
    }
    let bin = build_program("ap_sleeper");
    let server = Server::start(Duration::ZERO);
    let dir = tempfile::tempdir().expect("tempdir");
    let sleeper = Program::spawn(&bin, "20");
    let pid = sleeper.pid();
    let yaml = format!("batch:\n  max_age: 2s\nsyscall:\n  drain_interval: 1s\nfilter:\n  pids: [{pid}]\n");
    let (shutdown, agent) = start_agent(agent_config(&server, dir.path(), &yaml, "syscall"));
    let found = server.wait_for(WAIT, |frames| {
        let slow = frames.iter().find_map(|(_, b)| {
            b.slow_calls.iter().find_map(|c| {
                let t = &b.targets[c.target as usize];
                let stack = symbols(b, c.stack);
                // As for locks, libc may hide slow_call_site behind its caller.
                let at_site = stack.iter().any(|f| f == "slow_call_site" || f == "main");
                (t.pid == pid && at_site).then(|| (t.clone(), c.clone()))
            })
        })?;
        let counted = frames.iter().any(|(_, b)| {
            b.syscalls.iter().any(|s| b.targets[s.target as usize].pid == pid && s.name == "getppid" && s.count > 0)
        });
        counted.then_some(slow)
    });
    shutdown.trigger();
    let report = agent.join().expect("agent thread").expect("agent ran");
    let (target, call) =
        found.unwrap_or_else(|| panic!("no slow call from slow_call_site with getppid counts: {}", summary(&server)));
    println!("syscall: {target:?} {call:?}; {report}");
    assert_eq!(target.process, "ap_sleeper");
    assert!(call.name == "nanosleep" || call.name == "clock_nanosleep", "{}", call.name);
    assert!(call.duration_ns >= 10_000_000);
}
