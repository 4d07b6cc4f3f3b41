//! Who a sample belongs to: node, process, container, pod.
//!
//! The kernel gives pid and `comm`; the container comes from
//! `/proc/<pid>/cgroup` ([`cgroup`]), namespace, pod and container name
//! from the Kubernetes pod index ([`crate::kube`]). Results are cached per
//! pid, so `/proc` is read once per process (again when its `comm` changes
//! — an exec or a reused pid — or after [`REFRESH_NS`]), and the pod
//! fields are recomputed only when the pod index changes.

pub mod cgroup;
mod node;

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;

use aperture_core::model::Target;

use crate::kube::PodView;
use crate::selection::{Candidate, Selection};
use cgroup::{CgroupInfo, parse_proc_cgroup};

pub use node::node_name;

/// How long a process's cgroup is trusted before `/proc` is read again, ns.
pub const REFRESH_NS: u64 = 60_000_000_000;

/// Processes not seen for this long are forgotten, ns.
pub const FORGET_NS: u64 = 300_000_000_000;

/// Length of a container id shown when the container name is unknown.
const SHORT_ID: usize = 12;

/// Counters of attribution, exported as metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttributionStats {
    /// `/proc/<pid>/cgroup` reads.
    pub proc_reads: u64,
    /// Reads that failed because the process had already exited.
    pub proc_gone: u64,
    /// Reads that failed for another reason.
    pub proc_errors: u64,
    /// Malformed lines in `/proc/<pid>/cgroup`.
    pub malformed_lines: u64,
    /// Processes in a container the pod index does not know (yet).
    pub unknown_containers: u64,
}

/// The attribution of one process.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// Labels of the process.
    pub target: Target,
    /// Whether the selection profiles it.
    pub selected: bool,
}

#[derive(Debug)]
struct Entry {
    resolved: Resolved,
    cgroup: CgroupInfo,
    read_at_ns: u64,
    seen_at_ns: u64,
    pod_generation: u64,
}

impl Entry {
    fn new(pid: u32, comm: &str, cgroup: CgroupInfo, now_ns: u64, generation: u64) -> Entry {
        Entry {
            resolved: Resolved {
                target: Target { pid, process: comm.to_owned(), ..Target::default() },
                selected: false,
            },
            cgroup,
            read_at_ns: now_ns,
            seen_at_ns: now_ns,
            // Differs from the current generation so the pod fields get filled.
            pod_generation: generation.wrapping_add(1),
        }
    }
}

/// Resolves and caches the [`Target`] of each pid.
#[derive(Debug)]
pub struct Attributor {
    proc_root: PathBuf,
    pods: Option<PodView>,
    selection: Selection,
    entries: HashMap<u32, Entry>,
    stats: AttributionStats,
    last_sweep_ns: u64,
}

impl Attributor {
    /// An attributor reading `proc_root` (normally `/proc`), looking pods up
    /// in `pods` (`None` outside Kubernetes) and applying `selection`.
    pub fn new(proc_root: impl Into<PathBuf>, pods: Option<PodView>, selection: Selection) -> Attributor {
        Attributor {
            proc_root: proc_root.into(),
            pods,
            selection,
            entries: HashMap::new(),
            stats: AttributionStats::default(),
            last_sweep_ns: 0,
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> AttributionStats {
        self.stats
    }

    /// Number of processes cached.
    pub fn cached(&self) -> usize {
        self.entries.len()
    }

    /// The attribution of `pid` whose kernel `comm` is `comm`, at monotonic time `now_ns`.
    pub fn resolve(&mut self, pid: u32, comm: &str, now_ns: u64) -> &Resolved {
        let generation = self.pods.as_mut().map_or(0, PodView::refresh);
        let fresh = self
            .entries
            .get(&pid)
            .is_some_and(|e| e.resolved.target.process == comm && now_ns.saturating_sub(e.read_at_ns) < REFRESH_NS);
        if !fresh {
            let cgroup = self.read_cgroup(pid);
            self.entries.insert(pid, Entry::new(pid, comm, cgroup, now_ns, generation));
        }
        // Present after the insert above; the fallback keeps this total.
        let entry =
            self.entries.entry(pid).or_insert_with(|| Entry::new(pid, comm, CgroupInfo::default(), now_ns, generation));
        entry.seen_at_ns = now_ns;
        if entry.pod_generation != generation {
            entry.pod_generation = generation;
            fill_pod_fields(entry, self.pods.as_ref(), &self.selection, &mut self.stats);
        }
        &entry.resolved
    }

    /// Forgets processes not seen for [`FORGET_NS`]; cheap to call often.
    pub fn sweep(&mut self, now_ns: u64) {
        if now_ns.saturating_sub(self.last_sweep_ns) < FORGET_NS / 10 {
            return;
        }
        self.last_sweep_ns = now_ns;
        self.entries.retain(|_, e| now_ns.saturating_sub(e.seen_at_ns) < FORGET_NS);
    }

    fn read_cgroup(&mut self, pid: u32) -> CgroupInfo {
        self.stats.proc_reads += 1;
        let path = self.proc_root.join(pid.to_string()).join("cgroup");
        match std::fs::read_to_string(&path) {
            Ok(contents) => {
                let (info, malformed) = parse_proc_cgroup(&contents);
                if let Some(first) = malformed.first() {
                    self.stats.malformed_lines += malformed.len() as u64;
                    tracing::debug!("{}: {first}", path.display());
                }
                info
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
                self.stats.proc_gone += 1;
                CgroupInfo::default()
            }
            Err(e) => {
                self.stats.proc_errors += 1;
                tracing::debug!("cannot read {}: {e}", path.display());
                CgroupInfo::default()
            }
        }
    }
}

fn fill_pod_fields(entry: &mut Entry, pods: Option<&PodView>, selection: &Selection, stats: &mut AttributionStats) {
    let target = &mut entry.resolved.target;
    target.namespace.clear();
    target.pod.clear();
    target.container.clear();
    let index = pods.map(PodView::index);
    let mut labels = None;
    if let Some(container) = &entry.cgroup.container {
        let by_id = index.and_then(|i| i.container(&container.id));
        let by_pod = || index.and_then(|i| container.pod_uid.as_deref().and_then(|uid| i.pod(uid)));
        match by_id.or_else(by_pod) {
            Some(meta) => {
                target.namespace.clone_from(&meta.namespace);
                target.pod.clone_from(&meta.pod);
                target.container =
                    if meta.container.is_empty() { short_id(&container.id) } else { meta.container.clone() };
                labels = Some(meta.labels.clone());
            }
            None => {
                if index.is_some() {
                    stats.unknown_containers += 1;
                }
                target.container = short_id(&container.id);
            }
        }
    }
    let candidate = Candidate {
        pid: target.pid,
        process: &target.process,
        cgroup_path: entry.cgroup.unified_path.as_deref(),
        pod: labels.as_deref().map(|l| (target.namespace.as_str(), l)),
    };
    entry.resolved.selected = selection.selects(&candidate);
}

fn short_id(id: &str) -> String {
    id.chars().take(SHORT_ID).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::{PodDirectory, PodIndex, PodList};
    use aperture_core::config::Filter;
    use std::sync::Arc;

    const WEB_ID: &str = "9c1f0e4a0d0e2b8f5b7f7e8a3c9d2e1f0a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d";

    fn fake_proc(entries: &[(u32, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (pid, cgroup) in entries {
            let p = dir.path().join(pid.to_string());
            std::fs::create_dir_all(&p).expect("mkdir");
            std::fs::write(p.join("cgroup"), cgroup).expect("write");
        }
        dir
    }

    fn pods() -> Arc<PodDirectory> {
        let list: PodList =
            serde_json::from_str(include_str!("../../tests/fixtures/k8s/podlist.json")).expect("fixture");
        let dir = Arc::new(PodDirectory::default());
        dir.publish(PodIndex::from_pods(&list.items));
        dir
    }

    #[test]
    fn host_container_and_pod_processes() {
        let other = "ab".repeat(32);
        let proc = fake_proc(&[
            (1, "0::/init.scope\n"),
            (
                100,
                &format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5f0c8b1e_6d2a_4c3b_9e8f_1a2b3c4d5e6f.slice/cri-containerd-{WEB_ID}.scope\n"
                ),
            ),
            (200, &format!("0::/system.slice/docker-{other}.scope\n")),
        ]);
        let dir = pods();
        let mut a = Attributor::new(proc.path(), Some(dir.view()), Selection::default());
        let host = a.resolve(1, "systemd", 0).clone();
        assert_eq!(host.target, Target { pid: 1, process: "systemd".into(), ..Target::default() });
        assert!(host.selected);
        let web = a.resolve(100, "nginx", 0).target.clone();
        assert_eq!((web.namespace.as_str(), web.pod.as_str(), web.container.as_str()), ("shop", "web-7d9f8", "nginx"));
        let docker = a.resolve(200, "redis-server", 0).target.clone();
        assert_eq!(docker.container, "abababababab", "unknown container shows its short id");
        assert_eq!(docker.namespace, "");
        assert_eq!(a.stats().unknown_containers, 1);
        let gone = a.resolve(999, "exited", 0).target.clone();
        assert_eq!(gone.container, "");
        assert_eq!(a.stats().proc_gone, 1);
        assert_eq!(a.stats().proc_reads, 4);
        // Cached: no new reads for known processes.
        a.resolve(100, "nginx", 1);
        assert_eq!(a.stats().proc_reads, 4);
        // exec (new comm) or age re-reads.
        a.resolve(100, "nginx-worker", 2);
        a.resolve(1, "systemd", REFRESH_NS + 1);
        assert_eq!(a.stats().proc_reads, 6);
    }

    #[test]
    fn selection_by_namespace() {
        let proc = fake_proc(&[
            (1, "0::/init.scope\n"),
            (100, &format!("0::/kubepods/burstable/pod5f0c8b1e-6d2a-4c3b-9e8f-1a2b3c4d5e6f/{WEB_ID}\n")),
        ]);
        let filter = Filter { namespaces: vec!["shop".into()], ..Filter::default() };
        let dir = pods();
        let mut a = Attributor::new(proc.path(), Some(dir.view()), Selection::new(&filter).expect("valid"));
        assert!(!a.resolve(1, "systemd", 0).selected);
        assert!(a.resolve(100, "nginx", 0).selected);
    }

    #[test]
    fn pod_changes_reach_cached_processes() {
        let proc =
            fake_proc(&[(100, &format!("0::/kubepods/burstable/pod5f0c8b1e-6d2a-4c3b-9e8f-1a2b3c4d5e6f/{WEB_ID}\n"))]);
        let dir = Arc::new(PodDirectory::default());
        let mut a = Attributor::new(proc.path(), Some(dir.view()), Selection::default());
        assert_eq!(a.resolve(100, "nginx", 0).target.pod, "");
        let list: PodList =
            serde_json::from_str(include_str!("../../tests/fixtures/k8s/podlist.json")).expect("fixture");
        dir.publish(PodIndex::from_pods(&list.items));
        assert_eq!(a.resolve(100, "nginx", 1).target.pod, "web-7d9f8");
        assert_eq!(a.stats().proc_reads, 1, "pod change does not re-read /proc");
    }

    #[test]
    fn sweep_forgets_idle_processes() {
        let proc = fake_proc(&[(1, "0::/\n"), (2, "0::/\n")]);
        let mut a = Attributor::new(proc.path(), None, Selection::default());
        a.resolve(1, "a", 0);
        a.resolve(2, "b", FORGET_NS);
        a.sweep(FORGET_NS + 1);
        assert_eq!(a.cached(), 1);
    }
}
