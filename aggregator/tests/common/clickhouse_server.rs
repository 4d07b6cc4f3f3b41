//! A throwaway ClickHouse server for tests: a generated minimal config in a
//! temporary directory, HTTP and native ports on 127.0.0.1 only (free ports
//! picked at start), the `default` user without password. Killed on drop.
//!
//! The same commands work by hand (what CI runs):
//!
//! ```sh
//! aggregator/scripts/clickhouse-test-server.sh /tmp/aperture-ch 8123 9000
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) test server.
#[derive(Debug)]
pub struct ClickHouseServer {
    dir: tempfile::TempDir,
    pub http_port: u16,
    tcp_port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// Whether `clickhouse-server` is installed.
pub fn installed() -> bool {
    Command::new("sh")
        .args(["-c", "command -v clickhouse-server"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts a server, or prints `SKIPPED: <test>: clickhouse-server not installed` and returns `None`.
pub fn start_or_skip(test: &str) -> Option<ClickHouseServer> {
    if !installed() {
        aperture_testkit::skip(test, "clickhouse-server not installed (apt-get install clickhouse-server)");
        return None;
    }
    Some(ClickHouseServer::start())
}

pub fn write_config(dir: &Path, http_port: u16, tcp_port: u16) -> PathBuf {
    let d = dir.display();
    let config = format!(
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
    );
    let users = "<yandex>
    <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
    <users><default><password></password><networks><ip>127.0.0.1</ip></networks>
        <profile>default</profile><quota>default</quota></default></users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
        <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
";
    let path = dir.join("config.xml");
    std::fs::write(&path, config).expect("write config.xml");
    std::fs::write(dir.join("users.xml"), users).expect("write users.xml");
    path
}

impl ClickHouseServer {
    /// Starts a server on free ports and waits until it answers.
    pub fn start() -> ClickHouseServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = ClickHouseServer { dir, http_port: free_port(), tcp_port: free_port(), child: None };
        write_config(server.dir.path(), server.http_port, server.tcp_port);
        server.resume();
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Kills the server with SIGKILL (data on disk stays).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same ports and data, and waits until it answers.
    pub fn resume(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("log file");
        let child = Command::new("clickhouse-server")
            .arg(format!("--config-file={}", self.dir.path().join("config.xml").display()))
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn clickhouse-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.answers() {
            assert!(Instant::now() < deadline, "clickhouse-server did not answer within 60 s; see its server.log");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.http_port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_err() {
            return false;
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.starts_with("HTTP/1.1 200") && out.contains("Ok.")
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        self.kill();
    }
}
