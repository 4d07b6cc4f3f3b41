//! Kubernetes pod metadata for attribution: which namespace, pod and
//! container a container id belongs to, for the pods on this node.
//!
//! [`KubeClient`] talks to the API server with the in-cluster service
//! account; [`run_pod_watcher`] lists and watches this node's pods and
//! publishes a [`PodIndex`] through a [`PodDirectory`]; the pipeline reads
//! it through a [`PodView`] without taking a lock per sample. Outside
//! Kubernetes there is no client and every pod label stays empty.

mod client;
mod pods;
mod watcher;

pub use client::{KubeClient, KubeError, SERVICE_ACCOUNT_DIR, WatchItem, WatchStream};
pub use pods::{
    ContainerMeta, ContainerStatus, ObjectMeta, Pod, PodDirectory, PodIndex, PodList, PodStatus, PodView, Status,
    WatchEvent, runtime_container_id,
};
pub use watcher::{KubeStats, run_pod_watcher};
