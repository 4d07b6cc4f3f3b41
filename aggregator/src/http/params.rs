//! Query-parameter parsing for the `/api/v1` routes. Every error names the
//! parameter, the value and what is accepted, and becomes a 400.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use aperture_core::model::{LockKind, Mode, ProfileType};

use crate::store::{LabelFilter, MAX_TAGS, Selector, valid_tag};

/// Which profile a request reads: an agent mode (`mode=` or a built-in
/// `type=`), or a pushed profile type (`type=<id>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Which {
    /// The agent's rows of a mode.
    Mode(Mode),
    /// Pushed profiles of a type (never a built-in one).
    Type(ProfileType),
}

impl Which {
    /// The profile type: the mode's built-in type or the pushed one.
    pub fn profile_type(&self) -> ProfileType {
        match self {
            Which::Mode(m) => ProfileType::of_mode(*m),
            Which::Type(t) => t.clone(),
        }
    }
}

/// Prefix of tag filter parameters: `tag.<key>=<value>`.
pub const TAG_PREFIX: &str = "tag.";

/// A query parameter that could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamError {
    /// The value does not parse.
    #[error("parameter `{name}`: {value:?} is not valid: expected {expected}")]
    Invalid {
        /// Parameter name.
        name: &'static str,
        /// The value given.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// A required parameter is missing.
    #[error("parameter `{name}` is required: expected {expected}")]
    Missing {
        /// Parameter name.
        name: &'static str,
        /// What is accepted.
        expected: &'static str,
    },
    /// A parameter this route does not take (often a typo).
    #[error("parameter `{name}` is not known here; accepted: {accepted}")]
    Unknown {
        /// The name given.
        name: String,
        /// What this route accepts.
        accepted: String,
    },
    /// `from` is not before `to`.
    #[error("parameter `{name}`: the range start ({from}) must be before its end ({to})")]
    EmptyRange {
        /// Which start parameter.
        name: &'static str,
        /// Start, Unix seconds.
        from: u64,
        /// End, Unix seconds.
        to: u64,
    },
    /// The range is longer than `limits.http_max_query_range`.
    #[error(
        "parameter `{name}`: the range covers {seconds} s, more than the limit of {limit_s} s \
         (limits.http_max_query_range); narrow the range"
    )]
    RangeTooLong {
        /// Which start parameter.
        name: &'static str,
        /// Length asked for, seconds.
        seconds: u64,
        /// The limit, seconds.
        limit_s: u64,
    },
}

const WHICH_EXPECTED: &str = "`mode` (cpu, lock or syscall) or `type` (a profile type id)";
const TYPE_EXPECTED: &str =
    "cpu, lock, syscall, or a profile type id name:sample_type:sample_unit:period_type:period_unit";

const TIME_EXPECTED: &str = "unix seconds, RFC 3339 (2024-05-01T12:00:00Z), `now`, or relative like -15m";

/// The query string of one request, consumed parameter by parameter.
#[derive(Debug)]
pub struct Params {
    values: HashMap<String, String>,
    now_s: u64,
    max_range_s: u64,
}

/// The filter parameters every data route accepts, besides `tag.<key>`.
pub const FILTERS: [&str; 8] = ["node", "namespace", "pod", "container", "process", "pid", "service", "lock_class"];

const LOCK_CLASS_EXPECTED: &str = "a comma-separated list of lock classes (mutex, rwlock, condvar, semaphore, join, \
     futex, kernel_spin, kernel_mutex, kernel_rwsem, kernel_other) or groups (contention, waiting, kernel, all)";

/// The lock kinds a `lock_class` value names: kinds by name, and the
/// groups `contention` (mutexes, rwlocks and kernel locks: the default),
/// `waiting` (condition variables, semaphores, joins, other futex waits),
/// `kernel` and `all` (`None`: no filter).
pub fn lock_classes(value: &str) -> Result<Option<Vec<LockKind>>, ParamError> {
    const WAITING: [LockKind; 4] = [LockKind::CondVar, LockKind::Semaphore, LockKind::Join, LockKind::Futex];
    const KERNEL: [LockKind; 4] =
        [LockKind::KernelSpin, LockKind::KernelMutex, LockKind::KernelRwsem, LockKind::KernelOther];
    let mut kinds = Vec::new();
    for name in value.split(',').map(str::trim) {
        match name {
            "all" => return Ok(None),
            "contention" => kinds.extend(LockKind::CONTENTION),
            "waiting" => kinds.extend(WAITING),
            "kernel" => kinds.extend(KERNEL),
            _ => kinds.push(LockKind::from_name(name).ok_or_else(|| ParamError::Invalid {
                name: "lock_class",
                value: value.into(),
                expected: LOCK_CLASS_EXPECTED,
            })?),
        }
    }
    kinds.sort_unstable();
    kinds.dedup();
    Ok(Some(kinds))
}

impl Params {
    /// Wraps a parsed query string; `now_s` anchors relative times.
    pub fn new(values: HashMap<String, String>, now_s: u64) -> Params {
        Params { values, now_s, max_range_s: u64::MAX }
    }

    /// Bounds the length of every range read by [`Params::range`].
    pub fn with_max_range(mut self, max: Duration) -> Params {
        self.max_range_s = max.as_secs().max(1);
        self
    }

    /// Wraps a parsed query string at the current time.
    pub fn at_now(values: HashMap<String, String>) -> Params {
        let now = crate::clock::unix_now_s();
        Params::new(values, now)
    }

    /// The current time used for relative values, Unix seconds.
    pub fn now_s(&self) -> u64 {
        self.now_s
    }

    /// Fails if any parameter outside `accepted` was given; `tag.<key>`
    /// filters are accepted wherever `service` is.
    pub fn reject_unknown(&self, accepted: &[&str]) -> Result<(), ParamError> {
        let tags = accepted.contains(&"service");
        let mut names: Vec<&String> = self.values.keys().collect();
        names.sort();
        let known = |n: &str| accepted.contains(&n) || (tags && n.starts_with(TAG_PREFIX));
        match names.into_iter().find(|n| !known(n)) {
            Some(name) => {
                let mut list = accepted.join(", ");
                if tags {
                    list.push_str(", tag.<key>");
                }
                Err(ParamError::Unknown { name: name.clone(), accepted: list })
            }
            None => Ok(()),
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    /// `mode` (required): cpu, lock or syscall.
    pub fn mode(&self) -> Result<Mode, ParamError> {
        const EXPECTED: &str = "cpu, lock or syscall";
        let value = self.get("mode").ok_or(ParamError::Missing { name: "mode", expected: EXPECTED })?;
        Mode::parse(value).ok_or_else(|| ParamError::Invalid { name: "mode", value: value.into(), expected: EXPECTED })
    }

    /// An optional `mode`.
    pub fn optional_mode(&self) -> Result<Option<Mode>, ParamError> {
        if self.get("mode").is_some() { self.mode().map(Some) } else { Ok(None) }
    }

    /// The profile asked for: `mode` (cpu, lock, syscall) as always, or
    /// `type`: a mode's name, or a profile type id
    /// `name:sample_type:sample_unit:period_type:period_unit` (a built-in
    /// type's id means its mode). One of the two is required; both must agree.
    pub fn which(&self) -> Result<Which, ParamError> {
        match self.optional_which()? {
            Some(w) => Ok(w),
            None => Err(ParamError::Missing { name: "mode", expected: WHICH_EXPECTED }),
        }
    }

    /// Like [`Params::which`], `None` when neither `mode` nor `type` is given.
    pub fn optional_which(&self) -> Result<Option<Which>, ParamError> {
        let mode = self.optional_mode()?;
        let Some(value) = self.get("type") else { return Ok(mode.map(Which::Mode)) };
        let typed = match Mode::parse(value) {
            Some(m) => Which::Mode(m),
            None => {
                let t = ProfileType::parse_id(value).ok_or_else(|| ParamError::Invalid {
                    name: "type",
                    value: value.into(),
                    expected: TYPE_EXPECTED,
                })?;
                match t.mode() {
                    Some(m) => Which::Mode(m),
                    None => Which::Type(t),
                }
            }
        };
        match mode {
            Some(m) if typed != Which::Mode(m) => Err(ParamError::Invalid {
                name: "type",
                value: value.into(),
                expected: "the type of the `mode` given, or no `mode`",
            }),
            _ => Ok(Some(typed)),
        }
    }

    /// A time parameter, or `default` when absent.
    pub fn time(&self, name: &'static str, default: u64) -> Result<u64, ParamError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => parse_time(v, self.now_s).ok_or_else(|| ParamError::Invalid {
                name,
                value: v.into(),
                expected: TIME_EXPECTED,
            }),
        }
    }

    /// A `[from, to)` pair named `from_name`/`to_name`; default the last 15
    /// minutes. At most the limit given to [`Params::with_max_range`] long.
    pub fn range(&self, from_name: &'static str, to_name: &'static str) -> Result<(u64, u64), ParamError> {
        let to = self.time(to_name, self.now_s)?;
        let from = self.time(from_name, to.saturating_sub(15 * 60))?;
        self.check_range(from_name, from, to)?;
        Ok((from, to))
    }

    /// Checks that `[from, to)` is not empty and within the range limit.
    pub fn check_range(&self, name: &'static str, from: u64, to: u64) -> Result<(), ParamError> {
        if from >= to {
            return Err(ParamError::EmptyRange { name, from, to });
        }
        if to - from > self.max_range_s {
            return Err(ParamError::RangeTooLong { name, seconds: to - from, limit_s: self.max_range_s });
        }
        Ok(())
    }

    /// The label filters.
    pub fn filter(&self) -> Result<LabelFilter, ParamError> {
        let text = |n: &str| self.get(n).map(str::to_owned);
        let pid = match self.get("pid") {
            None => None,
            Some(v) => Some(v.parse::<u32>().map_err(|_| ParamError::Invalid {
                name: "pid",
                value: v.into(),
                expected: "a process id (unsigned integer)",
            })?),
        };
        let mut tags: Vec<(String, String)> = Vec::new();
        for (name, value) in &self.values {
            let Some(key) = name.strip_prefix(TAG_PREFIX) else { continue };
            if !valid_tag(key, value) {
                return Err(ParamError::Invalid {
                    name: "tag.<key>",
                    value: format!("{name}={value}"),
                    expected: "tag.<key>=<value>: a key of letters, digits, `_`, `.`, `-`",
                });
            }
            tags.push((key.to_owned(), value.clone()));
        }
        if tags.len() > MAX_TAGS {
            return Err(ParamError::Invalid {
                name: "tag.<key>",
                value: format!("{} tag filters", tags.len()),
                expected: "at most 32 tag filters",
            });
        }
        tags.sort();
        let lock_kinds = lock_classes(self.get("lock_class").unwrap_or("contention"))?;
        Ok(LabelFilter {
            node: text("node"),
            namespace: text("namespace"),
            pod: text("pod"),
            container: text("container"),
            process: text("process"),
            pid,
            service: text("service"),
            profile_type: None,
            tags,
            sets: Vec::new(),
            lock_kinds,
        })
    }

    /// `from`/`to`, the filters and, for a pushed profile type, the type.
    pub fn selector_for(&self, which: Option<&Which>) -> Result<Selector, ParamError> {
        let mut sel = self.selector()?;
        if let Some(Which::Type(t)) = which {
            sel.filter.profile_type = Some(t.id());
        }
        Ok(sel)
    }

    /// `from`/`to` and the filters.
    pub fn selector(&self) -> Result<Selector, ParamError> {
        let (from_s, to_s) = self.range("from", "to")?;
        Ok(Selector { from_s, to_s, filter: self.filter()? })
    }

    /// A positive integer `limit`, default `default`, at most `max`.
    pub fn limit(&self, default: usize, max: usize) -> Result<usize, ParamError> {
        const EXPECTED: &str = "an integer from 1 to 10000";
        match self.get("limit") {
            None => Ok(default),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(ParamError::Invalid { name: "limit", value: v.into(), expected: EXPECTED }),
            },
        }
    }

    /// A parameter restricted to a fixed set of values.
    pub fn choice(
        &self,
        name: &'static str,
        choices: &'static [&'static str],
        expected: &'static str,
    ) -> Result<&'static str, ParamError> {
        match self.get(name) {
            None => Ok(choices[0]),
            Some(v) => choices.iter().find(|c| **c == v).copied().ok_or_else(|| ParamError::Invalid {
                name,
                value: v.into(),
                expected,
            }),
        }
    }
}

/// Parses unix seconds, RFC 3339, `now`, or `-<duration>` relative to `now_s`.
pub fn parse_time(value: &str, now_s: u64) -> Option<u64> {
    let value = value.trim();
    if value == "now" {
        return Some(now_s);
    }
    if let Some(rel) = value.strip_prefix('-') {
        let d = humantime::parse_duration(rel).ok()?;
        return Some(now_s.saturating_sub(d.as_secs()));
    }
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse().ok();
    }
    // humantime reads UTC (`Z`) only; a numeric offset is applied here.
    let (base, offset_s) = split_offset(value)?;
    let t = humantime::parse_rfc3339_weak(base).ok()?;
    let utc = t.duration_since(UNIX_EPOCH).ok().map(|d: Duration| d.as_secs())?;
    u64::try_from(i64::try_from(utc).ok()? - offset_s).ok()
}

/// Splits a trailing `+HH:MM`/`-HH:MM` offset off an RFC 3339 time.
fn split_offset(value: &str) -> Option<(&str, i64)> {
    let n = value.len();
    if n > 6 && value.is_char_boundary(n - 6) {
        let tail = &value.as_bytes()[n - 6..];
        if (tail[0] == b'+' || tail[0] == b'-') && tail[3] == b':' {
            let digits = |a: u8, b: u8| -> Option<i64> {
                (a.is_ascii_digit() && b.is_ascii_digit()).then(|| i64::from((a - b'0') * 10 + (b - b'0')))
            };
            let h = digits(tail[1], tail[2])?;
            let m = digits(tail[4], tail[5])?;
            let sign = if tail[0] == b'+' { 1 } else { -1 };
            return Some((&value[..n - 6], sign * (h * 3600 + m * 60)));
        }
    }
    Some((value, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Params {
        Params::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), 10_000)
    }

    #[test]
    fn times_accept_the_documented_forms() {
        for (input, want) in [
            ("1700000000", Some(1_700_000_000)),
            ("now", Some(10_000)),
            ("-15m", Some(10_000 - 900)),
            ("-1h 30m", Some(10_000 - 5400)),
            ("2024-05-01T12:00:00Z", Some(1_714_564_800)),
            ("2024-05-01T14:00:00+02:00", Some(1_714_564_800)),
            ("yesterday", None),
            ("-", None),
            ("", None),
        ] {
            assert_eq!(parse_time(input, 10_000), want, "{input}");
        }
    }

    #[test]
    fn errors_name_the_parameter() {
        let e = params(&[("mode", "gpu")]).mode().unwrap_err();
        assert!(e.to_string().contains("`mode`") && e.to_string().contains("gpu"), "{e}");
        let e = params(&[("from", "soon")]).selector().unwrap_err();
        assert!(e.to_string().contains("`from`"), "{e}");
        let e = params(&[("from", "200"), ("to", "100")]).selector().unwrap_err();
        assert!(matches!(e, ParamError::EmptyRange { name: "from", .. }));
        let e = params(&[("pid", "-1")]).filter().unwrap_err();
        assert!(e.to_string().contains("`pid`"));
        let e = params(&[("limit", "0")]).limit(10, 100).unwrap_err();
        assert!(e.to_string().contains("`limit`"));
        let e = params(&[("nodee", "x")]).reject_unknown(&["node"]).unwrap_err();
        assert!(e.to_string().contains("`nodee`"));
        assert!(matches!(params(&[]).mode(), Err(ParamError::Missing { name: "mode", .. })));
    }

    #[test]
    fn lock_classes_default_to_contention_and_take_names_and_groups() {
        let kinds = |pairs: &[(&str, &str)]| params(pairs).filter().map(|f| f.lock_kinds);
        let contention = Some(LockKind::CONTENTION.iter().copied().collect::<std::collections::BTreeSet<_>>());
        let as_set = |k: Option<Vec<LockKind>>| k.map(|v| v.into_iter().collect::<std::collections::BTreeSet<_>>());
        assert_eq!(kinds(&[]).map(as_set), Ok(contention.clone()));
        assert_eq!(kinds(&[("lock_class", "contention")]).map(as_set), Ok(contention));
        assert_eq!(kinds(&[("lock_class", "all")]), Ok(None));
        assert_eq!(kinds(&[("lock_class", "mutex,all")]), Ok(None));
        assert_eq!(
            kinds(&[("lock_class", "condvar, join,condvar")]),
            Ok(Some(vec![LockKind::CondVar, LockKind::Join]))
        );
        let waiting = kinds(&[("lock_class", "waiting")]).expect("valid").expect("a list");
        assert_eq!(waiting.len(), 4);
        assert!(waiting.iter().all(|k| !k.is_contention()), "{waiting:?}");
        assert_eq!(kinds(&[("lock_class", "kernel")]).map(|k| k.map(|v| v.len())), Ok(Some(4)));
        for bad in ["spin", "mutex,", "Mutex"] {
            let e = kinds(&[("lock_class", bad)]).unwrap_err();
            assert!(e.to_string().contains("`lock_class`") && e.to_string().contains("contention"), "{e}");
        }
    }

    #[test]
    fn ranges_over_the_limit_are_refused_naming_it() {
        let p = params(&[("from", "1000"), ("to", "9000")]).with_max_range(Duration::from_secs(3600));
        let e = p.selector().unwrap_err();
        assert_eq!(e, ParamError::RangeTooLong { name: "from", seconds: 8000, limit_s: 3600 });
        assert!(e.to_string().contains("limits.http_max_query_range"), "{e}");
        let ok = params(&[("from", "5400"), ("to", "9000")]).with_max_range(Duration::from_secs(3600));
        assert_eq!(ok.selector().map(|s| (s.from_s, s.to_s)), Ok((5400, 9000)));
        // A time far in the past (0) with the default end is still bounded.
        let e = params(&[("from", "0")]).with_max_range(Duration::from_secs(3600)).selector().unwrap_err();
        assert!(matches!(e, ParamError::RangeTooLong { .. }), "{e}");
    }

    #[test]
    fn mode_and_type_select_the_same_profiles_and_tags_filter() {
        assert_eq!(params(&[("mode", "cpu")]).which(), Ok(Which::Mode(Mode::Cpu)));
        assert_eq!(params(&[("type", "lock")]).which(), Ok(Which::Mode(Mode::Lock)));
        let builtin = ProfileType::of_mode(Mode::Syscall).id();
        assert_eq!(params(&[("type", builtin.as_str())]).which(), Ok(Which::Mode(Mode::Syscall)));
        let alloc = "memory:alloc_space:bytes:space:bytes";
        let w = params(&[("type", alloc)]).which().expect("type");
        assert_eq!(w, Which::Type(ProfileType::parse_id(alloc).expect("id")));
        assert!(params(&[("type", alloc), ("mode", "cpu")]).which().is_err(), "disagreeing mode and type");
        assert!(params(&[("type", "gpu")]).which().unwrap_err().to_string().contains("`type`"));
        assert!(matches!(params(&[]).which(), Err(ParamError::Missing { name: "mode", .. })));
        let sel = params(&[("type", alloc), ("service", "api"), ("tag.env", "prod")])
            .selector_for(Some(&w))
            .expect("selector");
        assert_eq!(sel.filter.profile_type.as_deref(), Some(alloc));
        assert_eq!(sel.filter.service.as_deref(), Some("api"));
        assert_eq!(sel.filter.tags, vec![("env".to_owned(), "prod".to_owned())]);
        assert!(params(&[("tag.env", "x")]).reject_unknown(&["service"]).is_ok());
        assert!(params(&[("tag.env", "x")]).reject_unknown(&["node"]).is_err());
        assert!(params(&[("tag.b=d", "x")]).filter().is_err());
    }

    #[test]
    fn range_defaults_to_the_last_fifteen_minutes() {
        let s = params(&[]).selector().expect("selector");
        assert_eq!((s.from_s, s.to_s), (10_000 - 900, 10_000));
    }
}
