//! The HTTP/1.1 accept loop: at most [`HttpLimits::max_connections`]
//! connections are served at once, and a connection that has not sent a
//! complete request head within [`HttpLimits::header_read_timeout`] (also
//! while idle between requests) is closed. A connection over the cap is
//! answered 503 at once and closed, so a flood of idle or half-sent
//! requests cannot hold the server, and clients see why.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus::IntGauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;
use crate::settings::HttpLimits;

/// Refusals (503 then close) in progress at once; beyond that, a connection
/// over the cap is closed without an answer.
const REFUSING_AT_ONCE: usize = 64;

/// How long a refused connection is given to read its 503.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// Serves `app` on `listener` until `shutdown` completes, then lets open
/// requests finish for at most `limits.request_timeout`.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let refusing = Arc::new(Semaphore::new(REFUSING_AT_ONCE));
    let refusal: Arc<[u8]> = refusal_response(limits.max_connections).into();
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors or a connection reset before it was
                // taken: wait a little rather than spin, then go on.
                tracing::warn!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            metrics.http_connections_refused.inc();
            refuse(stream, &refusing, Arc::clone(&refusal));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let open = OpenConnection::new(metrics.http_connections_open.clone());
        let header_timeouts = metrics.http_header_timeouts.clone();
        let conn =
            graceful.watch(builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone())));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                if e.is_timeout() {
                    header_timeouts.inc();
                } else {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
            }
            drop(open);
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.request_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!("HTTP connections still open after {:?}; closing them", limits.request_timeout);
    }
}

/// Counts a connection in `aperture_http_connections_open` while it lives.
struct OpenConnection(IntGauge);

impl OpenConnection {
    fn new(gauge: IntGauge) -> OpenConnection {
        gauge.inc();
        OpenConnection(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn refusal_response(max: usize) -> Vec<u8> {
    let body = serde_json::json!({
        "error": format!(
            "the aggregator is serving {max} HTTP connections, its limit (limits.http_max_connections); retry later"
        )
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         retry-after: 1\r\nx-content-type-options: nosniff\r\ncontent-security-policy: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len(),
        super::API_CONTENT_SECURITY_POLICY,
    )
    .into_bytes()
}

/// Answers a connection over the cap with 503 and closes it. The request is
/// read and discarded (for at most [`REFUSAL_LINGER`]) so that closing does
/// not reset the connection before the client has read the answer.
fn refuse(mut stream: TcpStream, refusing: &Arc<Semaphore>, response: Arc<[u8]>) {
    let Ok(permit) = Arc::clone(refusing).try_acquire_owned() else { return };
    tokio::spawn(async move {
        let _permit = permit;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            stream.write_all(&response).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 1024];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<(), std::io::Error>(())
        })
        .await;
    });
}
