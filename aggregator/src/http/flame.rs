//! `GET /api/v1/flamegraph`: the merged profile as a flame-graph tree for the
//! web UI, with a `count_unit` naming what a node's `count` counts. The tree
//! is the one of `/api/v1/profile?format=json` (built by
//! [`query::flame_tree`]; its fields are documented there).

use std::collections::HashMap;

use aperture_core::model::Mode;
use axum::extract::{Query, State};
use axum::response::Response;
use serde_json::json;

use super::api::{ApiError, describe, json_with_root, load, merge, value_mode};
use super::params::{FILTERS, Which};
use super::state::AppState;
use crate::query;

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
    let mut accepted = vec!["mode", "type", "from", "to"];
    accepted.extend(FILTERS);
    p.reject_unknown(&accepted)?;
    let which = p.which()?;
    let sel = p.selector_for(Some(&which))?;
    let profile = load(&state, &which, &sel).await?;
    let tree = query::flame_tree(&profile, value_mode(&which));
    let count_unit = match &which {
        Which::Mode(m) => count_unit(*m).to_owned(),
        Which::Type(t) => t.sample_unit.clone(),
    };
    Ok(json_with_root(
        merge(describe(&which), json!({ "from": sel.from_s, "to": sel.to_s, "count_unit": count_unit })),
        &tree.to_json(),
    ))
}
