//! `GET /api/v1/flamegraph`: the merged profile as a flame-graph tree for the
//! web UI, with a `count_unit` naming what a node's `count` counts. The tree
//! is the one of `/api/v1/profile?format=json` (built by
//! [`query::flame_tree`]; its fields are documented there).

use std::collections::HashMap;

use aperture_core::model::Mode;
use axum::extract::{Query, State};
use axum::response::Response;
use serde_json::json;

use super::AppState;
use super::api::{ApiError, json_with_root};
use super::params::FILTERS;
use crate::query::{self, profile_unit};

/// What one `count` stands for in a mode.
fn count_unit(mode: Mode) -> &'static str {
    match mode {
        Mode::Cpu => "samples",
        Mode::Lock => "waits",
        Mode::Syscall => "calls",
    }
}

/// `GET /api/v1/flamegraph`: same parameters as `/api/v1/profile` without `format`.
pub(crate) async fn flamegraph(
    State(state): State<AppState>,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let p = super::api::params(&state, raw);
    let mut accepted = vec!["mode", "from", "to"];
    accepted.extend(FILTERS);
    p.reject_unknown(&accepted)?;
    let mode = p.mode()?;
    let sel = p.selector()?;
    let profile = query::load_profile(state.store.as_ref(), mode, &sel).await?;
    let tree = query::flame_tree(&profile, mode);
    Ok(json_with_root(
        json!({
            "mode": mode.as_str(),
            "from": sel.from_s,
            "to": sel.to_s,
            "unit": profile_unit(mode),
            "count_unit": count_unit(mode),
        }),
        &tree.to_json(),
    ))
}
