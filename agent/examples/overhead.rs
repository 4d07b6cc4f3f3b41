//! Measures the agent's own cost: runs it (as root) against a transport
//! server in the same process for a while and reports the CPU time of the
//! agent's threads (the server's are excluded) and the process RSS.
//!
//! `cargo run --release -p aperture-agent --example overhead -- <mode> <seconds>`

use std::sync::Arc;
use std::time::{Duration, Instant};

use aperture_agent::{Shutdown, run_agent};
use aperture_core::config::{AgentConfig, FlagValue, load};
use aperture_transport::server::{Admission, IngressSink, ReceivedFrame, ServerConfig, serve};

// As in the `aperture` binary, so the memory measured is the shipped one's.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

struct AckNothing;

impl IngressSink for AckNothing {
    fn admit(&self, _frame: ReceivedFrame) -> Admission {
        Admission::AlreadyCommitted
    }
}

/// utime + stime of this process's agent threads, in clock ticks.
fn agent_thread_ticks() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if !(comm.starts_with("aperture-") || comm.starts_with("ap-perf")) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = after.split_whitespace().collect();
        // Fields after the comm: state is [0]; utime [11], stime [12].
        total += fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        total += fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    total
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_else(|| "cpu".into());
    let seconds: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(30);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let dir = tempfile::tempdir()?;
    let loopback = "127.0.0.1:0".parse()?;
    let mut server_config = ServerConfig {
        quic_listen: Some(loopback),
        grpc_listen: Some(loopback),
        data_dir: dir.path().join("server"),
        ..ServerConfig::default()
    };
    server_config.auth.disabled = true;
    let handle = rt.block_on(serve(server_config, Arc::new(AckNothing)))?;
    let port = handle.grpc_addr().map(|a| a.port()).unwrap_or(0);
    let flags = [
        FlagValue::new("--aggregator", "aggregator", format!("127.0.0.1:{port}")),
        FlagValue::new("--mode", "mode", mode.clone()),
        FlagValue::new("--freq", "frequency_hz", "99"),
        FlagValue::new("--data-dir", "data_dir", dir.path().join("agent").display().to_string()),
        FlagValue::new("--metrics-listen", "metrics.listen", "127.0.0.1:0"),
        FlagValue::new("--fingerprint", "transport.fingerprint_sha256", handle.fingerprint()),
    ];
    let mut config: AgentConfig = load(None, &|_| None, &flags)?;
    config.transport.server_name = Some("localhost".into());
    let shutdown = Shutdown::new();
    let flag = shutdown.clone();
    let agent = std::thread::spawn(move || run_agent(config, flag));
    // Let start-up (BTF parsing, loading) settle before measuring.
    std::thread::sleep(Duration::from_secs(3));
    let (t0, c0) = (Instant::now(), agent_thread_ticks());
    std::thread::sleep(Duration::from_secs(seconds));
    let (elapsed, ticks) = (t0.elapsed(), agent_thread_ticks() - c0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_percent = ticks as f64 / hz / elapsed.as_secs_f64() * 100.0;
    let rss_mib = aperture_agent::budget::own_rss_bytes() as f64 / (1 << 20) as f64;
    shutdown.trigger();
    let report = agent.join().map_err(|_| anyhow::anyhow!("agent panicked"))??;
    println!(
        "mode {mode} at 99 Hz over {:.0} s: agent threads {cpu_percent:.2}% of one core, process RSS {rss_mib:.1} MiB; {report}",
        elapsed.as_secs_f64()
    );
    rt.block_on(handle.shutdown(Duration::from_secs(1)));
    Ok(())
}
