//! Background tasks around the store: a periodic health check, so
//! `/readyz` reflects the store even when nothing is written, and the
//! retention timer.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::unix_now_s;
use crate::pipeline::state::Shared;
use crate::settings::Settings;
use crate::store::Store;

/// Pings the store every few seconds so health reflects it even when idle.
pub(crate) async fn health_checker(store: Arc<dyn Store>, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let error = match tokio::time::timeout(Duration::from_secs(5), store.ping()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("no answer within 5 s".to_owned()),
        };
        // The details are logged (once per change); unauthenticated health
        // endpoints only say that the store is down.
        if let Some(e) = &error
            && shared.store_error().as_ref() != Some(e)
        {
            tracing::warn!(store = store.kind().as_str(), error = %e, "store health check failed");
        }
        shared.set_store_error(error);
    }
}

/// Deletes data older than the retention period, on a timer.
pub(crate) async fn retention(
    store: Arc<dyn Store>,
    shared: Arc<Shared>,
    settings: Settings,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(settings.retention_interval.max(Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let cutoff = unix_now_s().saturating_sub(settings.retention.as_secs());
        match store.apply_retention(cutoff).await {
            Ok(report) => {
                shared.metrics.retention_runs.with_label_values(&["ok"]).inc();
                tracing::debug!(cutoff, removed = report.removed, "retention pass");
            }
            Err(e) => {
                shared.metrics.retention_runs.with_label_values(&["error"]).inc();
                tracing::warn!(error = %e, "retention pass failed; retried at the next interval");
            }
        }
    }
}
