//! The flame-graph tree: the one builder behind `/api/v1/profile?format=json`
//! and `/api/v1/flamegraph`.
//!
//! Stored data decides how deep a tree is (a stack may carry tens of
//! thousands of frames), so nothing here recurses: the tree is built by
//! walking each stack in a loop, kept as a flat vector of nodes (dropping it
//! is flat too), and written as JSON with an explicit stack. All sums
//! saturate at `u64::MAX`.
//!
//! JSON form of a node: `{"name", "kernel", "value", "self", "count", "ns",
//! "children": [...]}`, children sorted by name:
//!
//! - `value`: value of every stack through the node (samples for CPU, ns for
//!   lock and syscall profiles, see [`super::profile_value`]);
//! - `self`: value of the stacks ending at the node;
//! - `kernel`: whether the frame runs in the kernel;
//! - `count`: samples, waits or slow calls through the node;
//! - `ns`: CPU, wait or call time through the node, ns.

use std::collections::HashMap;

use aperture_core::model::Mode;

use super::Profile;

/// One node of a [`FlameTree`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlameNode {
    /// Function name (`root` for the root).
    pub name: String,
    /// Whether the frame runs in the kernel.
    pub kernel: bool,
    /// Value of every stack through this node.
    pub value: u64,
    /// Value of the stacks ending at this node.
    pub self_value: u64,
    /// Samples, waits or slow calls through this node.
    pub count: u64,
    /// CPU, wait or call time through this node, ns.
    pub ns: u64,
    /// Callees, as indices into the tree, sorted by name.
    children: Vec<usize>,
}

impl FlameNode {
    fn named(name: String) -> FlameNode {
        FlameNode { name, ..FlameNode::default() }
    }

    fn add(&mut self, value: u64, count: u64, ns: u64) {
        self.value = self.value.saturating_add(value);
        self.count = self.count.saturating_add(count);
        self.ns = self.ns.saturating_add(ns);
    }
}

/// A merged flame-graph tree, stored flat; the root is node 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlameTree {
    nodes: Vec<FlameNode>,
}

/// Index of the root in a [`FlameTree`].
pub const ROOT: usize = 0;

impl FlameTree {
    /// The node at `index` (0 is the root).
    pub fn node(&self, index: usize) -> &FlameNode {
        &self.nodes[index]
    }

    /// The root.
    pub fn root(&self) -> &FlameNode {
        &self.nodes[ROOT]
    }

    /// The callees of the node at `index`, sorted by name.
    pub fn children(&self, index: usize) -> impl Iterator<Item = (usize, &FlameNode)> + '_ {
        self.nodes[index].children.iter().map(|&c| (c, &self.nodes[c]))
    }

    /// The callee of the node at `index` named `name`.
    pub fn child(&self, index: usize, name: &str) -> Option<usize> {
        self.children(index).find(|(_, n)| n.name == name).map(|(i, _)| i)
    }

    /// Number of nodes, the root included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the tree holds only its root.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() == 1
    }

    /// Depth of the deepest node (the root is 0).
    pub fn depth(&self) -> usize {
        let mut deepest = 0;
        let mut todo = vec![(ROOT, 0usize)];
        while let Some((i, d)) = todo.pop() {
            deepest = deepest.max(d);
            todo.extend(self.nodes[i].children.iter().map(|&c| (c, d + 1)));
        }
        deepest
    }

    /// The tree as JSON (see the module doc), written without recursion.
    pub fn to_json(&self) -> String {
        enum Step {
            Open { index: usize, first: bool },
            Close,
        }
        let mut out = String::with_capacity(self.nodes.len() * 96);
        let mut todo = vec![Step::Open { index: ROOT, first: true }];
        while let Some(step) = todo.pop() {
            match step {
                Step::Close => out.push_str("]}"),
                Step::Open { index, first } => {
                    let n = &self.nodes[index];
                    if !first {
                        out.push(',');
                    }
                    out.push_str("{\"name\":");
                    push_json_string(&mut out, &n.name);
                    out.push_str(&format!(
                        ",\"kernel\":{},\"value\":{},\"self\":{},\"count\":{},\"ns\":{},\"children\":[",
                        n.kernel, n.value, n.self_value, n.count, n.ns
                    ));
                    todo.push(Step::Close);
                    for (k, &c) in n.children.iter().enumerate().rev() {
                        todo.push(Step::Open { index: c, first: k == 0 });
                    }
                }
            }
        }
        out
    }
}

/// Appends `s` as a JSON string literal.
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Builds the merged tree of `profile`: stacks with the same names merge,
/// children sorted by name, values per [`super::profile_value`].
pub fn flame_tree(profile: &Profile, mode: Mode) -> FlameTree {
    let mut nodes = vec![FlameNode::named("root".to_owned())];
    let mut index: HashMap<(usize, &str), usize> = HashMap::new();
    for s in &profile.stacks {
        let v = s.value(mode);
        if v == 0 {
            continue;
        }
        nodes[ROOT].add(v, s.count, s.total_ns);
        // `names` is root first, `frames` leaf first; they pair up when the
        // store knew the stack's frames.
        let paired = s.frames.len() == s.names.len();
        let mut at = ROOT;
        for (i, name) in s.names.iter().enumerate() {
            let next = match index.get(&(at, name.as_str())) {
                Some(&n) => n,
                None => {
                    let n = nodes.len();
                    nodes.push(FlameNode::named(name.clone()));
                    nodes[at].children.push(n);
                    index.insert((at, name.as_str()), n);
                    n
                }
            };
            at = next;
            let node = &mut nodes[at];
            node.kernel |= paired && s.frames[s.frames.len() - 1 - i].kernel;
            node.add(v, s.count, s.total_ns);
        }
        nodes[at].self_value = nodes[at].self_value.saturating_add(v);
    }
    for i in 0..nodes.len() {
        let mut children = std::mem::take(&mut nodes[i].children);
        children.sort_by(|a, b| nodes[*a].name.cmp(&nodes[*b].name));
        nodes[i].children = children;
    }
    FlameTree { nodes }
}

#[cfg(test)]
mod tests {
    use aperture_core::model::{StackFrame, StackHash};

    use super::*;
    use crate::query::ProfileStack;

    fn stack(hash: u64, leaf_first: &[(&str, bool)], count: u64, total_ns: u64) -> ProfileStack {
        let frames: Vec<StackFrame> = leaf_first
            .iter()
            .map(|(n, k)| StackFrame { symbol: (*n).to_owned(), kernel: *k, ..Default::default() })
            .collect();
        ProfileStack {
            hash: StackHash(hash),
            names: frames.iter().rev().map(StackFrame::display_name).collect(),
            frames,
            count,
            total_ns,
        }
    }

    fn profile(stacks: Vec<ProfileStack>) -> Profile {
        Profile { mode: Some(Mode::Cpu), stacks }
    }

    #[test]
    fn tree_sums_values_along_paths_and_carries_kind_count_and_time() {
        let p = profile(vec![
            stack(1, &[("compute", false), ("main", false)], 3, 30),
            stack(2, &[("vfs_read", true), ("__x64_sys_read", true), ("main", false)], 1, 10),
            stack(3, &[("main", false)], 2, 20),
        ]);
        let t = flame_tree(&p, Mode::Cpu);
        assert_eq!((t.root().value, t.root().count, t.root().ns), (6, 6, 60));
        let main = t.child(ROOT, "main").expect("main");
        assert_eq!((t.node(main).kernel, t.node(main).value, t.node(main).self_value), (false, 6, 2));
        let names: Vec<&str> = t.children(main).map(|(_, n)| n.name.as_str()).collect();
        assert_eq!(names, ["__x64_sys_read", "compute"], "children sorted by name");
        let sys = t.child(main, "__x64_sys_read").expect("sys");
        assert!(t.node(sys).kernel);
        let compute = t.node(t.child(main, "compute").expect("compute"));
        assert_eq!((compute.kernel, compute.value, compute.self_value, compute.ns), (false, 3, 3, 30));
        // Lock and syscall trees are valued in ns, counts kept apart.
        let lock = flame_tree(&p, Mode::Lock);
        assert_eq!((lock.root().value, lock.root().count), (60, 6));
    }

    #[test]
    fn json_nests_children_and_escapes_names() {
        let p = profile(vec![stack(1, &[("a\"b\\c\u{1}", false), ("main", false)], 2, 20)]);
        let json: serde_json::Value = serde_json::from_str(&flame_tree(&p, Mode::Cpu).to_json()).expect("valid JSON");
        assert_eq!(json["name"], "root");
        assert_eq!(json["value"], 2);
        let main = &json["children"][0];
        assert_eq!((main["name"].as_str(), main["self"].as_u64()), (Some("main"), Some(0)));
        let leaf = &main["children"][0];
        assert_eq!(leaf["name"], "a\"b\\c\u{1}");
        assert_eq!((leaf["self"].as_u64(), leaf["ns"].as_u64()), (Some(2), Some(20)));
        assert_eq!(leaf["children"], serde_json::json!([]));
    }

    #[test]
    fn sums_saturate() {
        let p = profile(vec![stack(1, &[("f", false)], u64::MAX, u64::MAX), stack(2, &[("f", false)], 5, 5)]);
        let t = flame_tree(&p, Mode::Cpu);
        assert_eq!((t.root().value, t.root().count, t.root().ns), (u64::MAX, u64::MAX, u64::MAX));
        let f = t.node(t.child(ROOT, "f").expect("f"));
        assert_eq!(f.self_value, u64::MAX);
    }

    /// A stack of 80 000 frames (stored data can hold one) is built,
    /// written and dropped without overflowing the thread's stack: this
    /// runs on a thread with a 256 KiB stack.
    #[test]
    fn an_80k_frame_stack_builds_and_serializes_on_a_small_stack() {
        let t = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let frames: Vec<(String, bool)> = (0..80_000).map(|i| (format!("f{i}"), i < 10)).collect();
                let leaf_first: Vec<(&str, bool)> = frames.iter().map(|(n, k)| (n.as_str(), *k)).collect();
                let p = profile(vec![stack(1, &leaf_first, 7, 70), stack(2, &[("f79999", false)], 1, 10)]);
                let tree = flame_tree(&p, Mode::Cpu);
                let json = tree.to_json();
                (tree.len(), tree.depth(), json.len(), json.ends_with("]}]}"))
            })
            .expect("spawn");
        let (len, depth, json_len, closed) = t.join().expect("no stack overflow");
        assert_eq!((len, depth), (80_001, 80_000), "one node per frame; the second stack merges into the first");
        assert!(closed && json_len > 80_000 * 60);
    }
}
