//! OTLP profiles ingest (proto v1.10.0, `v1development`): the same
//! `ExportProfilesServiceRequest` over gRPC (`ProfilesService/Export` on
//! the OTLP listener, served by the transport, which hands requests to
//! [`OtlpIngest`]) and over HTTP (`POST /v1development/profiles`,
//! `application/x-protobuf`, optionally gzipped, on the HTTP port).
//!
//! Both paths decode here, map the request onto a
//! [`aperture_core::model::ProfileBatch`] ([`convert`]) and commit it
//! through the same ledger, shards and writer as Pyroscope's pushes
//! ([`crate::pyroscope::commit`]): a success answer means committed. A
//! malformed request is refused whole (`INVALID_ARGUMENT`, HTTP 400 with a
//! `google.rpc.Status` body) and nothing of it is stored. Auth is the
//! ingest token as a bearer token. Every outcome is counted in
//! `aperture_push_requests_total{protocol="otlp_grpc"|"otlp_http", result}`.
//!
//! The other direction, forwarding what is committed to an OTLP endpoint,
//! is [`export`].

mod convert;
pub(crate) mod export;

use std::sync::Arc;

use aperture_transport::server::otlp::proto::collector::ExportProfilesServiceRequest;
use aperture_transport::server::otlp::{ExportFuture, OtlpCode, OtlpRefusal, OtlpSink};
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use prost::Message;

use crate::http::state::AppState;
use crate::pyroscope::{authorized, commit, push_result, read_body};
use convert::{ConvertError, to_batch};

/// `aperture_push_requests_total{protocol}` of the gRPC path.
pub(crate) const GRPC: &str = "otlp_grpc";
/// ... and of the HTTP path.
pub(crate) const HTTP: &str = "otlp_http";

/// `google.rpc.Status`, the body of an OTLP/HTTP error.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

fn count(state: &AppState, protocol: &str, result: &str) {
    state.shared.metrics.push_requests.with_label_values(&[protocol, result]).inc();
}

fn result_of(code: OtlpCode) -> &'static str {
    match code {
        OtlpCode::InvalidArgument => push_result::BAD_REQUEST,
        OtlpCode::Unauthenticated => push_result::UNAUTHORIZED,
        OtlpCode::TooLarge => push_result::TOO_LARGE,
        OtlpCode::Unavailable => push_result::BUSY,
    }
}

/// The OTLP routes of the HTTP port.
pub(crate) fn routes() -> Router<AppState> {
    Router::new().route(crate::http::OTLP_HTTP, post(export_http))
}

/// Decodes, converts and commits one request; counts the outcome under `protocol`.
async fn ingest(state: &AppState, body: &[u8], protocol: &str) -> Result<(), OtlpRefusal> {
    let refuse = |code: OtlpCode, result: &str, message: String| {
        count(state, protocol, result);
        OtlpRefusal { code, message }
    };
    let request = ExportProfilesServiceRequest::decode(body).map_err(|e| {
        refuse(
            OtlpCode::InvalidArgument,
            push_result::BAD_REQUEST,
            format!("the body is not an OTLP ExportProfilesServiceRequest (proto v1.10.0): {e}"),
        )
    })?;
    let batch = to_batch(&request, crate::clock::unix_now_ns()).map_err(|e| match e {
        ConvertError::Bad(m) => refuse(OtlpCode::InvalidArgument, push_result::BAD_REQUEST, m),
        ConvertError::TooLarge(m) => refuse(OtlpCode::InvalidArgument, push_result::TOO_LARGE, m),
    })?;
    match commit(state, batch, body.len()).await {
        Ok(()) => {
            count(state, protocol, push_result::OK);
            Ok(())
        }
        Err(r) => {
            let code =
                if r.status == StatusCode::BAD_REQUEST { OtlpCode::InvalidArgument } else { OtlpCode::Unavailable };
            Err(refuse(code, r.result, r.message))
        }
    }
}

/// What the OTLP gRPC listener hands requests to.
#[derive(Debug)]
pub(crate) struct OtlpIngest {
    state: AppState,
}

impl OtlpIngest {
    pub(crate) fn sink(state: AppState) -> Arc<dyn OtlpSink> {
        Arc::new(OtlpIngest { state })
    }
}

impl OtlpSink for OtlpIngest {
    fn export(&self, request: axum::body::Bytes) -> ExportFuture {
        let state = self.state.clone();
        Box::pin(async move { ingest(&state, &request, GRPC).await })
    }

    fn refused(&self, code: OtlpCode) {
        count(&self.state, GRPC, result_of(code));
    }
}

/// An OTLP/HTTP answer: the status and a `google.rpc.Status` protobuf body.
fn error_response(code: OtlpCode, message: String) -> Response {
    let status = match code {
        OtlpCode::InvalidArgument => StatusCode::BAD_REQUEST,
        OtlpCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        OtlpCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        OtlpCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    };
    let body = RpcStatus { code: code.grpc() as i32, message }.encode_to_vec();
    let mut r = (status, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
    if code == OtlpCode::Unavailable {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if code == OtlpCode::Unauthenticated {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// `POST /v1development/profiles`.
async fn export_http(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    if !authorized(&state, &headers) {
        count(&state, HTTP, push_result::UNAUTHORIZED);
        return error_response(
            OtlpCode::Unauthenticated,
            "missing or wrong token: send `Authorization: Bearer <token>` with the ingest token \
             (APERTURE_INGEST_TOKEN, or the shared APERTURE_AUTH_TOKEN)"
                .into(),
        );
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.starts_with("application/x-protobuf") {
        count(&state, HTTP, push_result::BAD_REQUEST);
        let mut r = error_response(
            OtlpCode::InvalidArgument,
            format!("content type {content_type:?} is not supported: send application/x-protobuf"),
        );
        *r.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return r;
    }
    let limit = state.limits.max_push_body_bytes;
    let Some(body) = read_body(body, limit).await else {
        count(&state, HTTP, push_result::TOO_LARGE);
        return error_response(
            OtlpCode::TooLarge,
            format!("the body is over the limit of {limit} bytes, or could not be read; send smaller requests"),
        );
    };
    let encoding = headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("identity");
    let body = match encoding.trim() {
        "" | "identity" => body.to_vec(),
        "gzip" => match gunzip(&body, limit) {
            Ok(b) => b,
            Err(refusal) => {
                count(&state, HTTP, result_of(refusal.code));
                return error_response(refusal.code, refusal.message);
            }
        },
        other => {
            count(&state, HTTP, push_result::BAD_REQUEST);
            return error_response(
                OtlpCode::InvalidArgument,
                format!("content encoding {other:?} is not supported: gzip or none"),
            );
        }
    };
    match ingest(&state, &body, HTTP).await {
        Ok(()) => {
            // An empty ExportProfilesServiceResponse: no partial success.
            let mut r = Vec::<u8>::new().into_response();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
            r
        }
        Err(r) => error_response(r.code, r.message),
    }
}

/// Inflates a gzip body, reading at most `max` bytes of output.
fn gunzip(body: &[u8], max: usize) -> Result<Vec<u8>, OtlpRefusal> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body).take((max as u64).saturating_add(1)).read_to_end(&mut out).map_err(|e| {
        OtlpRefusal { code: OtlpCode::InvalidArgument, message: format!("the body is not valid gzip: {e}") }
    })?;
    if out.len() > max {
        return Err(OtlpRefusal {
            code: OtlpCode::TooLarge,
            message: format!("the body decompresses to more than the limit of {max} bytes; send smaller requests"),
        });
    }
    Ok(out)
}
