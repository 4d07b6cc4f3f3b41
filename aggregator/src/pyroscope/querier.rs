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
//! `container`, `process` and `pid` are the agent's, `lock_class` is the
//! class of a lock wait (lock profiles only; listed with every class the
//! range has, matched with `=` as the REST API's parameter), `__profile_type__`,
//! `__name__`, `__type__`, `__unit__`, `__period_type__` and
//! `__period_unit__` name parts of the profile type, and any other name is a
//! tag. Matchers are `=`, `!=`, `=~` and `!~` (regexes match whole values,
//! a label a row lacks is ""); the others become sets of the values their
//! label has in the range. Times are milliseconds since the epoch. Auth is
//! the read token.

mod connect;
mod messages;
mod render;
mod selection;

pub(crate) use render::render;

use std::collections::BTreeMap;

use aperture_core::model::{Mode, ProfileType};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use prost::Message;
use serde_json::{Value, json};

use super::push::connect_error;
use super::read_body;
use crate::http::params::Which;
use crate::http::state::AppState;
use crate::query::{self, FlameTree, ROOT, profile_value};
use crate::store::{LabelFilter, Selector};

use connect::*;
use messages::*;
use selection::*;

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
    let sel = select(state, &req.matchers, "", from_s, to_s).await?;
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
    let sel = select(state, &req.matchers, "", from_s, to_s).await?;
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
    let sel = select(state, &req.matchers, "", from_s, to_s).await?;
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
    let sel = select(state, &[label_selector.to_owned()], type_id, from_s, to_s).await?;
    if !sel.admits(&w.profile_type()) {
        return Err(Failure::bad("the label selector names another profile type than `profileTypeID`"));
    }
    let s = selector_for(&sel, &w, from_s, to_s);
    let profile = crate::http::api::load(state, &w, &s).await?;
    Ok((w, profile, s))
}

async fn select_merge_stacktraces(state: &AppState, body: &Request<'_>, enc: Encoding) -> Result<Response, Failure> {
    let req = decode(body, merge_request)?;
    if req.format == 2 {
        return Err(Failure::bad("format PROFILE_FORMAT_TREE is not supported: ask for the flame graph"));
    }
    let (w, profile, _) = load(state, &req.profile_type_id, &req.label_selector, req.start, req.end).await?;
    let tree = query::flame_tree(&profile, crate::http::api::value_mode(&w));
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
    let sel = select(state, std::slice::from_ref(&req.label_selector), &req.profile_type_id, from_s, to_s).await?;
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
    let mode = crate::http::api::value_mode(&w);
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
    into.sets.extend(more.sets);
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
    if !crate::http::state::authorized(&state, &headers) {
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
        let sel =
            selection(&[r#"{a=~"x|y", pod!="p-2", __name__!~"mem.*", b=~".*"}"#.to_owned()], "").ok().expect("parses");
        assert_eq!(sel.pending.len(), 2, "the regex and the negation wait for the values of their labels");
        assert!(sel.pending[0].matches("y") && !sel.pending[0].matches("xy") && !sel.pending[0].matches(""));
        assert!(sel.pending[1].matches("p-1") && sel.pending[1].matches("") && !sel.pending[1].matches("p-2"));
        assert!(!sel.admits(&ProfileType::new("memory", "alloc_space", "bytes", "space", "bytes")));
        assert!(sel.admits(&ProfileType::new("process_cpu", "cpu", "nanoseconds", "cpu", "nanoseconds")));
        let bad = selection(&[r#"{a=~"(x"}"#.to_owned()], "").expect_err("a bad regex");
        assert_eq!(bad.0, StatusCode::BAD_REQUEST);
        assert!(bad.1.contains("a=~") && bad.1.contains("regular expression"), "{}", bad.1);
        assert!(selection(&[r#"{"a b"!="x"}"#.to_owned()], "").is_err());
        assert!(selection(&[r#"{a="x"#.to_owned()], "").is_err());
        assert!(selection(&[r#"{a="x" b="y"}"#.to_owned()], "").is_err());
    }
}
