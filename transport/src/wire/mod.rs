//! Wire formats of the two carriers: how session messages and frames are
//! laid out on a QUIC stream, and as gRPC protobuf messages.

pub mod grpc;
pub(crate) mod quic;
