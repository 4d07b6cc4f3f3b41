//! An `ExportProfilesServiceRequest` (OTLP proto v1.10.0) turned into a
//! [`ProfileBatch`]: stacks resolved through the request's dictionary
//! (`stack_table` → `location_table` → `function_table`/`mapping_table` →
//! `string_table`), attributes of the resource, the scope, the profile and
//! each sample mapped onto labels, one series per label set and type.
//!
//! Every index is checked: a request that refers outside its tables is
//! refused whole, so nothing of a malformed request is stored.

use std::collections::{BTreeMap, HashMap};

use aperture_core::model::{Labels, Mode, ProfileBatch, ProfileSample, ProfileSeries, ProfileType, Stack, StackFrame};
use aperture_transport::server::otlp::proto::collector::ExportProfilesServiceRequest;
use aperture_transport::server::otlp::proto::common::{AnyValue, KeyValue, any_value};
use aperture_transport::server::otlp::proto::profiles::{Profile, ProfilesDictionary, Stack as PbStack};

use crate::store::{MAX_TAGS, valid_tag};

pub(crate) use crate::pyroscope::ConvertError;

fn bad(message: impl Into<String>) -> ConvertError {
    ConvertError::Bad(message.into())
}

/// The labels a set of attributes builds up; later attributes (sample over
/// profile over scope over resource) replace earlier ones.
#[derive(Clone, Debug, Default)]
struct LabelSet {
    service: String,
    namespace: String,
    pod: String,
    container_name: String,
    container_id: String,
    node: String,
    host: String,
    process: String,
    pid: u32,
    tags: BTreeMap<String, String>,
}

impl LabelSet {
    fn set(&mut self, key: &str, value: &AnyValue, strings: &[String]) -> Result<(), ConvertError> {
        let Some(text) = value_text(value, strings)? else { return Ok(()) };
        match key {
            "service.name" => self.service = text,
            "k8s.namespace.name" => self.namespace = text,
            "k8s.pod.name" => self.pod = text,
            "k8s.container.name" => self.container_name = text,
            "container.id" => self.container_id = text,
            "k8s.node.name" => self.node = text,
            "host.name" => self.host = text,
            "process.executable.name" => self.process = text,
            "process.pid" => {
                self.pid =
                    text.parse().map_err(|_| bad(format!("attribute process.pid = {text:?} is not a process id")))?
            }
            _ => drop(self.tags.insert(key.to_owned(), text)),
        }
        Ok(())
    }

    fn labels(&self, profile_type: &str) -> Result<Labels, ConvertError> {
        for (k, v) in &self.tags {
            if !valid_tag(k, v) {
                return Err(bad(format!(
                    "attribute {k:?}={v:?}: keys are letters, digits, `_`, `.`, `-` (at most 128 bytes), values at \
                     most 1 KiB without control characters"
                )));
            }
        }
        if self.tags.len() > MAX_TAGS {
            return Err(ConvertError::TooLarge(format!(
                "a series has {} attributes that become tags, more than the limit of {MAX_TAGS}; send fewer attributes",
                self.tags.len()
            )));
        }
        let fields = [&self.service, &self.namespace, &self.pod, &self.container_name, &self.container_id, &self.node];
        if fields.iter().chain([&&self.host, &&self.process]).any(|s| s.len() > 1024 || s.chars().any(char::is_control))
        {
            return Err(bad(
                "a resource attribute (service.name, k8s.*, container.id, host.name, process.*) is over 1 KiB or holds control characters",
            ));
        }
        Ok(Labels {
            node: if self.node.is_empty() { self.host.clone() } else { self.node.clone() },
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
            container: if self.container_name.is_empty() {
                self.container_id.clone()
            } else {
                self.container_name.clone()
            },
            process: self.process.clone(),
            pid: self.pid,
            service: self.service.clone(),
            tags: self.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            profile_type: profile_type.to_owned(),
        })
    }
}

/// A string of the table; index 0 is the empty string.
fn string(strings: &[String], i: i32, what: &str) -> Result<String, ConvertError> {
    usize::try_from(i).ok().and_then(|i| strings.get(i)).cloned().or_else(|| (i == 0).then(String::new)).ok_or_else(
        || bad(format!("{what} refers to string {i}, outside the string table ({} entries)", strings.len())),
    )
}

/// The text of a scalar value; `None` for arrays, maps and bytes (not labels).
fn value_text(value: &AnyValue, strings: &[String]) -> Result<Option<String>, ConvertError> {
    Ok(match &value.value {
        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
        Some(any_value::Value::StringValueStrindex(i)) => Some(string(strings, *i, "an attribute value")?),
        Some(any_value::Value::BoolValue(b)) => Some(b.to_string()),
        Some(any_value::Value::IntValue(n)) => Some(n.to_string()),
        Some(any_value::Value::DoubleValue(d)) => Some(d.to_string()),
        _ => None,
    })
}

fn key_of(kv: &KeyValue, strings: &[String]) -> Result<String, ConvertError> {
    if kv.key.is_empty() { string(strings, kv.key_strindex, "an attribute key") } else { Ok(kv.key.clone()) }
}

fn apply_key_values(set: &mut LabelSet, attributes: &[KeyValue], strings: &[String]) -> Result<(), ConvertError> {
    for kv in attributes {
        if let Some(v) = &kv.value {
            set.set(&key_of(kv, strings)?, v, strings)?;
        }
    }
    Ok(())
}

/// Applies `indices` of the dictionary's attribute table.
fn apply_indices(set: &mut LabelSet, indices: &[i32], d: &ProfilesDictionary) -> Result<(), ConvertError> {
    for &i in indices {
        let a = usize::try_from(i).ok().and_then(|i| d.attribute_table.get(i)).ok_or_else(|| {
            bad(format!("attribute index {i} is outside the attribute table ({} entries)", d.attribute_table.len()))
        })?;
        if let Some(v) = &a.value {
            let key = string(&d.string_table, a.key_strindex, "an attribute key")?;
            if !key.is_empty() {
                set.set(&key, v, &d.string_table)?;
            }
        }
    }
    Ok(())
}

/// The profile name of a sample type, in Pyroscope's terms.
fn profile_name(sample_type: &str, period_type: &str) -> String {
    match sample_type {
        "cpu" | "samples" if period_type == "cpu" || period_type.is_empty() || period_type == "samples" => {
            "process_cpu".into()
        }
        "wall" => "wall".into(),
        s if s.starts_with("alloc_") || s.starts_with("inuse_") => "memory".into(),
        s if s.starts_with("goroutine") => "goroutines".into(),
        "contentions" | "delay" if period_type == "contentions" => "mutex".into(),
        "" => "unknown".into(),
        s => s.to_owned(),
    }
}

fn profile_type(p: &Profile, strings: &[String]) -> Result<ProfileType, ConvertError> {
    let pair = |v: Option<&aperture_transport::server::otlp::proto::profiles::ValueType>| -> Result<_, ConvertError> {
        Ok(match v {
            Some(v) => {
                (string(strings, v.type_strindex, "a sample type")?, string(strings, v.unit_strindex, "a unit")?)
            }
            None => (String::new(), String::new()),
        })
    };
    let (ty, unit) = pair(p.sample_type.as_ref())?;
    let (pt, pu) = pair(p.period_type.as_ref())?;
    if [&ty, &unit, &pt, &pu].iter().any(|s| s.contains(':') || s.len() > 100 || s.chars().any(char::is_control)) {
        return Err(bad("a sample or period type holds `:`, control characters or is over 100 bytes"));
    }
    let or = |a: &str, b: &str| if a.is_empty() { b.to_owned() } else { a.to_owned() };
    // Aperture's own lock and syscall types (as its export sends them) keep
    // their names; CPU samples are `process_cpu`, whoever sent them.
    let own = [Mode::Lock, Mode::Syscall].into_iter().map(ProfileType::of_mode).find(|t| {
        (t.sample_type.as_str(), t.sample_unit.as_str(), t.period_type.as_str(), t.period_unit.as_str())
            == (ty.as_str(), unit.as_str(), pt.as_str(), pu.as_str())
    });
    if let Some(t) = own {
        return Ok(t);
    }
    let name = profile_name(&ty, &pt);
    let (ty, unit) = (or(&ty, "unknown"), or(&unit, "unknown"));
    Ok(ProfileType::new(&name, &ty, &unit, &or(&pt, &ty), &or(&pu, &unit)))
}

/// Frames of every location, innermost inlined function first.
fn locations(d: &ProfilesDictionary) -> Result<Vec<Vec<StackFrame>>, ConvertError> {
    let strings = &d.string_table;
    let mut out = Vec::with_capacity(d.location_table.len());
    for loc in &d.location_table {
        let module = match usize::try_from(loc.mapping_index).ok().and_then(|i| d.mapping_table.get(i)) {
            Some(m) => {
                let f = string(strings, m.filename_strindex, "a mapping's file name")?;
                f.rsplit('/').next().unwrap_or(&f).to_owned()
            }
            None if loc.mapping_index == 0 => String::new(),
            None => {
                return Err(bad(format!(
                    "a location refers to mapping {}, outside the mapping table",
                    loc.mapping_index
                )));
            }
        };
        // The OpenTelemetry eBPF profiler marks each location with its
        // frame type (`kernel`, `native`, `python`...).
        let mut kinds = LabelSet::default();
        apply_indices(&mut kinds, &loc.attribute_indices, d)?;
        let kernel = kinds.tags.get("profile.frame.type").is_some_and(|t| t == "kernel");
        let module = if kernel && module.is_empty() { "[kernel]".to_owned() } else { module };
        let frame = |symbol: String, file: String, line: i64| StackFrame {
            address: loc.address,
            symbol,
            module: module.clone(),
            file,
            line: u32::try_from(line).unwrap_or(0),
            kernel,
            ..StackFrame::default()
        };
        let frames = if loc.lines.is_empty() {
            vec![frame(String::new(), String::new(), 0)]
        } else {
            let mut frames = Vec::with_capacity(loc.lines.len());
            for l in &loc.lines {
                let f =
                    usize::try_from(l.function_index).ok().and_then(|i| d.function_table.get(i)).ok_or_else(|| {
                        bad(format!("a line refers to function {}, outside the function table", l.function_index))
                    })?;
                let name = string(strings, f.name_strindex, "a function name")?;
                let file = string(strings, f.filename_strindex, "a function's file name")?;
                frames.push(frame(name, file, l.line));
            }
            frames
        };
        out.push(frames);
    }
    Ok(out)
}

/// Builds the batch; `now_ns` stands in for a profile without a time.
pub(crate) fn to_batch(req: &ExportProfilesServiceRequest, now_ns: u64) -> Result<ProfileBatch, ConvertError> {
    let empty = ProfilesDictionary::default();
    let no_stack = PbStack::default();
    let d = req.dictionary.as_ref().unwrap_or(&empty);
    let strings = &d.string_table;
    let frames_of = locations(d)?;
    let mut stacks: Vec<Stack> = Vec::new();
    let mut by_hash: HashMap<aperture_core::model::StackHash, u32> = HashMap::new();
    let mut by_index: HashMap<i32, Option<u32>> = HashMap::new();
    let mut series: Vec<ProfileSeries> = Vec::new();
    let mut series_of: HashMap<Labels, usize> = HashMap::new();
    for rp in &req.resource_profiles {
        let mut resource = LabelSet::default();
        if let Some(r) = &rp.resource {
            apply_key_values(&mut resource, &r.attributes, strings)?;
        }
        for sp in &rp.scope_profiles {
            let mut scope = resource.clone();
            if let Some(s) = &sp.scope {
                apply_key_values(&mut scope, &s.attributes, strings)?;
            }
            for p in &sp.profiles {
                let ty = profile_type(p, strings)?.id();
                let mut base = scope.clone();
                apply_indices(&mut base, &p.attribute_indices, d)?;
                let time = if p.time_unix_nano > 0 { p.time_unix_nano } else { now_ns };
                for s in &p.samples {
                    let stack = match by_index.get(&s.stack_index) {
                        Some(known) => *known,
                        None => {
                            let st = usize::try_from(s.stack_index).ok().and_then(|i| d.stack_table.get(i));
                            let st = match st {
                                Some(st) => st,
                                None if s.stack_index == 0 => &no_stack,
                                None => {
                                    return Err(bad(format!(
                                        "a sample refers to stack {}, outside the stack table ({} entries)",
                                        s.stack_index,
                                        d.stack_table.len()
                                    )));
                                }
                            };
                            let mut frames = Vec::new();
                            for &li in &st.location_indices {
                                let loc = usize::try_from(li).ok().and_then(|i| frames_of.get(i)).ok_or_else(|| {
                                    bad(format!(
                                        "a stack refers to location {li}, outside the location table ({} entries)",
                                        frames_of.len()
                                    ))
                                })?;
                                frames.extend(loc.iter().cloned());
                            }
                            let id = (!frames.is_empty()).then(|| {
                                let st = Stack::new(frames);
                                let next = stacks.len() as u32;
                                *by_hash.entry(st.hash).or_insert_with(|| {
                                    stacks.push(st);
                                    next
                                })
                            });
                            by_index.insert(s.stack_index, id);
                            id
                        }
                    };
                    let points = sample_points(&s.values, &s.timestamps_unix_nano, time)?;
                    let Some(stack) = stack else { continue };
                    if points.is_empty() {
                        continue;
                    }
                    let labels = if s.attribute_indices.is_empty() {
                        base.labels(&ty)?
                    } else {
                        let mut own = base.clone();
                        apply_indices(&mut own, &s.attribute_indices, d)?;
                        own.labels(&ty)?
                    };
                    let i = *series_of.entry(labels).or_insert_with_key(|l| {
                        series.push(ProfileSeries { labels: l.clone(), samples: Vec::new() });
                        series.len() - 1
                    });
                    series[i].samples.extend(points.into_iter().map(|(time_ns, value)| ProfileSample {
                        time_ns,
                        stack,
                        value,
                    }));
                }
            }
        }
    }
    Ok(ProfileBatch { stacks, series })
}

/// (time, value) of a sample: its values at its timestamps; values alone
/// at the profile's time; timestamps alone count one each. Values that are
/// not positive are left out.
fn sample_points(values: &[i64], timestamps: &[u64], time: u64) -> Result<Vec<(u64, u64)>, ConvertError> {
    let positive = |v: &i64| u64::try_from(*v).ok().filter(|v| *v > 0);
    Ok(match (values.is_empty(), timestamps.is_empty()) {
        (false, true) => {
            let sum = values.iter().filter_map(positive).fold(0u64, u64::saturating_add);
            if sum > 0 { vec![(time, sum)] } else { Vec::new() }
        }
        (true, false) => timestamps.iter().map(|t| (if *t > 0 { *t } else { time }, 1)).collect(),
        (false, false) if values.len() == timestamps.len() => timestamps
            .iter()
            .zip(values)
            .filter_map(|(t, v)| positive(v).map(|v| (if *t > 0 { *t } else { time }, v)))
            .collect(),
        (false, false) => {
            return Err(bad(format!(
                "a sample has {} values but {} timestamps; they must pair up",
                values.len(),
                timestamps.len()
            )));
        }
        (true, true) => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aperture_transport::server::otlp::proto::common::InstrumentationScope;
    use aperture_transport::server::otlp::proto::profiles::{
        Function, KeyValueAndUnit, Line, Location, ResourceProfiles, Sample, ScopeProfiles, ValueType,
    };
    use aperture_transport::server::otlp::proto::resource::Resource;

    fn text(s: &str) -> Option<AnyValue> {
        Some(AnyValue { value: Some(any_value::Value::StringValue(s.into())) })
    }

    fn kv(k: &str, v: Option<AnyValue>) -> KeyValue {
        KeyValue { key: k.into(), value: v, ..KeyValue::default() }
    }

    /// Two functions (`leaf` inlined into `outer` at one location), a
    /// container known only by id, a sample attribute that overrides a
    /// resource one.
    fn request(samples: Vec<Sample>) -> ExportProfilesServiceRequest {
        let strings =
            ["", "samples", "count", "cpu", "nanoseconds", "leaf", "outer", "env", "dev", "profile.frame.type"];
        let dictionary = ProfilesDictionary {
            string_table: strings.iter().map(|s| s.to_string()).collect(),
            function_table: vec![
                Function::default(),
                Function { name_strindex: 5, ..Function::default() },
                Function { name_strindex: 6, ..Function::default() },
            ],
            location_table: vec![
                Location::default(),
                Location {
                    address: 0x10,
                    lines: vec![
                        Line { function_index: 1, line: 3, column: 0 },
                        Line { function_index: 2, line: 9, column: 0 },
                    ],
                    attribute_indices: vec![2],
                    ..Location::default()
                },
            ],
            stack_table: vec![PbStack::default(), PbStack { location_indices: vec![1] }],
            attribute_table: vec![
                KeyValueAndUnit::default(),
                KeyValueAndUnit { key_strindex: 7, value: text("dev"), unit_strindex: 0 },
                KeyValueAndUnit { key_strindex: 9, value: text("kernel"), unit_strindex: 0 },
            ],
            ..ProfilesDictionary::default()
        };
        let profile = Profile {
            sample_type: Some(ValueType { type_strindex: 1, unit_strindex: 2 }),
            period_type: Some(ValueType { type_strindex: 3, unit_strindex: 4 }),
            time_unix_nano: 1_000,
            samples,
            ..Profile::default()
        };
        let resource = Resource {
            attributes: vec![
                kv("service.name", text("api")),
                kv("container.id", text("abc123")),
                kv("process.pid", Some(AnyValue { value: Some(any_value::Value::IntValue(77)) })),
                kv("env", text("prod")),
            ],
            ..Resource::default()
        };
        ExportProfilesServiceRequest {
            resource_profiles: vec![ResourceProfiles {
                resource: Some(resource),
                scope_profiles: vec![ScopeProfiles {
                    scope: Some(InstrumentationScope::default()),
                    profiles: vec![profile],
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
            dictionary: Some(dictionary),
        }
    }

    fn sample(stack_index: i32, values: Vec<i64>, timestamps: Vec<u64>, attrs: Vec<i32>) -> Sample {
        Sample { stack_index, values, timestamps_unix_nano: timestamps, attribute_indices: attrs, link_index: 0 }
    }

    #[test]
    fn stacks_labels_and_type_come_from_the_dictionary_and_attributes() {
        let b = to_batch(&request(vec![sample(1, vec![5], vec![], vec![]), sample(1, vec![], vec![7, 8], vec![1])]), 9)
            .expect("valid");
        assert_eq!(b.stacks.len(), 1);
        let names: Vec<&str> = b.stacks[0].frames.iter().map(|f| f.symbol.as_str()).collect();
        assert_eq!(names, ["leaf", "outer"], "inlined lines innermost first");
        assert!(b.stacks[0].frames.iter().all(|f| f.kernel && f.module == "[kernel]"), "the location's frame type");
        assert_eq!(b.series.len(), 2, "the sample attribute makes its own series");
        let l = &b.series[0].labels;
        assert_eq!((l.service.as_str(), l.container.as_str(), l.pid), ("api", "abc123", 77));
        assert_eq!(l.profile_type, "process_cpu:samples:count:cpu:nanoseconds");
        assert_eq!(l.tags, [("env".to_owned(), "prod".to_owned())]);
        assert_eq!(b.series[0].samples[0].time_ns, 1_000);
        assert_eq!(b.series[0].samples[0].value, 5);
        assert_eq!(b.series[1].labels.tags, [("env".to_owned(), "dev".to_owned())], "sample over resource");
        let points: Vec<(u64, u64)> = b.series[1].samples.iter().map(|s| (s.time_ns, s.value)).collect();
        assert_eq!(points, [(7, 1), (8, 1)], "timestamps alone count one each");
    }

    #[test]
    fn an_index_outside_its_table_refuses_the_request() {
        for s in [
            sample(5, vec![1], vec![], vec![]),
            sample(1, vec![1], vec![], vec![9]),
            sample(1, vec![1, 2], vec![3], vec![]),
        ] {
            assert!(matches!(to_batch(&request(vec![s.clone()]), 9), Err(ConvertError::Bad(_))), "{s:?}");
        }
        let mut r = request(vec![sample(1, vec![1], vec![], vec![])]);
        if let Some(d) = r.dictionary.as_mut() {
            d.location_table[1].lines[0].function_index = 40;
        }
        assert!(matches!(to_batch(&r, 9), Err(ConvertError::Bad(m)) if m.contains("function 40")));
    }

    #[test]
    fn too_many_attributes_is_a_limit() {
        let mut r = request(vec![sample(1, vec![1], vec![], vec![])]);
        if let Some(res) = r.resource_profiles[0].resource.as_mut() {
            res.attributes.extend((0..=MAX_TAGS).map(|i| kv(&format!("k{i}"), text("v"))));
        }
        assert!(matches!(to_batch(&r, 9), Err(ConvertError::TooLarge(_))));
    }
}
