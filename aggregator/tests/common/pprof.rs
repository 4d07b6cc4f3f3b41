//! pprof profiles as SDKs send them (google/pprof `profile.proto`, the
//! fields the tests use).

use std::io::Write;

use prost::Message;

/// The pprof messages a test sends (google/pprof `profile.proto`, the fields used).
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
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
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
}

/// A pprof profile of `types` (type, unit) with period type `period`, whose
/// samples are (stack root first, values).
pub fn pprof(types: &[(&str, &str)], period: (&str, &str), samples: &[(&[&str], &[i64])], time_s: u64) -> Vec<u8> {
    let samples: Vec<LabelledSample> = samples.iter().map(|(s, v)| (*s, *v, &[][..])).collect();
    pprof_labelled(types, period, &samples, time_s)
}

/// A sample: its stack (root first), values and string labels.
pub type LabelledSample<'a> = (&'a [&'a str], &'a [i64], &'a [(&'a str, &'a str)]);

/// [`pprof`] whose samples also carry string labels.
pub fn pprof_labelled(
    types: &[(&str, &str)],
    period: (&str, &str),
    samples: &[LabelledSample],
    time_s: u64,
) -> Vec<u8> {
    let mut strings: Vec<String> = vec![String::new()];
    let mut s = |x: &str| -> i64 {
        match strings.iter().position(|y| y == x) {
            Some(i) => i as i64,
            None => {
                strings.push(x.to_owned());
                strings.len() as i64 - 1
            }
        }
    };
    let sample_type = types.iter().map(|(t, u)| ValueType { r#type: s(t), unit: s(u) }).collect();
    let period_type = Some(ValueType { r#type: s(period.0), unit: s(period.1) });
    let mapping = vec![Mapping { id: 1, filename: s("/usr/bin/app") }];
    let mut function: Vec<Function> = Vec::new();
    let mut location: Vec<Location> = Vec::new();
    let mut sample = Vec::new();
    for (stack, values, labels) in samples {
        let mut ids = Vec::new();
        for name in stack.iter().rev() {
            let n = s(name);
            let id = match function.iter().position(|f| f.name == n) {
                Some(i) => i as u64 + 1,
                None => {
                    function.push(Function { id: function.len() as u64 + 1, name: n });
                    let id = function.len() as u64;
                    location.push(Location { id, mapping_id: 1, line: vec![Line { function_id: id, line: 1 }] });
                    id
                }
            };
            ids.push(id);
        }
        let label = labels.iter().map(|(k, v)| Label { key: s(k), str: s(v) }).collect();
        sample.push(Sample { location_id: ids, value: values.to_vec(), label });
    }
    Profile {
        sample_type,
        sample,
        mapping,
        location,
        function,
        string_table: strings,
        time_nanos: (time_s * 1_000_000_000) as i64,
        period_type,
    }
    .encode_to_vec()
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).expect("gzip");
    gz.finish().expect("gzip")
}
