//! The aggregator under test as a child process, and what is read from
//! it and from this process while the fleet runs.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use aperture_transport::tls::{ServerTlsConfig, format_fingerprint, load_or_create_identity};

use super::TOKEN;
use crate::sys::{Guarded, free_port, free_port_pair, http, wait_for};

/// The sum of a counter over all its label sets in a Prometheus text exposition.
pub fn metric_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.chars().next()? {
                ' ' => rest,
                '{' => rest.split_once('}')?.1,
                _ => return None,
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// Counters of the aggregator's `/metrics` reported as refusals and drops.
/// (Busy: refused for lack of room. Not counted: the `checking` answer every
/// new agent run gets once while the store is asked what it already holds.)
pub(super) const REFUSALS: &[&str] = &[
    "aperture_ingress_frames_total{result=\"busy\"}",
    "aperture_transport_rejections_total",
    "aperture_transport_preauth_refused_total",
    "aperture_transport_decode_errors_total",
    "aperture_writer_rows_rejected_total",
    "aperture_ingress_frames_total{result=\"rejected\"}",
];

/// Raises this process's open-file limit (children inherit it): to
/// `wanted` when allowed (root), else to the hard limit. Returns the limit.
pub(super) fn raise_nofile(wanted: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with valid pointers to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        let raised = libc::rlimit { rlim_cur: wanted.max(lim.rlim_cur), rlim_max: wanted.max(lim.rlim_max) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return raised.rlim_cur;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    lim.rlim_cur
}

pub(super) fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(u64::MAX)
}

pub(super) fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0)
}

pub(super) fn self_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    crate::load::stat_cpu_ticks(&stat).unwrap_or(0) as f64 / crate::sys::TICKS_PER_SEC
}

/// The aggregator child process and its addresses.
pub(super) struct Aggregator {
    pub proc: Guarded,
    pub http: SocketAddr,
    pub ingest: SocketAddr,
    pub fingerprint: String,
}

impl Aggregator {
    /// Starts `aperture aggregator`; with `clickhouse` (endpoint, database) on that store.
    pub(super) fn start(
        bin: &Path,
        dir: &Path,
        max_connections: usize,
        clickhouse: Option<(String, String)>,
    ) -> anyhow::Result<Aggregator> {
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        // The certificate the aggregator will load, made here to learn its fingerprint.
        let id = load_or_create_identity(&ServerTlsConfig::default(), &data).context("creating the certificate")?;
        let config = dir.join("aggregator.yaml");
        std::fs::write(&config, format!("limits:\n  max_connections: {max_connections}\n"))?;
        let (http_port, ingest) = (free_port()?, free_port_pair()?);
        let log = std::fs::File::create(dir.join("aggregator.log"))?;
        let mut cmd = Command::new(bin);
        // SAFETY: prctl(2) only, async-signal-safe, between fork and exec:
        // the aggregator dies with the harness even when the harness is
        // killed (out of memory with thousands of simulated agents).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        if let Some((endpoint, database)) = clickhouse {
            cmd.env("APERTURE_CLICKHOUSE_ENDPOINT", endpoint).env("APERTURE_CLICKHOUSE_DATABASE", database);
        } else {
            cmd.env_remove("APERTURE_CLICKHOUSE_ENDPOINT");
        }
        let proc = Guarded::spawn(
            "aperture aggregator",
            cmd.arg("aggregator")
                .arg("-c")
                .arg(&config)
                .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
                .args(["--grpc-listen", &format!("127.0.0.1:{ingest}")])
                .args(["--quic-listen", &format!("127.0.0.1:{ingest}")])
                .arg("--data-dir")
                .arg(&data)
                .env("APERTURE_AUTH_TOKEN", TOKEN)
                .stdout(Stdio::null())
                .stderr(log),
        )?;
        let http_addr = SocketAddr::from(([127, 0, 0, 1], http_port));
        let mut agg = Aggregator {
            proc,
            http: http_addr,
            ingest: SocketAddr::from(([127, 0, 0, 1], ingest)),
            fingerprint: format_fingerprint(&id.fingerprint),
        };
        wait_for("aperture aggregator", Duration::from_secs(30), || {
            http(http_addr, "GET", "/healthz", None, b"", Duration::from_secs(2)).is_ok_and(|r| r.status == 200)
        })
        .with_context(|| format!("see {}", dir.join("aggregator.log").display()))?;
        agg.proc.check_alive()?;
        Ok(agg)
    }

    pub(super) fn metrics(&self) -> String {
        http(self.http, "GET", "/metrics", Some(TOKEN), b"", Duration::from_secs(10))
            .map(|r| r.text())
            .unwrap_or_default()
    }

    /// Each of [`REFUSALS`], summed over its label sets.
    pub(super) fn refusals(&self) -> Vec<f64> {
        let m = self.metrics();
        REFUSALS.iter().map(|n| metric_sum(&m, n)).collect()
    }
}
