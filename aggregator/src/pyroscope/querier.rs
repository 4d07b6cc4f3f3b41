//! The part of Pyroscope's `querier.v1.QuerierService` that Grafana's
//! Pyroscope data source calls, over the Connect protocol (unary: HTTP POST
//! `/querier.v1.QuerierService/<Method>` of one message, `application/proto`
//! or `application/json` with protobuf's JSON mapping): `ProfileTypes`,
//! `LabelNames`, `LabelValues`, `Series`, `SelectMergeStacktraces`,
//! `SelectSeries` and `SelectMergeProfile`. Message shapes follow
//! Pyroscope's `querier/v1/querier.proto` and `types/v1/types.proto`.
//!
//! Label selectors (`{service_name="x", pod="y"}`) are read with Aperture's
//! labels: `service_name` is the `service` label, `node`, `namespace`, `pod`,
//! `container`, `process` and `pid` are the agent's, `__profile_type__`,
//! `__name__`, `__type__`, `__unit__`, `__period_type__` and
//! `__period_unit__` name parts of the profile type, and any other name is a
//! tag. Only `=` matchers are supported (and `=~` with a literal value or
//! `.*`). Times are milliseconds since the epoch. Auth is the read token.

mod render;

pub(crate) use render::render;

use std::collections::BTreeMap;

use aperture_core::model::{Mode, ProfileType};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prost::Message;
use serde_json::{Value, json};

use super::push::connect_error;
use super::read_body;
use crate::http::AppState;
use crate::http::params::Which;
use crate::query::{self, FlameTree, ROOT, profile_value};
use crate::store::{LabelFilter, LabelName, Selector, valid_tag};

// --- Messages (field numbers from Pyroscope's protos) ---

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct LabelPair {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PbProfileType {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(string, tag = "4")]
    sample_type: String,
    #[prost(string, tag = "5")]
    sample_unit: String,
    #[prost(string, tag = "6")]
    period_type: String,
    #[prost(string, tag = "7")]
    period_unit: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProfileTypesRequest {
    #[prost(int64, tag = "1")]
    start: i64,
    #[prost(int64, tag = "2")]
    end: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProfileTypesResponse {
    #[prost(message, repeated, tag = "1")]
    profile_types: Vec<PbProfileType>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LabelValuesRequest {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, repeated, tag = "2")]
    matchers: Vec<String>,
    #[prost(int64, tag = "3")]
    start: i64,
    #[prost(int64, tag = "4")]
    end: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LabelNamesRequest {
    #[prost(string, repeated, tag = "1")]
    matchers: Vec<String>,
    #[prost(int64, tag = "2")]
    start: i64,
    #[prost(int64, tag = "3")]
    end: i64,
}

/// `LabelValuesResponse` and `LabelNamesResponse`: both `repeated string names = 1`.
#[derive(Clone, PartialEq, prost::Message)]
struct NamesResponse {
    #[prost(string, repeated, tag = "1")]
    names: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SeriesRequest {
    #[prost(string, repeated, tag = "1")]
    matchers: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    label_names: Vec<String>,
    #[prost(int64, tag = "3")]
    start: i64,
    #[prost(int64, tag = "4")]
    end: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PbLabels {
    #[prost(message, repeated, tag = "1")]
    labels: Vec<LabelPair>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SeriesResponse {
    #[prost(message, repeated, tag = "2")]
    labels_set: Vec<PbLabels>,
}

/// `SelectMergeStacktracesRequest` and `SelectMergeProfileRequest` share
/// their first five fields; `format` (6) is the former's only.
#[derive(Clone, PartialEq, prost::Message)]
struct SelectMergeRequest {
    #[prost(string, tag = "1")]
    profile_type_id: String,
    #[prost(string, tag = "2")]
    label_selector: String,
    #[prost(int64, tag = "3")]
    start: i64,
    #[prost(int64, tag = "4")]
    end: i64,
    #[prost(int64, optional, tag = "5")]
    max_nodes: Option<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SelectMergeStacktracesRequest {
    #[prost(string, tag = "1")]
    profile_type_id: String,
    #[prost(string, tag = "2")]
    label_selector: String,
    #[prost(int64, tag = "3")]
    start: i64,
    #[prost(int64, tag = "4")]
    end: i64,
    #[prost(int64, optional, tag = "5")]
    max_nodes: Option<i64>,
    #[prost(int32, tag = "6")]
    format: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Level {
    #[prost(int64, repeated, tag = "1")]
    values: Vec<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct FlameGraph {
    #[prost(string, repeated, tag = "1")]
    names: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    levels: Vec<Level>,
    #[prost(int64, tag = "3")]
    total: i64,
    #[prost(int64, tag = "4")]
    max_self: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SelectMergeStacktracesResponse {
    #[prost(message, optional, tag = "1")]
    flamegraph: Option<FlameGraph>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SelectSeriesRequest {
    #[prost(string, tag = "1")]
    profile_type_id: String,
    #[prost(string, tag = "2")]
    label_selector: String,
    #[prost(int64, tag = "3")]
    start: i64,
    #[prost(int64, tag = "4")]
    end: i64,
    #[prost(string, repeated, tag = "5")]
    group_by: Vec<String>,
    #[prost(double, tag = "6")]
    step: f64,
    /// Read and not used: every point is the step's sum.
    #[prost(int32, optional, tag = "7")]
    aggregation: Option<i32>,
    #[prost(int64, optional, tag = "9")]
    limit: Option<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Point {
    #[prost(double, tag = "1")]
    value: f64,
    #[prost(int64, tag = "2")]
    timestamp: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PbSeries {
    #[prost(message, repeated, tag = "1")]
    labels: Vec<LabelPair>,
    #[prost(message, repeated, tag = "2")]
    points: Vec<Point>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SelectSeriesResponse {
    #[prost(message, repeated, tag = "1")]
    series: Vec<PbSeries>,
}

// --- Errors and encodings ---

/// A failed call: a Connect error code's status and a message.
struct Failure(StatusCode, String);

impl Failure {
    fn bad(message: impl Into<String>) -> Failure {
        Failure(StatusCode::BAD_REQUEST, message.into())
    }
}

impl From<crate::store::QueryError> for Failure {
    fn from(e: crate::store::QueryError) -> Failure {
        Failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

/// Reads a JSON member as int64: protobuf JSON writes them as strings and
/// accepts numbers.
fn json_i64(v: &Value, key: &str) -> Result<i64, Failure> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f as i64))
            .ok_or_else(|| Failure::bad(format!("`{key}` is not an int64"))),
        Some(Value::String(s)) => s.parse().map_err(|_| Failure::bad(format!("`{key}` {s:?} is not an int64"))),
        Some(_) => Err(Failure::bad(format!("`{key}` is not an int64"))),
    }
}

fn json_opt_i64(v: &Value, key: &str) -> Result<Option<i64>, Failure> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => json_i64(v, key).map(Some),
    }
}

fn json_f64(v: &Value, key: &str) -> Result<f64, Failure> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(0.0),
        Some(Value::Number(n)) => n.as_f64().ok_or_else(|| Failure::bad(format!("`{key}` is not a number"))),
        Some(Value::String(s)) => s.parse().map_err(|_| Failure::bad(format!("`{key}` {s:?} is not a number"))),
        Some(_) => Err(Failure::bad(format!("`{key}` is not a number"))),
    }
}

fn json_string(v: &Value, key: &str) -> Result<String, Failure> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(Failure::bad(format!("`{key}` is not a string"))),
    }
}

fn json_strings(v: &Value, key: &str) -> Result<Vec<String>, Failure> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_owned).ok_or_else(|| Failure::bad(format!("`{key}` holds a non-string"))))
            .collect(),
        Some(_) => Err(Failure::bad(format!("`{key}` is not a list of strings"))),
    }
}

/// The request's encoding, which the answer uses too.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Proto,
    Json,
}

/// A decoded request: the message, or its JSON form.
enum Request<'a> {
    Proto(&'a [u8]),
    Json(Value),
}

fn decode<T: Message + Default>(
    body: &Request<'_>,
    from_json: impl Fn(&Value) -> Result<T, Failure>,
) -> Result<T, Failure> {
    match body {
        Request::Proto(b) => {
            T::decode(*b).map_err(|e| Failure::bad(format!("the body is not the method's request message: {e}")))
        }
        Request::Json(v) => from_json(v),
    }
}

fn answer(encoding: Encoding, message: &impl Message, json: Value) -> Response {
    let (ct, body): (&'static str, Vec<u8>) = match encoding {
        Encoding::Proto => ("application/proto", message.encode_to_vec()),
        Encoding::Json => ("application/json", json.to_string().into_bytes()),
    };
    let mut r = body.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    r
}

// --- Label selectors ---

/// What a label selector and a profile type id select.
#[derive(Debug, Default, Clone)]
struct Selection {
    filter: LabelFilter,
    /// Constraints on parts of the profile type: `(part, value)`, part one
    /// of `id`, `name`, `sample_type`, `sample_unit`, `period_type`, `period_unit`.
    type_parts: Vec<(&'static str, String)>,
}

impl Selection {
    fn admits(&self, t: &ProfileType) -> bool {
        self.type_parts.iter().all(|(part, want)| {
            let have = match *part {
                "id" => t.id(),
                "name" => t.name.clone(),
                "sample_type" => t.sample_type.clone(),
                "sample_unit" => t.sample_unit.clone(),
                "period_type" => t.period_type.clone(),
                _ => t.period_unit.clone(),
            };
            have == *want
        })
    }
}

/// Parses `{name="value", ...}` into `(name, op, value)` triples.
fn parse_matchers(text: &str) -> Result<Vec<(String, String, String)>, Failure> {
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
fn selection(selectors: &[String], type_id: &str) -> Result<Selection, Failure> {
    let mut sel = Selection::default();
    if !type_id.is_empty() {
        sel.type_parts.push(("id", type_id.to_owned()));
    }
    for text in selectors {
        for (name, op, value) in parse_matchers(text)? {
            let literal = !value.chars().any(|c| "\\.+*?()[]{}|^$".contains(c));
            match op.as_str() {
                "=" => {}
                "=~" if value == ".*" => continue,
                "=~" if literal => {}
                _ => {
                    return Err(Failure::bad(format!(
                        "matcher {name}{op}{value:?} is not supported: only `=` (and `=~` with a literal value or .*)"
                    )));
                }
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
                "__profile_type__" => sel.type_parts.push(("id", value)),
                "__name__" => sel.type_parts.push(("name", value)),
                "__type__" => sel.type_parts.push(("sample_type", value)),
                "__unit__" => sel.type_parts.push(("sample_unit", value)),
                "__period_type__" => sel.type_parts.push(("period_type", value)),
                "__period_unit__" => sel.type_parts.push(("period_unit", value)),
                n if n.starts_with("__") => {}
                n => {
                    if !valid_tag(n, &value) {
                        return Err(Failure::bad(format!("label {n}={value:?} is not a valid tag")));
                    }
                    sel.filter.tags.push((n.to_owned(), value));
                }
            }
        }
    }
    sel.filter.tags.sort();
    sel.filter.tags.dedup();
    if sel.filter.tags.len() > crate::store::MAX_TAGS {
        return Err(Failure::bad(format!("at most {} tag matchers", crate::store::MAX_TAGS)));
    }
    Ok(sel)
}

/// The `[from_s, to_s)` range of `start`/`end` (ms); zero means the last hour.
fn range(state: &AppState, start_ms: i64, end_ms: i64) -> Result<(u64, u64), Failure> {
    let now_ms = i64::try_from(super::now_ns() / 1_000_000).unwrap_or(i64::MAX);
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
fn which(type_id: &str) -> Result<Which, Failure> {
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

fn selector_for(sel: &Selection, which: &Which, from_s: u64, to_s: u64) -> Selector {
    let mut filter = sel.filter.clone();
    if let Which::Type(t) = which {
        filter.profile_type = Some(t.id());
    }
    Selector { from_s, to_s, filter }
}

fn mode_of(which: &Which) -> Option<Mode> {
    match which {
        Which::Mode(m) => Some(*m),
        Which::Type(_) => None,
    }
}

/// The types there is (or may be) data of: the agent's modes and the pushed
/// types stored in the range, those `sel` admits.
async fn types(state: &AppState, sel: &Selection, from_s: u64, to_s: u64) -> Result<Vec<ProfileType>, Failure> {
    let mut out: Vec<ProfileType> = Mode::ALL.into_iter().map(ProfileType::of_mode).collect();
    let all = Selector { from_s, to_s, filter: LabelFilter::default() };
    let pushed = state.store.label_values(LabelName::Type, None, &all).await?;
    out.extend(query::sort_label_values(pushed, false).iter().filter_map(|id| ProfileType::parse_id(id)));
    out.retain(|t| sel.admits(t));
    Ok(out)
}

/// Values of the label Pyroscope calls `name`, among rows of `which` (all
/// if `None`) selected by `sel`.
async fn values_of(
    state: &AppState,
    name: &str,
    which: Option<&Which>,
    sel: &Selector,
) -> Result<Vec<String>, Failure> {
    let mode = which.and_then(mode_of);
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
async fn has_data(state: &AppState, which: &Which, sel: &Selector) -> Result<bool, Failure> {
    let (label, mode) = match which {
        Which::Mode(m) => (LabelName::Node, Some(*m)),
        Which::Type(_) => (LabelName::Type, None),
    };
    Ok(!query::sort_label_values(state.store.label_values(label, mode, sel).await?, false).is_empty())
}

/// The labels `LabelNames` lists when they have values (besides the type's and the tags).
const LISTED: [&str; 7] = ["service_name", "node", "namespace", "pod", "container", "process", "pid"];

fn type_labels(t: &ProfileType) -> Vec<(&'static str, String)> {
    vec![
        ("__name__", t.name.clone()),
        ("__period_type__", t.period_type.clone()),
        ("__period_unit__", t.period_unit.clone()),
        ("__profile_type__", t.id()),
        ("__type__", t.sample_type.clone()),
        ("__unit__", t.sample_unit.clone()),
    ]
}

// --- Methods ---

async fn profile_types(state: &AppState, body: &Request<'_>, enc: Encoding) -> Result<Response, Failure> {
    let req: ProfileTypesRequest =
        decode(body, |v| Ok(ProfileTypesRequest { start: json_i64(v, "start")?, end: json_i64(v, "end")? }))?;
    let (from_s, to_s) = range(state, req.start, req.end)?;
    let list = types(state, &Selection::default(), from_s, to_s).await?;
    let pb: Vec<PbProfileType> = list
        .iter()
        .map(|t| PbProfileType {
            id: t.id(),
            name: t.name.clone(),
            sample_type: t.sample_type.clone(),
            sample_unit: t.sample_unit.clone(),
            period_type: t.period_type.clone(),
            period_unit: t.period_unit.clone(),
        })
        .collect();
    let json = json!({ "profileTypes": pb.iter().map(|t| json!({
        "ID": t.id, "name": t.name, "sampleType": t.sample_type, "sampleUnit": t.sample_unit,
        "periodType": t.period_type, "periodUnit": t.period_unit,
    })).collect::<Vec<_>>() });
    Ok(answer(enc, &ProfileTypesResponse { profile_types: pb }, json))
}

/// Every type `sel` admits, with what to load of it and a selector narrowed to it.
async fn per_type(
    state: &AppState,
    sel: &Selection,
    from_s: u64,
    to_s: u64,
) -> Result<Vec<(ProfileType, Which, Selector)>, Failure> {
    let mut out = Vec::new();
    for t in types(state, sel, from_s, to_s).await? {
        let w = which(&t.id())?;
        let s = selector_for(sel, &w, from_s, to_s);
        out.push((t, w, s));
    }
    Ok(out)
}

/// Whether only the type is constrained: then every admitted type counts.
fn typed_only(sel: &Selection) -> bool {
    sel.filter == LabelFilter::default()
}

async fn label_names(state: &AppState, body: &Request<'_>, enc: Encoding) -> Result<Response, Failure> {
    let req: LabelNamesRequest = decode(body, |v| {
        Ok(LabelNamesRequest {
            matchers: json_strings(v, "matchers")?,
            start: json_i64(v, "start")?,
            end: json_i64(v, "end")?,
        })
    })?;
    let (from_s, to_s) = range(state, req.start, req.end)?;
    let sel = selection(&req.matchers, "")?;
    let mut names: Vec<String> = type_labels(&ProfileType::default()).into_iter().map(|(n, _)| n.to_owned()).collect();
    let typed = !sel.type_parts.is_empty();
    for name in LISTED {
        let mut found = false;
        if typed {
            for (_, w, s) in per_type(state, &sel, from_s, to_s).await? {
                if !values_of(state, name, Some(&w), &s).await?.is_empty() {
                    found = true;
                    break;
                }
            }
        } else {
            let s = Selector { from_s, to_s, filter: sel.filter.clone() };
            found = !values_of(state, name, None, &s).await?.is_empty();
        }
        if found {
            names.push(name.to_owned());
        }
    }
    // Tags, by their keys.
    if typed {
        for (_, w, s) in per_type(state, &sel, from_s, to_s).await? {
            names.extend(state.store.tag_keys(mode_of(&w), &s).await?);
        }
    } else {
        let s = Selector { from_s, to_s, filter: sel.filter.clone() };
        names.extend(state.store.tag_keys(None, &s).await?);
    }
    names.sort();
    names.dedup();
    let json = json!({ "names": names });
    Ok(answer(enc, &NamesResponse { names }, json))
}

async fn label_values(state: &AppState, body: &Request<'_>, enc: Encoding) -> Result<Response, Failure> {
    let req: LabelValuesRequest = decode(body, |v| {
        Ok(LabelValuesRequest {
            name: json_string(v, "name")?,
            matchers: json_strings(v, "matchers")?,
            start: json_i64(v, "start")?,
            end: json_i64(v, "end")?,
        })
    })?;
    if req.name.is_empty() {
        return Err(Failure::bad("`name` is required: the label whose values to list"));
    }
    let (from_s, to_s) = range(state, req.start, req.end)?;
    let sel = selection(&req.matchers, "")?;
    let mut names: Vec<String> = Vec::new();
    let part = type_labels(&ProfileType::default()).iter().position(|(n, _)| *n == req.name);
    if let Some(i) = part {
        for (t, _, s) in per_type(state, &sel, from_s, to_s).await? {
            // A type counts when it has rows the filters select.
            if typed_only(&sel) || has_data(state, &which(&t.id())?, &s).await? {
                names.push(type_labels(&t)[i].1.clone());
            }
        }
    } else if sel.type_parts.is_empty() {
        let s = Selector { from_s, to_s, filter: sel.filter.clone() };
        names = values_of(state, &req.name, None, &s).await?;
    } else {
        for (_, w, s) in per_type(state, &sel, from_s, to_s).await? {
            names.extend(values_of(state, &req.name, Some(&w), &s).await?);
        }
    }
    names.sort();
    names.dedup();
    let json = json!({ "names": names });
    Ok(answer(enc, &NamesResponse { names }, json))
}

async fn series(state: &AppState, body: &Request<'_>, enc: Encoding) -> Result<Response, Failure> {
    let req: SeriesRequest = decode(body, |v| {
        Ok(SeriesRequest {
            matchers: json_strings(v, "matchers")?,
            label_names: json_strings(v, "labelNames")?,
            start: json_i64(v, "start")?,
            end: json_i64(v, "end")?,
        })
    })?;
    let (from_s, to_s) = range(state, req.start, req.end)?;
    let sel = selection(&req.matchers, "")?;
    let mut sets: Vec<Vec<(String, String)>> = Vec::new();
    for (t, w, s) in per_type(state, &sel, from_s, to_s).await? {
        let services = values_of(state, "service_name", Some(&w), &s).await?;
        let mut base: Vec<(String, String)> = type_labels(&t).into_iter().map(|(n, v)| (n.to_owned(), v)).collect();
        if services.is_empty() {
            // The agent's rows have no service: a series when there is data.
            if has_data(state, &w, &s).await? {
                sets.push(base);
            }
            continue;
        }
        base.push(("service_name".to_owned(), String::new()));
        for svc in services {
            let mut set = base.clone();
            if let Some(last) = set.last_mut() {
                last.1 = svc;
            }
            sets.push(set);
        }
    }
    let mut out: Vec<Vec<(String, String)>> = sets
        .into_iter()
        .map(|mut set| {
            if !req.label_names.is_empty() {
                set.retain(|(n, _)| req.label_names.contains(n));
            }
            set.sort();
            set
        })
        .collect();
    out.sort();
    out.dedup();
    let pb = SeriesResponse {
        labels_set: out
            .iter()
            .map(|set| PbLabels {
                labels: set.iter().map(|(n, v)| LabelPair { name: n.clone(), value: v.clone() }).collect(),
            })
            .collect(),
    };
    let json = json!({ "labelsSet": out.iter().map(|set| json!({
        "labels": set.iter().map(|(n, v)| json!({"name": n, "value": v})).collect::<Vec<_>>()
    })).collect::<Vec<_>>() });
    Ok(answer(enc, &pb, json))
}

/// Pyroscope's flame graph: level by level from the root (`total`), each
/// node four numbers: its offset from the end of the previous node of its
/// level, its total, its self value and the index of its name. Nodes below
/// the `max_nodes`-th largest total are left out, their value kept in their
/// parent's self value.
fn flame_graph(tree: &FlameTree, max_nodes: usize) -> FlameGraph {
    let count = tree_size(tree);
    let min_total = if max_nodes > 0 && count > max_nodes {
        let mut totals: Vec<u64> = (0..count).map(|i| tree.node(i).value).collect();
        totals.sort_unstable_by(|a, b| b.cmp(a));
        totals[max_nodes - 1].max(1)
    } else {
        0
    };
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    // A node's self value, with the children left out folded in.
    let self_of = |i: usize| {
        tree.children(i)
            .filter(|(_, n)| n.value < min_total)
            .fold(tree.node(i).self_value, |acc, (_, n)| acc.saturating_add(n.value))
    };
    let mut names = vec!["total".to_owned()];
    let mut name_ids: BTreeMap<String, i64> = BTreeMap::new();
    let root = tree.root();
    let mut max_self = self_of(ROOT);
    let mut levels = vec![Level { values: vec![0, clamp(root.value), clamp(max_self), 0] }];
    // (node, x) of the current level, in order; children start at their
    // parent's x, one after the other.
    let mut current: Vec<(usize, u64)> = vec![(ROOT, 0)];
    loop {
        let mut next: Vec<(usize, u64)> = Vec::new();
        for &(index, x) in &current {
            let mut child_x = x;
            for (c, node) in tree.children(index) {
                if node.value >= min_total {
                    next.push((c, child_x));
                    child_x = child_x.saturating_add(node.value);
                }
            }
        }
        if next.is_empty() {
            break;
        }
        let mut values: Vec<i64> = Vec::with_capacity(next.len() * 4);
        let mut level_end = 0u64;
        for &(c, x) in &next {
            let node = tree.node(c);
            let id = *name_ids.entry(node.name.clone()).or_insert_with(|| {
                names.push(node.name.clone());
                names.len() as i64 - 1
            });
            let own = self_of(c);
            max_self = max_self.max(own);
            values.extend([clamp(x.saturating_sub(level_end)), clamp(node.value), clamp(own), id]);
            level_end = x.saturating_add(node.value);
        }
        levels.push(Level { values });
        current = next;
    }
    FlameGraph { names, levels, total: clamp(root.value), max_self: clamp(max_self) }
}

fn tree_size(tree: &FlameTree) -> usize {
    let mut n = 0;
    let mut stack = vec![ROOT];
    while let Some(i) = stack.pop() {
        n += 1;
        stack.extend(tree.children(i).map(|(c, _)| c));
    }
    n
}

fn merge_request(v: &Value) -> Result<SelectMergeStacktracesRequest, Failure> {
    Ok(SelectMergeStacktracesRequest {
        profile_type_id: json_string(v, "profileTypeID")?,
        label_selector: json_string(v, "labelSelector")?,
        start: json_i64(v, "start")?,
        end: json_i64(v, "end")?,
        max_nodes: json_opt_i64(v, "maxNodes")?,
        format: match v.get("format") {
            Some(Value::String(s)) if s == "PROFILE_FORMAT_TREE" => 2,
            Some(Value::String(_)) | None | Some(Value::Null) => 0,
            Some(_) => i32::try_from(json_i64(v, "format")?).unwrap_or(-1),
        },
    })
}

/// Loads the merged profile of a select request.
async fn load(
    state: &AppState,
    type_id: &str,
    label_selector: &str,
    start: i64,
    end: i64,
) -> Result<(Which, query::Profile, Selector), Failure> {
    if type_id.is_empty() {
        return Err(Failure::bad("`profileTypeID` is required (see ProfileTypes)"));
    }
    let w = which(type_id)?;
    let (from_s, to_s) = range(state, start, end)?;
    let sel = selection(&[label_selector.to_owned()], type_id)?;
    if !sel.admits(&w.profile_type()) {
        return Err(Failure::bad("the label selector names another profile type than `profileTypeID`"));
    }
    let s = selector_for(&sel, &w, from_s, to_s);
    let profile = crate::http::load_profile(state, &w, &s).await?;
    Ok((w, profile, s))
}

async fn select_merge_stacktraces(state: &AppState, body: &Request<'_>, enc: Encoding) -> Result<Response, Failure> {
    let req = decode(body, merge_request)?;
    if req.format == 2 {
        return Err(Failure::bad("format PROFILE_FORMAT_TREE is not supported: ask for the flame graph"));
    }
    let (w, profile, _) = load(state, &req.profile_type_id, &req.label_selector, req.start, req.end).await?;
    let tree = query::flame_tree(&profile, crate::http::value_mode(&w));
    let max_nodes = req.max_nodes.and_then(|n| usize::try_from(n).ok()).unwrap_or(0);
    let fg = flame_graph(&tree, max_nodes);
    let s = |v: i64| v.to_string();
    let json = json!({ "flamegraph": {
        "names": fg.names,
        "levels": fg.levels.iter().map(|l| json!({ "values": l.values.iter().map(|v| s(*v)).collect::<Vec<_>>() })).collect::<Vec<_>>(),
        "total": s(fg.total),
        "maxSelf": s(fg.max_self),
    }});
    Ok(answer(enc, &SelectMergeStacktracesResponse { flamegraph: Some(fg) }, json))
}

async fn select_merge_profile(state: &AppState, body: &Request<'_>, enc: Encoding) -> Result<Response, Failure> {
    let req: SelectMergeRequest = decode(body, |v| {
        let m = merge_request(v)?;
        Ok(SelectMergeRequest {
            profile_type_id: m.profile_type_id,
            label_selector: m.label_selector,
            start: m.start,
            end: m.end,
            max_nodes: m.max_nodes,
        })
    })?;
    let (w, profile, s) = load(state, &req.profile_type_id, &req.label_selector, req.start, req.end).await?;
    let gz = query::encode_pprof(&profile, &w.profile_type(), s.from_s * 1_000_000_000, s.to_s * 1_000_000_000)
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding pprof failed: {e}")))?;
    let raw = super::convert::gunzip(&gz, usize::MAX)
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding pprof failed: {e}")))?;
    let p = query::pprof::PbProfile::decode(&raw[..])
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding pprof failed: {e}")))?;
    Ok(answer(enc, &p, pprof_json(&p)))
}

async fn select_series(state: &AppState, body: &Request<'_>, enc: Encoding) -> Result<Response, Failure> {
    let req: SelectSeriesRequest = decode(body, |v| {
        Ok(SelectSeriesRequest {
            profile_type_id: json_string(v, "profileTypeID")?,
            label_selector: json_string(v, "labelSelector")?,
            start: json_i64(v, "start")?,
            end: json_i64(v, "end")?,
            group_by: json_strings(v, "groupBy")?,
            step: json_f64(v, "step")?,
            aggregation: match v.get("aggregation") {
                Some(Value::String(s)) if s.ends_with("AVERAGE") => Some(1),
                _ => None,
            },
            limit: json_opt_i64(v, "limit")?,
        })
    })?;
    if req.profile_type_id.is_empty() {
        return Err(Failure::bad("`profileTypeID` is required (see ProfileTypes)"));
    }
    let w = which(&req.profile_type_id)?;
    let (from_s, to_s) = range(state, req.start, req.end)?;
    let sel = selection(std::slice::from_ref(&req.label_selector), &req.profile_type_id)?;
    if !sel.admits(&w.profile_type()) {
        return Err(Failure::bad("the label selector names another profile type than `profileTypeID`"));
    }
    let base = selector_for(&sel, &w, from_s, to_s);
    // Groups: every combination of the group-by labels' values.
    const MAX_GROUPS: usize = 100;
    let mut groups: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for name in &req.group_by {
        let values = values_of(state, name, Some(&w), &base).await?;
        let mut next = Vec::new();
        for g in &groups {
            for v in &values {
                let mut g = g.clone();
                g.push((name.clone(), v.clone()));
                next.push(g);
            }
        }
        if next.len() > MAX_GROUPS {
            return Err(Failure::bad(format!(
                "grouping by {:?} gives more than {MAX_GROUPS} series; group by fewer labels or narrow the selector",
                req.group_by
            )));
        }
        groups = next;
    }
    // Steps: at least a second, at most MAX_POINTS per series and
    // MAX_QUERIES (one store query per step and series) in all.
    const MAX_POINTS: u64 = 1_000;
    const MAX_QUERIES: u64 = 10_000;
    let points_cap = MAX_POINTS.min(MAX_QUERIES / (groups.len() as u64).max(1)).max(1);
    let asked = if req.step.is_finite() && req.step > 0.0 { req.step.ceil() as u64 } else { 15 };
    let step_s = asked.max(1).max((to_s - from_s).div_ceil(points_cap));
    let mode = crate::http::value_mode(&w);
    let mut series: Vec<(u64, PbSeries)> = Vec::new();
    for g in groups {
        let matchers: Vec<String> = g.iter().map(|(n, v)| format!("{{{n}={}}}", json!(v))).collect();
        let mut gsel = selection(&matchers, "")?;
        let mut filter = sel.filter.clone();
        merge_filter(&mut filter, std::mem::take(&mut gsel.filter));
        filter.profile_type = base.filter.profile_type.clone();
        let mut points = Vec::new();
        let mut total = 0u64;
        let mut t = from_s;
        while t < to_s {
            let end = (t + step_s).min(to_s);
            let s = Selector { from_s: t, to_s: end, filter: filter.clone() };
            let sum = bucket_sum(state, &w, mode, &s).await?;
            if sum > 0 {
                // Always the step's sum: rows are merged per aggregation
                // window, so single profiles cannot be averaged.
                points.push(Point { value: sum as f64, timestamp: i64::try_from(t * 1000).unwrap_or(i64::MAX) });
                total = total.saturating_add(sum);
            }
            t = end;
        }
        if points.is_empty() {
            continue;
        }
        let labels = g.into_iter().map(|(name, value)| LabelPair { name, value }).collect();
        series.push((total, PbSeries { labels, points }));
    }
    if let Some(limit) = req.limit.and_then(|l| usize::try_from(l).ok()).filter(|l| *l > 0) {
        series.sort_by_key(|s| std::cmp::Reverse(s.0));
        series.truncate(limit);
    }
    let series: Vec<PbSeries> = series.into_iter().map(|(_, s)| s).collect();
    let json = json!({ "series": series.iter().map(|s| json!({
        "labels": s.labels.iter().map(|l| json!({"name": l.name, "value": l.value})).collect::<Vec<_>>(),
        "points": s.points.iter().map(|p| json!({"value": p.value, "timestamp": p.timestamp.to_string()})).collect::<Vec<_>>(),
    })).collect::<Vec<_>>() });
    Ok(answer(enc, &SelectSeriesResponse { series }, json))
}

fn merge_filter(into: &mut LabelFilter, more: LabelFilter) {
    let pick = |a: &mut Option<String>, b: Option<String>| {
        if b.is_some() {
            *a = b;
        }
    };
    pick(&mut into.node, more.node);
    pick(&mut into.namespace, more.namespace);
    pick(&mut into.pod, more.pod);
    pick(&mut into.container, more.container);
    pick(&mut into.process, more.process);
    pick(&mut into.service, more.service);
    if more.pid.is_some() {
        into.pid = more.pid;
    }
    into.tags.extend(more.tags);
    into.tags.sort();
    into.tags.dedup();
}

async fn bucket_sum(state: &AppState, w: &Which, mode: Mode, s: &Selector) -> Result<u64, Failure> {
    let kind = match w {
        Which::Mode(m) => crate::store::profile_kind(*m),
        Which::Type(_) => aperture_core::shard::RowKind::Profile,
    };
    let totals = state.store.stack_totals(kind, s).await?;
    Ok(totals.iter().fold(0u64, |acc, t| acc.saturating_add(profile_value(mode, t.count, t.total_ns))))
}

/// A pprof profile in protobuf's JSON mapping (int64 as strings).
fn pprof_json(p: &query::pprof::PbProfile) -> Value {
    let s = |v: i64| v.to_string();
    let u = |v: u64| v.to_string();
    let vt = |t: &query::pprof::PbValueType| json!({ "type": s(t.r#type), "unit": s(t.unit) });
    json!({
        "sampleType": p.sample_type.iter().map(vt).collect::<Vec<_>>(),
        "sample": p.sample.iter().map(|x| json!({
            "locationId": x.location_id.iter().map(|v| u(*v)).collect::<Vec<_>>(),
            "value": x.value.iter().map(|v| s(*v)).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "mapping": p.mapping.iter().map(|m| json!({ "id": u(m.id), "filename": s(m.filename) })).collect::<Vec<_>>(),
        "location": p.location.iter().map(|l| json!({
            "id": u(l.id), "mappingId": u(l.mapping_id), "address": u(l.address),
            "line": l.line.iter().map(|x| json!({ "functionId": u(x.function_id), "line": s(x.line) })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "function": p.function.iter().map(|f| json!({
            "id": u(f.id), "name": s(f.name), "systemName": s(f.system_name), "filename": s(f.filename),
        })).collect::<Vec<_>>(),
        "stringTable": p.string_table,
        "timeNanos": s(p.time_nanos),
        "durationNanos": s(p.duration_nanos),
        "periodType": p.period_type.as_ref().map(vt),
        "period": s(p.period),
    })
}

/// `POST /querier.v1.QuerierService/{method}`.
pub(crate) async fn querier(
    State(state): State<AppState>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !crate::http::authorized(&state, &headers) {
        return connect_error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token: send `Authorization: Bearer <token>` with the read token \
             (APERTURE_READ_TOKEN, or the shared APERTURE_AUTH_TOKEN)",
        );
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let enc = if content_type.starts_with("application/json") {
        Encoding::Json
    } else if content_type.starts_with("application/proto") {
        Encoding::Proto
    } else {
        return connect_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type {content_type:?} is not supported: application/proto or application/json"),
        );
    };
    let limit = state.limits.max_body_bytes;
    let Some(raw) = read_body(body, limit).await else {
        return connect_error(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is over the limit of {limit} bytes"));
    };
    let raw = match super::convert::gunzip(&raw, limit.saturating_mul(super::MAX_INFLATE)) {
        Ok(r) => r,
        Err(e) => return connect_error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let body = match enc {
        Encoding::Proto => Request::Proto(&raw),
        Encoding::Json => match serde_json::from_slice::<Value>(if raw.is_empty() { b"{}" } else { &raw }) {
            Ok(v @ Value::Object(_)) => Request::Json(v),
            Ok(_) => return connect_error(StatusCode::BAD_REQUEST, "the JSON body is not an object"),
            Err(e) => return connect_error(StatusCode::BAD_REQUEST, format!("the body is not JSON: {e}")),
        },
    };
    let result = match method.as_str() {
        "ProfileTypes" => profile_types(&state, &body, enc).await,
        "LabelNames" => label_names(&state, &body, enc).await,
        "LabelValues" => label_values(&state, &body, enc).await,
        "Series" => series(&state, &body, enc).await,
        "SelectMergeStacktraces" => select_merge_stacktraces(&state, &body, enc).await,
        "SelectMergeProfile" => select_merge_profile(&state, &body, enc).await,
        "SelectSeries" => select_series(&state, &body, enc).await,
        other => Err(Failure(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "querier.v1.QuerierService/{other} is not served: ProfileTypes, LabelNames, LabelValues, Series, \
                 SelectMergeStacktraces, SelectMergeProfile and SelectSeries are"
            ),
        )),
    };
    result.unwrap_or_else(|Failure(status, message)| connect_error(status, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_into_filters_and_type_parts() {
        let sel = selection(
            &[r#"{service_name="checkout", pod = "p-1", env="prod", __name__="memory"}"#.to_owned()],
            "memory:alloc_space:bytes:space:bytes",
        )
        .ok()
        .expect("parses");
        assert_eq!(sel.filter.service.as_deref(), Some("checkout"));
        assert_eq!(sel.filter.pod.as_deref(), Some("p-1"));
        assert_eq!(sel.filter.tags, vec![("env".to_owned(), "prod".to_owned())]);
        assert!(sel.admits(&ProfileType::new("memory", "alloc_space", "bytes", "space", "bytes")));
        assert!(!sel.admits(&ProfileType::new("memory", "inuse_space", "bytes", "space", "bytes")));
        assert!(selection(&["{}".to_owned()], "").is_ok());
        assert!(selection(&[r#"{a=~"x|y"}"#.to_owned()], "").is_err());
        assert!(selection(&[r#"{a="x"#.to_owned()], "").is_err());
        assert!(selection(&[r#"{a="x" b="y"}"#.to_owned()], "").is_err());
    }
}
