//! What a Pyroscope `/ingest` request carries, turned into a
//! [`ProfileBatch`]: the series key in `name` (`app.cpu{k=v,...}`), pprof
//! bodies (raw or gzipped) and folded text (`a;b;c 10` per line, or `lines`:
//! one sample per line). pprof bodies are read in [`super::pprof`].

use std::collections::HashMap;
use std::io::Read;

use aperture_core::model::{Labels, ProfileBatch, ProfileSample, ProfileSeries, ProfileType, Stack, StackFrame};
use flate2::read::GzDecoder;

use crate::store::{MAX_TAGS, valid_tag};

/// Why a request's data cannot be taken; each becomes a 4xx answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ConvertError {
    /// Something in the request is malformed.
    #[error("{0}")]
    Bad(String),
    /// A limit was reached.
    #[error("{0}")]
    TooLarge(String),
}

fn bad(message: impl Into<String>) -> ConvertError {
    ConvertError::Bad(message.into())
}

/// The series key of `name`: service, the profile suffix, tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SeriesKey {
    /// The application name without its profile suffix.
    pub service: String,
    /// `cpu`, `alloc_objects`... (the part after the last `.` when it is a
    /// known profile suffix); empty when there is none.
    pub suffix: String,
    /// Labels between the braces, sorted by key.
    pub tags: Vec<(String, String)>,
    /// The profile name when the sender gives it (Push's `__name__`);
    /// empty: derived from the suffix and the sample types.
    pub profile_name: String,
}

/// Profile suffixes the SDKs append to the application name.
const SUFFIXES: [&str; 14] = [
    "cpu",
    "itimer",
    "wall",
    "alloc_objects",
    "alloc_space",
    "inuse_objects",
    "inuse_space",
    "goroutines",
    "mutex_count",
    "mutex_duration",
    "block_count",
    "block_duration",
    "lock_count",
    "lock_duration",
];

/// Parses `app.cpu{k=v,k2=v2}`. Pyroscope's reserved labels (`__name__`...)
/// are dropped; `service_name` overrides the application name.
pub(crate) fn parse_name(name: &str) -> Result<SeriesKey, ConvertError> {
    let (app, labels) = match name.find('{') {
        Some(i) => {
            let rest = &name[i + 1..];
            let inner = rest
                .strip_suffix('}')
                .ok_or_else(|| bad(format!("`name` {name:?}: the labels lack a closing `}}`")))?;
            (&name[..i], inner)
        }
        None => (name, ""),
    };
    let app = app.trim();
    if app.is_empty() {
        return Err(bad("`name` is required: the application name, e.g. `myapp.cpu{env=prod}`"));
    }
    let (mut service, suffix) = match app.rsplit_once('.') {
        Some((base, s)) if SUFFIXES.contains(&s) && !base.is_empty() => (base.to_owned(), s.to_owned()),
        _ => (app.to_owned(), String::new()),
    };
    let mut tags: Vec<(String, String)> = Vec::new();
    for pair in labels.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| bad(format!("`name` label {pair:?} is not key=value")))?;
        let (k, v) = (k.trim(), v.trim());
        if k.starts_with("__") {
            continue;
        }
        if k == "service_name" {
            service = v.to_owned();
            continue;
        }
        if !valid_tag(k, v) {
            return Err(bad(format!(
                "`name` label {k:?}={v:?}: keys are letters, digits, `_`, `.`, `-` (at most 128 bytes), values at most 1 KiB without control characters"
            )));
        }
        tags.push((k.to_owned(), v.to_owned()));
    }
    tags.sort();
    tags.dedup_by(|a, b| a.0 == b.0);
    if tags.len() > MAX_TAGS {
        return Err(ConvertError::TooLarge(format!(
            "the series has {} labels, more than the limit of {MAX_TAGS}; send fewer tags",
            tags.len()
        )));
    }
    if service.len() > 1024 || service.chars().any(char::is_control) {
        return Err(bad("the application name is over 1 KiB or holds control characters"));
    }
    Ok(SeriesKey { service, suffix, tags, profile_name: String::new() })
}

/// The series key of Push's label pairs: `service_name` is the service,
/// `__name__` the profile name, other labels starting with `__` are
/// dropped, the rest are tags.
pub(crate) fn key_from_labels<'a>(labels: impl Iterator<Item = (&'a str, &'a str)>) -> Result<SeriesKey, ConvertError> {
    let mut key =
        SeriesKey { service: String::new(), suffix: String::new(), tags: Vec::new(), profile_name: String::new() };
    for (k, v) in labels {
        match k {
            "service_name" => key.service = v.to_owned(),
            "__name__" => key.profile_name = v.to_owned(),
            _ if k.starts_with("__") => {}
            _ => {
                if !valid_tag(k, v) {
                    return Err(bad(format!(
                        "label {k:?}={v:?}: keys are letters, digits, `_`, `.`, `-` (at most 128 bytes), values at most 1 KiB without control characters"
                    )));
                }
                key.tags.push((k.to_owned(), v.to_owned()));
            }
        }
    }
    if key.service.is_empty() {
        return Err(bad("a series has no `service_name` label: set the application name"));
    }
    if key.service.len() > 1024
        || key.service.chars().any(char::is_control)
        || key.profile_name.chars().any(|c| c == ':' || c.is_control())
    {
        return Err(bad("`service_name` or `__name__` holds characters or a length that cannot be stored"));
    }
    key.tags.sort();
    key.tags.dedup_by(|a, b| a.0 == b.0);
    if key.tags.len() > MAX_TAGS {
        return Err(ConvertError::TooLarge(format!(
            "the series has {} labels, more than the limit of {MAX_TAGS}; send fewer tags",
            key.tags.len()
        )));
    }
    Ok(key)
}

/// Appends `more` to `batch`, renumbering its stack references.
pub(crate) fn append(batch: &mut ProfileBatch, more: ProfileBatch) {
    let offset = batch.stacks.len() as u32;
    batch.stacks.extend(more.stacks);
    for mut series in more.series {
        for s in &mut series.samples {
            s.stack += offset;
        }
        batch.series.push(series);
    }
}

/// The Pyroscope profile name of a sample type: `process_cpu`, `memory`,
/// `goroutines`, `mutex`, `block`, `wall`, else the suffix.
pub(super) fn profile_name(suffix: &str, sample_type: &str, period_type: &str) -> String {
    let s = if suffix.is_empty() { sample_type } else { suffix };
    if s.starts_with("mutex") || s.starts_with("lock") {
        "mutex".into()
    } else if s.starts_with("block") {
        "block".into()
    } else if s.starts_with("alloc_") || s.starts_with("inuse_") || period_type == "space" {
        "memory".into()
    } else if s.starts_with("goroutine") {
        "goroutines".into()
    } else if s == "wall" {
        "wall".into()
    } else if s == "cpu" || s == "itimer" || s == "samples" || period_type == "cpu" {
        "process_cpu".into()
    } else if s.is_empty() {
        "unknown".into()
    } else {
        s.to_owned()
    }
}

/// Decompresses `body` when it is gzip (by its magic bytes), reading at most `max` bytes.
pub(crate) fn gunzip(body: &[u8], max: usize) -> Result<Vec<u8>, ConvertError> {
    if !body.starts_with(&[0x1f, 0x8b]) {
        return Ok(body.to_vec());
    }
    let mut out = Vec::new();
    GzDecoder::new(body)
        .take((max as u64).saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| bad(format!("the body is not valid gzip: {e}")))?;
    if out.len() > max {
        return Err(ConvertError::TooLarge(format!("the body decompresses to more than the limit of {max} bytes")));
    }
    Ok(out)
}

fn labels(key: &SeriesKey, t: &ProfileType) -> Labels {
    labels_with(key, key.tags.clone(), t)
}

/// The labels of a series of `key`'s service with `tags` (sorted by key).
pub(super) fn labels_with(key: &SeriesKey, tags: Vec<(String, String)>, t: &ProfileType) -> Labels {
    Labels { service: key.service.clone(), tags, profile_type: t.id(), ..Labels::default() }
}

/// Stacks interned by hash while a batch is built.
#[derive(Default)]
pub(super) struct Stacks {
    pub stacks: Vec<Stack>,
    index: HashMap<aperture_core::model::StackHash, u32>,
}

impl Stacks {
    pub fn add(&mut self, frames: Vec<StackFrame>) -> u32 {
        let s = Stack::new(frames);
        let next = self.stacks.len() as u32;
        *self.index.entry(s.hash).or_insert_with(|| {
            self.stacks.push(s);
            next
        })
    }
}

pub(super) fn nonempty(s: &str) -> &str {
    if s.is_empty() { "unknown" } else { s }
}

/// The type of folded data, from the name's suffix and `units`.
pub(crate) fn folded_type(key: &SeriesKey, units: &str) -> ProfileType {
    let suffix = key.suffix.as_str();
    match units {
        "objects" => ProfileType::new("memory", or(suffix, "alloc_objects"), "count", "space", "bytes"),
        "bytes" => ProfileType::new("memory", or(suffix, "alloc_space"), "bytes", "space", "bytes"),
        "goroutines" => ProfileType::new("goroutines", "goroutine", "count", "goroutine", "count"),
        "lock_samples" => {
            ProfileType::new(&profile_name(suffix, "mutex", ""), "contentions", "count", "contentions", "count")
        }
        "lock_nanoseconds" => {
            ProfileType::new(&profile_name(suffix, "mutex", ""), "delay", "nanoseconds", "contentions", "count")
        }
        _ => {
            let name = profile_name(suffix, "cpu", "cpu");
            ProfileType::new(&name, "samples", "count", "cpu", "nanoseconds")
        }
    }
}

fn or<'a>(a: &'a str, b: &'a str) -> &'a str {
    if a.is_empty() { b } else { a }
}

/// Folded text, root first: `a;b;c 10` per line, or with `lines` one
/// stack per line counting one sample.
pub(crate) fn from_folded(
    text: &[u8],
    key: &SeriesKey,
    t: &ProfileType,
    lines: bool,
    time_ns: u64,
) -> Result<ProfileBatch, ConvertError> {
    let text = std::str::from_utf8(text).map_err(|_| bad("the folded body is not UTF-8"))?;
    let mut stacks = Stacks::default();
    let mut sums: HashMap<u32, u64> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        let (stack, value) = if lines {
            (line, 1)
        } else {
            let (stack, count) =
                line.rsplit_once(' ').ok_or_else(|| bad(format!("folded line {}: expected `a;b;c <count>`", n + 1)))?;
            let value =
                count.parse::<u64>().map_err(|_| bad(format!("folded line {}: {count:?} is not a count", n + 1)))?;
            (stack, value)
        };
        let frames: Vec<StackFrame> = stack
            .split(';')
            .rev()
            .filter(|f| !f.is_empty())
            .map(|f| StackFrame { symbol: f.to_owned(), ..StackFrame::default() })
            .collect();
        if frames.is_empty() || value == 0 {
            continue;
        }
        let id = stacks.add(frames);
        let sum = sums.entry(id).or_default();
        *sum = sum.saturating_add(value);
    }
    let mut samples: Vec<ProfileSample> =
        sums.into_iter().map(|(stack, value)| ProfileSample { time_ns, stack, value }).collect();
    samples.sort_by_key(|s| s.stack);
    let series = if samples.is_empty() { Vec::new() } else { vec![ProfileSeries { labels: labels(key, t), samples }] };
    Ok(ProfileBatch { stacks: stacks.stacks, series })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_into_service_suffix_and_tags() {
        let k = parse_name("my.app.cpu{env=prod, region = eu ,__name__=x}").expect("name");
        assert_eq!(k.service, "my.app");
        assert_eq!(k.suffix, "cpu");
        assert_eq!(k.tags, vec![("env".into(), "prod".into()), ("region".into(), "eu".into())]);
        let k = parse_name("plain").expect("name");
        assert_eq!((k.service.as_str(), k.suffix.as_str()), ("plain", ""));
        assert_eq!(parse_name("a.cpu{service_name=b}").expect("name").service, "b");
        assert!(matches!(parse_name("a{env=prod"), Err(ConvertError::Bad(_))));
        assert!(matches!(parse_name("{env=prod}"), Err(ConvertError::Bad(_))));
        assert!(matches!(parse_name("a{a=b=c,d}"), Err(ConvertError::Bad(_))));
        let many: Vec<String> = (0..=MAX_TAGS).map(|i| format!("k{i}=v")).collect();
        assert!(matches!(parse_name(&format!("a{{{}}}", many.join(","))), Err(ConvertError::TooLarge(_))));
    }

    #[test]
    fn folded_lines_sum_per_stack_root_first() {
        let key = parse_name("app.cpu").expect("name");
        let t = folded_type(&key, "samples");
        assert_eq!(t.id(), "process_cpu:samples:count:cpu:nanoseconds");
        let b = from_folded(b"main;work 3\nmain;work 2\nmain;idle 1\n", &key, &t, false, 5).expect("folded");
        assert_eq!(b.stacks.len(), 2);
        let work = &b.stacks[0];
        assert_eq!(work.frames[0].symbol, "work", "leaf first");
        assert_eq!(b.series[0].samples[0].value, 5);
        let l = from_folded(b"main;work\nmain;work\n", &key, &t, true, 5).expect("lines");
        assert_eq!(l.series[0].samples[0].value, 2);
        assert!(matches!(from_folded(b"main;work x\n", &key, &t, false, 5), Err(ConvertError::Bad(_))));
    }

    #[test]
    fn gzip_bombs_stop_at_the_limit() {
        use flate2::write::GzEncoder;
        use std::io::Write;
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![0u8; 1 << 20]).expect("write");
        let body = gz.finish().expect("gzip");
        assert!(matches!(gunzip(&body, 1000), Err(ConvertError::TooLarge(_))));
        assert_eq!(gunzip(&body, 1 << 20).expect("fits").len(), 1 << 20);
        assert_eq!(gunzip(b"plain", 10).expect("raw"), b"plain");
    }
}
