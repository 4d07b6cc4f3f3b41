//! What the scenarios need from the machine: process CPU and memory from
//! `/proc`, free loopback ports, a minimal HTTP client for loopback servers,
//! child processes that are stopped when dropped, and the `aperture`
//! release binary.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ; 100 on Linux).
pub const TICKS_PER_SEC: f64 = 100.0;

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Fails with `what` when not root.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the {what} scenario needs root (it loads BPF programs): run it with sudo");
    }
    Ok(())
}

/// CPU time and memory of one process at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcUsage {
    /// utime + stime, seconds.
    pub cpu_s: f64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Peak resident set size, KiB.
    pub hwm_kib: u64,
}

/// `VmRSS` and `VmHWM` (KiB) from the text of `/proc/<pid>/status`.
pub fn parse_status_memory(status: &str) -> (u64, u64) {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.trim_start_matches(':').split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS"), field("VmHWM"))
}

/// Reads the usage of process `pid`.
pub fn proc_usage(pid: u32) -> anyhow::Result<ProcUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("process {pid} gone"))?;
    let ticks = crate::load::stat_cpu_ticks(&stat).context("unreadable /proc/<pid>/stat")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let (rss_kib, hwm_kib) = parse_status_memory(&status);
    Ok(ProcUsage { cpu_s: ticks as f64 / TICKS_PER_SEC, rss_kib, hwm_kib })
}

/// cutime + cstime, in clock ticks, from the text of `/proc/self/stat`: CPU
/// time of the children already reaped (fields 16 and 17).
pub fn stat_children_ticks(stat: &str) -> Option<u64> {
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(13)?.parse::<u64>().ok()? + f.get(14)?.parse::<u64>().ok()?)
}

/// CPU seconds of this process's reaped children so far: read before and
/// after reaping one child, the difference is that child's whole life.
pub fn reaped_children_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    stat_children_ticks(&stat).unwrap_or(0) as f64 / TICKS_PER_SEC
}

/// 1-, 5- and 15-minute load averages, as text.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A TCP port free on 127.0.0.1 right now (bound and released; good enough on loopback).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// A UDP and TCP port both free on 127.0.0.1 (for a QUIC + gRPC ingress on one port).
pub fn free_port_pair() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let port = free_port()?;
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both TCP and UDP on 127.0.0.1")
}

/// An HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Splits a raw HTTP/1.x response into status and body.
pub fn parse_http_response(raw: &[u8]) -> anyhow::Result<HttpResponse> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").context("HTTP response without end of headers")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad HTTP status line: {}", head.lines().next().unwrap_or("")))?;
    Ok(HttpResponse { status, body: raw[end + 4..].to_vec() })
}

/// Sends one HTTP/1.0 request (no chunked replies, connection closed after)
/// to a loopback server and reads the whole response.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
    timeout: Duration,
) -> anyhow::Result<HttpResponse> {
    anyhow::ensure!(addr.ip().is_loopback(), "refusing to send to {addr}: loopback only");
    let mut s = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).with_context(|| format!("reading the reply of {addr}{path}"))?;
    parse_http_response(&raw)
}

/// A child process stopped (SIGTERM, then SIGKILL after a grace period) when dropped.
#[derive(Debug)]
pub struct Guarded {
    /// What it is, for messages.
    pub name: String,
    child: Option<Child>,
}

impl Guarded {
    /// Spawns `cmd`.
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Guarded> {
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Guarded { name: name.to_owned(), child: Some(child) })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Fails if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }

    /// Sends `signal`, waits up to `grace` for exit, then kills.
    pub fn stop_with(&mut self, signal: i32, grace: Duration) {
        let Some(mut c) = self.child.take() else { return };
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe { libc::kill(c.id() as i32, signal) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(c.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        self.stop_with(libc::SIGTERM, Duration::from_secs(10));
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether `prog` is on PATH.
pub fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(prog).is_file()))
}

/// The release `aperture` binary: `$APERTURE_BIN`, else `target/release/aperture`
/// under `root`, built with `cargo build --release -p aperture` when missing.
pub fn aperture_binary(root: &Path) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("APERTURE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let path = root.join("target/release/aperture");
    if !path.is_file() {
        eprintln!("building the release binary: cargo build --release -p aperture");
        let status = Command::new("cargo")
            .args(["build", "--release", "-p", "aperture"])
            .current_dir(root)
            .status()
            .context("running cargo (or set APERTURE_BIN to a release build of `aperture`)")?;
        if !status.success() {
            bail!("`cargo build --release -p aperture` failed; set APERTURE_BIN to a release build instead");
        }
    }
    Ok(path)
}

/// A private copy of `bin` in `dir`, so a rebuild of `target/release` by
/// someone else in the middle of a run cannot mix two builds in one report.
pub fn snapshot_binary(bin: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let copy = dir.join("aperture");
    std::fs::copy(bin, &copy).with_context(|| format!("copying {}", bin.display()))?;
    Ok(copy)
}

/// Waits until `ready` returns true, polling every 100 ms, up to `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            bail!("{what} not ready within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Total size of the files in `dir` whose name starts with `prefix`.
pub fn files_size(dir: &Path, prefix: &str) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_memory_fields_are_read_in_kib() {
        let status = "Name:\taperture\nVmPeak:\t  900000 kB\nVmHWM:\t   40960 kB\nVmRSS:\t   30720 kB\nThreads:\t9\n";
        assert_eq!(parse_status_memory(status), (30720, 40960));
        assert_eq!(parse_status_memory(""), (0, 0));
    }

    #[test]
    fn stat_cpu_comes_from_utime_and_stime() {
        // Fields after the name: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
        let stat = "77 (aperture (agent)) S 1 77 77 0 -1 4194560 10 0 0 0 250 50 0 0 20 0 12 0 99 0";
        assert_eq!(crate::load::stat_cpu_ticks(stat), Some(300));
        // ... cutime cstime follow.
        let stat = "77 (perf) S 1 77 77 0 -1 4194560 10 0 0 0 250 50 7 3 20 0 12 0 99 0";
        assert_eq!(stat_children_ticks(stat), Some(10));
        assert_eq!(stat_children_ticks("77 (x"), None);
    }

    #[test]
    fn http_responses_are_split() {
        let r = parse_http_response(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nok").expect("parse");
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
        assert!(parse_http_response(b"HTTP/1.0 200 OK\r\n").is_err());
    }
}
