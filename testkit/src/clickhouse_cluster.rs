//! A throwaway ClickHouse cluster on loopback: Debian's `zookeeper` (run
//! from its jars with a configuration of its own, not the system service)
//! and `clickhouse-server` processes from [`crate::clickhouse`], one shard
//! each, joined by a generated `config.d/cluster.xml` (`remote_servers`,
//! `zookeeper`, `macros`, `distributed_ddl`). Everything lives in one
//! temporary directory and is killed on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::clickhouse::{ClickHouseServer, free_port};

/// How long ZooKeeper may take to answer, and the servers to see each other.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Debian's ZooKeeper jar; the rest of its class path is in the same folder.
const ZOOKEEPER_JAR: &str = "/usr/share/java/zookeeper.jar";

/// Whether ZooKeeper (Debian's package) and a Java runtime are installed.
pub fn zookeeper_installed() -> bool {
    Path::new(ZOOKEEPER_JAR).is_file()
        && std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("java").is_file()))
}

/// A ZooKeeper server on a free loopback port.
#[derive(Debug)]
pub struct ZooKeeper {
    /// Client port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
}

impl ZooKeeper {
    /// Starts ZooKeeper with its data in `dir` and waits until it answers `ruok`.
    pub fn start(dir: &Path) -> std::io::Result<ZooKeeper> {
        let port = free_port()?;
        std::fs::create_dir_all(dir.join("data"))?;
        let config = dir.join("zoo.cfg");
        std::fs::write(
            &config,
            format!(
                "tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\n\
                 admin.enableServer=false\n4lw.commands.whitelist=ruok\n",
                dir.join("data").display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("zookeeper.log"))?;
        let child = Command::new("java")
            .args(["-Xmx128m", "-XX:+UseSerialGC", "-cp", &format!("{ZOOKEEPER_JAR}:/usr/share/java/*")])
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(&config)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| std::io::Error::other(format!("spawning java for ZooKeeper: {e}")))?;
        let mut zk = ZooKeeper { port, child: Some(child) };
        let deadline = Instant::now() + START_TIMEOUT;
        while !zk.answers() {
            if let Some(status) = zk.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(std::io::Error::other(format!(
                    "ZooKeeper exited ({status}); see {}",
                    dir.join("zookeeper.log").display()
                )));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "ZooKeeper did not answer within {START_TIMEOUT:?}; see {}",
                    dir.join("zookeeper.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(zk)
    }

    /// Whether the four-letter command `ruok` is answered `imok`.
    pub fn answers(&self) -> bool {
        let ask = || -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"ruok")?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            Ok(reply)
        };
        ask().is_ok_and(|r| r == "imok")
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// ZooKeeper and one ClickHouse server per shard, forming the cluster
/// [`ClickHouseCluster::NAME`].
#[derive(Debug)]
pub struct ClickHouseCluster {
    /// The servers, shard 1 first.
    pub servers: Vec<ClickHouseServer>,
    zookeeper: ZooKeeper,
    // Last: removed once the processes using it are gone.
    dir: tempfile::TempDir,
}

impl ClickHouseCluster {
    /// The cluster's name in `remote_servers`.
    pub const NAME: &'static str = "aperture_test";

    /// Starts ZooKeeper and `shards` servers, and waits until every server
    /// sees the cluster and ZooKeeper.
    pub fn start(shards: usize) -> std::io::Result<ClickHouseCluster> {
        let dir = tempfile::Builder::new().prefix("aperture-chc").tempdir()?;
        let zookeeper = ZooKeeper::start(&dir.path().join("zookeeper"))?;
        let ports: Vec<(u16, u16, u16)> =
            (0..shards).map(|_| Ok((free_port()?, free_port()?, free_port()?))).collect::<std::io::Result<_>>()?;
        let remote: String = ports
            .iter()
            .map(|(_, tcp, _)| {
                format!(
                    "<shard><internal_replication>true</internal_replication>\
                     <replica><host>127.0.0.1</host><port>{tcp}</port></replica></shard>"
                )
            })
            .collect();
        let mut servers = Vec::with_capacity(shards);
        for (i, (http, tcp, interserver)) in ports.iter().enumerate() {
            let server_dir = dir.path().join(format!("shard{}", i + 1));
            std::fs::create_dir_all(server_dir.join("config.d"))?;
            std::fs::write(
                server_dir.join("config.d/cluster.xml"),
                format!(
                    "<yandex>
    <interserver_http_port>{interserver}</interserver_http_port>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <remote_servers><{name}>{remote}</{name}></remote_servers>
    <zookeeper><node><host>127.0.0.1</host><port>{zk}</port></node><session_timeout_ms>10000</session_timeout_ms></zookeeper>
    <macros><shard>{shard}</shard><replica>replica{shard}</replica></macros>
    <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
</yandex>
",
                    name = Self::NAME,
                    zk = zookeeper.port,
                    shard = i + 1,
                ),
            )?;
            servers.push(ClickHouseServer::start_at(&server_dir, *http, *tcp)?);
        }
        let cluster = ClickHouseCluster { servers, zookeeper, dir };
        cluster.wait_until_joined()?;
        Ok(cluster)
    }

    /// Waits until every server lists every shard of the cluster and reads ZooKeeper.
    fn wait_until_joined(&self) -> std::io::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let check = format!(
            "SELECT (SELECT count() FROM system.clusters WHERE cluster = '{}'), (SELECT count() > 0 FROM system.zookeeper WHERE path = '/')",
            Self::NAME
        );
        let want = format!("{}\t1", self.servers.len());
        for server in &self.servers {
            loop {
                let last = server.query(&check);
                if last.as_ref().is_ok_and(|r| r.trim() == want) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(std::io::Error::other(format!(
                        "{} does not see the cluster and ZooKeeper within {START_TIMEOUT:?}: {last:?}; see {}",
                        server.endpoint(),
                        server.dir().join("server.log").display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// ZooKeeper's client port.
    pub fn zookeeper_port(&self) -> u16 {
        self.zookeeper.port
    }

    /// The directory holding every process's configuration, data and log.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

/// Starts a cluster of `shards` servers, or reports `SKIPPED: <test>: ...`
/// (a failure under `APERTURE_REQUIRE_ALL_TESTS=1`) when ZooKeeper or
/// ClickHouse is not installed and returns `None`. Panics if installed
/// programs do not start.
pub fn start_or_skip(test: &str, shards: usize) -> Option<ClickHouseCluster> {
    if !crate::clickhouse::installed() {
        crate::skip(test, "clickhouse-server not installed (apt-get install clickhouse-server)");
        return None;
    }
    if !zookeeper_installed() {
        crate::skip(test, "zookeeper or java not installed (apt-get install zookeeper)");
        return None;
    }
    Some(ClickHouseCluster::start(shards).unwrap_or_else(|e| panic!("{test}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_shards_share_tables_created_on_the_cluster() {
        let Some(cluster) = start_or_skip("two_shards_share_tables_created_on_the_cluster", 2) else { return };
        let [a, b] = &cluster.servers[..] else { panic!("two servers") };
        let name = ClickHouseCluster::NAME;
        a.query(&format!(
            "CREATE TABLE default.t_local ON CLUSTER {name} (x UInt64) \
             ENGINE = ReplicatedMergeTree('/clickhouse/tables/{{shard}}/default/t', '{{replica}}') ORDER BY x"
        ))
        .expect("create local");
        a.query(&format!(
            "CREATE TABLE default.t ON CLUSTER {name} AS default.t_local ENGINE = Distributed({name}, default, t_local, x)"
        ))
        .expect("create distributed");
        // Asynchronous, as inserts into a Distributed table are by default:
        // the rows reach their shard within moments.
        b.query("INSERT INTO default.t SELECT number FROM system.numbers LIMIT 10").expect("insert");
        let local = |s: &ClickHouseServer| s.query("SELECT count() FROM default.t_local").expect("count");
        let deadline = Instant::now() + Duration::from_secs(30);
        while (local(a).trim(), local(b).trim()) != ("5", "5") {
            assert!(Instant::now() < deadline, "x splits the rows over both shards: {} and {}", local(a), local(b));
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(a.query("SELECT sum(x) FROM default.t").expect("sum").trim(), "45");
    }
}
