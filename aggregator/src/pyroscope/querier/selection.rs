//! Label selectors and profile type ids: what a request selects, and the
//! store look-ups that list types, labels and values for it.

use aperture_core::model::{Mode, ProfileType};
use regex::{Regex, RegexBuilder};

use super::connect::Failure;
use crate::http::params::Which;
use crate::http::params::lock_classes;
use crate::http::state::AppState;
use crate::query;
use crate::store::{LabelFilter, LabelName, Selector, SetFilter, SetLabel, valid_tag};

/// At most this many values in the set a matcher other than `=` selects.
const MAX_SET: usize = 1000;

/// One matcher of a label selector: `=`, `!=`, `=~` or `!~`. A regex
/// matches the whole value, as in Prometheus; a label a row lacks has the
/// value "".
#[derive(Debug, Clone)]
pub(super) struct Matcher {
    name: String,
    op: &'static str,
    value: String,
    regex: Option<Regex>,
}

impl Matcher {
    fn new(name: String, op: &'static str, value: String) -> Result<Matcher, Failure> {
        let regex = if op.ends_with('~') {
            let re = RegexBuilder::new(&format!("^(?:{value})$")).size_limit(1 << 20).build().map_err(|e| {
                Failure::bad(format!("matcher {name}{op}{value:?}: the regular expression is invalid: {e}"))
            })?;
            Some(re)
        } else {
            None
        };
        Ok(Matcher { name, op, value, regex })
    }

    fn equal(value: &str) -> Matcher {
        Matcher { name: String::new(), op: "=", value: value.to_owned(), regex: None }
    }

    pub(super) fn matches(&self, v: &str) -> bool {
        match (self.op, &self.regex) {
            ("=~", Some(re)) => re.is_match(v),
            ("!~", Some(re)) => !re.is_match(v),
            ("!=", _) => v != self.value,
            _ => v == self.value,
        }
    }
}

/// What a label selector and a profile type id select.
#[derive(Debug, Default, Clone)]
pub(super) struct Selection {
    pub(super) filter: LabelFilter,
    /// Constraints on parts of the profile type: `(part, matcher)`, part one
    /// of `id`, `name`, `sample_type`, `sample_unit`, `period_type`, `period_unit`.
    pub(super) type_parts: Vec<(&'static str, Matcher)>,
    /// Matchers other than `=` on labels, made set filters by [`resolve`].
    pub(super) pending: Vec<Matcher>,
}

impl Selection {
    pub(super) fn admits(&self, t: &ProfileType) -> bool {
        self.type_parts.iter().all(|(part, want)| {
            let have = match *part {
                "id" => t.id(),
                "name" => t.name.clone(),
                "sample_type" => t.sample_type.clone(),
                "sample_unit" => t.sample_unit.clone(),
                "period_type" => t.period_type.clone(),
                _ => t.period_unit.clone(),
            };
            want.matches(&have)
        })
    }
}

/// Parses `{name="value", ...}` into `(name, op, value)` triples.
pub(super) fn parse_matchers(text: &str) -> Result<Vec<(String, String, String)>, Failure> {
    let bad = |why: &str| Failure::bad(format!("label selector {text:?}: {why}; expected {{name=\"value\", ...}}"));
    let t = text.trim();
    if t.is_empty() {
        return Ok(Vec::new());
    }
    let inner = t.strip_prefix('{').and_then(|s| s.strip_suffix('}')).ok_or_else(|| bad("no braces"))?;
    let mut out = Vec::new();
    let mut rest = inner.trim_start();
    while !rest.is_empty() {
        let name_len =
            rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')).unwrap_or(rest.len());
        if name_len == 0 {
            return Err(bad("a label name is missing"));
        }
        let name = rest[..name_len].to_owned();
        rest = rest[name_len..].trim_start();
        let op =
            ["=~", "!~", "!=", "="].into_iter().find(|op| rest.starts_with(op)).ok_or_else(|| bad("no operator"))?;
        rest = rest[op.len()..].trim_start();
        let quote = rest
            .chars()
            .next()
            .filter(|c| matches!(c, '"' | '\'' | '`'))
            .ok_or_else(|| bad("a value is not quoted"))?;
        let mut value = String::new();
        let mut chars = rest[1..].char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' if quote != '`' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, 't')) => value.push('\t'),
                    Some((_, e)) => value.push(e),
                    None => return Err(bad("a value is not closed")),
                },
                c if c == quote => {
                    end = Some(1 + i + c.len_utf8());
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.ok_or_else(|| bad("a value is not closed"))?;
        out.push((name, op.to_owned(), value));
        rest = rest[end..].trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
        } else if !rest.is_empty() {
            return Err(bad("matchers are not separated by commas"));
        }
    }
    Ok(out)
}

/// Reads matchers (and a profile type id) into a [`Selection`].
pub(super) fn selection(selectors: &[String], type_id: &str) -> Result<Selection, Failure> {
    let mut sel = Selection::default();
    let mut lock_class_given = false;
    if !type_id.is_empty() {
        sel.type_parts.push(("id", Matcher::equal(type_id)));
    }
    for text in selectors {
        for (name, op, value) in parse_matchers(text)? {
            let op = ["=~", "!~", "!=", "="].into_iter().find(|o| *o == op).unwrap_or("=");
            let part = match name.as_str() {
                "__profile_type__" => Some("id"),
                "__name__" => Some("name"),
                "__type__" => Some("sample_type"),
                "__unit__" => Some("sample_unit"),
                "__period_type__" => Some("period_type"),
                "__period_unit__" => Some("period_unit"),
                _ => None,
            };
            if op == "=~" && value == ".*" {
                continue;
            }
            if let Some(part) = part {
                sel.type_parts.push((part, Matcher::new(name, op, value)?));
                continue;
            }
            if name.starts_with("__") {
                continue;
            }
            if name == "lock_class" {
                // As the REST API's `lock_class`: class names or groups, comma-separated.
                if op != "=" {
                    return Err(Failure::bad(format!(
                        "lock_class{op}{value:?}: lock_class takes `=` with class names or groups \
                         (contention, waiting, kernel, all), comma-separated"
                    )));
                }
                sel.filter.lock_kinds = lock_classes(&value).map_err(|e| Failure::bad(e.to_string()))?;
                lock_class_given = true;
                continue;
            }
            if op != "=" {
                if name != "service_name" && SetLabel::column(&name).is_none() && !valid_tag(&name, "") {
                    return Err(Failure::bad(format!("label {name:?} is not a valid tag key")));
                }
                sel.pending.push(Matcher::new(name, op, value)?);
                continue;
            }
            let set = |slot: &mut Option<String>| *slot = Some(value.clone());
            match name.as_str() {
                "service_name" => set(&mut sel.filter.service),
                "node" => set(&mut sel.filter.node),
                "namespace" => set(&mut sel.filter.namespace),
                "pod" => set(&mut sel.filter.pod),
                "container" => set(&mut sel.filter.container),
                "process" => set(&mut sel.filter.process),
                "pid" => {
                    sel.filter.pid =
                        Some(value.parse().map_err(|_| Failure::bad(format!("pid {value:?} is not a process id")))?)
                }
                n => {
                    if !valid_tag(n, &value) {
                        return Err(Failure::bad(format!("label {n}={value:?} is not a valid tag")));
                    }
                    sel.filter.tags.push((n.to_owned(), value));
                }
            }
        }
    }
    if !lock_class_given {
        // Lock profiles show contention unless asked otherwise, as in the REST API and the UI.
        sel.filter.lock_kinds = lock_classes("contention").map_err(|e| Failure::bad(e.to_string()))?;
    }
    sel.filter.tags.sort();
    sel.filter.tags.dedup();
    if sel.filter.tags.len() > crate::store::MAX_TAGS {
        return Err(Failure::bad(format!("at most {} tag matchers", crate::store::MAX_TAGS)));
    }
    Ok(sel)
}

/// Makes the matchers other than `=` set filters: the values their labels
/// have in `[from_s, to_s)` among the rows the `=` matchers select, those
/// that match (or, when a row without the label matches, those that do not,
/// left out).
pub(super) async fn resolve(state: &AppState, sel: &mut Selection, from_s: u64, to_s: u64) -> Result<(), Failure> {
    let base = Selector { from_s, to_s, filter: sel.filter.clone() };
    for m in std::mem::take(&mut sel.pending) {
        let column = if m.name == "service_name" { "service" } else { m.name.as_str() };
        let label = SetLabel::column(column).unwrap_or_else(|| SetLabel::Tag(m.name.clone()));
        let set = if m.op == "!=" && !m.value.is_empty() {
            SetFilter { label, values: vec![m.value.clone()], exclude: true }
        } else {
            let values = values_of(state, &m.name, None, &base).await?;
            let exclude = m.matches("");
            let values: Vec<String> = values.into_iter().filter(|v| !v.is_empty() && m.matches(v) != exclude).collect();
            if values.len() > MAX_SET {
                return Err(Failure::bad(format!(
                    "matcher {}{}{:?} stands for {} values, more than {MAX_SET}; narrow it",
                    m.name,
                    m.op,
                    m.value,
                    values.len()
                )));
            }
            SetFilter { label, values, exclude }
        };
        sel.filter.sets.push(set);
    }
    Ok(())
}

/// [`selection`] and [`resolve`]: what `selectors` and `type_id` select in `[from_s, to_s)`.
pub(super) async fn select(
    state: &AppState,
    selectors: &[String],
    type_id: &str,
    from_s: u64,
    to_s: u64,
) -> Result<Selection, Failure> {
    let mut sel = selection(selectors, type_id)?;
    resolve(state, &mut sel, from_s, to_s).await?;
    Ok(sel)
}

/// The `[from_s, to_s)` range of `start`/`end` (ms); zero means the last hour.
pub(super) fn range(state: &AppState, start_ms: i64, end_ms: i64) -> Result<(u64, u64), Failure> {
    let now_ms = i64::try_from(crate::clock::unix_now_ns() / 1_000_000).unwrap_or(i64::MAX);
    let end_ms = if end_ms <= 0 { now_ms } else { end_ms };
    let start_ms = if start_ms <= 0 { end_ms - 3_600_000 } else { start_ms };
    if start_ms >= end_ms {
        return Err(Failure::bad(format!("`start` ({start_ms}) must be before `end` ({end_ms})")));
    }
    let from_s = u64::try_from(start_ms / 1000).unwrap_or(0);
    let to_s = u64::try_from(end_ms.saturating_add(999) / 1000).unwrap_or(0).max(from_s + 1);
    let max = state.limits.max_query_range.as_secs().max(1);
    if to_s - from_s > max {
        return Err(Failure::bad(format!(
            "the range covers {} s, more than the limit of {max} s (limits.http_max_query_range); narrow the range",
            to_s - from_s
        )));
    }
    Ok((from_s, to_s))
}

/// Reads a profile type id as what to load.
pub(super) fn which(type_id: &str) -> Result<Which, Failure> {
    let t = ProfileType::parse_id(type_id).ok_or_else(|| {
        Failure::bad(format!(
            "profile type {type_id:?} is not an id name:sample_type:sample_unit:period_type:period_unit (see ProfileTypes)"
        ))
    })?;
    Ok(match t.mode() {
        Some(m) => Which::Mode(m),
        None => Which::Type(t),
    })
}

pub(super) fn selector_for(sel: &Selection, which: &Which, from_s: u64, to_s: u64) -> Selector {
    let mut filter = sel.filter.clone();
    if let Which::Type(t) = which {
        filter.profile_type = Some(t.id());
    }
    Selector { from_s, to_s, filter }
}

pub(super) fn mode_of(which: &Which) -> Option<Mode> {
    match which {
        Which::Mode(m) => Some(*m),
        Which::Type(_) => None,
    }
}

/// The types there is (or may be) data of: the agent's modes and the pushed
/// types stored in the range, those `sel` admits.
pub(super) async fn types(
    state: &AppState,
    sel: &Selection,
    from_s: u64,
    to_s: u64,
) -> Result<Vec<ProfileType>, Failure> {
    let mut out: Vec<ProfileType> = Mode::ALL.into_iter().map(ProfileType::of_mode).collect();
    let all = Selector { from_s, to_s, filter: LabelFilter::default() };
    let pushed = state.store.label_values(LabelName::Type, None, &all).await?;
    out.extend(query::sort_label_values(pushed, false).iter().filter_map(|id| ProfileType::parse_id(id)));
    out.retain(|t| sel.admits(t));
    Ok(out)
}

/// Values of the label Pyroscope calls `name`, among rows of `which` (all
/// if `None`) selected by `sel`.
pub(super) async fn values_of(
    state: &AppState,
    name: &str,
    which: Option<&Which>,
    sel: &Selector,
) -> Result<Vec<String>, Failure> {
    let mode = which.and_then(mode_of);
    if name == LOCK_CLASS {
        // Only the agent's lock rows have a class. Every class there is is
        // listed (not only the contention shown by default), so a picker
        // offers the rest too.
        if which.is_some_and(|w| !matches!(w, Which::Mode(Mode::Lock))) {
            return Ok(Vec::new());
        }
        let all = Selector { filter: LabelFilter { lock_kinds: None, ..sel.filter.clone() }, ..sel.clone() };
        let kinds = state.store.lock_totals(&all).await?.into_iter().map(|t| t.kind).collect();
        return Ok(query::sort_label_values(kinds, false));
    }
    let label = match name {
        "service_name" => Some(LabelName::Service),
        n => LabelName::parse(n).filter(|l| *l != LabelName::Service && *l != LabelName::Type),
    };
    let values = match label {
        Some(l) => query::sort_label_values(state.store.label_values(l, mode, sel).await?, l == LabelName::Pid),
        None if name.starts_with("__") => Vec::new(),
        None => {
            if !valid_tag(name, "") {
                return Err(Failure::bad(format!("label name {name:?} is not valid")));
            }
            query::sort_label_values(state.store.tag_values(name, mode, sel).await?, false)
        }
    };
    Ok(values)
}

/// Whether `sel` selects any row of `which`: the agent's rows all carry a
/// node, pushed rows their type.
pub(super) async fn has_data(state: &AppState, which: &Which, sel: &Selector) -> Result<bool, Failure> {
    let (label, mode) = match which {
        Which::Mode(m) => (LabelName::Node, Some(*m)),
        Which::Type(_) => (LabelName::Type, None),
    };
    Ok(!query::sort_label_values(state.store.label_values(label, mode, sel).await?, false).is_empty())
}

/// The label holding a lock wait's class (`mutex`, `condvar`...; lock profiles only).
pub(super) const LOCK_CLASS: &str = "lock_class";

/// The labels `LabelNames` lists when they have values (besides the type's and the tags).
pub(super) const LISTED: [&str; 8] =
    ["service_name", "node", "namespace", "pod", "container", "process", "pid", LOCK_CLASS];

pub(super) fn type_labels(t: &ProfileType) -> Vec<(&'static str, String)> {
    vec![
        ("__name__", t.name.clone()),
        ("__period_type__", t.period_type.clone()),
        ("__period_unit__", t.period_unit.clone()),
        ("__profile_type__", t.id()),
        ("__type__", t.sample_type.clone()),
        ("__unit__", t.sample_unit.clone()),
    ]
}

#[cfg(test)]
mod tests {
    use aperture_core::model::LockKind;

    use super::selection;

    fn kinds(selector: &str) -> Option<Vec<LockKind>> {
        match selection(&[selector.to_owned()], "") {
            Ok(sel) => sel.filter.lock_kinds,
            Err(e) => panic!("{selector}: {}", e.1),
        }
    }

    #[test]
    fn lock_classes_default_to_contention_and_follow_a_lock_class_matcher() {
        let mut contention = LockKind::CONTENTION.to_vec();
        contention.sort_unstable();
        assert_eq!(kinds(r#"{service_name="x"}"#), Some(contention));
        assert_eq!(kinds(r#"{lock_class="all"}"#), None);
        assert_eq!(kinds(r#"{lock_class="condvar,join"}"#), Some(vec![LockKind::CondVar, LockKind::Join]));
        for bad in [r#"{lock_class=~"mu.*"}"#, r#"{lock_class="spinning"}"#] {
            let Err(err) = selection(&[bad.to_owned()], "") else { panic!("{bad} was taken") };
            assert_eq!(err.0, axum::http::StatusCode::BAD_REQUEST, "{bad}");
            assert!(err.1.contains("lock_class"), "{bad}: {}", err.1);
        }
    }
}
