//! One synthetic profile in the formats the aggregator ingests: an Aperture
//! frame (the agents' own), a gzipped pprof profile as Pyroscope's SDKs push
//! it to `/ingest`, and an OTLP `ExportProfilesServiceRequest` (proto
//! v1.10.0) as OpenTelemetry senders export it.
//!
//! Every format carries the same content, built from one [`Batch`]: the
//! same stacks (leaf first, symbols and modules), the same processes and
//! the same number of samples per (process, stack). Each is in its own
//! natural shape: the frame lists timestamped records, pprof and OTLP list
//! each (process, stack) once with its sample count; pprof names the
//! process with a `pid` label (one Pyroscope application per push), OTLP
//! with a resource per process (`process.pid`, `process.executable.name`).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use anyhow::Context;
use aperture_core::model::Batch;
use aperture_transport::server::otlp::proto::collector::ExportProfilesServiceRequest;
use aperture_transport::server::otlp::proto::common::{AnyValue, KeyValue, any_value};
use aperture_transport::server::otlp::proto::profiles as otlp;
use aperture_transport::server::otlp::proto::resource::Resource;
use prost::Message;

/// The Pyroscope application and OTel `service.name` of every push.
pub const SERVICE: &str = "bench";

/// Sampling period of the synthetic CPU samples (99 Hz).
pub const PERIOD_NS: i64 = 10_101_010;

/// Samples per (process, stack) of a batch, and the time of its first record.
fn counts(batch: &Batch) -> (BTreeMap<(u32, u32), u64>, u64) {
    let mut out = BTreeMap::new();
    for s in &batch.cpu {
        *out.entry((s.target, s.stack)).or_insert(0) += u64::from(s.count);
    }
    (out, batch.cpu.iter().map(|s| s.time_ns).min().unwrap_or(0))
}

/// A string table that hands out each string's index once.
#[derive(Debug, Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, usize>,
}

impl Strings {
    fn new() -> Strings {
        let mut s = Strings::default();
        s.get(""); // index 0 is the empty string in both formats
        s
    }

    fn get(&mut self, s: &str) -> usize {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        self.table.push(s.to_owned());
        self.index.insert(s.to_owned(), self.table.len() - 1);
        self.table.len() - 1
    }
}

/// google/pprof `profile.proto`, the fields Pyroscope's SDKs fill.
mod pprof {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
    }
}

/// The batch as a pprof CPU profile of sample counts (`samples`/`count`,
/// period `cpu`/`nanoseconds`), gzipped: one sample per (process, stack)
/// with a `pid` label, one location per frame address, one function per
/// symbol, one mapping per module. The Go SDK also sends `cpu`/`nanoseconds`
/// values, which the aggregator stores as a second profile type: left out,
/// so that every format stores the same rows.
pub fn pprof_gzip(batch: &Batch) -> anyhow::Result<Vec<u8>> {
    let (counts, time_ns) = counts(batch);
    let mut s = Strings::new();
    let mut p = pprof::Profile {
        sample_type: vec![pprof::ValueType { r#type: s.get("samples") as i64, unit: s.get("count") as i64 }],
        period_type: Some(pprof::ValueType { r#type: s.get("cpu") as i64, unit: s.get("nanoseconds") as i64 }),
        period: PERIOD_NS,
        time_nanos: time_ns as i64,
        duration_nanos: 1_000_000_000,
        ..Default::default()
    };
    let mut mappings: HashMap<&str, u64> = HashMap::new();
    let mut functions: HashMap<&str, u64> = HashMap::new();
    let mut locations: HashMap<u64, u64> = HashMap::new();
    let mut stacks: Vec<Vec<u64>> = Vec::with_capacity(batch.stacks.len());
    for stack in &batch.stacks {
        let mut ids = Vec::with_capacity(stack.frames.len());
        for f in &stack.frames {
            let mapping_id = *mappings.entry(&f.module).or_insert_with(|| {
                p.mapping.push(pprof::Mapping {
                    id: p.mapping.len() as u64 + 1,
                    filename: s.get(&format!("/usr/lib/{}", f.module)) as i64,
                });
                p.mapping.len() as u64
            });
            let function_id = *functions.entry(&f.symbol).or_insert_with(|| {
                let name = s.get(&f.symbol) as i64;
                p.function.push(pprof::Function { id: p.function.len() as u64 + 1, name, system_name: name });
                p.function.len() as u64
            });
            let id = *locations.entry(f.address).or_insert_with(|| {
                p.location.push(pprof::Location {
                    id: p.location.len() as u64 + 1,
                    mapping_id,
                    address: f.address,
                    line: vec![pprof::Line { function_id, line: i64::from(f.line) }],
                });
                p.location.len() as u64
            });
            ids.push(id);
        }
        stacks.push(ids);
    }
    let pid_key = s.get("pid") as i64;
    for (&(target, stack), &n) in &counts {
        let pid = batch.targets.get(target as usize).map(|t| t.pid).unwrap_or(0);
        p.sample.push(pprof::Sample {
            location_id: stacks.get(stack as usize).cloned().unwrap_or_default(),
            value: vec![n as i64],
            label: vec![pprof::Label { key: pid_key, str: s.get(&pid.to_string()) as i64 }],
        });
    }
    p.string_table = s.table;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&p.encode_to_vec()).context("gzip")?;
    gz.finish().context("gzip")
}

/// The query of `POST /ingest` for a push of the batch, as the SDKs send
/// it (application name with tags, `from`/`until` in seconds).
pub fn pyroscope_query(batch: &Batch) -> String {
    let from = counts(batch).1 / 1_000_000_000;
    format!(
        "name={SERVICE}.cpu%7Bhost%3D{}%7D&from={from}&until={}&sampleRate=99&spyName=gospy&units=samples\
         &aggregationType=sum&format=pprof",
        batch.node,
        from + 1
    )
}

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
        key_strindex: 0,
    }
}

/// The batch as an OTLP profiles export: one resource per process
/// (`service.name`, `process.pid`, `process.executable.name`, `host.name`)
/// with one CPU profile whose samples are that process's stacks with their
/// counts, all sharing one dictionary.
pub fn otlp_request(batch: &Batch) -> ExportProfilesServiceRequest {
    let (counts, time_ns) = counts(batch);
    let mut s = Strings::new();
    let mut d = otlp::ProfilesDictionary {
        // Index 0 of every table is the zero value, as the spec asks.
        mapping_table: vec![otlp::Mapping::default()],
        location_table: vec![otlp::Location::default()],
        function_table: vec![otlp::Function::default()],
        stack_table: vec![otlp::Stack::default()],
        attribute_table: vec![otlp::KeyValueAndUnit::default()],
        ..Default::default()
    };
    let mut mappings: HashMap<&str, i32> = HashMap::new();
    let mut functions: HashMap<&str, i32> = HashMap::new();
    let mut locations: HashMap<u64, i32> = HashMap::new();
    for stack in &batch.stacks {
        let mut indices = Vec::with_capacity(stack.frames.len());
        for f in &stack.frames {
            let mapping_index = *mappings.entry(&f.module).or_insert_with(|| {
                let filename_strindex = s.get(&format!("/usr/lib/{}", f.module)) as i32;
                d.mapping_table.push(otlp::Mapping { filename_strindex, ..Default::default() });
                d.mapping_table.len() as i32 - 1
            });
            let function_index = *functions.entry(&f.symbol).or_insert_with(|| {
                let name = s.get(&f.symbol) as i32;
                d.function_table.push(otlp::Function {
                    name_strindex: name,
                    system_name_strindex: name,
                    ..Default::default()
                });
                d.function_table.len() as i32 - 1
            });
            let i = *locations.entry(f.address).or_insert_with(|| {
                d.location_table.push(otlp::Location {
                    mapping_index,
                    address: f.address,
                    lines: vec![otlp::Line { function_index, line: i64::from(f.line), column: 0 }],
                    attribute_indices: Vec::new(),
                });
                d.location_table.len() as i32 - 1
            });
            indices.push(i);
        }
        d.stack_table.push(otlp::Stack { location_indices: indices });
    }
    let sample_type =
        Some(otlp::ValueType { type_strindex: s.get("samples") as i32, unit_strindex: s.get("count") as i32 });
    let period_type =
        Some(otlp::ValueType { type_strindex: s.get("cpu") as i32, unit_strindex: s.get("nanoseconds") as i32 });
    let mut resource_profiles = Vec::with_capacity(batch.targets.len());
    for (t, target) in batch.targets.iter().enumerate() {
        let samples: Vec<otlp::Sample> = counts
            .iter()
            .filter(|((target, _), _)| *target as usize == t)
            .map(|(&(_, stack), &n)| otlp::Sample {
                // Stack 0 of the table is the empty one.
                stack_index: stack as i32 + 1,
                values: vec![n as i64],
                ..Default::default()
            })
            .collect();
        if samples.is_empty() {
            continue;
        }
        let attributes = vec![
            text("service.name", SERVICE),
            text("host.name", &batch.node),
            KeyValue {
                key: "process.pid".into(),
                value: Some(AnyValue { value: Some(any_value::Value::IntValue(i64::from(target.pid))) }),
                key_strindex: 0,
            },
            text("process.executable.name", &target.process),
        ];
        let profile = otlp::Profile {
            sample_type,
            samples,
            time_unix_nano: time_ns,
            duration_nano: 1_000_000_000,
            period_type,
            period: PERIOD_NS,
            ..Default::default()
        };
        resource_profiles.push(otlp::ResourceProfiles {
            resource: Some(Resource { attributes, ..Default::default() }),
            scope_profiles: vec![otlp::ScopeProfiles { profiles: vec![profile], ..Default::default() }],
            schema_url: String::new(),
        });
    }
    d.string_table = s.table;
    ExportProfilesServiceRequest { resource_profiles, dictionary: Some(d) }
}

/// The OTLP request as an OTLP/HTTP body: protobuf, gzipped.
pub fn otlp_http_gzip(request: &ExportProfilesServiceRequest) -> anyhow::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&request.encode_to_vec()).context("gzip")?;
    gz.finish().context("gzip")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::synthetic_batch;
    use std::io::Read;

    fn gunzip(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(b).read_to_end(&mut out).expect("gzip");
        out
    }

    #[test]
    fn pprof_carries_every_sample_and_frame_of_the_batch() {
        let batch = synthetic_batch(800, 100);
        let p = pprof::Profile::decode(gunzip(&pprof_gzip(&batch).expect("encode")).as_slice()).expect("decode");
        let total: i64 = p.sample.iter().map(|s| s.value[0]).sum();
        assert_eq!(total as u64, batch.sample_count());
        assert!(p.sample.iter().all(|s| s.location_id.len() == 16));
        // One location per distinct frame address; the leaf of stack 0 first.
        assert_eq!(p.location.len(), 1600);
        let leaf = &p.location[p.sample[0].location_id[0] as usize - 1];
        let f = &p.function[leaf.line[0].function_id as usize - 1];
        assert_eq!(p.string_table[f.name as usize], batch.stacks[0].frames[0].symbol);
    }

    #[test]
    fn otlp_carries_every_sample_per_process() {
        let batch = synthetic_batch(800, 100);
        let r = otlp_request(&batch);
        assert_eq!(r.resource_profiles.len(), 8);
        let d = r.dictionary.as_ref().expect("dictionary");
        let mut total = 0;
        for rp in &r.resource_profiles {
            for s in &rp.scope_profiles[0].profiles[0].samples {
                total += s.values[0];
                let stack = &d.stack_table[s.stack_index as usize];
                assert_eq!(stack.location_indices.len(), 16);
            }
        }
        assert_eq!(total as u64, batch.sample_count());
        assert!(!otlp_http_gzip(&r).expect("gzip").is_empty());
    }
}
