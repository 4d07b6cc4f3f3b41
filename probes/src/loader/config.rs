//! What to load and how: modes, frequency, thresholds, filter.

use std::path::PathBuf;
use std::time::Duration;

use aperture_core::model::Mode;

/// A set of [`Mode`]s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Modes(u8);

impl Modes {
    /// No mode.
    pub const NONE: Modes = Modes(0);
    /// Every mode (`APERTURE_MODE=all`).
    pub const ALL: Modes = Modes(0b111);

    /// The set holding only `mode`.
    pub fn only(mode: Mode) -> Modes {
        Modes(1 << mode as u8)
    }

    /// This set plus `mode`.
    #[must_use]
    pub fn with(self, mode: Mode) -> Modes {
        Modes(self.0 | 1 << mode as u8)
    }

    /// Whether `mode` is in the set.
    pub fn contains(self, mode: Mode) -> bool {
        self.0 & (1 << mode as u8) != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The modes in the set, in [`Mode::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Mode> {
        Mode::ALL.into_iter().filter(move |m| self.contains(*m))
    }

    /// Parses `APERTURE_MODE`: `all` or a comma-separated list of mode names.
    /// Returns the unknown name on failure.
    pub fn parse(s: &str) -> Result<Modes, String> {
        let mut set = Modes::NONE;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == "all" {
                set = Modes::ALL;
            } else {
                set = set.with(Mode::parse(part).ok_or_else(|| part.to_owned())?);
            }
        }
        Ok(set)
    }
}

impl FromIterator<Mode> for Modes {
    fn from_iter<I: IntoIterator<Item = Mode>>(iter: I) -> Modes {
        iter.into_iter().fold(Modes::NONE, Modes::with)
    }
}

/// Only record these processes. Empty lists with a filter set record nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Thread group ids (user-space pids) in the host pid namespace.
    pub pids: Vec<u32>,
    /// cgroup v2 ids (the inode number of the cgroup directory), as returned
    /// by `bpf_get_current_cgroup_id`: the task's own (leaf) cgroup.
    pub cgroups: Vec<u64>,
}

/// How user stacks are walked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnwindMode {
    /// Unwind tables built from `.eh_frame`, frame pointers where a mapping
    /// has none (the default).
    #[default]
    Tables,
    /// Frame pointers only (`bpf_get_stack`), for comparison.
    FramePointers,
}

/// Unwind tables: walker choice, disk cache, memory budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnwindSettings {
    /// Tables or frame pointers.
    pub mode: UnwindMode,
    /// Where built tables are kept across restarts; `None` keeps none.
    pub cache_dir: Option<PathBuf>,
    /// Bytes of table rows loaded into the kernel at most.
    pub budget_bytes: u64,
    /// Bytes of files the disk cache keeps at most (least recently used go first).
    pub cache_max_bytes: u64,
}

impl Default for UnwindSettings {
    fn default() -> Self {
        UnwindSettings {
            mode: UnwindMode::Tables,
            cache_dir: None,
            budget_bytes: 32 << 20,
            cache_max_bytes: aperture_symbolize::unwind::DEFAULT_CACHE_BYTES,
        }
    }
}

/// How [`crate::Probes::load`] configures the programs.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// Which programs to load.
    pub modes: Modes,
    /// cpu mode: samples per second per CPU (`APERTURE_FREQ`).
    pub frequency_hz: u64,
    /// lock mode: waits at least this long are also sent individually.
    pub lock_threshold: Duration,
    /// syscall mode: calls at least this long are sent individually.
    pub slow_syscall_threshold: Duration,
    /// Record only these processes; `None` records everything.
    pub filter: Option<Filter>,
    /// Never record the calling process (the agent's own syscalls and locks).
    pub ignore_self: bool,
    /// How user stacks are walked.
    pub unwind: UnwindSettings,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            modes: Modes::ALL,
            frequency_hz: 99,
            lock_threshold: Duration::from_millis(1),
            slow_syscall_threshold: Duration::from_millis(10),
            filter: None,
            ignore_self: true,
            unwind: UnwindSettings::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_like_aperture_mode() {
        assert_eq!(Modes::parse("all"), Ok(Modes::ALL));
        assert_eq!(Modes::parse("cpu, syscall"), Ok(Modes::only(Mode::Cpu).with(Mode::Syscall)));
        assert_eq!(Modes::parse("gpu"), Err("gpu".to_owned()));
        assert_eq!(Modes::ALL.iter().collect::<Vec<_>>(), Mode::ALL.to_vec());
        assert!(Modes::parse("").map(Modes::is_empty).unwrap_or(false));
    }
}
