//! The list-then-watch loop that keeps a [`PodDirectory`] current.
//!
//! List the node's pods, publish the index, watch from the list's resource
//! version and apply each event; when the server ends the watch (its
//! timeout), watch again from the last version seen; when the version has
//! expired (410, as a status or as an `ERROR` event), list again; on any
//! other failure wait with capped exponential backoff and list again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::client::{KubeClient, KubeError, WatchItem};
use super::pods::{PodDirectory, PodIndex, WatchEvent};

/// Seconds a watch asks the server to keep it open.
const WATCH_TIMEOUT_S: u32 = 290;
/// First and longest wait after a failure.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

/// Counters of the pod watcher, exported as metrics.
#[derive(Debug, Default)]
pub struct KubeStats {
    /// Successful lists.
    pub lists: AtomicU64,
    /// Watch events applied.
    pub events: AtomicU64,
    /// Lists caused by an expired resource version.
    pub expired: AtomicU64,
    /// Failed API calls.
    pub errors: AtomicU64,
    /// Watch lines that were not events.
    pub malformed: AtomicU64,
    /// Pods currently known.
    pub pods: AtomicU64,
}

/// How a watch ended.
enum WatchEnd {
    /// The server closed it; continue from this version.
    Closed(String),
    /// The version expired; list again.
    Expired,
}

/// Runs until the task is aborted.
pub async fn run_pod_watcher(client: KubeClient, directory: Arc<PodDirectory>, stats: Arc<KubeStats>) {
    let mut backoff = BACKOFF.0;
    loop {
        match list_and_watch(&client, &directory, &stats).await {
            Ok(()) => backoff = BACKOFF.0,
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("pod metadata for node {}: {e}; retrying in {backoff:?}", client.node());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF.1);
            }
        }
    }
}

/// One list and the watches that follow it; returns `Ok` when a re-list is due.
async fn list_and_watch(client: &KubeClient, directory: &PodDirectory, stats: &KubeStats) -> Result<(), KubeError> {
    let list = client.list_pods().await?;
    let mut index = PodIndex::from_pods(&list.items);
    stats.lists.fetch_add(1, Ordering::Relaxed);
    stats.pods.store(index.pod_count() as u64, Ordering::Relaxed);
    tracing::info!(
        "pod metadata: {} pods, {} containers on node {}",
        index.pod_count(),
        index.container_count(),
        client.node()
    );
    directory.publish(index.clone());
    let mut version = list.metadata.resource_version;
    loop {
        match watch_once(client, &version, &mut index, directory, stats).await {
            Ok(WatchEnd::Closed(v)) => version = v,
            Ok(WatchEnd::Expired) | Err(KubeError::Expired) => {
                stats.expired.fetch_add(1, Ordering::Relaxed);
                tracing::info!("pod watch from resource version {version} expired; listing again");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}

async fn watch_once(
    client: &KubeClient,
    from: &str,
    index: &mut PodIndex,
    directory: &PodDirectory,
    stats: &KubeStats,
) -> Result<WatchEnd, KubeError> {
    let mut stream = client.watch_pods(from, WATCH_TIMEOUT_S).await?;
    let mut version = from.to_owned();
    while let Some(item) = stream.next().await? {
        let event = match item {
            WatchItem::Event(e) => e,
            WatchItem::Malformed(what) => {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("skipping a malformed pod watch event: {what}");
                continue;
            }
        };
        stats.events.fetch_add(1, Ordering::Relaxed);
        let pod = match event {
            WatchEvent::Added(pod) | WatchEvent::Modified(pod) => {
                index.upsert(&pod);
                pod
            }
            WatchEvent::Deleted(pod) => {
                index.remove(&pod);
                pod
            }
            WatchEvent::Bookmark(pod) => {
                version = pod.metadata.resource_version;
                continue;
            }
            WatchEvent::Error(status) if status.code == 410 => return Ok(WatchEnd::Expired),
            WatchEvent::Error(status) => {
                return Err(KubeError::Request {
                    url: format!("pod watch of node {}", client.node()),
                    reason: format!("status {}: {}", status.code, status.message),
                });
            }
        };
        if !pod.metadata.resource_version.is_empty() {
            version = pod.metadata.resource_version;
        }
        stats.pods.store(index.pod_count() as u64, Ordering::Relaxed);
        directory.publish(index.clone());
    }
    Ok(WatchEnd::Closed(version))
}
