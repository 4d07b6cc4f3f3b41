//! Connect's unary calls: failures as Connect errors, and requests and
//! answers in protobuf or in protobuf's JSON mapping.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prost::Message;
use serde_json::Value;
/// A failed call: a Connect error code's status and a message.
pub(super) struct Failure(pub(super) StatusCode, pub(super) String);

impl Failure {
    pub(super) fn bad(message: impl Into<String>) -> Failure {
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
pub(super) fn json_i64(v: &Value, key: &str) -> Result<i64, Failure> {
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

pub(super) fn json_opt_i64(v: &Value, key: &str) -> Result<Option<i64>, Failure> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => json_i64(v, key).map(Some),
    }
}

pub(super) fn json_f64(v: &Value, key: &str) -> Result<f64, Failure> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(0.0),
        Some(Value::Number(n)) => n.as_f64().ok_or_else(|| Failure::bad(format!("`{key}` is not a number"))),
        Some(Value::String(s)) => s.parse().map_err(|_| Failure::bad(format!("`{key}` {s:?} is not a number"))),
        Some(_) => Err(Failure::bad(format!("`{key}` is not a number"))),
    }
}

pub(super) fn json_string(v: &Value, key: &str) -> Result<String, Failure> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(Failure::bad(format!("`{key}` is not a string"))),
    }
}

pub(super) fn json_strings(v: &Value, key: &str) -> Result<Vec<String>, Failure> {
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
pub(super) enum Encoding {
    Proto,
    Json,
}

/// A decoded request: the message, or its JSON form.
pub(super) enum Request<'a> {
    Proto(&'a [u8]),
    Json(Value),
}

pub(super) fn decode<T: Message + Default>(
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

pub(super) fn answer(encoding: Encoding, message: &impl Message, json: Value) -> Response {
    let (ct, body): (&'static str, Vec<u8>) = match encoding {
        Encoding::Proto => ("application/proto", message.encode_to_vec()),
        Encoding::Json => ("application/json", json.to_string().into_bytes()),
    };
    let mut r = body.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    r
}
