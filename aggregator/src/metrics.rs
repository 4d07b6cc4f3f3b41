//! The aggregator's own metrics, named and registered in one place.
//! Every metric here is documented in `docs/metrics.md` (name, type, unit,
//! labels, meaning); `/api/health` reads the same values.
//!
//! Each aggregator owns its [`prometheus::Registry`] (no global registry), so
//! several can run in one process (tests).

use std::sync::{Arc, Mutex};

use aperture_transport::server::ServerStats;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Outcome label values of `aperture_ingress_frames_total`.
pub mod frame_result {
    /// Taken and queued to a shard.
    pub const QUEUED: &str = "queued";
    /// A copy of a frame still in flight: dropped, the ack follows.
    pub const IN_FLIGHT: &str = "in_flight";
    /// Already committed: acknowledged again, not counted twice.
    pub const COMMITTED: &str = "committed";
    /// Refused because the buffer is above high water or a shard queue is full.
    pub const BUSY: &str = "busy";
    /// Refused because its contents are invalid.
    pub const REJECTED: &str = "rejected";
    /// Held back while the run's committed frames are read from the store
    /// (a run this aggregator had not served lately); offered again.
    pub const CHECKING: &str = "checking";
}

/// Every metric of one aggregator.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// `aperture_ingress_frames_total{result}`.
    pub ingress_frames: IntCounterVec,
    /// `aperture_push_requests_total{protocol, result}`.
    pub push_requests: IntCounterVec,
    /// `aperture_push_samples_total`.
    pub push_samples: IntCounter,
    /// `aperture_ingress_received_bytes_total`.
    pub ingress_bytes: IntCounter,
    /// `aperture_ingress_samples_total`.
    pub ingress_samples: IntCounter,
    /// `aperture_ingress_stacks_truncated_total`.
    pub ingress_stacks_truncated: IntCounter,
    /// `aperture_ingress_stack_frames_cut_total`.
    pub ingress_stack_frames_cut: IntCounter,
    /// `aperture_ingress_connected_agents{carrier}`.
    pub connected_agents: IntGaugeVec,
    /// `aperture_buffer_used_bytes`.
    pub buffer_used: IntGauge,
    /// `aperture_buffer_capacity_bytes`.
    pub buffer_capacity: IntGauge,
    /// `aperture_buffer_high_water_bytes`.
    pub buffer_high_water: IntGauge,
    /// `aperture_shard_frames_total{shard}`.
    pub shard_frames: IntCounterVec,
    /// `aperture_shard_flushes_total{shard}`.
    pub shard_flushes: IntCounterVec,
    /// `aperture_shard_rows_flushed_total{shard}`.
    pub shard_rows: IntCounterVec,
    /// `aperture_shard_buffered_bytes{shard}`.
    pub shard_bytes: IntGaugeVec,
    /// `aperture_shard_queue_frames{shard}`.
    pub shard_queue: IntGaugeVec,
    /// `aperture_writer_batches_total{store,result}`.
    pub writer_batches: IntCounterVec,
    /// `aperture_writer_rows_written_total{store}`.
    pub writer_rows: IntCounterVec,
    /// `aperture_writer_stacks_written_total{store}`.
    pub writer_stacks: IntCounterVec,
    /// `aperture_writer_rows_rejected_total{store}`.
    pub writer_rows_rejected: IntCounterVec,
    /// `aperture_writer_frames_acked_total`.
    pub writer_frames_acked: IntCounter,
    /// `aperture_writer_pending_rows`.
    pub writer_pending_rows: IntGauge,
    /// `aperture_writer_last_success_timestamp_seconds`.
    pub writer_last_success: IntGauge,
    /// `aperture_writer_write_duration_seconds`.
    pub writer_duration: Histogram,
    /// `aperture_store_up`.
    pub store_up: IntGauge,
    /// `aperture_retention_runs_total{result}`.
    pub retention_runs: IntCounterVec,
    /// `aperture_http_requests_total{route,status}`.
    pub http_requests: IntCounterVec,
    /// `aperture_http_request_duration_seconds{route}`.
    pub http_duration: HistogramVec,
    /// `aperture_http_connections_open`.
    pub http_connections_open: IntGauge,
    /// `aperture_http_connections_refused_total`.
    pub http_connections_refused: IntCounter,
    /// `aperture_http_header_timeouts_total`.
    pub http_header_timeouts: IntCounter,
    /// `aperture_store_undecodable_total{what}`.
    pub store_undecodable: IntCounterVec,
    /// Where the `aperture_transport_*` counters are read from.
    transport: TransportSource,
}

/// A function returning the transport server's counters, or `None` once
/// the server is gone.
pub type TransportStatsFn = Box<dyn Fn() -> Option<ServerStats> + Send + Sync>;

/// The transport server's counters, read when `/metrics` is rendered.
#[derive(Clone, Default)]
struct TransportSource(Arc<Mutex<Option<TransportStatsFn>>>);

impl std::fmt::Debug for TransportSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TransportSource")
    }
}

impl TransportSource {
    fn read(&self) -> Option<ServerStats> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|f| f())
    }
}

/// Exports the transport server's [`ServerStats`] as `aperture_transport_*`
/// counters: the values are copied from a snapshot at each collection.
#[derive(Clone)]
struct TransportCollector {
    source: TransportSource,
    sessions_opened: IntCounter,
    frames_received: IntCounter,
    bytes_received: IntCounter,
    frames_busy: IntCounter,
    frames_duplicate: IntCounter,
    sequence_gaps: IntCounter,
    frames_acked: IntCounter,
    rejections: IntCounterVec,
    decode_errors: IntCounterVec,
    sessions_closed: IntCounterVec,
    unauthenticated: IntGauge,
    parked_bytes: IntGauge,
    preauth_closed: IntCounter,
    preauth_refused: IntCounter,
    descs: Vec<Desc>,
}

impl TransportCollector {
    fn new(source: TransportSource) -> prometheus::Result<TransportCollector> {
        let counter = |name: &str, help: &str| IntCounter::new(name, help);
        let by_reason = |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["reason"]);
        let mut c = TransportCollector {
            source,
            sessions_opened: counter("aperture_transport_sessions_opened_total", "Agent sessions authenticated.")?,
            frames_received: counter(
                "aperture_transport_frames_received_total",
                "Frames received and validated by the transport.",
            )?,
            bytes_received: counter("aperture_transport_received_bytes_total", "Bytes of the frames received.")?,
            frames_busy: counter(
                "aperture_transport_frames_busy_total",
                "Frames refused as busy (kept by the agent and sent again).",
            )?,
            frames_duplicate: counter(
                "aperture_transport_frames_duplicate_in_session_total",
                "Frames ignored because their sequence was not above the session's last.",
            )?,
            sequence_gaps: counter(
                "aperture_transport_sequence_gaps_total",
                "Frames that followed a skipped sequence number.",
            )?,
            frames_acked: counter("aperture_transport_frames_acked_total", "Frames acknowledged to agents.")?,
            rejections: by_reason(
                "aperture_transport_rejections_total",
                "Agent sessions refused (wrong token, bad hello, limits), by reason.",
            )?,
            decode_errors: by_reason(
                "aperture_transport_decode_errors_total",
                "Frames or messages that failed to decode (the connection is closed), by reason.",
            )?,
            sessions_closed: by_reason("aperture_transport_sessions_closed_total", "Agent sessions ended, by reason.")?,
            unauthenticated: IntGauge::new(
                "aperture_transport_unauthenticated_connections",
                "Connections open now that have not authenticated yet (both carriers).",
            )?,
            parked_bytes: IntGauge::new(
                "aperture_transport_parked_bytes",
                "Bytes of frames held now because the pipeline refused them as busy (at most limits.max_parked_size).",
            )?,
            preauth_closed: counter(
                "aperture_transport_preauth_closed_total",
                "Connections that ended before authenticating (refused hello, stalled or malformed handshake, client gone).",
            )?,
            preauth_refused: counter(
                "aperture_transport_preauth_refused_total",
                "Connections refused at once because limits.max_unauthenticated others were still authenticating.",
            )?,
            descs: Vec::new(),
        };
        c.descs = c.parts().iter().flat_map(|p| p.desc()).cloned().collect();
        Ok(c)
    }

    fn parts(&self) -> [&dyn Collector; 14] {
        [
            &self.sessions_opened,
            &self.frames_received,
            &self.bytes_received,
            &self.frames_busy,
            &self.frames_duplicate,
            &self.sequence_gaps,
            &self.frames_acked,
            &self.rejections,
            &self.decode_errors,
            &self.sessions_closed,
            &self.unauthenticated,
            &self.parked_bytes,
            &self.preauth_closed,
            &self.preauth_refused,
        ]
    }
}

fn copy_counter(c: &IntCounter, v: u64) {
    c.reset();
    c.inc_by(v);
}

impl Collector for TransportCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Some(s) = self.source.read() {
            copy_counter(&self.sessions_opened, s.sessions_opened);
            copy_counter(&self.frames_received, s.frames_received);
            copy_counter(&self.bytes_received, s.bytes_received);
            copy_counter(&self.frames_busy, s.frames_busy);
            copy_counter(&self.frames_duplicate, s.frames_duplicate_in_session);
            copy_counter(&self.sequence_gaps, s.sequence_gaps);
            copy_counter(&self.frames_acked, s.frames_acked);
            self.unauthenticated.set(i64::try_from(s.unauthenticated_connections).unwrap_or(i64::MAX));
            self.parked_bytes.set(i64::try_from(s.parked_bytes).unwrap_or(i64::MAX));
            copy_counter(&self.preauth_closed, s.preauth_closed);
            copy_counter(&self.preauth_refused, s.preauth_refused);
            for (vec, by_reason) in [
                (&self.rejections, &s.rejections),
                (&self.decode_errors, &s.decode_errors),
                (&self.sessions_closed, &s.sessions_closed),
            ] {
                for (reason, v) in by_reason {
                    copy_counter(&vec.with_label_values(&[reason.as_str()]), *v);
                }
            }
        }
        self.parts().iter().flat_map(|p| p.collect()).collect()
    }
}

/// Registration failed: two metrics with one name (a programming error
/// caught by the unit test below).
#[derive(Debug, thiserror::Error)]
#[error("registering metric {name} failed: {source}")]
pub struct MetricsError {
    name: String,
    #[source]
    source: prometheus::Error,
}

fn reg<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    name: &str,
    make: impl FnOnce() -> prometheus::Result<C>,
) -> Result<C, MetricsError> {
    let wrap = |source| MetricsError { name: name.to_owned(), source };
    let c = make().map_err(wrap)?;
    registry.register(Box::new(c.clone())).map_err(wrap)?;
    Ok(c)
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Metrics, MetricsError> {
        let r = Registry::new();
        let transport = TransportSource::default();
        let collector = TransportCollector::new(transport.clone())
            .map_err(|source| MetricsError { name: "aperture_transport_*".to_owned(), source })?;
        r.register(Box::new(collector))
            .map_err(|source| MetricsError { name: "aperture_transport_*".to_owned(), source })?;
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let opts = Opts::new(name, help);
            reg(&r, name, || IntCounterVec::new(opts, labels))
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let opts = Opts::new(name, help);
            reg(&r, name, || IntGaugeVec::new(opts, labels))
        };
        let counter = |name: &str, help: &str| reg(&r, name, || IntCounter::new(name, help));
        let gauge = |name: &str, help: &str| reg(&r, name, || IntGauge::new(name, help));
        let m = Metrics {
            ingress_frames: counter_vec(
                "aperture_ingress_frames_total",
                "Frames offered by agents, by outcome.",
                &["result"],
            )?,
            ingress_bytes: counter("aperture_ingress_received_bytes_total", "Bytes of frames queued to shards.")?,
            push_requests: counter_vec(
                "aperture_push_requests_total",
                "Pushed-profile requests (Pyroscope ingest), by protocol and outcome.",
                &["protocol", "result"],
            )?,
            push_samples: counter("aperture_push_samples_total", "Samples of pushed profiles committed to the store.")?,
            ingress_samples: counter(
                "aperture_ingress_samples_total",
                "Observations (CPU samples, lock waits, syscalls, slow calls) folded into shards.",
            )?,
            ingress_stacks_truncated: counter(
                "aperture_ingress_stacks_truncated_total",
                "Stacks longer than the frame limit, cut to their leaf-most frames.",
            )?,
            ingress_stack_frames_cut: counter(
                "aperture_ingress_stack_frames_cut_total",
                "Frames cut from truncated stacks.",
            )?,
            connected_agents: gauge_vec(
                "aperture_ingress_connected_agents",
                "Agents that sent a frame recently, by carrier.",
                &["carrier"],
            )?,
            buffer_used: gauge("aperture_buffer_used_bytes", "Bytes held by shard queues, shards and the writer.")?,
            buffer_capacity: gauge("aperture_buffer_capacity_bytes", "Configured buffer capacity.")?,
            buffer_high_water: gauge(
                "aperture_buffer_high_water_bytes",
                "Buffer level above which the ingress pushes back.",
            )?,
            shard_frames: counter_vec("aperture_shard_frames_total", "Frames folded by a shard.", &["shard"])?,
            shard_flushes: counter_vec("aperture_shard_flushes_total", "Flushes handed to the writer.", &["shard"])?,
            shard_rows: counter_vec("aperture_shard_rows_flushed_total", "Rows handed to the writer.", &["shard"])?,
            shard_bytes: gauge_vec(
                "aperture_shard_buffered_bytes",
                "Bytes of aggregated state in a shard.",
                &["shard"],
            )?,
            shard_queue: gauge_vec("aperture_shard_queue_frames", "Frames waiting in a shard's queue.", &["shard"])?,
            writer_batches: counter_vec(
                "aperture_writer_batches_total",
                "Write attempts, by store and result (ok, error, rejected).",
                &["store", "result"],
            )?,
            writer_rows: counter_vec("aperture_writer_rows_written_total", "Rows committed.", &["store"])?,
            writer_stacks: counter_vec("aperture_writer_stacks_written_total", "Stacks committed.", &["store"])?,
            writer_rows_rejected: counter_vec(
                "aperture_writer_rows_rejected_total",
                "Rows the store refused as invalid (not retried).",
                &["store"],
            )?,
            writer_frames_acked: counter(
                "aperture_writer_frames_acked_total",
                "Frames acknowledged after their rows were committed.",
            )?,
            writer_pending_rows: gauge("aperture_writer_pending_rows", "Rows waiting in the writer.")?,
            writer_last_success: gauge(
                "aperture_writer_last_success_timestamp_seconds",
                "Unix time of the last successful write (0 if none).",
            )?,
            writer_duration: reg(&r, "aperture_writer_write_duration_seconds", || {
                Histogram::with_opts(
                    HistogramOpts::new("aperture_writer_write_duration_seconds", "Duration of write attempts.")
                        .buckets(prometheus::exponential_buckets(0.001, 4.0, 9)?),
                )
            })?,
            store_up: gauge("aperture_store_up", "1 if the last write or health check reached the store.")?,
            retention_runs: counter_vec(
                "aperture_retention_runs_total",
                "Retention passes, by result (ok, error).",
                &["result"],
            )?,
            http_requests: counter_vec(
                "aperture_http_requests_total",
                "HTTP requests, by route and status code.",
                &["route", "status"],
            )?,
            http_duration: reg(&r, "aperture_http_request_duration_seconds", || {
                HistogramVec::new(
                    HistogramOpts::new("aperture_http_request_duration_seconds", "HTTP request duration by route.")
                        .buckets(prometheus::exponential_buckets(0.0005, 4.0, 9)?),
                    &["route"],
                )
            })?,
            http_connections_open: gauge("aperture_http_connections_open", "HTTP connections being served.")?,
            http_connections_refused: counter(
                "aperture_http_connections_refused_total",
                "HTTP connections answered 503 and closed because limits.http_max_connections were open.",
            )?,
            http_header_timeouts: counter(
                "aperture_http_header_timeouts_total",
                "HTTP connections closed because no complete request head arrived within limits.http_header_timeout.",
            )?,
            store_undecodable: counter_vec(
                "aperture_store_undecodable_total",
                "Stored records that could not be decoded and were left out, by what (stack, ledger_row).",
                &["what"],
            )?,
            transport: transport.clone(),
            registry: r.clone(),
        };
        Ok(m)
    }

    /// Reads the `aperture_transport_*` counters from `stats` from now on.
    pub fn set_transport_stats(&self, stats: TransportStatsFn) {
        *self.transport.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats);
    }

    /// Frames offered with `result` so far.
    pub fn frames(&self, result: &str) -> u64 {
        self.ingress_frames.with_label_values(&[result]).get()
    }

    /// Renders the Prometheus text format.
    pub fn render(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder.encode_to_string(&self.registry.gather()).unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_once_and_follows_the_naming_scheme() {
        let m = Metrics::new().expect("metrics");
        m.ingress_frames.with_label_values(&[frame_result::QUEUED]).inc();
        for family in m.registry.gather() {
            let name = family.name();
            assert!(name.starts_with("aperture_"), "{name}");
        }
        assert!(m.render().contains("aperture_ingress_frames_total{result=\"queued\"} 1"));
    }

    #[test]
    fn transport_counters_are_exported_from_the_server_snapshot() {
        let m = Metrics::new().expect("metrics");
        assert!(m.render().contains("aperture_transport_sequence_gaps_total 0"));
        m.set_transport_stats(Box::new(|| {
            Some(ServerStats {
                sequence_gaps: 4,
                sessions_opened: 2,
                rejections: [("bad_token".to_owned(), 3)].into_iter().collect(),
                decode_errors: [("bad_frame".to_owned(), 5)].into_iter().collect(),
                ..ServerStats::default()
            })
        }));
        for _ in 0..2 {
            let text = m.render();
            for line in [
                "aperture_transport_sequence_gaps_total 4",
                "aperture_transport_sessions_opened_total 2",
                "aperture_transport_rejections_total{reason=\"bad_token\"} 3",
                "aperture_transport_decode_errors_total{reason=\"bad_frame\"} 5",
            ] {
                assert!(text.contains(line), "{line} missing:\n{text}");
            }
        }
    }
}
