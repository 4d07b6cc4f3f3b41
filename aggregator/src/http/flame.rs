//! `GET /api/v1/flamegraph`: the merged profile as a flame-graph tree for the
//! web UI. It is the tree of `/api/v1/profile?format=json` with three more
//! fields per node, which the UI needs and the plain tree does not carry:
//!
//! - `kernel`: whether the frame is a kernel frame (drawn in its own hue);
//! - `count`: samples, waits or slow calls through the node;
//! - `ns`: CPU time, wait time or call time through the node, in ns (for CPU
//!   profiles this is samples × sampling period, so the UI can show CPU time
//!   next to sample counts).
//!
//! `value` and `self` are exactly those of the plain tree (samples for CPU,
//! ns for lock and syscall profiles), so shares agree between the two.

use std::collections::{BTreeMap, HashMap};

use aperture_core::model::Mode;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use super::AppState;
use super::api::ApiError;
use super::params::{FILTERS, Params};
use crate::query::{self, Profile, profile_unit};

/// A node of the UI's flame-graph tree.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FlameGraphNode {
    /// Function name (`root` for the root).
    pub name: String,
    /// Whether the frame runs in the kernel.
    pub kernel: bool,
    /// Value of every stack through this node (samples for CPU, ns otherwise).
    pub value: u64,
    /// Value of the stacks ending at this node.
    #[serde(rename = "self")]
    pub self_value: u64,
    /// Samples, waits or slow calls through this node.
    pub count: u64,
    /// CPU, wait or call time through this node, ns.
    pub ns: u64,
    /// Callees, by name.
    pub children: Vec<FlameGraphNode>,
}

#[derive(Default)]
struct Building {
    kernel: bool,
    value: u64,
    self_value: u64,
    count: u64,
    ns: u64,
    children: BTreeMap<String, Building>,
}

impl Building {
    fn add(&mut self, value: u64, count: u64, ns: u64) {
        self.value = self.value.saturating_add(value);
        self.count = self.count.saturating_add(count);
        self.ns = self.ns.saturating_add(ns);
    }

    fn finish(self, name: String) -> FlameGraphNode {
        FlameGraphNode {
            name,
            kernel: self.kernel,
            value: self.value,
            self_value: self.self_value,
            count: self.count,
            ns: self.ns,
            children: self.children.into_iter().map(|(n, b)| b.finish(n)).collect(),
        }
    }
}

/// Builds the tree: children merged by name and sorted by name, as in
/// [`query::flame_tree`].
pub fn flame_graph(profile: &Profile, mode: Mode) -> FlameGraphNode {
    let mut root = Building::default();
    for s in &profile.stacks {
        let v = s.value(mode);
        if v == 0 {
            continue;
        }
        root.add(v, s.count, s.total_ns);
        // `names` is root first, `frames` leaf first; they pair up when the
        // store knew the stack's frames.
        let kernel_at = |i: usize| s.frames.len() == s.names.len() && s.frames[s.frames.len() - 1 - i].kernel;
        let mut node = &mut root;
        for (i, name) in s.names.iter().enumerate() {
            node = node.children.entry(name.clone()).or_default();
            node.kernel |= kernel_at(i);
            node.add(v, s.count, s.total_ns);
        }
        node.self_value = node.self_value.saturating_add(v);
    }
    root.finish("root".to_owned())
}

/// What one `count` stands for in a mode.
fn count_unit(mode: Mode) -> &'static str {
    match mode {
        Mode::Cpu => "samples",
        Mode::Lock => "waits",
        Mode::Syscall => "calls",
    }
}

/// `GET /api/v1/flamegraph`: same parameters as `/api/v1/profile` without `format`.
pub(crate) async fn flamegraph(
    State(state): State<AppState>,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let p = Params::at_now(raw);
    let mut accepted = vec!["mode", "from", "to"];
    accepted.extend(FILTERS);
    p.reject_unknown(&accepted)?;
    let mode = p.mode()?;
    let sel = p.selector()?;
    let profile = query::load_profile(state.store.as_ref(), mode, &sel).await?;
    Ok(axum::Json(json!({
        "mode": mode.as_str(),
        "from": sel.from_s,
        "to": sel.to_s,
        "unit": profile_unit(mode),
        "count_unit": count_unit(mode),
        "root": flame_graph(&profile, mode),
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use aperture_core::model::{StackFrame, StackHash};

    use super::*;
    use crate::query::ProfileStack;

    fn frame(name: &str, kernel: bool) -> StackFrame {
        StackFrame { symbol: name.to_owned(), kernel, ..Default::default() }
    }

    fn stack(hash: u64, leaf_first: &[(&str, bool)], count: u64, total_ns: u64) -> ProfileStack {
        let frames: Vec<StackFrame> = leaf_first.iter().map(|(n, k)| frame(n, *k)).collect();
        ProfileStack {
            hash: StackHash(hash),
            names: frames.iter().rev().map(StackFrame::display_name).collect(),
            frames,
            count,
            total_ns,
        }
    }

    #[test]
    fn tree_matches_the_plain_tree_and_carries_kind_count_and_time() {
        let profile = Profile {
            mode: Some(Mode::Cpu),
            stacks: vec![
                stack(1, &[("compute", false), ("main", false)], 3, 30),
                stack(2, &[("vfs_read", true), ("__x64_sys_read", true), ("main", false)], 1, 10),
                stack(3, &[("main", false)], 2, 20),
            ],
        };
        let tree = flame_graph(&profile, Mode::Cpu);
        let plain = query::flame_tree(&profile, Mode::Cpu);
        assert_eq!((tree.value, tree.count, tree.ns), (6, 6, 60));
        assert_eq!(tree.value, plain.value);
        let main = &tree.children[0];
        assert_eq!((main.name.as_str(), main.kernel, main.self_value), ("main", false, 2));
        let sys = &main.children[0];
        assert_eq!((sys.name.as_str(), sys.kernel, sys.value), ("__x64_sys_read", true, 1));
        assert!(sys.children[0].kernel);
        let compute = &main.children[1];
        assert_eq!((compute.name.as_str(), compute.kernel, compute.value, compute.ns), ("compute", false, 3, 30));

        // Lock and syscall trees are valued in ns, counts kept apart.
        let lock = flame_graph(&profile, Mode::Lock);
        assert_eq!((lock.value, lock.count), (60, 6));
    }
}
