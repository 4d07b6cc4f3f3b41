//! Probes, `/api/health` and `/metrics`.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::state::{AppState, authorized};
use crate::metrics::frame_result;
use crate::pipeline::state::CARRIERS;

/// `GET /healthz`: liveness, never depends on the store.
pub(crate) async fn healthz() -> &'static str {
    "ok"
}

/// What unauthenticated callers learn of a store failure: that it failed,
/// not what the store said (paths, hosts, user names). The details are in
/// the log, and in `/api/health` for callers with the read token.
const STORE_DOWN: &str = "the store is not answering; details are in the aggregator log";

/// `GET /readyz`: 503 with a one-line reason while the buffer is above its
/// high-water mark (the ingress is pushing back), 200 otherwise.
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let b = &state.shared.buffer;
    if b.above_high_water() {
        let store = match state.shared.store_error() {
            Some(_) => format!("; store {} unreachable", state.store.kind().as_str()),
            None => String::new(),
        };
        let reason = format!(
            "not ready: buffer holds {} of {} bytes, above the high-water mark of {} bytes; \
             agents are being slowed down{store}\n",
            b.used(),
            b.capacity(),
            b.high_water()
        );
        return (StatusCode::SERVICE_UNAVAILABLE, reason).into_response();
    }
    "ready\n".into_response()
}

/// `GET /api/health`. The store's own error text is shown only to callers
/// with the read token (or when no token is configured).
pub(crate) async fn api_health(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let m = &state.shared.metrics;
    let frames = |r| m.frames(r);
    let (queued, in_flight, committed, busy, rejected) = (
        frames(frame_result::QUEUED),
        frames(frame_result::IN_FLIGHT),
        frames(frame_result::COMMITTED),
        frames(frame_result::BUSY),
        frames(frame_result::REJECTED),
    );
    let agents = state.shared.connected_agents();
    let agents_json: serde_json::Map<String, serde_json::Value> =
        CARRIERS.into_iter().map(|c| (c.as_str().to_owned(), json!(agents.get(&c).copied().unwrap_or(0)))).collect();
    let kind = state.store.kind().as_str();
    let store_error = state.shared.store_error();
    let store_error_shown = match &store_error {
        Some(e) if authorized(&state, &headers) => json!(e),
        Some(_) => json!(STORE_DOWN),
        None => json!(null),
    };
    let last_write = m.writer_last_success.get();
    let b = &state.shared.buffer;
    let body = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started.elapsed().as_secs(),
        "push_total_ok": queued.saturating_sub(rejected) + in_flight + committed,
        "push_total_err": busy + rejected,
        "frames": {
            "received": queued + in_flight + committed + busy,
            "queued": queued,
            "in_flight_duplicates": in_flight,
            "already_committed": committed,
            "busy": busy,
            "rejected": rejected,
            "acknowledged": m.writer_frames_acked.get(),
        },
        "frames_received": queued + in_flight + committed + busy,
        "samples_received": m.ingress_samples.get(),
        "buffer": {
            "used_bytes": b.used(),
            "capacity_bytes": b.capacity(),
            "high_water_bytes": b.high_water(),
            "above_high_water": b.above_high_water(),
        },
        "store": {
            "kind": kind,
            "status": if store_error.is_none() { "up" } else { "down" },
            "error": store_error_shown,
            "last_write_unix_s": if last_write > 0 { json!(last_write) } else { json!(null) },
            "rows_written": m.writer_rows.with_label_values(&[kind]).get(),
            "rows_rejected": m.writer_rows_rejected.with_label_values(&[kind]).get(),
            "pending_rows": m.writer_pending_rows.get(),
        },
        "agents": agents_json,
    });
    axum::Json(body).into_response()
}

/// `GET /metrics`: Prometheus text format.
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let m = &state.shared.metrics;
    let b = &state.shared.buffer;
    m.buffer_used.set(b.used() as i64);
    let undecodable = state.store.undecodable();
    for (what, n) in [("stack", undecodable.stacks), ("ledger_row", undecodable.ledger_rows)] {
        let c = m.store_undecodable.with_label_values(&[what]);
        c.inc_by(n.saturating_sub(c.get()));
    }
    for (carrier, n) in state.shared.connected_agents() {
        m.connected_agents.with_label_values(&[carrier.as_str()]).set(n as i64);
    }
    let mut r = m.render().into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
}
