//! Which optional kernel features this node has, and what Aperture does
//! without each: the table of `docs/deploy.md` ("Kernel features"), computed
//! for the running kernel so the agent can say at start-up which features are
//! off and why.
//!
//! A feature is judged by the kernel version it arrived in and, where a
//! distribution may have backported it, by what the node really shows
//! (tracefs events). [`report`] is pure over those inputs and unit-tested;
//! [`detect`] reads them from the node.

use std::fmt;
use std::path::Path;

use crate::preflight::{MIN_KERNEL, parse_kernel_version};

/// One optional kernel feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    /// Short name, as in the docs' table.
    pub name: &'static str,
    /// The first mainline kernel that has it.
    pub since: (u32, u32),
    /// What Aperture does on a kernel without it.
    pub without: &'static str,
}

/// Every optional feature, oldest first. The kernel floor itself
/// ([`MIN_KERNEL`]) is not here: below it the agent refuses to start.
pub const FEATURES: &[Feature] = &[
    Feature {
        name: "BTF-typed raw tracepoints (tp_btf)",
        since: (5, 5),
        without: "attaches the syscall and lock programs as raw tracepoints, then as classic tracepoints",
    },
    Feature {
        name: "kernel lock contention tracepoints (lock:contention_begin/end)",
        since: (5, 19),
        without: "records user-space lock waits (futex) only; kernel mutexes, rwsems and spinlocks are not seen",
    },
    Feature {
        name: "PROCMAP_QUERY",
        since: (6, 11),
        without: "reads /proc/<pid>/maps to find a sampled address's file (slower on a miss, same result)",
    },
];

/// Whether a feature is available on this node, and why not when it is not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureState {
    /// The feature.
    pub feature: Feature,
    /// `None` when available; otherwise why not.
    pub off_because: Option<String>,
}

impl fmt::Display for FeatureState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.off_because {
            None => write!(f, "{}: on", self.feature.name),
            Some(why) => write!(f, "{}: off ({why}); Aperture {}", self.feature.name, self.feature.without),
        }
    }
}

/// What the node shows besides its version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeEvidence {
    /// tracefs lists `lock/contention_begin` (it may be backported).
    pub lock_contention_events: bool,
}

/// The state of every feature for a kernel `release` and what the node
/// shows. An unreadable release counts as the floor.
pub fn report(release: &str, evidence: NodeEvidence) -> Vec<FeatureState> {
    let version = parse_kernel_version(release).unwrap_or(MIN_KERNEL);
    FEATURES
        .iter()
        .map(|&feature| {
            let by_version = version >= feature.since;
            let on = if feature.since == (5, 19) { by_version || evidence.lock_contention_events } else { by_version };
            let off_because = (!on).then(|| {
                let (major, minor) = feature.since;
                format!("kernel {release} is older than {major}.{minor}")
            });
            FeatureState { feature, off_because }
        })
        .collect()
}

/// Reads the evidence from the node: `tracefs` is where tracefs is mounted.
pub fn detect(release: &str, tracefs: &Path) -> Vec<FeatureState> {
    let evidence = NodeEvidence { lock_contention_events: tracefs.join("events/lock/contention_begin").exists() };
    report(release, evidence)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn off(states: &[FeatureState]) -> Vec<&'static str> {
        states.iter().filter(|s| s.off_because.is_some()).map(|s| s.feature.name).collect()
    }

    #[test]
    fn the_floor_kernel_lacks_the_newer_features_and_says_why() {
        let states = report("5.10.0-46-amd64", NodeEvidence::default());
        assert_eq!(off(&states).len(), 2, "lock contention and PROCMAP_QUERY: {states:?}");
        let lock = states.iter().find(|s| s.feature.name.contains("lock contention")).expect("listed");
        let line = lock.to_string();
        assert!(line.contains("off (kernel 5.10.0-46-amd64 is older than 5.19)"), "{line}");
        assert!(line.contains("futex"), "says what Aperture does instead: {line}");
    }

    #[test]
    fn newer_kernels_turn_features_on_by_version() {
        assert_eq!(off(&report("6.1.0-28-amd64", NodeEvidence::default())), ["PROCMAP_QUERY"]);
        assert!(off(&report("6.18.44", NodeEvidence::default())).is_empty());
    }

    #[test]
    fn a_backported_lock_tracepoint_counts() {
        let states = report("5.15.0-100-generic", NodeEvidence { lock_contention_events: true });
        assert_eq!(off(&states), ["PROCMAP_QUERY"]);
    }
}
