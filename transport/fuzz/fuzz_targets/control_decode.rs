//! The compact control-message decoder must never panic, and whatever it
//! accepts must re-encode to the same bytes (one spelling per message).
#![no_main]

use aperture_transport::control;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = control::decode(data) {
        let again = msg.to_bytes().expect("a decoded message re-encodes");
        assert_eq!(again, data, "decode/encode is not a bijection for {msg:?}");
    }
});
