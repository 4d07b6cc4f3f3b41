//! Feeds arbitrary query strings to the `/api/v1` parameter parser, decoded
//! as the HTTP server decodes them: every accessor must return a value or a
//! typed error, never panic, and what it accepts must hold the documented
//! bounds (a non-empty range within the limit, a limit within its range,
//! a mode or choice from the accepted set).
#![no_main]

use std::collections::HashMap;
use std::time::Duration;

use aperture_aggregator::http::params::{FILTERS, ParamError, Params, parse_time};
use libfuzzer_sys::fuzz_target;

const MAX_RANGE: Duration = Duration::from_secs(31 * 86_400);
const FORMATS: &[&str] = &["json", "folded", "pprof", "svg"];

fuzz_target!(|data: &[u8]| {
    // The first 8 bytes pick "now", so relative times meet every clock.
    let (now_s, query) = match data.split_first_chunk::<8>() {
        Some((now, rest)) => (u64::from_le_bytes(*now), rest),
        None => (1_700_000_000, data),
    };
    let values: HashMap<String, String> = form_urlencoded::parse(query).into_owned().collect();
    for v in values.values() {
        let _ = parse_time(v, now_s);
    }
    let p = Params::new(values, now_s).with_max_range(MAX_RANGE);
    let mut accepted = vec!["from", "to", "mode", "format", "limit", "base_from", "base_to"];
    accepted.extend(FILTERS);
    let _ = p.reject_unknown(&accepted);
    let _ = p.optional_mode();
    let _ = p.mode();
    let _ = p.filter();
    if let Ok(f) = p.choice("format", FORMATS, "json, folded, pprof or svg") {
        assert!(FORMATS.contains(&f));
    }
    if let Ok(n) = p.limit(50, 10_000) {
        assert!((1..=10_000).contains(&n), "limit {n}");
    }
    match p.selector() {
        Ok(sel) => {
            assert!(sel.from_s < sel.to_s, "empty range accepted: {sel:?}");
            assert!(sel.to_s - sel.from_s <= MAX_RANGE.as_secs(), "range over the limit accepted: {sel:?}");
            if let (Ok(to), Ok(from)) = (p.time("base_to", sel.from_s), p.time("base_from", 0)) {
                if let Err(e) = p.check_range("base_from", from, to) {
                    assert!(matches!(e, ParamError::EmptyRange { .. } | ParamError::RangeTooLong { .. }));
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
