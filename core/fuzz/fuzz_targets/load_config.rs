//! Feeds arbitrary configuration files and environments to the layered
//! loader of both daemons: it must return a configuration or an error that
//! names what was wrong, never panic.
//!
//! Input: the YAML file, then optionally a NUL byte and environment lines
//! `NAME=value` (only names the loader reads matter; the rest are ignored).
#![no_main]

use aperture_core::config::{AgentConfig, AggregatorConfig, Layered, load};
use libfuzzer_sys::fuzz_target;

fn check<T: Layered>(file: &str, env: &[(String, String)]) {
    let lookup = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    if let Err(e) = load::<T>(Some(("fuzz.yaml", file)), &lookup, &[]) {
        assert!(!e.to_string().is_empty(), "an error says what was wrong");
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (file, env) = text.split_once('\0').unwrap_or((&text, ""));
    let env: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    check::<AgentConfig>(file, &env);
    check::<AggregatorConfig>(file, &env);
});
