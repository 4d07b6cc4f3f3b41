//! Starts a throwaway ClickHouse server on loopback for manual runs, with
//! the same configuration the tests use, and runs until it is stopped.
//!
//! usage: clickhouse-test-server DIR [HTTP_PORT] [TCP_PORT]
//! then: APERTURE_CLICKHOUSE_ENDPOINT=http://127.0.0.1:HTTP_PORT

use std::path::PathBuf;
use std::process::ExitCode;

use aperture_testkit::clickhouse::ClickHouseServer;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: clickhouse-test-server DIR [HTTP_PORT] [TCP_PORT]";
    let Some(dir) = args.first().map(PathBuf::from) else {
        eprintln!("{usage}");
        return ExitCode::FAILURE;
    };
    let port = |i: usize, default: u16| match args.get(i) {
        None => Some(default),
        Some(p) => p.parse().ok(),
    };
    let (Some(http), Some(tcp)) = (port(1, 8123), port(2, 9000)) else {
        eprintln!("ports must be numbers from 1 to 65535; {usage}");
        return ExitCode::FAILURE;
    };
    match ClickHouseServer::start_at(&dir, http, tcp) {
        Ok(mut server) => {
            println!(
                "clickhouse-server on {} (pid {}), data in {}; stop with Ctrl-C",
                server.endpoint(),
                server.pid().unwrap_or(0),
                dir.display()
            );
            server.wait();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
