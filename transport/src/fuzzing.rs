//! Entry points for the cargo-fuzz targets in `transport/fuzz/`: the
//! decoders of received bytes that are not public API on their own.

use aperture_core::frame::DecodeLimits;
use prost::Message;

/// Decodes a gRPC `PushRequest` and converts it as the server does.
/// Returns whether it became a valid session input.
pub fn push_request(bytes: &[u8]) -> bool {
    let Ok(req) = crate::wire::grpc::pb::PushRequest::decode(bytes) else { return false };
    if let Some(crate::wire::grpc::pb::push_request::Body::Hello(h)) = req.body {
        return crate::wire::grpc::hello_from_pb(h).is_ok();
    }
    !matches!(crate::server::inbound_from_pb(req, &DecodeLimits::default()), crate::server::Inbound::Malformed { .. })
}
