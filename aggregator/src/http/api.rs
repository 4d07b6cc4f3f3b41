//! `/api/v1` handlers: parse parameters, ask the store, render.

use std::collections::HashMap;

use aperture_core::model::Mode;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::params::{FILTERS, ParamError, Params, TAG_PREFIX, Which};
use super::state::{AppState, error_response};
use crate::query::{self, profile_unit};
use crate::store::{LabelName, QueryError};

/// Why a query request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// Bad parameters: 400.
    #[error(transparent)]
    Param(#[from] ParamError),
    /// The store failed: 503.
    #[error(transparent)]
    Store(#[from] QueryError),
    /// Rendering failed: 500.
    #[error("rendering the {format} output failed: {reason}")]
    Render {
        /// Output format.
        format: &'static str,
        /// What failed.
        reason: String,
    },
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Param(_) => StatusCode::BAD_REQUEST,
            ApiError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Render { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error_response(status, self.to_string())
    }
}

type Raw = Query<HashMap<String, String>>;

fn accepted(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = vec!["from", "to"];
    v.extend(FILTERS);
    v.extend_from_slice(extra);
    v
}

/// The request's parameters, bounded by the configured query range.
pub(crate) fn params(state: &AppState, raw: HashMap<String, String>) -> Params {
    Params::at_now(raw).with_max_range(state.limits.max_query_range)
}

/// A JSON response: the object `head` with a `"root"` member whose JSON
/// text is already written (a flame-graph tree, which may be too deep for a
/// recursive serializer).
pub(crate) fn json_with_root(head: serde_json::Value, root_json: &str) -> Response {
    let mut body = head.to_string();
    if body.ends_with('}') {
        body.pop();
        if body.len() > 1 {
            body.push(',');
        }
        body.push_str("\"root\":");
        body.push_str(root_json);
        body.push('}');
    }
    with_type(body.into_response(), "application/json")
}

fn with_type(mut r: Response, content_type: &'static str) -> Response {
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The mode whose value rules apply to a profile: a pushed profile's value
/// is its rows' `count`, as for CPU samples.
pub(crate) fn value_mode(which: &Which) -> Mode {
    match which {
        Which::Mode(m) => *m,
        Which::Type(_) => Mode::Cpu,
    }
}

/// The unit of a profile's values.
pub(crate) fn unit(which: &Which) -> String {
    match which {
        Which::Mode(m) => profile_unit(*m).to_owned(),
        Which::Type(t) => t.sample_unit.clone(),
    }
}

/// What a profile response says it is: `mode` (null for pushed types), `type`, `unit`.
pub(crate) fn describe(which: &Which) -> serde_json::Value {
    let mode = match which {
        Which::Mode(m) => json!(m.as_str()),
        Which::Type(_) => serde_json::Value::Null,
    };
    json!({ "mode": mode, "type": which.profile_type().id(), "unit": unit(which) })
}

/// Loads the merged profile a request asks for.
pub(crate) async fn load(
    state: &AppState,
    which: &Which,
    sel: &crate::store::Selector,
) -> Result<query::Profile, QueryError> {
    match which {
        Which::Mode(m) => query::load_profile(state.store.as_ref(), *m, sel).await,
        Which::Type(_) => query::load_pushed(state.store.as_ref(), sel).await,
    }
}

pub(crate) fn merge(mut head: serde_json::Value, more: serde_json::Value) -> serde_json::Value {
    if let (Some(h), serde_json::Value::Object(m)) = (head.as_object_mut(), more) {
        h.extend(m);
    }
    head
}

/// `GET /api/v1/profile`.
pub(crate) async fn profile(State(state): State<AppState>, Query(raw): Raw) -> Result<Response, ApiError> {
    let p = params(&state, raw);
    p.reject_unknown(&accepted(&["mode", "type", "format"]))?;
    let which = p.which()?;
    let mode = value_mode(&which);
    let format = p.choice("format", &["json", "folded", "pprof", "svg"], "json, folded, pprof or svg")?;
    let sel = p.selector_for(Some(&which))?;
    let profile = load(&state, &which, &sel).await?;
    let r = match format {
        "folded" => with_type(query::folded(&profile, mode).into_response(), "text/plain; charset=utf-8"),
        "pprof" => {
            let (from_ns, to_ns) = (sel.from_s * 1_000_000_000, sel.to_s * 1_000_000_000);
            let body = query::encode_pprof(&profile, &which.profile_type(), from_ns, to_ns)
                .map_err(|e| ApiError::Render { format: "pprof", reason: e.to_string() })?;
            let mut r = with_type(body.into_response(), "application/octet-stream");
            r.headers_mut().insert(
                header::CONTENT_DISPOSITION,
                HeaderValue::from_static("attachment; filename=\"profile.pb.gz\""),
            );
            r
        }
        "svg" => {
            let title = match &which {
                Which::Mode(m) => format!("{m} profile"),
                Which::Type(t) => format!("{} profile", t.id()),
            };
            let body = query::svg(&profile, mode, &unit(&which), &title)
                .map_err(|e| ApiError::Render { format: "svg", reason: e.to_string() })?;
            with_type(body.into_response(), "image/svg+xml")
        }
        _ => json_with_root(
            merge(describe(&which), json!({ "from": sel.from_s, "to": sel.to_s })),
            &query::flame_tree(&profile, mode).to_json(),
        ),
    };
    Ok(r)
}

/// `GET /api/v1/top`.
pub(crate) async fn top(State(state): State<AppState>, Query(raw): Raw) -> Result<Response, ApiError> {
    let p = params(&state, raw);
    p.reject_unknown(&accepted(&["mode", "type", "by", "limit"]))?;
    let which = p.which()?;
    let by = p.choice("by", &["self", "total"], "self or total")?;
    let limit = p.limit(50, 10_000)?;
    let sel = p.selector_for(Some(&which))?;
    let profile = load(&state, &which, &sel).await?;
    let functions = query::top(&profile, value_mode(&which), by == "total", limit);
    Ok(axum::Json(merge(
        describe(&which),
        json!({ "from": sel.from_s, "to": sel.to_s, "by": by, "functions": functions }),
    ))
    .into_response())
}

/// `GET /api/v1/syscalls`.
pub(crate) async fn syscalls(State(state): State<AppState>, Query(raw): Raw) -> Result<Response, ApiError> {
    let p = params(&state, raw);
    p.reject_unknown(&accepted(&["limit"]))?;
    let limit = p.limit(100, 10_000)?;
    let sel = p.selector()?;
    let rows = query::syscalls(state.store.as_ref(), &sel, limit).await?;
    Ok(axum::Json(json!({ "from": sel.from_s, "to": sel.to_s, "syscalls": rows })).into_response())
}

/// `GET /api/v1/locks`.
pub(crate) async fn locks(State(state): State<AppState>, Query(raw): Raw) -> Result<Response, ApiError> {
    let p = params(&state, raw);
    p.reject_unknown(&accepted(&["limit"]))?;
    let limit = p.limit(50, 10_000)?;
    let sel = p.selector()?;
    let sites = query::locks(state.store.as_ref(), &sel, limit).await?;
    Ok(axum::Json(json!({ "from": sel.from_s, "to": sel.to_s, "sites": sites })).into_response())
}

/// `GET /api/v1/labels/{name}/values`.
pub(crate) async fn label_values(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(raw): Raw,
) -> Result<Response, ApiError> {
    let p = params(&state, raw);
    p.reject_unknown(&accepted(&["mode", "type"]))?;
    let which = p.optional_which()?;
    let mode = match &which {
        Some(Which::Mode(m)) => Some(*m),
        _ => None,
    };
    let sel = p.selector_for(which.as_ref())?;
    if name == "tag" {
        // The tag keys, for the UI's tag filter.
        let keys = query::sort_label_values(state.store.tag_keys(mode, &sel).await?, false);
        return Ok(axum::Json(json!({ "name": name, "values": keys })).into_response());
    }
    if let Some(key) = name.strip_prefix(TAG_PREFIX) {
        if !crate::store::valid_tag(key, "") {
            return Err(ParamError::Invalid {
                name: "name",
                value: name.clone(),
                expected: "tag.<key>: a key of letters, digits, `_`, `.`, `-`",
            }
            .into());
        }
        let values = state.store.tag_values(key, mode, &sel).await?;
        let values = query::sort_label_values(values, false);
        return Ok(axum::Json(json!({ "name": name, "values": values })).into_response());
    }
    let label = LabelName::parse(&name).ok_or_else(|| ParamError::Invalid {
        name: "name",
        value: name.clone(),
        expected: "node, namespace, pod, container, process, pid, service, type, tag (the tag keys) or tag.<key>",
    })?;
    let values = state.store.label_values(label, mode, &sel).await?;
    let values = query::sort_label_values(values, label == LabelName::Pid);
    Ok(axum::Json(json!({ "name": label.as_str(), "values": values })).into_response())
}

/// `GET /api/v1/types`: the profile types there is data of in the range:
/// the agent's modes (always listed) and the pushed types.
pub(crate) async fn types(State(state): State<AppState>, Query(raw): Raw) -> Result<Response, ApiError> {
    let p = params(&state, raw);
    p.reject_unknown(&accepted(&[]))?;
    let sel = p.selector()?;
    let mut types: Vec<serde_json::Value> = Mode::ALL
        .into_iter()
        .map(|m| {
            let t = aperture_core::model::ProfileType::of_mode(m);
            json!({ "id": t.id(), "mode": m.as_str(), "name": t.name, "sample_type": t.sample_type,
                    "sample_unit": t.sample_unit, "period_type": t.period_type, "period_unit": t.period_unit })
        })
        .collect();
    let pushed = state.store.label_values(LabelName::Type, None, &sel).await?;
    for id in query::sort_label_values(pushed, false) {
        if let Some(t) = aperture_core::model::ProfileType::parse_id(&id) {
            types.push(json!({ "id": id, "mode": null, "name": t.name, "sample_type": t.sample_type,
                               "sample_unit": t.sample_unit, "period_type": t.period_type, "period_unit": t.period_unit }));
        }
    }
    Ok(axum::Json(json!({ "from": sel.from_s, "to": sel.to_s, "types": types })).into_response())
}

/// `GET /api/v1/diff`.
pub(crate) async fn diff(State(state): State<AppState>, Query(raw): Raw) -> Result<Response, ApiError> {
    let p = params(&state, raw);
    p.reject_unknown(&accepted(&["mode", "type", "base_from", "base_to", "limit"]))?;
    let which = p.which()?;
    let limit = p.limit(100, 10_000)?;
    let sel = p.selector_for(Some(&which))?;
    let (base_from, base_to) = base_range(&p, sel.from_s, sel.to_s)?;
    let base_sel = crate::store::Selector { from_s: base_from, to_s: base_to, filter: sel.filter.clone() };
    let current = load(&state, &which, &sel).await?;
    let base = load(&state, &which, &base_sel).await?;
    let stacks = query::diff(&base, &current, value_mode(&which), limit);
    Ok(axum::Json(merge(
        describe(&which),
        json!({
            "base": { "from": base_from, "to": base_to },
            "current": { "from": sel.from_s, "to": sel.to_s },
            "stacks": stacks,
        }),
    ))
    .into_response())
}

/// The base range of a diff; by default the range of the same length just
/// before the compared one.
fn base_range(p: &Params, from: u64, to: u64) -> Result<(u64, u64), ParamError> {
    let len = to - from;
    let base_to = p.time("base_to", from)?;
    let base_from = p.time("base_from", base_to.saturating_sub(len))?;
    p.check_range("base_from", base_from, base_to)?;
    Ok((base_from, base_to))
}
