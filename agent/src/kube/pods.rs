//! Pods of this node as the Kubernetes API describes them, and the index the
//! pipeline looks container ids up in.
//!
//! Only the fields the agent uses are deserialized; everything else in the
//! API objects is ignored, so new API fields never break the agent.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

/// `metadata` of a list response.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ListMeta {
    /// Where a watch continues from.
    pub resource_version: String,
}

/// `metadata` of a pod.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectMeta {
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Unique id of this pod incarnation.
    pub uid: String,
    /// Version of the object (watch bookmarks carry only this).
    pub resource_version: String,
    /// Pod labels, matched by `filter.pod_selector`.
    pub labels: BTreeMap<String, String>,
}

/// One entry of `status.containerStatuses` (and the init/ephemeral lists).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ContainerStatus {
    /// Container name from the pod spec.
    pub name: String,
    /// `<runtime>://<id>`; empty until the container was created.
    #[serde(rename = "containerID")]
    pub container_id: String,
}

/// `status` of a pod.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct PodStatus {
    /// Regular containers.
    pub container_statuses: Vec<ContainerStatus>,
    /// Init containers.
    pub init_container_statuses: Vec<ContainerStatus>,
    /// Ephemeral (debug) containers.
    pub ephemeral_container_statuses: Vec<ContainerStatus>,
}

/// A pod, reduced to what attribution needs.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Pod {
    /// Name, namespace, uid, labels.
    pub metadata: ObjectMeta,
    /// Container ids.
    pub status: PodStatus,
}

/// Response of `GET /api/v1/pods`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct PodList {
    /// Resource version to watch from.
    pub metadata: ListMeta,
    /// The pods.
    pub items: Vec<Pod>,
}

/// `Status` object carried by a watch `ERROR` event.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Status {
    /// HTTP-like code; 410 means the resource version is too old.
    pub code: u16,
    /// Human-readable reason.
    pub message: String,
}

/// One line of a watch response.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", content = "object")]
pub enum WatchEvent {
    /// A pod appeared (or was listed).
    #[serde(rename = "ADDED")]
    Added(Pod),
    /// A pod changed (e.g. its containers started).
    #[serde(rename = "MODIFIED")]
    Modified(Pod),
    /// A pod is gone.
    #[serde(rename = "DELETED")]
    Deleted(Pod),
    /// Progress marker: only `metadata.resourceVersion` is meaningful.
    #[serde(rename = "BOOKMARK")]
    Bookmark(Pod),
    /// The watch failed; 410 means re-list.
    #[serde(rename = "ERROR")]
    Error(Status),
}

/// The Kubernetes identity of one container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerMeta {
    /// Namespace of the pod.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name.
    pub container: String,
    /// Pod labels.
    pub labels: Arc<BTreeMap<String, String>>,
}

/// The container id in `<runtime>://<id>`, lower-cased; `None` when empty.
pub fn runtime_container_id(status_id: &str) -> Option<String> {
    let id = status_id.split_once("://").map_or(status_id, |(_, id)| id);
    (!id.is_empty()).then(|| id.to_ascii_lowercase())
}

/// Every known container of this node's pods, by container id.
#[derive(Clone, Debug, Default)]
pub struct PodIndex {
    by_container: HashMap<String, ContainerMeta>,
    pods: HashMap<String, Vec<String>>,
    /// Pod metadata by pod uid, for processes whose container id is not (yet)
    /// in any status: they still get namespace and pod.
    by_pod_uid: HashMap<String, ContainerMeta>,
}

impl PodIndex {
    /// Builds an index from a full list.
    pub fn from_pods(pods: &[Pod]) -> PodIndex {
        let mut index = PodIndex::default();
        for pod in pods {
            index.upsert(pod);
        }
        index
    }

    /// Looks a container up by id (64 hex digits).
    pub fn container(&self, id: &str) -> Option<&ContainerMeta> {
        self.by_container.get(id)
    }

    /// Looks a pod up by uid; the container name is empty.
    pub fn pod(&self, uid: &str) -> Option<&ContainerMeta> {
        self.by_pod_uid.get(uid)
    }

    /// Number of pods known.
    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// Number of containers known.
    pub fn container_count(&self) -> usize {
        self.by_container.len()
    }

    /// Adds or replaces a pod.
    pub fn upsert(&mut self, pod: &Pod) {
        self.remove(pod);
        let m = &pod.metadata;
        let labels = Arc::new(m.labels.clone());
        let meta = |container: &str| ContainerMeta {
            namespace: m.namespace.clone(),
            pod: m.name.clone(),
            container: container.to_owned(),
            labels: Arc::clone(&labels),
        };
        let statuses = pod
            .status
            .container_statuses
            .iter()
            .chain(&pod.status.init_container_statuses)
            .chain(&pod.status.ephemeral_container_statuses);
        let mut ids = Vec::new();
        for s in statuses {
            if let Some(id) = runtime_container_id(&s.container_id) {
                self.by_container.insert(id.clone(), meta(&s.name));
                ids.push(id);
            }
        }
        if !m.uid.is_empty() {
            self.by_pod_uid.insert(m.uid.clone(), meta(""));
        }
        self.pods.insert(pod_key(pod), ids);
    }

    /// Removes a pod and its containers.
    pub fn remove(&mut self, pod: &Pod) {
        if let Some(ids) = self.pods.remove(&pod_key(pod)) {
            for id in ids {
                self.by_container.remove(&id);
            }
        }
        self.by_pod_uid.remove(&pod.metadata.uid);
    }
}

fn pod_key(pod: &Pod) -> String {
    if pod.metadata.uid.is_empty() {
        format!("{}/{}", pod.metadata.namespace, pod.metadata.name)
    } else {
        pod.metadata.uid.clone()
    }
}

/// Where the watcher publishes the current [`PodIndex`] and readers pick it up.
///
/// Readers check an atomic generation number and only take the mutex to
/// clone the new `Arc` when it changed, which is once per pod change, not
/// per sample.
#[derive(Debug, Default)]
pub struct PodDirectory {
    generation: AtomicU64,
    current: Mutex<Arc<PodIndex>>,
}

impl PodDirectory {
    /// Replaces the published index.
    pub fn publish(&self, index: PodIndex) {
        let index = Arc::new(index);
        match self.current.lock() {
            Ok(mut g) => *g = index,
            // A reader panicked while holding the lock; the data (an Arc) is
            // still whole, so keep going.
            Err(poisoned) => *poisoned.into_inner() = index,
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// A reader's view of this directory.
    pub fn view(self: &Arc<Self>) -> PodView {
        PodView { dir: Arc::clone(self), seen: u64::MAX, snapshot: Arc::new(PodIndex::default()) }
    }

    fn snapshot(&self) -> Arc<PodIndex> {
        match self.current.lock() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }
}

/// A reader's cached snapshot of a [`PodDirectory`].
#[derive(Debug)]
pub struct PodView {
    dir: Arc<PodDirectory>,
    seen: u64,
    snapshot: Arc<PodIndex>,
}

impl PodView {
    /// Picks up a newer index if one was published; returns its generation.
    pub fn refresh(&mut self) -> u64 {
        let generation = self.dir.generation.load(Ordering::Acquire);
        if generation != self.seen {
            self.snapshot = self.dir.snapshot();
            self.seen = generation;
        }
        generation
    }

    /// The snapshot as of the last [`PodView::refresh`].
    pub fn index(&self) -> &PodIndex {
        &self.snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = include_str!("../../tests/fixtures/k8s/podlist.json");

    #[test]
    fn recorded_pod_list_indexes_every_started_container() {
        let list: PodList = serde_json::from_str(LIST).expect("fixture parses");
        assert_eq!(list.metadata.resource_version, "48213");
        let index = PodIndex::from_pods(&list.items);
        assert_eq!(index.pod_count(), 3);
        let web = index
            .container("9c1f0e4a0d0e2b8f5b7f7e8a3c9d2e1f0a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d")
            .expect("web container indexed");
        assert_eq!((web.namespace.as_str(), web.pod.as_str(), web.container.as_str()), ("shop", "web-7d9f8", "nginx"));
        assert_eq!(web.labels.get("app").map(String::as_str), Some("web"));
        // init containers count too; a container still being created has no id.
        assert_eq!(index.container_count(), 4);
        let pod = index.pod("5f0c8b1e-6d2a-4c3b-9e8f-1a2b3c4d5e6f").expect("pod by uid");
        assert_eq!(pod.pod, "web-7d9f8");
    }

    #[test]
    fn container_ids_strip_the_runtime() {
        assert_eq!(runtime_container_id("containerd://ABC").as_deref(), Some("abc"));
        assert_eq!(runtime_container_id("cri-o://abc").as_deref(), Some("abc"));
        assert_eq!(runtime_container_id("docker://abc").as_deref(), Some("abc"));
        assert_eq!(runtime_container_id(""), None);
    }

    #[test]
    fn upsert_replaces_and_remove_forgets() {
        let list: PodList = serde_json::from_str(LIST).expect("fixture parses");
        let mut index = PodIndex::from_pods(&list.items);
        let mut pod = list.items[0].clone();
        let old = runtime_container_id(&pod.status.container_statuses[0].container_id).expect("id");
        pod.status.container_statuses[0].container_id = format!("containerd://{}", "e".repeat(64));
        index.upsert(&pod);
        assert!(index.container(&old).is_none(), "restarted container's old id is gone");
        assert!(index.container(&"e".repeat(64)).is_some());
        index.remove(&pod);
        assert!(index.container(&"e".repeat(64)).is_none());
        assert_eq!(index.pod_count(), 2);
    }

    #[test]
    fn views_pick_up_new_generations() {
        let dir = Arc::new(PodDirectory::default());
        let mut view = dir.view();
        let g0 = view.refresh();
        assert_eq!(view.index().pod_count(), 0);
        let list: PodList = serde_json::from_str(LIST).expect("fixture parses");
        dir.publish(PodIndex::from_pods(&list.items));
        let g1 = view.refresh();
        assert_ne!(g0, g1);
        assert_eq!(view.index().pod_count(), 3);
    }
}
