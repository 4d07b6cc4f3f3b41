use super::*;
use rusqlite::ffi;

fn failure(code: std::ffi::c_int) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(ffi::Error::new(code), None)
}

#[test]
fn store_failures_are_retried_and_only_bad_values_rejected() {
    for code in [
        ffi::SQLITE_CORRUPT,
        ffi::SQLITE_NOTADB,
        ffi::SQLITE_PERM,
        ffi::SQLITE_IOERR,
        ffi::SQLITE_FULL,
        ffi::SQLITE_BUSY,
        ffi::SQLITE_LOCKED,
        ffi::SQLITE_READONLY,
        ffi::SQLITE_CANTOPEN,
        ffi::SQLITE_NOMEM,
        ffi::SQLITE_PROTOCOL,
        ffi::SQLITE_ERROR,
    ] {
        assert!(classify(failure(code)).is_retryable(), "SQLite code {code} must be retried");
    }
    for code in [ffi::SQLITE_TOOBIG, ffi::SQLITE_CONSTRAINT, ffi::SQLITE_MISMATCH] {
        assert!(!classify(failure(code)).is_retryable(), "SQLite code {code} is about the rows");
    }
}
