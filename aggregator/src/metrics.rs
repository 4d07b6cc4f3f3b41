//! The aggregator's own metrics, named and registered in one place.
//! Every metric here is documented in `docs/metrics.md` (name, type, unit,
//! labels, meaning); `/api/health` reads the same values.
//!
//! Each aggregator owns its [`prometheus::Registry`] (no global registry), so
//! several can run in one process (tests).

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
            registry: r.clone(),
        };
        Ok(m)
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
}
