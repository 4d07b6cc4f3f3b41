//! Feeds arbitrary bytes to the frame decoder: it must return a typed error
//! or a valid view, never panic, and a view must be readable end to end.
#![no_main]

use aperture_core::frame::{DecodeLimits, FrameBuf, decode};
use aperture_core::shard::Shard;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = FrameBuf::with_capacity(data.len());
    buf.extend_from_slice(data);
    if let Ok(view) = decode(&buf, &DecodeLimits::default()) {
        // Touch everything a consumer would read.
        let _ = Shard::check(view.batch);
        for s in view.batch.stacks.iter() {
            for f in s.frames.iter() {
                let _ = (f.symbol.as_str().len(), f.module.as_str().len());
            }
        }
        let mut shard = Shard::new(Default::default());
        let _ = shard.ingest(0, view.header.id, view.batch);
        let _ = shard.take();
    }
});
