//! Start-up checks: can this node run Aperture's probes?
//!
//! [`check`] runs every check in order and stops at the first failure, with
//! a message that says what failed, the value found and what to do. Each
//! failure has its own process exit code ([`PreflightError::exit_code`]):
//!
//! | code | failure |
//! |------|---------|
//! | 10 | kernel older than 5.10 |
//! | 11 | kernel release unreadable |
//! | 12 | no kernel BTF |
//! | 13 | tracefs/debugfs not mounted and cannot be mounted |
//! | 14 | missing privileges (CAP_BPF + CAP_PERFMON, or CAP_SYS_ADMIN) |
//! | 15 | perf_event_paranoid too strict |

use std::ffi::CStr;
use std::path::Path;

/// The oldest kernel Aperture supports.
pub const MIN_KERNEL: (u32, u32) = (5, 10);

pub(crate) const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS: &str = "/sys/kernel/debug";
const PARANOID_PATH: &str = "/proc/sys/kernel/perf_event_paranoid";

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Why the node cannot run the probes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreflightError {
    /// The running kernel is older than [`MIN_KERNEL`].
    #[error(
        "kernel {release} is older than 5.10, the oldest Aperture supports; run the agent on nodes with Linux 5.10 or newer"
    )]
    KernelTooOld {
        /// `uname -r`.
        release: String,
    },
    /// The kernel release string could not be read or parsed.
    #[error("cannot tell the kernel version from release {release:?}; Aperture needs Linux 5.10 or newer")]
    KernelUnknown {
        /// What uname returned (empty if it failed).
        release: String,
    },
    /// No kernel BTF, which CO-RE relocation needs.
    #[error(
        "{path} is missing: the kernel was built without BTF (CONFIG_DEBUG_INFO_BTF=y), which Aperture needs; use a distribution kernel with BTF (5.10+ in Debian 11+, Ubuntu 20.10+, RHEL 8.2+)"
    )]
    NoBtf {
        /// The path checked.
        path: String,
    },
    /// Neither tracefs nor debugfs is mounted and mounting failed.
    #[error(
        "tracefs is not mounted at {TRACEFS} (nor debugfs at {DEBUGFS}) and mounting it failed ({reason}); mount it with `mount -t tracefs none {TRACEFS}`, or in Kubernetes mount the host's /sys/kernel/tracing and /sys/kernel/debug into the agent"
    )]
    NoTracefs {
        /// Why mounting failed.
        reason: String,
    },
    /// The process lacks the capabilities to load BPF and open perf events.
    #[error(
        "missing privileges: effective capabilities {cap_eff:#x} lack {missing}; run the agent as root, or grant CAP_BPF, CAP_PERFMON (and CAP_SYS_RESOURCE on kernels before 5.11) — in Kubernetes set securityContext.privileged or add these capabilities"
    )]
    MissingPrivileges {
        /// CapEff from /proc/self/status.
        cap_eff: u64,
        /// The capabilities missing, e.g. `CAP_BPF, CAP_PERFMON`.
        missing: String,
    },
    /// perf_event_paranoid forbids system-wide perf events for this process.
    #[error("kernel.perf_event_paranoid is {value}, which forbids system-wide sampling for this process; {advice}")]
    PerfParanoid {
        /// The value read.
        value: i32,
        /// What to change, given the capabilities the process has.
        advice: &'static str,
    },
}

impl PreflightError {
    /// The process exit code for this failure (see the module table).
    pub fn exit_code(&self) -> i32 {
        match self {
            PreflightError::KernelTooOld { .. } => 10,
            PreflightError::KernelUnknown { .. } => 11,
            PreflightError::NoBtf { .. } => 12,
            PreflightError::NoTracefs { .. } => 13,
            PreflightError::MissingPrivileges { .. } => 14,
            PreflightError::PerfParanoid { .. } => 15,
        }
    }
}

/// What the checks found on a node that passes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeReport {
    /// `uname -r`.
    pub kernel_release: String,
    /// Parsed (major, minor).
    pub kernel_version: (u32, u32),
    /// Where tracefs is reachable.
    pub tracefs: String,
    /// Whether this check mounted tracefs itself.
    pub mounted_tracefs: bool,
    /// CapEff.
    pub cap_eff: u64,
    /// kernel.perf_event_paranoid.
    pub perf_event_paranoid: i32,
}

/// Runs every check; mounts tracefs (or debugfs) when missing and allowed.
pub fn check() -> Result<NodeReport, PreflightError> {
    let release = kernel_release();
    let kernel_version = check_kernel(&release)?;
    if !Path::new(BTF_PATH).exists() {
        return Err(PreflightError::NoBtf { path: BTF_PATH.to_owned() });
    }
    let cap_eff = read_cap_eff().unwrap_or(0);
    check_capabilities(cap_eff)?;
    let (tracefs, mounted_tracefs) = ensure_tracefs()?;
    let perf_event_paranoid =
        std::fs::read_to_string(PARANOID_PATH).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(2);
    check_paranoid(perf_event_paranoid, cap_eff)?;
    Ok(NodeReport { kernel_release: release, kernel_version, tracefs, mounted_tracefs, cap_eff, perf_event_paranoid })
}

fn kernel_release() -> String {
    // SAFETY: utsname is plain data; uname fills it and returns 0 on success.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return String::new();
    }
    // SAFETY: on success `release` is a NUL-terminated string inside `uts`.
    unsafe { CStr::from_ptr(uts.release.as_ptr()) }.to_string_lossy().into_owned()
}

/// Parses `major.minor` from a kernel release such as `6.18.44-fc-v669`.
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Checks a release string against [`MIN_KERNEL`].
pub fn check_kernel(release: &str) -> Result<(u32, u32), PreflightError> {
    let v =
        parse_kernel_version(release).ok_or_else(|| PreflightError::KernelUnknown { release: release.to_owned() })?;
    if v < MIN_KERNEL {
        return Err(PreflightError::KernelTooOld { release: release.to_owned() });
    }
    Ok(v)
}

fn read_cap_eff() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

/// Extracts CapEff from the text of `/proc/<pid>/status`.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

/// CAP_SYS_ADMIN alone is enough; otherwise CAP_BPF and CAP_PERFMON are needed.
pub fn check_capabilities(cap_eff: u64) -> Result<(), PreflightError> {
    let has = |cap: u32| cap_eff & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return Ok(());
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(cap, _)| !has(*cap))
        .map(|(_, name)| name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::MissingPrivileges { cap_eff, missing: missing.join(", ") })
    }
}

/// With CAP_SYS_ADMIN the paranoid level does not apply. With CAP_PERFMON
/// levels up to 2 are fine, but 3 and above (a Debian and Ubuntu patch)
/// refuse perf events to everyone without CAP_SYS_ADMIN. Without either
/// capability, system-wide events need a level of 0 or lower.
pub fn check_paranoid(value: i32, cap_eff: u64) -> Result<(), PreflightError> {
    let has = |cap: u32| cap_eff & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return Ok(());
    }
    if has(CAP_PERFMON) {
        return if value <= 2 {
            Ok(())
        } else {
            Err(PreflightError::PerfParanoid {
                value,
                advice: "run `sysctl kernel.perf_event_paranoid=2` on the node, or run the agent with CAP_SYS_ADMIN (root)",
            })
        };
    }
    if value <= 0 {
        Ok(())
    } else {
        Err(PreflightError::PerfParanoid {
            value,
            advice: "grant the agent CAP_PERFMON (with CAP_BPF), or run it as root",
        })
    }
}

fn is_mounted(path: &str, fstype: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(path) && l.split(' ').nth(2) == Some(fstype)))
}

/// Returns where tracefs is reachable and whether it was mounted here.
fn ensure_tracefs() -> Result<(String, bool), PreflightError> {
    if is_mounted(TRACEFS, "tracefs") {
        return Ok((TRACEFS.to_owned(), false));
    }
    if is_mounted(DEBUGFS, "debugfs") && Path::new(&format!("{DEBUGFS}/tracing/events")).exists() {
        return Ok((format!("{DEBUGFS}/tracing"), false));
    }
    match mount("tracefs", TRACEFS) {
        Ok(()) => Ok((TRACEFS.to_owned(), true)),
        Err(e) => match mount("debugfs", DEBUGFS) {
            Ok(()) => Ok((format!("{DEBUGFS}/tracing"), true)),
            Err(_) => Err(PreflightError::NoTracefs { reason: e.to_string() }),
        },
    }
}

fn mount(fstype: &str, target: &str) -> std::io::Result<()> {
    let c = |s: &str| std::ffi::CString::new(s).map_err(std::io::Error::other);
    let (src, tgt, ty) = (c("none")?, c(target)?, c(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let ret = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) };
    if ret == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_are_parsed_and_compared() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.10.0-28-amd64"), Some((5, 10)));
        assert_eq!(parse_kernel_version("garbage"), None);
        assert!(check_kernel("5.10.0").is_ok());
        let old = check_kernel("5.4.0-150-generic").expect_err("too old");
        assert_eq!(old.exit_code(), 10);
        assert!(old.to_string().contains("5.4.0-150-generic is older than 5.10"));
        assert_eq!(check_kernel("").expect_err("unknown").exit_code(), 11);
    }

    #[test]
    fn capabilities_are_read_from_cap_eff() {
        let status = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert!(check_capabilities(0x1ff_ffff_ffff).is_ok());
        assert!(check_capabilities((1 << CAP_BPF) | (1 << CAP_PERFMON)).is_ok());
        let err = check_capabilities(1 << CAP_BPF).expect_err("no perfmon");
        assert_eq!(err, PreflightError::MissingPrivileges { cap_eff: 1 << CAP_BPF, missing: "CAP_PERFMON".into() });
        assert_eq!(err.exit_code(), 14);
    }

    #[test]
    fn paranoid_only_matters_without_perfmon() {
        assert!(check_paranoid(2, 1 << CAP_PERFMON).is_ok());
        assert!(check_paranoid(3, 1 << CAP_SYS_ADMIN).is_ok());
        let debian = check_paranoid(3, 1 << CAP_PERFMON).expect_err("level 3 needs CAP_SYS_ADMIN");
        assert!(debian.to_string().contains("kernel.perf_event_paranoid=2"), "{debian}");
        assert!(check_paranoid(-1, 0).is_ok());
        assert_eq!(check_paranoid(2, 0).expect_err("strict").exit_code(), 15);
    }

    #[test]
    fn exit_codes_are_distinct() {
        let all = [
            PreflightError::KernelTooOld { release: String::new() },
            PreflightError::KernelUnknown { release: String::new() },
            PreflightError::NoBtf { path: String::new() },
            PreflightError::NoTracefs { reason: String::new() },
            PreflightError::MissingPrivileges { cap_eff: 0, missing: String::new() },
            PreflightError::PerfParanoid { value: 3, advice: "" },
        ];
        let codes: std::collections::BTreeSet<i32> = all.iter().map(PreflightError::exit_code).collect();
        assert_eq!(codes.len(), all.len());
    }
}
