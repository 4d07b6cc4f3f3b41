//! The agent's own metrics, all named `aperture_agent_<name>_<unit>` and
//! documented (name, type, labels, cardinality) in `docs/agent-metrics.md`.
//! A unit test keeps the two in step.
//!
//! Counters owned by other components (the reader thread's atomics, the
//! transport client's statistics) are mirrored here by the pipeline thread
//! once per second with [`Mirror`], so scraping never touches the hot path.

mod server;

use aperture_probes::UnwindStats;
use aperture_probes::abi::UnwindStat;
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
    /// User stacks seen by the table walker, by outcome.
    pub unwind_stacks: IntCounterVec,
    /// User frames the table walker recovered, by how.
    pub unwind_frames: IntCounterVec,
    /// Objects the unwinder handled, by result.
    pub unwind_objects: IntCounterVec,
    /// Work the unwinder had no room for, by kind.
    pub unwind_dropped: IntCounterVec,
    /// Unwind tables loaded.
    pub unwind_tables: IntGauge,
    /// Bytes of unwind rows loaded.
    pub unwind_table_bytes: IntGauge,
    /// Processes the table walker knows.
    pub unwind_processes: IntGauge,
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
            unwind_stacks: counter_vec(
                &r,
                "aperture_agent_unwind_stacks_total",
                "User stacks seen by the table walker, by outcome.",
                &["outcome"],
            ),
            unwind_frames: counter_vec(
                &r,
                "aperture_agent_unwind_frames_total",
                "User frames recovered by the table walker, by how.",
                &["source"],
            ),
            unwind_objects: counter_vec(
                &r,
                "aperture_agent_unwind_objects_total",
                "Objects handled by the unwinder, by result.",
                &["result"],
            ),
            unwind_dropped: counter_vec(
                &r,
                "aperture_agent_unwind_dropped_total",
                "Unwinder work dropped for lack of room, by kind.",
                &["kind"],
            ),
            unwind_tables: int_gauge(&r, "aperture_agent_unwind_tables", "Unwind tables loaded."),
            unwind_table_bytes: int_gauge(&r, "aperture_agent_unwind_table_bytes", "Bytes of unwind rows loaded."),
            unwind_processes: int_gauge(&r, "aperture_agent_unwind_processes", "Processes the table walker knows."),
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

/// Where each of the unwinder's counters goes: a family of
/// [`AgentMetrics`] and its label value.
fn unwind_counter(m: &AgentMetrics, stat: UnwindStat) -> IntCounter {
    match stat {
        UnwindStat::FramesTable => m.unwind_frames.with_label_values(&["table"]),
        UnwindStat::FramesFramePointer => m.unwind_frames.with_label_values(&["frame_pointer"]),
        UnwindStat::Evicted => m.unwind_frames.with_label_values(&["evicted_table"]),
        UnwindStat::Walked
        | UnwindStat::NoProcess
        | UnwindStat::Truncated
        | UnwindStat::NoMapping
        | UnwindStat::Unsupported
        | UnwindStat::ReadFailed
        | UnwindStat::FramePointerEnded => m.unwind_stacks.with_label_values(&[stat.as_str()]),
    }
}

/// The last values of the unwinder's counters, mirrored into
/// [`AgentMetrics`] by [`AgentMetrics::sync_unwind`].
#[derive(Debug, Default)]
pub struct UnwindMirrors {
    kernel: [Mirror; UnwindStat::ALL.len()],
    objects: [Mirror; 5],
    dropped: [Mirror; 2],
}

impl AgentMetrics {
    /// Publishes the unwinder's state and adds what its counters moved by
    /// since the last call (a restarted unwinder starts its mirrors over).
    pub fn sync_unwind(&self, mirrors: &mut UnwindMirrors, s: &UnwindStats) {
        for &(stat, n) in &s.kernel {
            if let Some(mirror) = mirrors.kernel.get_mut(stat as usize) {
                mirror.sync(&unwind_counter(self, stat), n);
            }
        }
        let objects = [
            ("built", s.built),
            ("from_disk", s.from_disk),
            ("without_table", s.without_table),
            ("evicted", s.evictions),
        ];
        for (i, (result, n)) in objects.into_iter().enumerate() {
            mirrors.objects[i].sync(&self.unwind_objects.with_label_values(&[result]), n);
        }
        let dropped = [("process", s.refused), ("request", s.requests_dropped)];
        for (i, (kind, n)) in dropped.into_iter().enumerate() {
            mirrors.dropped[i].sync(&self.unwind_dropped.with_label_values(&[kind]), n);
        }
        self.unwind_tables.set(i64::try_from(s.tables).unwrap_or(i64::MAX));
        self.unwind_table_bytes.set(i64::try_from(s.table_bytes).unwrap_or(i64::MAX));
        self.unwind_processes.set(i64::try_from(s.processes).unwrap_or(i64::MAX));
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
        m.unwind_stacks.with_label_values(&["walked"]).inc();
        m.unwind_frames.with_label_values(&["table"]).inc();
        m.unwind_objects.with_label_values(&["built"]).inc();
        m.unwind_dropped.with_label_values(&["request"]).inc();
        let families = m.registry.gather();
        assert!(families.len() >= 35, "{}", families.len());
        for f in families {
            let name = f.name();
            assert!(name.starts_with("aperture_agent_"), "{name}");
            assert!(doc.contains(&format!("`{name}`")), "docs/agent-metrics.md lacks `{name}`");
        }
    }

    #[test]
    fn unwinder_counters_reach_their_families_by_reason() {
        let m = AgentMetrics::new();
        let mut mirrors = UnwindMirrors::default();
        let stats = |walked, no_table, frames| UnwindStats {
            tables: 3,
            table_bytes: 4096,
            built: 2,
            from_disk: 1,
            requests_dropped: 5,
            kernel: vec![
                (UnwindStat::Walked, walked),
                (UnwindStat::NoProcess, no_table),
                (UnwindStat::FramesTable, frames),
            ],
            ..UnwindStats::default()
        };
        m.sync_unwind(&mut mirrors, &stats(10, 2, 80));
        m.sync_unwind(&mut mirrors, &stats(15, 4, 120));
        let text = m.render();
        for line in [
            "aperture_agent_unwind_stacks_total{outcome=\"walked\"} 15",
            "aperture_agent_unwind_stacks_total{outcome=\"no_process_table\"} 4",
            "aperture_agent_unwind_frames_total{source=\"table\"} 120",
            "aperture_agent_unwind_objects_total{result=\"built\"} 2",
            "aperture_agent_unwind_objects_total{result=\"from_disk\"} 1",
            "aperture_agent_unwind_dropped_total{kind=\"request\"} 5",
            "aperture_agent_unwind_tables 3",
            "aperture_agent_unwind_table_bytes 4096",
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
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
