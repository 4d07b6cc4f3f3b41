//! The web UI: a single page served at `/`, its modules, styles and icon
//! under `/ui/`. Every file is embedded in the binary (no build step, no
//! Node at `cargo build`), so the UI works with no network access beyond
//! the aggregator itself.
//!
//! Every answer carries a strict Content-Security-Policy (same origin only:
//! no CDN, no external fonts, no inline script) and `Cache-Control:
//! no-cache` with an `ETag`, so browsers revalidate cheaply (304) and pick
//! up a new UI right after an upgrade.
//!
//! The UI reads the query API (`/api/v1/*`); the sources live in
//! `aggregator/ui/`, their browser test in `aggregator/ui/tests/`.

use std::sync::OnceLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use super::state::error_response;

/// One embedded file.
struct Asset {
    /// Path under `/ui/`.
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $content_type:expr) => {
        Asset { path: $path, content_type: $content_type, body: include_bytes!(concat!("../../ui/", $path)) }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file the UI is made of. `index.html` is also served at `/`.
static ASSETS: [Asset; 12] = [
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("state.js", JS),
    asset!("format.js", JS),
    asset!("tree.js", JS),
    asset!("flame.js", JS),
    asset!("tables.js", JS),
    asset!("views.js", JS),
    asset!("dom.js", JS),
];

/// Same origin only. Styles set from script through the CSSOM (positions,
/// widths) are not governed by `style-src`, so no `'unsafe-inline'` is needed.
pub(crate) const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// Routes `/` and `/ui/{path}`. Stateless, so it merges into any router.
pub(crate) fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/", get(index)).route("/ui/{*path}", get(asset))
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&path, &headers)
}

/// Strong validators, computed once from the embedded bytes.
fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let digest = Sha256::digest(a.body);
                let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
                format!("\"{hex}\"")
            })
            .collect()
    })
}

fn serve(path: &str, request: &HeaderMap) -> Response {
    let Some(index) = ASSETS.iter().position(|a| a.path == path) else {
        return error_response(StatusCode::NOT_FOUND, format!("no UI file {path:?}"));
    };
    let asset = &ASSETS[index];
    let etag = &etags()[index];
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = asset.body.into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
        r
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(a: &Asset) -> &'static str {
        std::str::from_utf8(a.body).expect("UI files are UTF-8")
    }

    #[test]
    fn assets_are_served_with_their_type_and_security_headers() {
        for a in &ASSETS {
            let r = serve(a.path, &HeaderMap::new());
            assert_eq!(r.status(), StatusCode::OK, "{}", a.path);
            let h = r.headers();
            assert_eq!(h[header::CONTENT_TYPE], a.content_type, "{}", a.path);
            assert_eq!(h[header::CACHE_CONTROL], "no-cache");
            assert_eq!(h[header::CONTENT_SECURITY_POLICY], CONTENT_SECURITY_POLICY);
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        }
        assert_eq!(serve("nope.js", &HeaderMap::new()).status(), StatusCode::NOT_FOUND);
        assert_eq!(serve("../Cargo.toml", &HeaderMap::new()).status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn a_matching_etag_answers_not_modified() {
        let first = serve("app.js", &HeaderMap::new());
        let etag = first.headers()[header::ETAG].clone();
        let mut h = HeaderMap::new();
        h.insert(header::IF_NONE_MATCH, etag);
        assert_eq!(serve("app.js", &h).status(), StatusCode::NOT_MODIFIED);
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"stale\""));
        assert_eq!(serve("app.js", &h).status(), StatusCode::OK);
    }

    #[test]
    fn the_policy_and_the_files_name_no_other_origin() {
        assert!(!CONTENT_SECURITY_POLICY.contains("http"));
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
        for a in &ASSETS {
            let t = text(a);
            // XML namespace URIs are identifiers, not fetches.
            let urls = t.matches("http://").count() + t.matches("https://").count();
            let namespaces = t.matches("http://www.w3.org/").count();
            assert_eq!(urls, namespaces, "{} names another origin", a.path);
            assert!(!t.contains("@import"), "{} imports a stylesheet", a.path);
        }
    }

    #[test]
    fn every_module_import_and_page_reference_is_embedded() {
        let known = |p: &str| ASSETS.iter().any(|a| a.path == p);
        for a in ASSETS.iter().filter(|a| a.path.ends_with(".js")) {
            for line in text(a).lines().map(str::trim).filter(|l| l.starts_with("import ")) {
                let spec = line.rsplit(['\'', '"']).nth(1).expect("import specifier");
                let file = spec.strip_prefix("./").expect("relative import");
                assert!(known(file), "{} imports {spec}, which is not embedded", a.path);
            }
        }
        let index = text(&ASSETS[0]);
        for reference in index.split("\"/ui/").skip(1) {
            let file = reference.split('"').next().expect("quoted path");
            assert!(known(file), "index.html references /ui/{file}, which is not embedded");
        }
        assert!(!index.contains("<script>"), "inline scripts are blocked by the policy");
        assert!(!index.contains("style=\""), "inline styles are blocked by the policy");
    }
}
