//! Container identity from `/proc/<pid>/cgroup`.
//!
//! The file has one `hierarchy-id:controllers:path` line per hierarchy:
//! a single `0::/path` line on cgroup v2, one line per controller on v1.
//! Container runtimes put the container id (64 hex digits) in the last
//! component of the path, in one of these shapes:
//!
//! | runtime / driver | last component(s) |
//! |---|---|
//! | containerd, systemd driver | `.../kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope` |
//! | containerd, cgroupfs driver | `.../kubepods/burstable/pod<uid>/<id>` |
//! | containerd, old systemd layout | `.../kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>` |
//! | CRI-O, systemd driver | `.../crio-<id>.scope` (and `crio-conmon-<id>.scope` for its monitor, not a container) |
//! | CRI-O, cgroupfs driver | `.../pod<uid>/crio-<id>` |
//! | Docker, systemd driver | `/system.slice/docker-<id>.scope` |
//! | Docker, cgroupfs driver | `/docker/<id>` |
//! | Podman | `.../libpod-<id>.scope` |
//!
//! The Kubernetes pod uid is taken from the `pod<uid>` component when
//! present (the systemd driver writes its dashes as underscores).

use std::fmt;

/// Length of a container id in hex digits.
const ID_LEN: usize = 64;

/// Prefixes runtimes put before the id in a path component.
const RUNTIME_PREFIXES: [&str; 4] = ["cri-containerd-", "crio-", "docker-", "libpod-"];

/// A container the process runs in, as far as its cgroup path tells.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct ContainerRef {
    /// Container id: 64 lower-case hex digits, as the runtime and the
    /// Kubernetes API (`containerStatuses[].containerID` after the `://`) show it.
    pub id: String,
    /// Kubernetes pod uid with dashes, when the path contains a pod component.
    pub pod_uid: Option<String>,
}

/// What `/proc/<pid>/cgroup` says about a process.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CgroupInfo {
    /// The container, when the process runs in one.
    pub container: Option<ContainerRef>,
    /// The cgroup v2 path (the `0::` line), when there is one.
    pub unified_path: Option<String>,
}

/// A line of `/proc/<pid>/cgroup` that does not have the
/// `hierarchy-id:controllers:path` shape.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed cgroup line `{line}`: expected hierarchy-id:controllers:path")]
pub struct MalformedCgroupLine {
    /// The offending line, truncated to 200 bytes.
    pub line: String,
}

impl fmt::Display for ContainerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// Parses the contents of `/proc/<pid>/cgroup`. Malformed lines are skipped
/// and returned so the caller can count them; the rest still count.
pub fn parse_proc_cgroup(contents: &str) -> (CgroupInfo, Vec<MalformedCgroupLine>) {
    let mut info = CgroupInfo::default();
    let mut malformed = Vec::new();
    for line in contents.lines().filter(|l| !l.trim().is_empty()) {
        let mut parts = line.splitn(3, ':');
        let (Some(hierarchy), Some(_controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            malformed.push(MalformedCgroupLine { line: truncate(line, 200) });
            continue;
        };
        if hierarchy.parse::<u32>().is_err() || !path.starts_with('/') {
            malformed.push(MalformedCgroupLine { line: truncate(line, 200) });
            continue;
        }
        if hierarchy == "0" {
            info.unified_path = Some(path.to_owned());
        }
        if info.container.is_none() {
            info.container = container_from_path(path);
        }
    }
    (info, malformed)
}

/// The container a cgroup path belongs to, if any.
pub fn container_from_path(path: &str) -> Option<ContainerRef> {
    let mut components = path.rsplit('/').filter(|c| !c.is_empty());
    // The id is in the innermost component; some runtimes nest one more
    // level below the container (e.g. `.../<id>/init.scope` for systemd in
    // a container), so look at the last two.
    let id = components.by_ref().take(2).find_map(id_from_component)?;
    let pod_uid = path.split(['/', ':']).find_map(pod_uid_from_component);
    Some(ContainerRef { id, pod_uid })
}

fn id_from_component(component: &str) -> Option<String> {
    // Old containerd systemd layout: `<slice>:cri-containerd:<id>`.
    let component = component.rsplit(':').next().unwrap_or(component);
    let component = component.strip_suffix(".scope").unwrap_or(component);
    if component.starts_with("crio-conmon-") {
        return None;
    }
    let component = RUNTIME_PREFIXES.iter().find_map(|p| component.strip_prefix(p)).unwrap_or(component);
    is_container_id(component).then(|| component.to_ascii_lowercase())
}

fn is_container_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn pod_uid_from_component(component: &str) -> Option<String> {
    // systemd driver: `kubepods-besteffort-pod<uid_with_underscores>.slice`;
    // cgroupfs driver: `pod<uid>`.
    let component = component.strip_suffix(".slice").unwrap_or(component);
    let start = component.rfind("pod")?;
    let uid = &component[start + 3..];
    let uid = uid.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

fn is_uid(s: &str) -> bool {
    // 8-4-4-4-12 hex digits.
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f5e2a1b4c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f";
    const UID: &str = "8a3b6c1d-2e4f-4a5b-9c8d-7e6f5a4b3c2d";
    const UID_UNDERSCORES: &str = "8a3b6c1d_2e4f_4a5b_9c8d_7e6f5a4b3c2d";

    /// (description, file contents, expected container id, expected pod uid)
    fn cases() -> Vec<(&'static str, String, Option<&'static str>, Option<&'static str>)> {
        vec![
            (
                "v2, containerd, systemd driver",
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_UNDERSCORES}.slice/cri-containerd-{ID}.scope\n"
                ),
                Some(ID),
                Some(UID),
            ),
            (
                "v2, containerd, cgroupfs driver",
                format!("0::/kubepods/besteffort/pod{UID}/{ID}\n"),
                Some(ID),
                Some(UID),
            ),
            (
                "v2, guaranteed QoS (no QoS slice), systemd driver",
                format!("0::/kubepods.slice/kubepods-pod{UID_UNDERSCORES}.slice/cri-containerd-{ID}.scope\n"),
                Some(ID),
                Some(UID),
            ),
            (
                "v2, CRI-O, systemd driver",
                format!(
                    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_UNDERSCORES}.slice/crio-{ID}.scope\n"
                ),
                Some(ID),
                Some(UID),
            ),
            (
                "v2, CRI-O monitor process is not a container",
                format!(
                    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_UNDERSCORES}.slice/crio-conmon-{ID}.scope\n"
                ),
                None,
                None,
            ),
            ("v2, CRI-O, cgroupfs driver", format!("0::/kubepods/burstable/pod{UID}/crio-{ID}\n"), Some(ID), Some(UID)),
            ("v2, Docker, systemd driver", format!("0::/system.slice/docker-{ID}.scope\n"), Some(ID), None),
            ("v2, Docker, cgroupfs driver", format!("0::/docker/{ID}\n"), Some(ID), None),
            (
                "v2, systemd running inside a container",
                format!("0::/system.slice/docker-{ID}.scope/init.scope\n"),
                Some(ID),
                None,
            ),
            (
                "v2, Podman",
                format!("0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope\n"),
                Some(ID),
                None,
            ),
            (
                "v1, containerd, cgroupfs driver (several hierarchies)",
                format!(
                    "12:pids:/kubepods/besteffort/pod{UID}/{ID}\n11:memory:/kubepods/besteffort/pod{UID}/{ID}\n1:name=systemd:/kubepods/besteffort/pod{UID}/{ID}\n0::/\n"
                ),
                Some(ID),
                Some(UID),
            ),
            (
                "v1, containerd, old systemd layout",
                format!(
                    "10:cpu,cpuacct:/system.slice/containerd.service/kubepods-besteffort-pod{UID_UNDERSCORES}.slice:cri-containerd:{ID}\n"
                ),
                Some(ID),
                Some(UID),
            ),
            (
                "v1, Docker, cgroupfs driver",
                format!("4:cpu,cpuacct:/docker/{ID}\n3:memory:/docker/{ID}\n"),
                Some(ID),
                None,
            ),
            ("v2, host process in a service", "0::/system.slice/sshd.service\n".to_owned(), None, None),
            (
                "v2, host process in a user session",
                "0::/user.slice/user-0.slice/session-3.scope\n".to_owned(),
                None,
                None,
            ),
            ("v2, root cgroup (kernel thread)", "0::/\n".to_owned(), None, None),
            (
                "v2, pod-level process (pause) without a container component",
                format!(
                    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_UNDERSCORES}.slice\n"
                ),
                None,
                None,
            ),
        ]
    }

    #[test]
    fn real_path_formats() {
        for (what, contents, id, uid) in cases() {
            let (info, malformed) = parse_proc_cgroup(&contents);
            assert!(malformed.is_empty(), "{what}: {malformed:?}");
            assert_eq!(info.container.as_ref().map(|c| c.id.as_str()), id, "{what}");
            assert_eq!(info.container.as_ref().and_then(|c| c.pod_uid.as_deref()), uid, "{what}");
        }
    }

    #[test]
    fn unified_path_is_kept() {
        let (info, _) = parse_proc_cgroup("0::/system.slice/sshd.service\n");
        assert_eq!(info.unified_path.as_deref(), Some("/system.slice/sshd.service"));
        let (info, _) = parse_proc_cgroup("4:cpu,cpuacct:/docker/x\n");
        assert_eq!(info.unified_path, None);
    }

    #[test]
    fn upper_case_ids_are_normalized() {
        let (info, _) = parse_proc_cgroup(&format!("0::/docker/{}\n", ID.to_ascii_uppercase()));
        assert_eq!(info.container.map(|c| c.id), Some(ID.to_owned()));
    }

    #[test]
    fn malformed_lines_are_reported_not_fatal() {
        let contents = format!("garbage\nx:y:/z\n0::/docker/{ID}\n12:cpu:relative\n");
        let (info, malformed) = parse_proc_cgroup(&contents);
        assert_eq!(info.container.map(|c| c.id), Some(ID.to_owned()));
        assert_eq!(malformed.len(), 3);
        assert_eq!(malformed[0].to_string(), "malformed cgroup line `garbage`: expected hierarchy-id:controllers:path");
    }

    #[test]
    fn near_misses_are_not_ids() {
        for path in [
            "/docker/3f5e2a1b",                      // too short
            &format!("/docker/{}z", &ID[..63]),      // not hex
            &format!("/docker/{ID}0"),               // too long
            "/kubepods/besteffort/podnot-a-uid/abc", // neither
        ] {
            assert_eq!(container_from_path(path), None, "{path}");
        }
    }

    #[test]
    fn long_lines_are_truncated_in_errors() {
        let line = "x".repeat(1000);
        let (_, malformed) = parse_proc_cgroup(&line);
        assert!(malformed[0].line.len() < 220);
    }
}
