//! Forwarding what the aggregator commits to an OTLP profiles endpoint
//! (`otlp.export.endpoint`).
//!
//! The writer hands every committed batch to [`Exporter::committed`] (a
//! [`CommitTap`]), which copies the rows that carry a stack into a bounded
//! queue and never blocks: when the queue is full the rows are dropped and
//! counted. A task turns each queued batch into an
//! `ExportProfilesServiceRequest` (one resource per label set, one profile
//! per type, a shared dictionary) and sends it, retrying what OTLP calls
//! retryable with exponential backoff, a bounded number of times. Stacks
//! the shards sent earlier are remembered (bounded) or read back from the
//! store. Counted in `aperture_otlp_export_requests_total{result}` and
//! `aperture_otlp_export_dropped_rows_total{reason}`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aperture_core::model::{Labels, ProfileType, Stack, StackHash};
use aperture_core::shard::RowKind;
use aperture_transport::server::otlp::proto::collector::ExportProfilesServiceRequest;
use aperture_transport::server::otlp::proto::common::{AnyValue, InstrumentationScope, KeyValue, any_value};
use aperture_transport::server::otlp::proto::profiles::{
    Function, KeyValueAndUnit, Line, Location, Mapping, Profile, ProfilesDictionary, ResourceProfiles, Sample,
    ScopeProfiles, Stack as PbStack, ValueType,
};
use aperture_transport::server::otlp::proto::resource::Resource;
use aperture_transport::server::otlp_export::OtlpExportClient;
use prometheus::IntCounterVec;
use tokio::sync::{mpsc, watch};

use crate::pipeline::state::CommitTap;
use crate::settings::OtlpExportSettings as ExportSettings;
use crate::store::{Store, WriteBatch};

/// Stacks remembered between batches; beyond this the memory is cleared
/// and stacks are read back from the store.
const MAX_CACHED_STACKS: usize = 100_000;
/// Sends of one request before its rows are dropped.
const MAX_ATTEMPTS: u32 = 5;

/// One stored row, as exported.
#[derive(Clone, Debug)]
struct Row {
    labels: Arc<Labels>,
    kind: RowKind,
    window_start_s: u64,
    stack: StackHash,
    value: u64,
}

#[derive(Debug)]
struct Committed {
    rows: Vec<Row>,
    stacks: Vec<Stack>,
}

#[derive(Clone, Debug)]
struct Counters {
    requests: IntCounterVec,
    dropped: IntCounterVec,
}

/// The commit tap's side: queues committed rows for the sending task.
#[derive(Debug)]
pub(crate) struct Exporter {
    queue: mpsc::Sender<Committed>,
    counters: Counters,
}

/// Starts the sending task; returns the tap to give the writer.
pub(crate) fn start(
    settings: &ExportSettings,
    store: Arc<dyn Store>,
    registry: &prometheus::Registry,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(Arc<Exporter>, impl std::future::Future<Output = ()> + Send + 'static)> {
    let token = Some(settings.token.as_str()).filter(|t| !t.is_empty());
    let client = OtlpExportClient::new(&settings.endpoint, token, settings.timeout)?;
    let requests = IntCounterVec::new(
        prometheus::Opts::new("aperture_otlp_export_requests_total", "Sends to the OTLP export endpoint, by result"),
        &["result"],
    )?;
    let dropped = IntCounterVec::new(
        prometheus::Opts::new(
            "aperture_otlp_export_dropped_rows_total",
            "Committed rows not forwarded to the OTLP export endpoint, by reason",
        ),
        &["reason"],
    )?;
    registry.register(Box::new(requests.clone()))?;
    registry.register(Box::new(dropped.clone()))?;
    let counters = Counters { requests, dropped };
    let (tx, rx) = mpsc::channel(settings.queue_batches.max(1));
    let task = send_loop(rx, client, store, counters.clone(), settings.min_backoff, stop);
    Ok((Arc::new(Exporter { queue: tx, counters }), task))
}

impl CommitTap for Exporter {
    fn committed(&self, batch: &WriteBatch) {
        let mut rows = Vec::new();
        let mut stacks = Vec::new();
        for flush in &batch.flushes {
            let labels: Vec<Arc<Labels>> = flush.labels.iter().cloned().map(Arc::new).collect();
            for (key, value) in &flush.rows {
                let value = match key.kind {
                    RowKind::Cpu | RowKind::Profile => value.count,
                    RowKind::Lock | RowKind::SlowCall => value.total_ns,
                    RowKind::Syscall => continue,
                };
                let Some(l) = labels.get(key.labels as usize) else { continue };
                if value > 0 {
                    let (labels, kind, window_start_s, stack) =
                        (Arc::clone(l), key.kind, key.window_start_s, key.stack);
                    rows.push(Row { labels, kind, window_start_s, stack, value });
                }
            }
            stacks.extend(flush.stacks.iter().cloned());
        }
        if rows.is_empty() {
            return;
        }
        let n = rows.len() as u64;
        match self.queue.try_send(Committed { rows, stacks }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.counters.dropped.with_label_values(&["queue_full"]).inc_by(n)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.counters.dropped.with_label_values(&["stopped"]).inc_by(n)
            }
        }
    }
}

async fn send_loop(
    mut rx: mpsc::Receiver<Committed>,
    client: OtlpExportClient,
    store: Arc<dyn Store>,
    counters: Counters,
    min_backoff: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut known: HashMap<StackHash, Stack> = HashMap::new();
    loop {
        let committed = tokio::select! {
            c = rx.recv() => match c { Some(c) => c, None => return },
            _ = stop.wait_for(|s| *s) => return,
        };
        if known.len() + committed.stacks.len() > MAX_CACHED_STACKS {
            known.clear();
        }
        known.extend(committed.stacks.into_iter().map(|s| (s.hash, s)));
        let mut missing: Vec<StackHash> =
            committed.rows.iter().map(|r| r.stack).filter(|h| !known.contains_key(h)).collect();
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            match store.stacks(&missing).await {
                Ok(found) => known.extend(found.into_iter().map(|s| (s.hash, s))),
                Err(e) => tracing::warn!(error = %e, stacks = missing.len(), "reading stacks to export"),
            }
        }
        let (request, rows, unknown) = to_request(&committed.rows, &known);
        if unknown > 0 {
            counters.dropped.with_label_values(&["unknown_stack"]).inc_by(unknown);
        }
        if rows == 0 {
            continue;
        }
        let mut backoff = min_backoff;
        for attempt in 1..=MAX_ATTEMPTS {
            match client.send(request.clone()).await {
                Ok(()) => {
                    counters.requests.with_label_values(&["ok"]).inc();
                    break;
                }
                Err(e) if e.retryable && attempt < MAX_ATTEMPTS => {
                    counters.requests.with_label_values(&["retry"]).inc();
                    tracing::debug!(error = %e, attempt, "OTLP export failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.wait_for(|s| *s) => {
                            counters.dropped.with_label_values(&["stopped"]).inc_by(rows);
                            return;
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                Err(e) => {
                    counters.requests.with_label_values(&["failed"]).inc();
                    counters.dropped.with_label_values(&["send_failed"]).inc_by(rows);
                    tracing::warn!(error = %e, attempt, rows, "OTLP export failed; rows dropped");
                    break;
                }
            }
        }
    }
}

/// Interns strings, functions, mappings, locations and stacks of one request.
#[derive(Default)]
struct Dictionary {
    d: ProfilesDictionary,
    strings: HashMap<String, i32>,
    functions: HashMap<(i32, i32), i32>,
    mappings: HashMap<i32, i32>,
    locations: HashMap<(i32, i32, i64, u64, bool), i32>,
    stacks: HashMap<StackHash, i32>,
    kernel: Option<i32>,
}

impl Dictionary {
    fn new() -> Dictionary {
        let mut d = Dictionary::default();
        // Index 0 of every table is the zero value.
        d.string("");
        d.d.mapping_table.push(Mapping::default());
        d.d.location_table.push(Location::default());
        d.d.function_table.push(Function::default());
        d.d.stack_table.push(PbStack::default());
        d.d.attribute_table.push(Default::default());
        d
    }

    fn string(&mut self, s: &str) -> i32 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.d.string_table.len() as i32;
        self.d.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), i);
        i
    }

    /// `profile.frame.type = kernel`, as the OpenTelemetry eBPF profiler marks kernel frames.
    fn kernel_attribute(&mut self) -> i32 {
        if let Some(i) = self.kernel {
            return i;
        }
        let key_strindex = self.string("profile.frame.type");
        let value = Some(AnyValue { value: Some(any_value::Value::StringValue("kernel".into())) });
        let i = self.d.attribute_table.len() as i32;
        self.d.attribute_table.push(KeyValueAndUnit { key_strindex, value, unit_strindex: 0 });
        self.kernel = Some(i);
        i
    }

    fn stack(&mut self, stack: &Stack) -> i32 {
        if let Some(&i) = self.stacks.get(&stack.hash) {
            return i;
        }
        let mut location_indices = Vec::with_capacity(stack.frames.len());
        for f in &stack.frames {
            let name = self.string(&f.display_name());
            let file = self.string(&f.file);
            let next = self.d.function_table.len() as i32;
            let function = *self.functions.entry((name, file)).or_insert(next);
            if function == next {
                self.d.function_table.push(Function {
                    name_strindex: name,
                    filename_strindex: file,
                    ..Function::default()
                });
            }
            let module = self.string(&f.module);
            let mapping = if f.module.is_empty() {
                0
            } else {
                let next = self.d.mapping_table.len() as i32;
                let m = *self.mappings.entry(module).or_insert(next);
                if m == next {
                    self.d.mapping_table.push(Mapping { filename_strindex: module, ..Mapping::default() });
                }
                m
            };
            let key = (function, mapping, i64::from(f.line), f.address, f.kernel);
            let next = self.d.location_table.len() as i32;
            let location = *self.locations.entry(key).or_insert(next);
            if location == next {
                let attribute_indices = if f.kernel { vec![self.kernel_attribute()] } else { Vec::new() };
                self.d.location_table.push(Location {
                    mapping_index: mapping,
                    address: f.address,
                    lines: vec![Line { function_index: function, line: i64::from(f.line), column: 0 }],
                    attribute_indices,
                });
            }
            location_indices.push(location);
        }
        let i = self.d.stack_table.len() as i32;
        self.d.stack_table.push(PbStack { location_indices });
        self.stacks.insert(stack.hash, i);
        i
    }
}

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_owned())) }),
        ..KeyValue::default()
    }
}

/// The resource attributes of a label set: the inverse of the ingest mapping.
fn attributes(l: &Labels) -> Vec<KeyValue> {
    let mut out = Vec::new();
    let k8s = !l.namespace.is_empty() || !l.pod.is_empty();
    for (key, value) in [
        ("service.name", &l.service),
        ("k8s.namespace.name", &l.namespace),
        ("k8s.pod.name", &l.pod),
        ("k8s.container.name", &l.container),
        (if k8s { "k8s.node.name" } else { "host.name" }, &l.node),
        ("process.executable.name", &l.process),
    ] {
        if !value.is_empty() {
            out.push(text(key, value));
        }
    }
    if l.pid > 0 {
        let value = Some(AnyValue { value: Some(any_value::Value::IntValue(i64::from(l.pid))) });
        out.push(KeyValue { key: "process.pid".into(), value, ..KeyValue::default() });
    }
    out.extend(l.tags.iter().map(|(k, v)| text(k, v)));
    out
}

fn profile_type(row: &Row) -> Option<ProfileType> {
    match row.kind.mode() {
        Some(mode) => Some(ProfileType::of_mode(mode)),
        None => ProfileType::parse_id(&row.labels.profile_type),
    }
}

/// The request for `rows`, the rows in it, and the rows left out because
/// their stack is unknown (or their type unreadable).
fn to_request(rows: &[Row], known: &HashMap<StackHash, Stack>) -> (ExportProfilesServiceRequest, u64, u64) {
    let mut dict = Dictionary::new();
    let mut resources: Vec<ResourceProfiles> = Vec::new();
    let mut resource_of: HashMap<Arc<Labels>, usize> = HashMap::new();
    let mut profile_of: HashMap<(usize, String), usize> = HashMap::new();
    let (mut taken, mut unknown) = (0u64, 0u64);
    for row in rows {
        let (Some(stack), Some(ty)) = (known.get(&row.stack), profile_type(row)) else {
            unknown += 1;
            continue;
        };
        let stack_index = dict.stack(stack);
        // Resource identity is the label set without its profile type.
        let mut labels = (*row.labels).clone();
        labels.profile_type.clear();
        let r = *resource_of.entry(Arc::new(labels)).or_insert_with_key(|l| {
            resources.push(ResourceProfiles {
                resource: Some(Resource { attributes: attributes(l), ..Resource::default() }),
                scope_profiles: vec![ScopeProfiles {
                    scope: Some(InstrumentationScope {
                        name: "aperture".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..InstrumentationScope::default()
                    }),
                    ..ScopeProfiles::default()
                }],
                ..ResourceProfiles::default()
            });
            resources.len() - 1
        });
        let profiles = &mut resources[r].scope_profiles[0].profiles;
        let p = match profile_of.get(&(r, ty.id())) {
            Some(&p) => p,
            None => {
                let sample_type = ValueType {
                    type_strindex: dict.string(&ty.sample_type),
                    unit_strindex: dict.string(&ty.sample_unit),
                };
                let period_type = ValueType {
                    type_strindex: dict.string(&ty.period_type),
                    unit_strindex: dict.string(&ty.period_unit),
                };
                profiles.push(Profile {
                    sample_type: Some(sample_type),
                    period_type: Some(period_type),
                    time_unix_nano: row.window_start_s.saturating_mul(1_000_000_000),
                    ..Profile::default()
                });
                profile_of.insert((r, ty.id()), profiles.len() - 1);
                profiles.len() - 1
            }
        };
        let profile = &mut profiles[p];
        let t = row.window_start_s.saturating_mul(1_000_000_000);
        profile.time_unix_nano = profile.time_unix_nano.min(t);
        profile.samples.push(Sample {
            stack_index,
            values: vec![i64::try_from(row.value).unwrap_or(i64::MAX)],
            timestamps_unix_nano: vec![t],
            ..Sample::default()
        });
        taken += 1;
    }
    (ExportProfilesServiceRequest { resource_profiles: resources, dictionary: Some(dict.d) }, taken, unknown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aperture_core::model::StackFrame;
    use aperture_core::shard::{Flush, RowKey, RowValue};

    fn stack(names: &[&str]) -> Stack {
        Stack::new(
            names
                .iter()
                .map(|n| {
                    let kernel = n.starts_with("k_");
                    let module = if kernel { "[kernel]" } else { "" }.to_owned();
                    StackFrame { symbol: (*n).into(), kernel, module, ..StackFrame::default() }
                })
                .collect(),
        )
    }

    fn batch(rows: &[(RowKind, &Stack, u64)]) -> WriteBatch {
        let labels = Labels {
            service: "api".into(),
            pod: "web-1".into(),
            namespace: "shop".into(),
            pid: 9,
            tags: vec![("env".into(), "ci".into())],
            profile_type: "process_cpu:samples:count:cpu:nanoseconds".into(),
            ..Labels::default()
        };
        let flush = Flush {
            labels: vec![labels],
            rows: rows
                .iter()
                .map(|(kind, s, v)| {
                    let key = RowKey { window_start_s: 100, kind: *kind, labels: 0, stack: s.hash, detail: 0 };
                    (key, RowValue { count: *v, total_ns: *v * 10, ..RowValue::default() })
                })
                .collect(),
            stacks: rows.iter().map(|(_, s, _)| (*s).clone()).collect(),
            ..Flush::default()
        };
        WriteBatch { flushes: vec![flush], ..WriteBatch::default() }
    }

    fn exporter(queue: usize) -> (Exporter, mpsc::Receiver<Committed>) {
        let (tx, rx) = mpsc::channel(queue);
        let opts = |n: &str| prometheus::Opts::new(n, "test");
        let counters = Counters {
            requests: IntCounterVec::new(opts("r"), &["result"]).expect("counter"),
            dropped: IntCounterVec::new(opts("d"), &["reason"]).expect("counter"),
        };
        (Exporter { queue: tx, counters }, rx)
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking_the_writer() {
        let (e, _rx) = exporter(1);
        let s = stack(&["leaf", "main"]);
        e.committed(&batch(&[(RowKind::Profile, &s, 3)]));
        e.committed(&batch(&[(RowKind::Profile, &s, 3), (RowKind::Cpu, &s, 1)]));
        assert_eq!(e.counters.dropped.with_label_values(&["queue_full"]).get(), 2);
        // Syscall statistics have no stack: nothing to export, nothing dropped.
        e.committed(&batch(&[(RowKind::Syscall, &s, 3)]));
        assert_eq!(e.counters.dropped.with_label_values(&["queue_full"]).get(), 2);
    }

    #[test]
    fn what_is_exported_reads_back_as_what_was_committed() {
        let (e, mut rx) = exporter(4);
        let (a, b) = (stack(&["k_leaf", "main"]), stack(&["other", "main"]));
        e.committed(&batch(&[(RowKind::Profile, &a, 3), (RowKind::Profile, &b, 4), (RowKind::Lock, &a, 2)]));
        let committed = rx.try_recv().expect("queued");
        let known: HashMap<StackHash, Stack> = [(a.hash, a.clone())].into_iter().collect();
        let (request, taken, unknown) = to_request(&committed.rows, &known);
        assert_eq!((taken, unknown), (2, 1), "the row whose stack is unknown is left out");
        let back = super::super::convert::to_batch(&request, 0).expect("our own ingest reads it");
        let mut got: Vec<(String, Vec<String>, u64)> = back
            .series
            .iter()
            .flat_map(|s| {
                let names: Vec<String> =
                    back.stacks[s.samples[0].stack as usize].frames.iter().map(|f| f.symbol.clone()).collect();
                s.samples.iter().map(move |x| (s.labels.profile_type.clone(), names.clone(), x.value))
            })
            .collect();
        got.sort();
        let names = vec!["k_leaf".to_owned(), "main".to_owned()];
        let frames = &back.stacks[0].frames;
        assert!(frames[0].kernel && !frames[1].kernel, "kernel frames stay kernel frames: {frames:?}");
        assert_eq!(
            got,
            [
                ("lock:wait:nanoseconds:lock:count".to_owned(), names.clone(), 20),
                ("process_cpu:samples:count:cpu:nanoseconds".to_owned(), names, 3),
            ]
        );
        let l = &back.series[0].labels;
        assert_eq!((l.service.as_str(), l.pod.as_str(), l.namespace.as_str(), l.pid), ("api", "web-1", "shop", 9));
        assert_eq!(l.tags, [("env".to_owned(), "ci".to_owned())]);
    }
}
