//! The ClickHouse server of the storage scenarios: the workspace's one
//! test-server launcher (`aperture_testkit::clickhouse`), plus what only the
//! harness measures.

use anyhow::Context;

pub use aperture_testkit::clickhouse::ClickHouseServer as ClickHouse;

/// Starts a throwaway server and waits until it answers (up to 60 s).
pub fn start() -> anyhow::Result<ClickHouse> {
    ClickHouse::start().context("starting clickhouse-server")
}

/// Bytes on disk of the active parts of `database` (after merging them).
pub fn database_bytes(server: &ClickHouse, database: &str) -> anyhow::Result<u64> {
    let tables = server.query(&format!("SELECT name FROM system.tables WHERE database = '{database}'"))?;
    for t in tables.lines().filter(|t| !t.is_empty()) {
        server.query(&format!("OPTIMIZE TABLE {database}.{t} FINAL"))?;
    }
    let v = server
        .query(&format!("SELECT sum(bytes_on_disk) FROM system.parts WHERE database = '{database}' AND active"))?;
    v.trim().parse().with_context(|| format!("bytes_on_disk of {database}: {v:?}"))
}
