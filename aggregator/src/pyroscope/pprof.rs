//! A pushed pprof profile turned into a [`ProfileBatch`]: one series per
//! sample type and per set of string labels on its samples (pprof labels
//! become tags, next to the tags of the request), stacks from locations
//! (inlined lines innermost first).
//!
//! The profile's name follows Pyroscope's rules: the sender's (`__name__`,
//! or the `.cpu`-style suffix of `name`), else `wall` when a sample type is
//! `wall`, else the first sample type whose name (or display name from the
//! Go SDK's `sample_type_config`) says `cpu`, `alloc_`/`inuse_`, `mutex_`,
//! `block_` or `goroutine`.

use std::collections::HashMap;

use aperture_core::model::{ProfileBatch, ProfileSample, ProfileSeries, ProfileType, StackFrame};
use prost::Message;

use super::convert::{ConvertError, SeriesKey, Stacks, labels_with, nonempty, profile_name};
use crate::query::pprof::{PbLabel, PbProfile};
use crate::store::{MAX_TAGS, valid_tag};

/// One entry of the Go SDK's `sample_type_config` part, keyed by the pprof
/// sample type (Pyroscope's `SampleTypeConfig`). Only `display-name` changes
/// what is stored: it names the profile (`mutex_count` → `mutex`), which
/// tells Go's mutex and block profiles apart (both count `contentions` and
/// `delay`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub(crate) struct SampleTypeConfig {
    /// `objects`, `bytes`, `lock_samples`...
    pub units: String,
    /// The name Pyroscope shows for the sample type.
    #[serde(rename = "display-name")]
    pub display_name: String,
    /// `sum` or `average` (instant values such as `inuse_space`).
    pub aggregation: String,
    /// Values are totals since the process started.
    pub cumulative: bool,
    /// Values are sampled.
    pub sampled: bool,
}

/// `sample_type_config`: pprof sample type → its configuration.
pub(crate) type SampleTypes = HashMap<String, SampleTypeConfig>;

/// The display names Pyroscope assumes when no configuration is sent.
fn default_display_name(sample_type: &str) -> Option<&'static str> {
    match sample_type {
        "samples" => Some("cpu"),
        "goroutine" => Some("goroutines"),
        "contentions" => Some("mutex_count"),
        "delay" => Some("mutex_duration"),
        _ => None,
    }
}

/// The profile name of a profile with `sample_types`, when the sender names none.
fn pprof_profile_name(
    key: &SeriesKey,
    sample_types: &[&str],
    period_type: &str,
    config: Option<&SampleTypes>,
) -> String {
    if !key.profile_name.is_empty() {
        return key.profile_name.clone();
    }
    if !key.suffix.is_empty() {
        return profile_name(&key.suffix, "", period_type);
    }
    if sample_types.contains(&"wall") {
        return "wall".into();
    }
    for st in sample_types {
        let display = match config {
            Some(c) => c.get(*st).map(|c| c.display_name.as_str()),
            None => default_display_name(st),
        };
        let st = display.filter(|d| !d.is_empty()).unwrap_or(st);
        if st.contains("cpu") {
            return "process_cpu".into();
        }
        if st.contains("alloc_") || st.contains("inuse_") || st == "space" || st == "objects" {
            return "memory".into();
        }
        if st.contains("mutex_") {
            return "mutex".into();
        }
        if st.contains("block_") {
            return "block".into();
        }
        if st.contains("goroutine") {
            return "goroutines".into();
        }
    }
    profile_name("", sample_types.first().copied().unwrap_or(""), period_type)
}

/// Labels that name one request or span (Pyroscope's span profiles): as
/// tags they would make a series per request, so they are dropped.
const PER_REQUEST_LABELS: [&str; 2] = ["span_id", "profile_id"];

/// At most this many label sets (series per sample type) in one profile.
const MAX_LABEL_SETS: usize = 1000;

/// The tags of a sample: the request's, with the sample's string labels
/// added (a label overrides a request tag of the same key). Labels whose
/// key starts with `__` are Pyroscope's own and dropped, and so are
/// [`PER_REQUEST_LABELS`]; numeric labels are not tags.
fn sample_tags(
    key: &SeriesKey,
    labels: &[PbLabel],
    string: &dyn Fn(i64) -> String,
) -> Result<Vec<(String, String)>, ConvertError> {
    let mut tags = key.tags.clone();
    for l in labels {
        if l.str == 0 {
            continue;
        }
        let (k, v) = (string(l.key), string(l.str));
        if k.starts_with("__") || PER_REQUEST_LABELS.contains(&k.as_str()) {
            continue;
        }
        if !valid_tag(&k, &v) {
            return Err(ConvertError::Bad(format!(
                "pprof label {k:?}={v:?}: keys are letters, digits, `_`, `.`, `-` (at most 128 bytes), values at most 1 KiB without control characters"
            )));
        }
        match tags.binary_search_by(|(t, _)| t.as_str().cmp(&k)) {
            Ok(i) => tags[i].1 = v,
            Err(i) => tags.insert(i, (k, v)),
        }
    }
    if tags.len() > MAX_TAGS {
        return Err(ConvertError::TooLarge(format!(
            "a pprof sample has {} labels with the request's tags, more than the limit of {MAX_TAGS}; send fewer",
            tags.len()
        )));
    }
    Ok(tags)
}

/// A pprof profile at `time_ns` (else its own time, else `now_ns`).
pub(crate) fn from_pprof(
    bytes: &[u8],
    key: &SeriesKey,
    time_ns: Option<u64>,
    now_ns: u64,
    config: Option<&SampleTypes>,
) -> Result<ProfileBatch, ConvertError> {
    let bad = |m: String| ConvertError::Bad(m);
    let p = PbProfile::decode(bytes).map_err(|e| bad(format!("the body is not a pprof profile: {e}")))?;
    let string =
        |i: i64| -> &str { usize::try_from(i).ok().and_then(|i| p.string_table.get(i)).map_or("", String::as_str) };
    let functions: HashMap<u64, (&str, &str)> =
        p.function.iter().map(|f| (f.id, (string(f.name), string(f.filename)))).collect();
    let mappings: HashMap<u64, &str> = p.mapping.iter().map(|m| (m.id, string(m.filename))).collect();
    let mut locations: HashMap<u64, Vec<StackFrame>> = HashMap::with_capacity(p.location.len());
    for loc in &p.location {
        let module = mappings.get(&loc.mapping_id).map_or("", |f| f.rsplit('/').next().unwrap_or(f));
        let frames = if loc.line.is_empty() {
            vec![StackFrame { address: loc.address, module: module.to_owned(), ..StackFrame::default() }]
        } else {
            loc.line
                .iter()
                .map(|l| {
                    let (name, file) = functions.get(&l.function_id).copied().unwrap_or(("", ""));
                    StackFrame {
                        address: loc.address,
                        symbol: name.to_owned(),
                        module: module.to_owned(),
                        file: file.to_owned(),
                        line: u32::try_from(l.line).unwrap_or(0),
                        ..StackFrame::default()
                    }
                })
                .collect()
        };
        locations.insert(loc.id, frames);
    }
    let period = p.period_type.as_ref().map_or(("", ""), |v| (string(v.r#type), string(v.unit)));
    let sample_types: Vec<&str> = p.sample_type.iter().map(|v| string(v.r#type)).collect();
    if sample_types.is_empty() {
        return Err(bad("the pprof profile declares no sample types".into()));
    }
    let name = pprof_profile_name(key, &sample_types, period.0, config);
    let types: Vec<ProfileType> = p
        .sample_type
        .iter()
        .map(|v| {
            let (ty, unit) = (string(v.r#type), string(v.unit));
            let (pt, pu) = if period.0.is_empty() { (ty, unit) } else { period };
            ProfileType::new(&name, nonempty(ty), nonempty(unit), nonempty(pt), nonempty(pu))
        })
        .collect();
    let t = time_ns.or_else(|| u64::try_from(p.time_nanos).ok().filter(|t| *t > 0)).unwrap_or(now_ns);
    let owned = |i: i64| string(i).to_owned();
    let mut stacks = Stacks::default();
    let mut series: Vec<ProfileSeries> = Vec::new();
    // The first of the `types.len()` series of each tag set.
    let mut first_of: HashMap<Vec<(String, String)>, usize> = HashMap::new();
    for s in &p.sample {
        if s.value.len() != types.len() {
            return Err(bad(format!("a pprof sample has {} values for {} sample types", s.value.len(), types.len())));
        }
        let mut frames = Vec::new();
        for id in &s.location_id {
            let loc = locations
                .get(id)
                .ok_or_else(|| bad(format!("a pprof sample refers to location {id}, which is not in the profile")))?;
            frames.extend(loc.iter().cloned());
        }
        if frames.is_empty() {
            continue;
        }
        let tags = sample_tags(key, &s.label, &owned)?;
        let first = match first_of.get(&tags) {
            Some(i) => *i,
            None => {
                if first_of.len() >= MAX_LABEL_SETS {
                    return Err(ConvertError::TooLarge(format!(
                        "the pprof profile has more than {MAX_LABEL_SETS} distinct sets of sample labels; label \
                         samples by fewer values (not by request or span)"
                    )));
                }
                let i = series.len();
                series.extend(
                    types
                        .iter()
                        .map(|ty| ProfileSeries { labels: labels_with(key, tags.clone(), ty), samples: Vec::new() }),
                );
                first_of.insert(tags, i);
                i
            }
        };
        let stack = stacks.add(frames);
        for (out, v) in series[first..first + types.len()].iter_mut().zip(&s.value) {
            if let Ok(value) = u64::try_from(*v)
                && value > 0
            {
                out.samples.push(ProfileSample { time_ns: t, stack, value });
            }
        }
    }
    series.retain(|s| !s.samples.is_empty());
    Ok(ProfileBatch { stacks: stacks.stacks, series })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pyroscope::convert::parse_name;
    use crate::query::pprof::{PbFunction, PbLine, PbLocation, PbSample, PbValueType};

    /// A sample: function names (leaf first), values, string labels.
    type TestSample<'a> = (&'a [&'a str], &'a [i64], &'a [(&'a str, &'a str)]);

    /// A profile of `types` (type, unit) with one sample per [`TestSample`].
    fn profile(types: &[(&str, &str)], samples: &[TestSample]) -> Vec<u8> {
        let mut strings = vec![String::new()];
        let mut s = |v: &str| -> i64 {
            if let Some(i) = strings.iter().position(|x| x == v) {
                return i as i64;
            }
            strings.push(v.to_owned());
            strings.len() as i64 - 1
        };
        let sample_type = types.iter().map(|(t, u)| PbValueType { r#type: s(t), unit: s(u) }).collect();
        let (mut function, mut location, mut sample) = (Vec::new(), Vec::new(), Vec::new());
        for (names, values, labels) in samples {
            let mut ids = Vec::new();
            for n in names.iter() {
                let id = function.len() as u64 + 1;
                function.push(PbFunction { id, name: s(n), system_name: 0, filename: 0 });
                location.push(PbLocation {
                    id,
                    mapping_id: 0,
                    address: 0,
                    line: vec![PbLine { function_id: id, line: 1 }],
                });
                ids.push(id);
            }
            let label = labels.iter().map(|(k, v)| PbLabel { key: s(k), str: s(v) }).collect();
            sample.push(PbSample { location_id: ids, value: values.to_vec(), label });
        }
        PbProfile { sample_type, sample, location, function, string_table: strings, ..PbProfile::default() }
            .encode_to_vec()
    }

    fn names(b: &ProfileBatch) -> Vec<String> {
        let mut v: Vec<String> = b.series.iter().map(|s| s.labels.profile_type.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    #[test]
    fn string_labels_become_tags_of_their_own_series() {
        let key = parse_name("app{env=ci,handler=any}").expect("name");
        let body = profile(
            &[("samples", "count"), ("cpu", "nanoseconds")],
            &[
                (&["main", "work"], &[3, 30], &[("handler", "checkout"), ("__session_id__", "x"), ("span_id", "9f0e")]),
                (&["main", "idle"], &[1, 10], &[]),
                (&["main", "work"], &[2, 20], &[("handler", "checkout")]),
            ],
        );
        let b = from_pprof(&body, &key, Some(5), 0, None).expect("pprof");
        assert_eq!(b.series.len(), 4, "two tag sets times two sample types");
        let checkout: Vec<&ProfileSeries> =
            b.series.iter().filter(|s| s.labels.tags.contains(&("handler".into(), "checkout".into()))).collect();
        assert_eq!(checkout.len(), 2);
        assert_eq!(checkout[0].labels.tags, vec![("env".into(), "ci".into()), ("handler".into(), "checkout".into())]);
        assert_eq!(checkout[0].samples.iter().map(|s| s.value).sum::<u64>(), 5);
        let plain: Vec<&ProfileSeries> =
            b.series.iter().filter(|s| s.labels.tags.contains(&("handler".into(), "any".into()))).collect();
        assert_eq!(plain.len(), 2);
        assert_eq!(plain[0].samples.iter().map(|s| s.value).sum::<u64>(), 1);
        assert_eq!(
            names(&b),
            vec!["process_cpu:cpu:nanoseconds:cpu:nanoseconds", "process_cpu:samples:count:samples:count"]
        );
    }

    #[test]
    fn bad_labels_are_refused_with_their_name() {
        let key = parse_name("app").expect("name");
        let body = profile(&[("samples", "count")], &[(&["main"], &[1], &[("bad key", "v")])]);
        let err = from_pprof(&body, &key, None, 1, None).expect_err("bad key");
        assert!(matches!(&err, ConvertError::Bad(m) if m.contains("bad key")), "{err}");
        let many: Vec<(String, String)> = (0..=MAX_TAGS).map(|i| (format!("k{i}"), "v".into())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let body = profile(&[("samples", "count")], &[(&["main"], &[1], &many)]);
        assert!(matches!(from_pprof(&body, &key, None, 1, None), Err(ConvertError::TooLarge(_))));
        let ids: Vec<String> = (0..=MAX_LABEL_SETS).map(|i| i.to_string()).collect();
        let labels: Vec<[(&str, &str); 1]> = ids.iter().map(|i| [("request", i.as_str())]).collect();
        let samples: Vec<TestSample> = labels.iter().map(|l| (&["main"][..], &[1i64][..], &l[..])).collect();
        let body = profile(&[("samples", "count")], &samples);
        let err = from_pprof(&body, &key, None, 1, None).expect_err("too many label sets");
        assert!(matches!(&err, ConvertError::TooLarge(m) if m.contains("sets of sample labels")), "{err}");
    }

    #[test]
    fn profiles_are_named_as_pyroscope_names_them() {
        let key = parse_name("app").expect("name");
        let one = |types: &[(&str, &str)], config: Option<&SampleTypes>| {
            let values = vec![1; types.len()];
            let body = profile(types, &[(&["main"], &values, &[])]);
            names(&from_pprof(&body, &key, None, 1, config).expect("pprof"))
        };
        // Node's wall profile.
        assert_eq!(
            one(&[("samples", "count"), ("wall", "nanoseconds")], None),
            vec!["wall:samples:count:samples:count", "wall:wall:nanoseconds:wall:nanoseconds"]
        );
        assert_eq!(
            one(&[("inuse_objects", "count"), ("inuse_space", "bytes")], None)[0],
            "memory:inuse_objects:count:inuse_objects:count"
        );
        // Go's mutex and block profiles differ only in their configuration.
        let contention = [("contentions", "count"), ("delay", "nanoseconds")];
        assert!(one(&contention, None)[0].starts_with("mutex:contentions:count"));
        let block: SampleTypes = serde_json::from_str(
            r#"{"contentions":{"display-name":"block_count","units":"lock_samples"},"delay":{"display-name":"block_duration","units":"lock_nanoseconds"}}"#,
        )
        .expect("config");
        assert!(one(&contention, Some(&block))[0].starts_with("block:contentions:count"));
        let named = parse_name("app.alloc_space").expect("name");
        let body = profile(&[("alloc_space", "bytes")], &[(&["main"], &[1], &[])]);
        assert!(names(&from_pprof(&body, &named, None, 1, None).expect("pprof"))[0].starts_with("memory:"));
    }
}
