//! Where the budget loop's costs come from on a real system.
//!
//! - Agent CPU: the agent's own threads ([`super::ThreadCost`]; under
//!   `aperture up` the process also runs the aggregator). [`ProcessCost`]
//!   counts the whole process with `getrusage(RUSAGE_SELF)`.
//! - BPF program time: the `run_time_ns` line of `/proc/self/fdinfo/<fd>`
//!   for every BPF program file descriptor the process holds. The kernel
//!   accounts it only while BPF statistics are enabled (`BPF_ENABLE_STATS`
//!   held by the probes, or `sysctl kernel.bpf_stats_enabled=1`); otherwise
//!   it reads 0 and only the agent's own CPU is budgeted.
//! - Resident memory: `/proc/self/statm`.

use std::path::{Path, PathBuf};

use super::controller::CostTotals;

/// A source of cumulative costs; the real one reads the process, tests simulate one.
pub trait CostSource {
    /// Cumulative costs now.
    fn totals(&mut self) -> CostTotals;
}

/// The costs of this process.
#[derive(Debug)]
pub struct ProcessCost {
    proc_self: PathBuf,
    /// BPF run time of programs whose descriptors were closed (e.g. after a
    /// re-attach), so the total never goes backwards.
    retired_kernel_ns: u64,
    last_by_prog: std::collections::HashMap<u32, u64>,
}

impl Default for ProcessCost {
    fn default() -> Self {
        ProcessCost::new("/proc/self")
    }
}

impl ProcessCost {
    /// Reads `proc_self` (normally `/proc/self`).
    pub fn new(proc_self: impl Into<PathBuf>) -> ProcessCost {
        ProcessCost { proc_self: proc_self.into(), retired_kernel_ns: 0, last_by_prog: Default::default() }
    }

    /// Sum of `run_time_ns` over the BPF programs this process holds, plus
    /// that of programs it held before.
    pub fn bpf_run_time_ns(&mut self) -> u64 {
        let now = bpf_programs(&self.proc_self.join("fdinfo"));
        // Programs that disappeared keep their last value in the total.
        for (id, ns) in &self.last_by_prog {
            if !now.contains_key(id) {
                self.retired_kernel_ns += ns;
            }
        }
        let live: u64 = now.values().sum();
        self.last_by_prog = now;
        self.retired_kernel_ns + live
    }
}

impl CostSource for ProcessCost {
    fn totals(&mut self) -> CostTotals {
        CostTotals { agent_cpu_ns: own_cpu_ns(), kernel_ns: self.bpf_run_time_ns() }
    }
}

/// User + system CPU time of this process, ns.
pub fn own_cpu_ns() -> u64 {
    // SAFETY: `rusage` is plain old data and `getrusage` only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    let ns = |tv: libc::timeval| (tv.tv_sec.max(0) as u64) * 1_000_000_000 + (tv.tv_usec.max(0) as u64) * 1_000;
    ns(usage.ru_utime) + ns(usage.ru_stime)
}

/// Resident set size of this process, bytes.
pub fn own_rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

/// `prog_id -> run_time_ns` for every BPF program descriptor in `fdinfo_dir`.
/// Several descriptors of one program count once.
fn bpf_programs(fdinfo_dir: &Path) -> std::collections::HashMap<u32, u64> {
    let mut out = std::collections::HashMap::new();
    let Ok(entries) = std::fs::read_dir(fdinfo_dir) else { return out };
    for entry in entries.flatten() {
        // A descriptor may close between listing and reading: skip it.
        let Ok(text) = std::fs::read_to_string(entry.path()) else { continue };
        if let Some((id, ns)) = parse_fdinfo(&text) {
            out.insert(id, ns);
        }
    }
    out
}

/// `(prog_id, run_time_ns)` from the text of one fdinfo file, when it
/// describes a BPF program.
fn parse_fdinfo(text: &str) -> Option<(u32, u64)> {
    let mut id = None;
    let mut run_time = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        match key.trim() {
            "prog_id" => id = value.trim().parse().ok(),
            "run_time_ns" => run_time = value.trim().parse().ok(),
            _ => {}
        }
    }
    Some((id?, run_time.unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROG_FDINFO: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t2085\nprog_type:\t7\nprog_jited:\t1\n\
        prog_tag:\t8b6e3b4a5c2d1e0f\nmemlock:\t4096\nprog_id:\t412\nrun_time_ns:\t183340\nrun_cnt:\t1027\n\
        recursion_misses:\t0\nverified_insns:\t311\n";
    const MAP_FDINFO: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t2085\nmap_type:\t4\nkey_size:\t4\n\
        value_size:\t4\nmax_entries:\t2\nmap_flags:\t0x0\nmap_extra:\t0x0\nmemlock:\t4096\nmap_id:\t77\nfrozen:\t0\n";

    #[test]
    fn fdinfo_of_programs_and_others() {
        assert_eq!(parse_fdinfo(PROG_FDINFO), Some((412, 183_340)));
        assert_eq!(parse_fdinfo(MAP_FDINFO), None);
        assert_eq!(parse_fdinfo("pos:\t0\nflags:\t02\n"), None);
    }

    #[test]
    fn run_time_survives_closed_programs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fdinfo = dir.path().join("fdinfo");
        std::fs::create_dir(&fdinfo).expect("mkdir");
        std::fs::write(fdinfo.join("5"), PROG_FDINFO).expect("write");
        std::fs::write(fdinfo.join("6"), PROG_FDINFO).expect("write"); // same program twice
        std::fs::write(fdinfo.join("7"), MAP_FDINFO).expect("write");
        let mut cost = ProcessCost::new(dir.path());
        assert_eq!(cost.bpf_run_time_ns(), 183_340);
        std::fs::remove_file(fdinfo.join("5")).expect("rm");
        std::fs::remove_file(fdinfo.join("6")).expect("rm");
        assert_eq!(cost.bpf_run_time_ns(), 183_340, "a detached program's time still counts");
    }

    #[test]
    fn own_process_measures() {
        let before = own_cpu_ns();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(own_cpu_ns() >= before);
        assert!(own_rss_bytes() > 0);
    }
}
