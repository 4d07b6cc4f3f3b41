//! `/api/v1` handlers: parse parameters, ask the store, render.

use std::collections::HashMap;

use aperture_core::model::Mode;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::params::{FILTERS, ParamError, Params};
use super::{AppState, error_response};
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

/// `GET /api/v1/profile`.
pub(crate) async fn profile(State(state): State<AppState>, Query(raw): Raw) -> Result<Response, ApiError> {
    let p = params(&state, raw);
    p.reject_unknown(&accepted(&["mode", "format"]))?;
    let mode = p.mode()?;
    let format = p.choice("format", &["json", "folded", "pprof", "svg"], "json, folded, pprof or svg")?;
    let sel = p.selector()?;
    let profile = query::load_profile(state.store.as_ref(), mode, &sel).await?;
    let r = match format {
        "folded" => with_type(query::folded(&profile, mode).into_response(), "text/plain; charset=utf-8"),
        "pprof" => {
            let body = query::encode_pprof(&profile, mode, sel.from_s * 1_000_000_000, sel.to_s * 1_000_000_000)
                .map_err(|e| ApiError::Render { format: "pprof", reason: e.to_string() })?;
            let mut r = with_type(body.into_response(), "application/octet-stream");
            r.headers_mut().insert(
                header::CONTENT_DISPOSITION,
                HeaderValue::from_static("attachment; filename=\"profile.pb.gz\""),
            );
            r
        }
        "svg" => {
            let title = format!("{mode} profile");
            let body = query::svg(&profile, mode, &title)
                .map_err(|e| ApiError::Render { format: "svg", reason: e.to_string() })?;
            with_type(body.into_response(), "image/svg+xml")
        }
        _ => json_with_root(
            json!({ "mode": mode.as_str(), "from": sel.from_s, "to": sel.to_s, "unit": profile_unit(mode) }),
            &query::flame_tree(&profile, mode).to_json(),
        ),
    };
    Ok(r)
}

/// `GET /api/v1/top`.
pub(crate) async fn top(State(state): State<AppState>, Query(raw): Raw) -> Result<Response, ApiError> {
    let p = params(&state, raw);
    p.reject_unknown(&accepted(&["mode", "by", "limit"]))?;
    let mode = p.mode()?;
    let by = p.choice("by", &["self", "total"], "self or total")?;
    let limit = p.limit(50, 10_000)?;
    let sel = p.selector()?;
    let profile = query::load_profile(state.store.as_ref(), mode, &sel).await?;
    let functions = query::top(&profile, mode, by == "total", limit);
    Ok(axum::Json(json!({
        "mode": mode.as_str(), "from": sel.from_s, "to": sel.to_s, "by": by,
        "unit": profile_unit(mode), "functions": functions,
    }))
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
    p.reject_unknown(&accepted(&["mode"]))?;
    let label = LabelName::parse(&name).ok_or_else(|| ParamError::Invalid {
        name: "name",
        value: name.clone(),
        expected: "node, namespace, pod, container, process or pid",
    })?;
    let mode = p.optional_mode()?;
    let sel = p.selector()?;
    let values = state.store.label_values(label, mode, &sel).await?;
    let values = query::sort_label_values(values, label == LabelName::Pid);
    Ok(axum::Json(json!({ "name": label.as_str(), "values": values })).into_response())
}

/// `GET /api/v1/diff`.
pub(crate) async fn diff(State(state): State<AppState>, Query(raw): Raw) -> Result<Response, ApiError> {
    let p = params(&state, raw);
    p.reject_unknown(&accepted(&["mode", "base_from", "base_to", "limit"]))?;
    let mode: Mode = p.mode()?;
    let limit = p.limit(100, 10_000)?;
    let sel = p.selector()?;
    let (base_from, base_to) = base_range(&p, sel.from_s, sel.to_s)?;
    let base_sel = crate::store::Selector { from_s: base_from, to_s: base_to, filter: sel.filter.clone() };
    let current = query::load_profile(state.store.as_ref(), mode, &sel).await?;
    let base = query::load_profile(state.store.as_ref(), mode, &base_sel).await?;
    let stacks = query::diff(&base, &current, mode, limit);
    Ok(axum::Json(json!({
        "mode": mode.as_str(), "unit": profile_unit(mode),
        "base": { "from": base_from, "to": base_to },
        "current": { "from": sel.from_s, "to": sel.to_s },
        "stacks": stacks,
    }))
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
