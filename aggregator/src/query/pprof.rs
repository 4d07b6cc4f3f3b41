//! pprof export: the `perftools.profiles.Profile` protobuf
//! (github.com/google/pprof, `proto/profile.proto`), gzip-compressed, as
//! `go tool pprof` and most profiling UIs read it.
//!
//! Only the fields Aperture fills or reads (the Pyroscope ingest decodes
//! pushed pprof with the same messages) are declared; field numbers follow
//! the upstream schema. Each sample carries two values: the count (samples,
//! contentions or calls) and the time in nanoseconds.

use std::collections::HashMap;
use std::io::Write;

use aperture_core::model::{Mode, ProfileType, StackFrame};
use flate2::Compression;
use flate2::write::GzEncoder;
use prost::Message;

use super::Profile;

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PbProfile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<PbValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<PbSample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<PbMapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<PbLocation>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<PbFunction>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<PbValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PbValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PbSample {
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    /// Read from pushed profiles (their string labels become tags); never written.
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<PbLabel>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PbLabel {
    #[prost(int64, tag = "1")]
    pub key: i64,
    /// A string value (0: none, the label is numeric).
    #[prost(int64, tag = "2")]
    pub str: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PbMapping {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "5")]
    pub filename: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PbLocation {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(uint64, tag = "3")]
    pub address: u64,
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<PbLine>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PbLine {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PbFunction {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
}

#[derive(Default)]
struct Builder {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    functions: Vec<PbFunction>,
    function_ids: HashMap<(i64, i64), u64>,
    locations: Vec<PbLocation>,
    location_ids: HashMap<(u64, i64, u64), u64>,
}

impl Builder {
    fn new() -> Builder {
        let mut b = Builder::default();
        b.string(""); // string_table[0] must be empty
        b
    }

    fn string(&mut self, s: &str) -> i64 {
        if let Some(id) = self.string_ids.get(s) {
            return *id;
        }
        let id = self.strings.len() as i64;
        self.strings.push(s.to_owned());
        self.string_ids.insert(s.to_owned(), id);
        id
    }

    fn location(&mut self, frame: &StackFrame) -> u64 {
        let name = self.string(&frame.display_name());
        let file = if frame.file.is_empty() { self.string(&frame.module) } else { self.string(&frame.file) };
        let next_fn = self.functions.len() as u64 + 1;
        let function_id = *self.function_ids.entry((name, file)).or_insert(next_fn);
        if function_id == next_fn {
            self.functions.push(PbFunction { id: function_id, name, system_name: name, filename: file });
        }
        let key = (function_id, i64::from(frame.line), frame.module_offset);
        let next_loc = self.locations.len() as u64 + 1;
        let location_id = *self.location_ids.entry(key).or_insert(next_loc);
        if location_id == next_loc {
            self.locations.push(PbLocation {
                id: location_id,
                mapping_id: 0,
                address: frame.module_offset,
                line: vec![PbLine { function_id, line: i64::from(frame.line) }],
            });
        }
        location_id
    }

    fn unknown(&mut self, name: &str) -> u64 {
        let frame = StackFrame { symbol: name.to_owned(), ..StackFrame::default() };
        self.location(&frame)
    }
}

fn sample_types(mode: Mode) -> (&'static str, &'static str) {
    match mode {
        Mode::Cpu => ("samples", "cpu"),
        Mode::Lock => ("contentions", "delay"),
        Mode::Syscall => ("calls", "time"),
    }
}

/// Encodes a profile of `kind` as gzip-compressed pprof. `from_ns`/`to_ns`
/// give the profile's time and duration. The agent's profiles carry two
/// values per sample, the count and the time in ns; a pushed profile its one
/// value, with its type's sample type and unit.
pub fn encode_pprof(profile: &Profile, kind: &ProfileType, from_ns: u64, to_ns: u64) -> std::io::Result<Vec<u8>> {
    let Some(mode) = kind.mode() else { return encode_pushed(profile, kind, from_ns, to_ns) };
    let mut b = Builder::new();
    let (count_name, time_name) = sample_types(mode);
    let count_type = PbValueType { r#type: b.string(count_name), unit: b.string("count") };
    let time_type = PbValueType { r#type: b.string(time_name), unit: b.string("nanoseconds") };
    let mut samples = Vec::with_capacity(profile.stacks.len());
    for s in &profile.stacks {
        let location_id = if s.frames.is_empty() {
            s.names.iter().rev().map(|n| b.unknown(n)).collect()
        } else {
            s.frames.iter().map(|f| b.location(f)).collect()
        };
        samples.push(PbSample {
            location_id,
            value: vec![i64::try_from(s.count).unwrap_or(i64::MAX), i64::try_from(s.total_ns).unwrap_or(i64::MAX)],
            label: Vec::new(),
        });
    }
    let period_type = time_type.clone();
    finish(b, vec![count_type, time_type], samples, period_type, from_ns, to_ns)
}

/// The profile of `samples` over `[from_ns, to_ns)` with the builder's
/// tables, gzipped.
fn finish(
    b: Builder,
    sample_type: Vec<PbValueType>,
    sample: Vec<PbSample>,
    period_type: PbValueType,
    from_ns: u64,
    to_ns: u64,
) -> std::io::Result<Vec<u8>> {
    let message = PbProfile {
        sample_type,
        sample,
        mapping: Vec::new(),
        location: b.locations,
        function: b.functions,
        string_table: b.strings,
        time_nanos: i64::try_from(from_ns).unwrap_or(i64::MAX),
        duration_nanos: i64::try_from(to_ns.saturating_sub(from_ns)).unwrap_or(i64::MAX),
        period_type: Some(period_type),
        period: 0,
    };
    gzip(&message)
}

fn gzip(message: &PbProfile) -> std::io::Result<Vec<u8>> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&message.encode_to_vec())?;
    gz.finish()
}

/// A pushed profile: one value per sample (the rows' count).
fn encode_pushed(profile: &Profile, kind: &ProfileType, from_ns: u64, to_ns: u64) -> std::io::Result<Vec<u8>> {
    let mut b = Builder::new();
    let sample_type = PbValueType { r#type: b.string(&kind.sample_type), unit: b.string(&kind.sample_unit) };
    let period_type = PbValueType { r#type: b.string(&kind.period_type), unit: b.string(&kind.period_unit) };
    let mut samples = Vec::with_capacity(profile.stacks.len());
    for s in &profile.stacks {
        let location_id = if s.frames.is_empty() {
            s.names.iter().rev().map(|n| b.unknown(n)).collect()
        } else {
            s.frames.iter().map(|f| b.location(f)).collect()
        };
        samples.push(PbSample {
            location_id,
            value: vec![i64::try_from(s.count).unwrap_or(i64::MAX)],
            label: Vec::new(),
        });
    }
    finish(b, vec![sample_type], samples, period_type, from_ns, to_ns)
}

#[cfg(test)]
mod tests {
    use super::super::ProfileStack;
    use super::*;
    use aperture_core::model::Stack;
    use flate2::read::GzDecoder;
    use std::io::Read;

    #[test]
    fn pprof_round_trips_through_gzip_and_protobuf() {
        let stack = Stack::new(vec![
            StackFrame { symbol: "leaf".into(), module: "app".into(), line: 7, ..Default::default() },
            StackFrame { symbol: "main".into(), module: "app".into(), ..Default::default() },
        ]);
        let profile = Profile {
            mode: Some(Mode::Cpu),
            stacks: vec![ProfileStack {
                hash: stack.hash,
                names: vec!["main".into(), "leaf".into()],
                frames: stack.frames.clone(),
                count: 3,
                total_ns: 30,
            }],
        };
        let gz = encode_pprof(&profile, &ProfileType::of_mode(Mode::Cpu), 1, 11).expect("encode");
        let mut raw = Vec::new();
        GzDecoder::new(&gz[..]).read_to_end(&mut raw).expect("gunzip");
        let p = PbProfile::decode(&raw[..]).expect("decode");
        assert_eq!(p.string_table[0], "");
        assert_eq!(p.sample.len(), 1);
        assert_eq!(p.sample[0].value, vec![3, 30]);
        let leaf_loc = &p.location[(p.sample[0].location_id[0] - 1) as usize];
        let leaf_fn = &p.function[(leaf_loc.line[0].function_id - 1) as usize];
        assert_eq!(p.string_table[leaf_fn.name as usize], "leaf");
        assert_eq!(leaf_loc.line[0].line, 7);
        assert_eq!(p.duration_nanos, 10);
    }
}
