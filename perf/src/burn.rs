//! Load programs the scenarios start as child processes: `aperture-perf
//! burn` spins on the CPU (or loops on a cheap syscall) for a bounded time.
//! Run through a symlink, it shows up under the symlink's name, which gives
//! the freshness scenario a process name nobody else uses.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::sys::Guarded;

/// Burns for `seconds` (at most 600): a CPU-bound loop, or with `syscalls`
/// a loop of `getppid` calls.
pub fn burn(seconds: f64, syscalls: bool) {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds.clamp(0.0, 600.0));
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while Instant::now() < deadline {
        for _ in 0..10_000 {
            if syscalls {
                // SAFETY: getppid has no preconditions.
                x = x.wrapping_add(unsafe { libc::getppid() } as u64);
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
        }
    }
    std::hint::black_box(x);
}

/// A symlink `<dir>/<name>` to this executable, so a burner started through
/// it is named `name` (at most 15 characters are kept by the kernel).
pub fn named_burner(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating aperture-perf")?;
    let link = dir.join(name);
    if !link.exists() {
        std::os::unix::fs::symlink(&exe, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(link)
}

/// Starts `program burn` as a child process, stopped when dropped.
pub fn spawn_burner(program: &Path, seconds: f64, syscalls: bool) -> anyhow::Result<Guarded> {
    let mut cmd = Command::new(program);
    cmd.arg("burn").arg("--seconds").arg(seconds.to_string());
    if syscalls {
        cmd.arg("--syscalls");
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    Guarded::spawn("burner", &mut cmd)
}
