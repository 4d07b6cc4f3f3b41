//! A throwaway ClickHouse server: Debian's `clickhouse-server` started from a
//! generated minimal configuration in a temporary directory, HTTP and native
//! ports on 127.0.0.1 only (free ports picked at start), the `default` user
//! without password. Killed on drop. The one launcher used by the
//! aggregator's tests, the perf harness and, by hand,
//! `cargo run -p aperture-testkit --bin clickhouse-test-server -- DIR`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer after being started.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running (or killed, or paused) server.
#[derive(Debug)]
pub struct ClickHouseServer {
    dir: Dir,
    /// HTTP port (what the aggregator uses).
    pub http_port: u16,
    tcp_port: u16,
    child: Option<Child>,
}

/// The server's directory: removed on drop unless it was given by the caller.
#[derive(Debug)]
enum Dir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl Dir {
    fn path(&self) -> &Path {
        match self {
            Dir::Temp(t) => t.path(),
            Dir::Kept(p) => p,
        }
    }
}

/// A loopback port free right now.
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Whether `clickhouse-server` is on `PATH`.
pub fn installed() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("clickhouse-server").is_file()))
}

/// Starts a server, or reports `SKIPPED: <test>: clickhouse-server not
/// installed` (a failure under `APERTURE_REQUIRE_ALL_TESTS=1`) and returns
/// `None`. Panics if an installed server does not start.
pub fn start_or_skip(test: &str) -> Option<ClickHouseServer> {
    if !installed() {
        crate::skip(test, "clickhouse-server not installed (apt-get install clickhouse-server)");
        return None;
    }
    Some(ClickHouseServer::start().unwrap_or_else(|e| panic!("{test}: {e}")))
}

/// Writes `config.xml` and `users.xml` for a server in `dir`; returns the config path.
pub fn write_config(dir: &Path, http_port: u16, tcp_port: u16) -> std::io::Result<PathBuf> {
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
    std::fs::create_dir_all(dir)?;
    let path = dir.join("config.xml");
    std::fs::write(&path, config)?;
    std::fs::write(dir.join("users.xml"), users)?;
    Ok(path)
}

fn io_error(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}

impl ClickHouseServer {
    /// Starts a server on free ports in a temporary directory and waits until it answers.
    pub fn start() -> std::io::Result<ClickHouseServer> {
        let dir = tempfile::Builder::new().prefix("aperture-ch").tempdir()?;
        ClickHouseServer::start_in(Dir::Temp(dir), free_port()?, free_port()?)
    }

    /// Starts a server in `dir` (kept after the server stops) on the given ports.
    pub fn start_at(dir: &Path, http_port: u16, tcp_port: u16) -> std::io::Result<ClickHouseServer> {
        ClickHouseServer::start_in(Dir::Kept(dir.to_path_buf()), http_port, tcp_port)
    }

    fn start_in(dir: Dir, http_port: u16, tcp_port: u16) -> std::io::Result<ClickHouseServer> {
        if !installed() {
            return Err(io_error("clickhouse-server not found on PATH: apt-get install clickhouse-server".into()));
        }
        write_config(dir.path(), http_port, tcp_port)?;
        let mut server = ClickHouseServer { dir, http_port, tcp_port, child: None };
        server.resume()?;
        Ok(server)
    }

    /// HTTP endpoint, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Native-protocol port (for `clickhouse-client`).
    pub fn tcp_port(&self) -> u16 {
        self.tcp_port
    }

    /// The server's directory (configuration, data, `server.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server with SIGKILL (data on disk stays).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until the server exits.
    pub fn wait(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections hang instead of failing.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Thaws a server frozen by [`ClickHouseServer::pause`] (SIGCONT).
    pub fn unpause(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(pid) = self.pid().and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    /// Starts the server again on the same ports and data, and waits until it answers.
    pub fn resume(&mut self) -> std::io::Result<()> {
        self.kill();
        let log = std::fs::File::create(self.dir().join("server.log"))?;
        let child = Command::new("clickhouse-server")
            .arg(format!("--config-file={}", self.dir().join("config.xml").display()))
            .current_dir(self.dir())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| io_error(format!("spawning clickhouse-server: {e}")))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.answers() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(io_error(format!(
                    "clickhouse-server exited ({status}); see {}",
                    self.dir().join("server.log").display()
                )));
            }
            if Instant::now() > deadline {
                return Err(io_error(format!(
                    "clickhouse-server did not answer within {START_TIMEOUT:?}; see {}",
                    self.dir().join("server.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Whether `/ping` answers `Ok.`.
    pub fn answers(&self) -> bool {
        self.http("GET", "/ping", b"", Duration::from_secs(2))
            .is_ok_and(|(status, body)| status == 200 && body == "Ok.\n")
    }

    /// Runs `sql` over HTTP and returns the reply text.
    pub fn query(&self, sql: &str) -> std::io::Result<String> {
        let (status, body) = self.http("POST", "/", sql.as_bytes(), Duration::from_secs(300))?;
        if status != 200 {
            return Err(io_error(format!("ClickHouse answered {status} to `{sql}`: {}", body.trim())));
        }
        Ok(body)
    }

    /// One HTTP/1.1 request without keep-alive; returns the status and body.
    fn http(&self, method: &str, path: &str, body: &[u8], timeout: Duration) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.http_port))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| io_error("truncated HTTP reply".into()))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| io_error(format!("bad HTTP status line: {head:?}")))?;
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_owned()
        };
        Ok((status, body))
    }
}

/// Decodes a chunked HTTP body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        // A paused server would not die from SIGKILL before it is waited
        // for otherwise; SIGCONT first is harmless.
        self.unpause();
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_decoded() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }

    #[test]
    fn a_server_starts_answers_and_restarts_on_the_same_data() {
        let Some(mut server) = start_or_skip("a_server_starts_answers_and_restarts_on_the_same_data") else {
            return;
        };
        server.query("CREATE TABLE t (x UInt8) ENGINE = MergeTree ORDER BY x").expect("create");
        server.query("INSERT INTO t VALUES (7)").expect("insert");
        server.kill();
        assert!(!server.answers());
        server.resume().expect("resume");
        assert_eq!(server.query("SELECT sum(x) FROM t").expect("select").trim(), "7");
    }
}
