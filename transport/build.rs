//! Generates the gRPC code from `proto/` with a pure-Rust protobuf compiler
//! (protox), so building needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/aperture/v1/ingest.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().bytes(".aperture.v1.PushRequest.frame").compile_fds(fds)?;
    Ok(())
}
