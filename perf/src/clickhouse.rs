//! A throwaway ClickHouse server for the storage scenarios: Debian's
//! `clickhouse-server` started from a generated configuration in a temp
//! directory, on free loopback ports (the same approach as the aggregator's
//! tests and `aggregator/scripts/clickhouse-test-server.sh`), stopped on drop.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::sys::{Guarded, free_port, http, on_path, wait_for};

/// A running server.
#[derive(Debug)]
pub struct ClickHouse {
    dir: tempfile::TempDir,
    http_port: u16,
    tcp_port: u16,
    // Stopped in Drop before the directory goes.
    server: Option<Guarded>,
}

fn config(dir: &Path, http_port: u16, tcp_port: u16) -> String {
    let d = dir.display();
    format!(
        "<yandex>
    <logger><level>warning</level><console>1</console></logger>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    <listen_host>127.0.0.1</listen_host>
    <path>{d}/data/</path>
    <tmp_path>{d}/tmp/</tmp_path>
    <user_files_path>{d}/user_files/</user_files_path>
    <format_schema_path>{d}/format_schemas/</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>67108864</mark_cache_size>
    <uncompressed_cache_size>67108864</uncompressed_cache_size>
    <max_concurrent_queries>50</max_concurrent_queries>
</yandex>
"
    )
}

const USERS: &str = "<yandex>
    <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
    <users><default><password></password><networks><ip>127.0.0.1</ip></networks>
        <profile>default</profile><quota>default</quota></default></users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
        <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
";

impl ClickHouse {
    /// Starts a server and waits until it answers (up to 60 s).
    pub fn start() -> anyhow::Result<ClickHouse> {
        if !on_path("clickhouse-server") {
            bail!("clickhouse-server not found: apt-get install clickhouse-server");
        }
        let dir = tempfile::Builder::new().prefix("aperture-perf-ch").tempdir().context("temp dir")?;
        let (http_port, tcp_port) = (free_port()?, free_port()?);
        let cfg = dir.path().join("config.xml");
        std::fs::write(&cfg, config(dir.path(), http_port, tcp_port)).context("writing config.xml")?;
        std::fs::write(dir.path().join("users.xml"), USERS).context("writing users.xml")?;
        let log = std::fs::File::create(dir.path().join("server.log")).context("server.log")?;
        let server = Guarded::spawn(
            "clickhouse-server",
            Command::new("clickhouse-server")
                .arg(format!("--config-file={}", cfg.display()))
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(log),
        )?;
        let mut ch = ClickHouse { dir, http_port, tcp_port, server: Some(server) };
        let addr = ch.http_addr();
        wait_for("clickhouse-server", Duration::from_secs(60), || {
            http(addr, "GET", "/ping", None, b"", Duration::from_secs(2)).is_ok_and(|r| r.status == 200)
        })
        .with_context(|| format!("see {}", ch.dir.path().join("server.log").display()))?;
        if let Some(s) = ch.server.as_mut() {
            s.check_alive()?;
        }
        Ok(ch)
    }

    fn http_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.http_port))
    }

    /// HTTP endpoint for the aggregator.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Native-protocol port for `clickhouse-client`.
    pub fn tcp_port(&self) -> u16 {
        self.tcp_port
    }

    /// Runs `sql` over HTTP and returns the reply text.
    pub fn query(&self, sql: &str) -> anyhow::Result<String> {
        let r = http(self.http_addr(), "POST", "/", None, sql.as_bytes(), Duration::from_secs(300))?;
        if r.status != 200 {
            bail!("ClickHouse answered {} to `{sql}`: {}", r.status, r.text().trim());
        }
        Ok(r.text())
    }

    /// Bytes on disk of the active parts of `database` (after merging them).
    pub fn database_bytes(&self, database: &str) -> anyhow::Result<u64> {
        let tables = self.query(&format!("SELECT name FROM system.tables WHERE database = '{database}'"))?;
        for t in tables.lines().filter(|t| !t.is_empty()) {
            self.query(&format!("OPTIMIZE TABLE {database}.{t} FINAL"))?;
        }
        let v = self
            .query(&format!("SELECT sum(bytes_on_disk) FROM system.parts WHERE database = '{database}' AND active"))?;
        v.trim().parse().with_context(|| format!("bytes_on_disk of {database}: {v:?}"))
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.stop();
        }
    }
}
