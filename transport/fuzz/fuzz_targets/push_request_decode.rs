//! A gRPC `PushRequest` as the server receives it: protobuf decoding, then
//! the conversion to a session input (frame validation included).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    aperture_transport::fuzzing::push_request(data);
});
