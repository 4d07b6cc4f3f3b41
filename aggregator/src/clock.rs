//! The wall clock, read in one place: stored rows, the ledger and
//! retention are in Unix seconds; pushed profiles, ledger versions and
//! seeds in Unix nanoseconds.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Nanoseconds since the Unix epoch (0 if the clock is before it; saturates
/// in the year 2554).
pub(crate) fn unix_now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
