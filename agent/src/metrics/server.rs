//! `/metrics` and `/healthz` over HTTP (axum on the agent's runtime).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::AgentMetrics;

/// The pipeline is considered stuck when its heartbeat is older than this, ns.
const STALE_NS: u64 = 30_000_000_000;

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsServerError {
    /// The address is taken or not allowed.
    #[error("cannot listen for metrics on {addr}: {source}; change metrics.listen or free the port")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A running metrics endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    /// Where it listens (useful with port 0).
    pub local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct AppState {
    metrics: AgentMetrics,
    heartbeat: Arc<AtomicU64>,
}

/// Serves `/metrics` and `/healthz` on `addr`. `/healthz` answers `ok`
/// while `heartbeat` (monotonic ns, bumped by the pipeline thread) is recent.
pub async fn serve(
    addr: SocketAddr,
    metrics: AgentMetrics,
    heartbeat: Arc<AtomicU64>,
) -> Result<MetricsServer, MetricsServerError> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| MetricsServerError::Bind { addr, source })?;
    let local_addr = listener.local_addr().map_err(|source| MetricsServerError::Bind { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(health))
        .with_state(AppState { metrics, heartbeat });
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("metrics endpoint on {local_addr} stopped: {e}");
        }
    });
    tracing::info!("agent metrics on http://{local_addr}/metrics");
    Ok(MetricsServer { local_addr, task })
}

async fn render(State(s): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}

async fn health(State(s): State<AppState>) -> impl IntoResponse {
    let beat = s.heartbeat.load(Ordering::Relaxed);
    let age = crate::clock::monotonic_ns().saturating_sub(beat);
    if beat == 0 || age < STALE_NS {
        (StatusCode::OK, "ok".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("pipeline stalled for {}s", age / 1_000_000_000))
    }
}
