//! The Go SDK's `/ingest` body: `multipart/form-data` with a `profile`
//! part (pprof, usually gzipped), optionally `sample_type_config` (JSON:
//! pprof sample type → units, display name, aggregation) and, from SDKs
//! that predate delta profiles, `prev_profile`.
//!
//! Like Pyroscope, a `prev_profile` is refused: it means the client sends
//! cumulative profiles and expects the server to subtract them, which
//! current SDKs (pyroscope-go 1.x) no longer do.

use axum::body::{Body, Bytes};

use super::convert::ConvertError;
use super::pprof::SampleTypes;

/// What a multipart body carries.
#[derive(Debug)]
pub(crate) struct Form {
    /// The `profile` part.
    pub profile: Bytes,
    /// The `sample_type_config` part, parsed.
    pub sample_types: Option<SampleTypes>,
}

/// Reads the parts of `body`, a `multipart/form-data` body of `content_type`.
pub(crate) async fn read_form(content_type: &str, body: Bytes) -> Result<Form, ConvertError> {
    let bad = |m: String| ConvertError::Bad(m);
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| bad(format!("content type {content_type:?} is multipart without a usable boundary: {e}")))?;
    let mut parts = multer::Multipart::new(Body::from(body).into_data_stream(), boundary);
    let (mut profile, mut sample_types) = (None, None);
    while let Some(part) = parts.next_field().await.map_err(|e| bad(format!("the multipart body is malformed: {e}")))? {
        let name = part.name().unwrap_or("").to_owned();
        let data = part.bytes().await.map_err(|e| bad(format!("the multipart part {name:?} is malformed: {e}")))?;
        match name.as_str() {
            "profile" => profile = Some(data),
            "prev_profile" if !data.is_empty() => {
                return Err(bad(
                    "the multipart body has a `prev_profile` (cumulative profiles to subtract), which is not \
                     supported: update the SDK (pyroscope-go sends delta profiles since 1.0)"
                        .into(),
                ));
            }
            "sample_type_config" => {
                let parsed: SampleTypes = serde_json::from_slice(&data)
                    .map_err(|e| bad(format!("the `sample_type_config` part is not the expected JSON: {e}")))?;
                sample_types = Some(parsed);
            }
            // Unknown parts are ignored, as Pyroscope does.
            _ => {}
        }
    }
    let profile = profile.ok_or_else(|| {
        bad("the multipart body has no `profile` part: send the pprof profile in a part named `profile`".into())
    })?;
    Ok(Form { profile, sample_types })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body as Go's `mime/multipart` writer builds it for the SDK.
    fn go_form(parts: &[(&str, &str, &[u8])]) -> (String, Vec<u8>) {
        let boundary = "3f1c0e5b9d7a4e2f8b6c1a0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d";
        let mut body = Vec::new();
        for (name, file, data) in parts {
            body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        (format!("multipart/form-data; boundary={boundary}"), body)
    }

    #[tokio::test]
    async fn parts_are_read_by_name() {
        let config = br#"{"alloc_space":{"units":"bytes"},"inuse_space":{"units":"bytes","aggregation":"average"}}"#;
        let (ct, body) = go_form(&[
            ("profile", "profile.pprof", b"\x1f\x8bpprof"),
            ("sample_type_config", "sample_type_config.json", config),
        ]);
        let form = read_form(&ct, body.into()).await.expect("form");
        assert_eq!(&form.profile[..], b"\x1f\x8bpprof");
        let types = form.sample_types.expect("config");
        assert_eq!(types["inuse_space"].aggregation, "average");
        assert_eq!(types["alloc_space"].units, "bytes");
    }

    #[tokio::test]
    async fn malformed_forms_are_refused_by_what_is_wrong() {
        let err = |r: Result<Form, ConvertError>| match r {
            Err(ConvertError::Bad(m)) => m,
            other => panic!("not refused: {other:?}"),
        };
        let (ct, body) = go_form(&[("sample_type_config", "c.json", b"{}")]);
        assert!(err(read_form(&ct, body.into()).await).contains("no `profile` part"));
        let (ct, body) = go_form(&[("profile", "p", b"x"), ("prev_profile", "p", b"y")]);
        assert!(err(read_form(&ct, body.into()).await).contains("prev_profile"));
        let (ct, body) = go_form(&[("profile", "p", b"x"), ("sample_type_config", "c.json", b"[1]")]);
        assert!(err(read_form(&ct, body.into()).await).contains("sample_type_config"));
        assert!(err(read_form("multipart/form-data", Bytes::from_static(b"x")).await).contains("boundary"));
        let (ct, _) = go_form(&[]);
        assert!(err(read_form(&ct, Bytes::from_static(b"--nope")).await).contains("malformed"));
    }
}
