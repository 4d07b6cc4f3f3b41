//! Aperture transport: the session protocol over QUIC and gRPC
