//! The agent's own metrics, all named `aperture_agent_<name>_<unit>` and
//! documented (name, type, labels, cardinality) in `docs/agent-metrics.md`.
//! A unit test keeps the two in step.
//!
//! Counters owned by other components (the reader thread's atomics, the
//! transport client's statistics) are mirrored here by the pipeline thread
//! once per second with [`Mirror`], so scraping never touches the hot path.

mod server;

use prometheus::{Counter, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

pub use server::{MetricsServer, MetricsServerError, serve};

/// Registers a metric, panicking only on a programming error (duplicate or
/// invalid name), which the unit tests catch.
fn reg<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, m: M) -> M {
    #[expect(clippy::expect_used, reason = "names are constants; a bad one fails every test run")]
    registry.register(Box::new(m.clone())).expect("metric names are unique and valid");
    m
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    #[expect(clippy::expect_used, reason = "constant, valid name and help")]
    reg(r, IntCounter::new(name, help).expect("valid metric"))
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    #[expect(clippy::expect_used, reason = "constant, valid name, help and labels")]
    reg(r, IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
}

fn gauge(r: &Registry, name: &str, help: &str) -> Gauge {
    #[expect(clippy::expect_used, reason = "constant, valid name and help")]
    reg(r, Gauge::new(name, help).expect("valid metric"))
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    #[expect(clippy::expect_used, reason = "constant, valid name and help")]
    reg(r, IntGauge::new(name, help).expect("valid metric"))
}

/// Every metric of the agent.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Events received from the kernel, by mode.
    pub events_captured: IntCounterVec,
    /// Events lost, by reason (`perf_lost`, `malformed`, `ring_full`, `ring_disconnected`).
    pub events_dropped: IntCounterVec,
    /// Events of processes the `filter` does not select.
    pub events_filtered: IntCounter,
    /// Events decoded but not batched (lock waits over the threshold, whose
    /// totals arrive through the in-kernel aggregates).
    pub events_ignored: IntCounterVec,
    /// In-kernel failure counters, by mode and reason.
    pub kernel_drops: IntCounterVec,
    /// Perf-buffer wakeups of the reader thread.
    pub reader_wakeups: IntCounter,
    /// Bytes read from the perf buffers.
    pub reader_bytes: IntCounter,
    /// Rows added to batches, by table.
    pub records: IntCounterVec,
    /// Batches flushed, by trigger.
    pub batches: IntCounterVec,
    /// Frames built.
    pub frames_built: IntCounter,
    /// Frame bytes built.
    pub frame_bytes: IntCounter,
    /// Batches that could not be encoded (too large).
    pub encode_errors: IntCounter,
    /// Frames built but refused by the transport (its buffer was closed or full).
    pub frames_refused: IntCounter,
    /// Frames handed to a carrier (first sends and resends).
    pub frames_sent: IntCounter,
    /// Frames acknowledged.
    pub frames_acked: IntCounter,
    /// Frames resent after a reconnect.
    pub frames_resent: IntCounter,
    /// Frames dropped, oldest first, because the unacknowledged buffer was full.
    pub frames_dropped: IntCounter,
    /// Frames sent with their lock classes as other futex, to an aggregator
    /// that does not read lock classes.
    pub frames_downgraded: IntCounter,
    /// Connections on which an older aggregator refused the newest session
    /// protocol (the next one offered the oldest).
    pub protocol_fallbacks: IntCounter,
    /// Frame bytes handed to a carrier.
    pub bytes_sent: IntCounter,
    /// Frames waiting for their acknowledgement.
    pub unacked_frames: IntGauge,
    /// 1 for the carrier in use, 0 for the others.
    pub carrier: IntGaugeVec,
    /// Reconnections to the aggregator.
    pub reconnects: IntCounter,
    /// Unique stacks found in the stack cache.
    pub symbolizer_hits: IntCounter,
    /// Unique stacks symbolized.
    pub symbolizer_misses: IntCounter,
    /// hits / (hits + misses) since start.
    pub symbolizer_hit_ratio: Gauge,
    /// Sampling frequency in effect.
    pub frequency: Gauge,
    /// Lock threshold in effect.
    pub lock_threshold: Gauge,
    /// Syscall threshold in effect.
    pub syscall_threshold: Gauge,
    /// Budget level (0 = as configured).
    pub budget_level: IntGauge,
    /// Budget adjustments, by direction.
    pub budget_adjustments: IntCounterVec,
    /// Last measured cost in percent of one core, by part (`agent`, `kernel`).
    pub budget_cost: prometheus::GaugeVec,
    /// The budget in percent of one core.
    pub budget_limit: Gauge,
    /// Agent CPU time.
    pub cpu_seconds: Counter,
    /// Agent resident memory.
    pub rss: IntGauge,
    /// `/proc/<pid>/cgroup` reads, by outcome.
    pub proc_reads: IntCounterVec,
    /// Processes cached by attribution.
    pub processes: IntGauge,
    /// Pods known on this node.
    pub kube_pods: IntGauge,
    /// Kubernetes API activity, by kind.
    pub kube_events: IntCounterVec,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new()
    }
}

impl AgentMetrics {
    /// Creates and registers every metric.
    pub fn new() -> AgentMetrics {
        let r = Registry::new();
        let m = AgentMetrics {
            events_captured: counter_vec(
                &r,
                "aperture_agent_events_captured_total",
                "Events received from the kernel, by mode.",
                &["mode"],
            ),
            events_dropped: counter_vec(
                &r,
                "aperture_agent_events_dropped_total",
                "Events lost between kernel and batch, by reason.",
                &["reason"],
            ),
            events_filtered: counter(
                &r,
                "aperture_agent_events_filtered_total",
                "Events of processes the filter does not select.",
            ),
            events_ignored: counter_vec(
                &r,
                "aperture_agent_events_ignored_total",
                "Events decoded but not batched, by kind.",
                &["kind"],
            ),
            kernel_drops: counter_vec(
                &r,
                "aperture_agent_kernel_drops_total",
                "Failures counted by the BPF programs, by mode and reason.",
                &["mode", "reason"],
            ),
            reader_wakeups: counter(&r, "aperture_agent_reader_wakeups_total", "Perf-buffer reader wakeups."),
            reader_bytes: counter(&r, "aperture_agent_reader_bytes_total", "Bytes read from the perf buffers."),
            records: counter_vec(&r, "aperture_agent_records_total", "Rows added to batches, by table.", &["table"]),
            batches: counter_vec(&r, "aperture_agent_batches_total", "Batches flushed, by trigger.", &["trigger"]),
            frames_built: counter(&r, "aperture_agent_frames_built_total", "Frames encoded."),
            frame_bytes: counter(&r, "aperture_agent_frame_bytes_total", "Bytes of frames encoded."),
            encode_errors: counter(&r, "aperture_agent_encode_errors_total", "Batches that could not be encoded."),
            frames_refused: counter(
                &r,
                "aperture_agent_frames_refused_total",
                "Frames built but refused by the transport (lost).",
            ),
            frames_sent: counter(&r, "aperture_agent_frames_sent_total", "Frames handed to a carrier."),
            frames_acked: counter(&r, "aperture_agent_frames_acked_total", "Frames acknowledged by the aggregator."),
            frames_resent: counter(&r, "aperture_agent_frames_resent_total", "Frames resent after a reconnect."),
            frames_dropped: counter(
                &r,
                "aperture_agent_frames_dropped_total",
                "Frames dropped because the unacknowledged buffer was full.",
            ),
            frames_downgraded: counter(
                &r,
                "aperture_agent_frames_downgraded_total",
                "Frames sent with lock classes as other futex to an aggregator that does not read them.",
            ),
            protocol_fallbacks: counter(
                &r,
                "aperture_agent_protocol_fallbacks_total",
                "Connections on which an older aggregator refused the newest session protocol.",
            ),
            bytes_sent: counter(&r, "aperture_agent_sent_bytes_total", "Frame bytes handed to a carrier."),
            unacked_frames: int_gauge(&r, "aperture_agent_unacked_frames", "Frames waiting for acknowledgement."),
            carrier: {
                #[expect(clippy::expect_used, reason = "constant, valid name, help and labels")]
                let g = IntGaugeVec::new(
                    Opts::new("aperture_agent_carrier_info", "1 for the carrier in use (quic or grpc)."),
                    &["carrier"],
                )
                .expect("valid metric");
                reg(&r, g)
            },
            reconnects: counter(&r, "aperture_agent_reconnects_total", "Reconnections to the aggregator."),
            symbolizer_hits: counter(
                &r,
                "aperture_agent_symbolizer_cache_hits_total",
                "Stacks found in the symbolized-stack cache.",
            ),
            symbolizer_misses: counter(
                &r,
                "aperture_agent_symbolizer_cache_misses_total",
                "Stacks symbolized (not in the cache).",
            ),
            symbolizer_hit_ratio: gauge(
                &r,
                "aperture_agent_symbolizer_cache_hit_ratio",
                "Fraction of stacks answered from the cache since start.",
            ),
            frequency: gauge(&r, "aperture_agent_sampling_frequency_hertz", "CPU sampling frequency in effect."),
            lock_threshold: gauge(&r, "aperture_agent_lock_threshold_seconds", "Lock threshold in effect."),
            syscall_threshold: gauge(&r, "aperture_agent_syscall_threshold_seconds", "Syscall threshold in effect."),
            budget_level: int_gauge(&r, "aperture_agent_budget_level", "Overhead budget level (0 = as configured)."),
            budget_adjustments: counter_vec(
                &r,
                "aperture_agent_budget_adjustments_total",
                "Overhead budget adjustments, by direction (lower, restore).",
                &["direction"],
            ),
            budget_cost: {
                #[expect(clippy::expect_used, reason = "constant, valid name, help and labels")]
                let g = prometheus::GaugeVec::new(
                    Opts::new(
                        "aperture_agent_budget_cost_percent",
                        "Cost over the last budget interval in percent of one core, by part (agent, kernel).",
                    ),
                    &["part"],
                )
                .expect("valid metric");
                reg(&r, g)
            },
            budget_limit: gauge(&r, "aperture_agent_budget_limit_percent", "The budget in percent of one core."),
            cpu_seconds: {
                #[expect(clippy::expect_used, reason = "constant, valid name and help")]
                let c = Counter::new("aperture_agent_cpu_seconds_total", "Agent CPU time (user + system).")
                    .expect("valid metric");
                reg(&r, c)
            },
            rss: int_gauge(&r, "aperture_agent_resident_memory_bytes", "Agent resident set size."),
            proc_reads: counter_vec(
                &r,
                "aperture_agent_proc_reads_total",
                "/proc/<pid>/cgroup reads, by outcome (ok, gone, error, malformed_line).",
                &["outcome"],
            ),
            processes: int_gauge(&r, "aperture_agent_processes", "Processes cached by attribution."),
            kube_pods: int_gauge(&r, "aperture_agent_kube_pods", "Pods known on this node."),
            kube_events: counter_vec(
                &r,
                "aperture_agent_kube_api_total",
                "Kubernetes API activity, by kind (list, event, expired, error, malformed).",
                &["kind"],
            ),
            registry: r,
        };
        for c in ["quic", "grpc"] {
            m.carrier.with_label_values(&[c]).set(0);
        }
        m
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out) {
            tracing::warn!("rendering metrics failed: {e}");
        }
        out
    }
}

/// Mirrors a monotonic counter owned elsewhere into a Prometheus counter by
/// adding the difference since the last call.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mirror {
    last: u64,
}

impl Mirror {
    /// Adds `current - last` to `counter`. A value going backwards (a
    /// restarted source) restarts the mirror without subtracting.
    pub fn sync(&mut self, counter: &IntCounter, current: u64) {
        if current >= self.last {
            counter.inc_by(current - self.last);
        } else {
            counter.inc_by(current);
        }
        self.last = current;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_documented() {
        let doc = include_str!("../../../docs/agent-metrics.md");
        let m = AgentMetrics::new();
        // Touch labelled families so they are gathered.
        m.events_captured.with_label_values(&["cpu"]).inc();
        m.events_dropped.with_label_values(&["perf_lost"]).inc();
        m.events_ignored.with_label_values(&["lock_event"]).inc();
        m.kernel_drops.with_label_values(&["cpu", "user_stack"]).inc();
        m.records.with_label_values(&["cpu"]).inc();
        m.batches.with_label_values(&["age"]).inc();
        m.budget_adjustments.with_label_values(&["lower"]).inc();
        m.budget_cost.with_label_values(&["agent"]).set(0.1);
        m.proc_reads.with_label_values(&["ok"]).inc();
        m.kube_events.with_label_values(&["list"]).inc();
        let families = m.registry.gather();
        assert!(families.len() >= 35, "{}", families.len());
        for f in families {
            let name = f.name();
            assert!(name.starts_with("aperture_agent_"), "{name}");
            assert!(doc.contains(&format!("`{name}`")), "docs/agent-metrics.md lacks `{name}`");
        }
    }

    #[test]
    fn mirror_adds_differences() {
        let c = IntCounter::new("x_total", "x").expect("valid");
        let mut mirror = Mirror::default();
        mirror.sync(&c, 5);
        mirror.sync(&c, 8);
        assert_eq!(c.get(), 8);
        mirror.sync(&c, 2); // source restarted
        assert_eq!(c.get(), 10);
    }

    #[test]
    fn renders_text_format() {
        let m = AgentMetrics::new();
        m.frequency.set(99.0);
        let text = m.render();
        assert!(text.contains("aperture_agent_sampling_frequency_hertz 99"), "{text}");
        assert!(text.contains("aperture_agent_carrier_info{carrier=\"quic\"} 0"), "{text}");
    }
}
