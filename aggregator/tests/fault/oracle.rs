//! The conservation oracle: what the agents sent, as they counted it,
//! against what the store holds, read back through the HTTP API.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::common::metric;
use crate::process::AggregatorProcess;

pub fn report(line: &str) {
    // Straight to the process's stderr, past the harness's capture.
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// What a scenario observed.
pub struct Conservation {
    pub sent: u64,
    pub stored: u64,
    pub restarts: u32,
}

impl Conservation {
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.stored)
    }

    pub fn duplicated(&self) -> u64 {
        self.stored.saturating_sub(self.sent)
    }

    /// The scenario line, `extra` (` key=value` pairs) appended.
    pub fn report_with(&self, scenario: &str, extra: &str) {
        report(&format!(
            "fault: {scenario} sent={} stored={} lost={} duplicated={}{extra}",
            self.sent,
            self.stored,
            self.lost(),
            self.duplicated()
        ));
    }

    pub fn report(&self, scenario: &str) {
        self.report_with(scenario, "");
    }
}

/// Total CPU samples stored in `[from, to)`, through the API (with the
/// aggregator's token if it has one).
pub async fn cpu_total(agg: &AggregatorProcess, from: u64, to: u64) -> u64 {
    let r = agg.get(&format!("/api/v1/profile?mode=cpu&from={from}&to={to}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["root"]["value"].as_u64().unwrap_or(0)
}

/// One metric of the aggregator's `/metrics`.
pub async fn scrape(agg: &AggregatorProcess, name: &str, labels: &[&str]) -> f64 {
    metric(&agg.get("/metrics").await.text(), name, labels)
}

/// Liveness while under attack: `/healthz` and a query each answer 200
/// within `limit` (retried: a refused or dropped attempt is tried again
/// until then). Returns how long the slower of the two took.
pub async fn live_within(agg: &AggregatorProcess, from: u64, to: u64, limit: Duration) -> Duration {
    let start = Instant::now();
    let deadline = start + limit;
    let path_query = format!("/api/v1/profile?mode=cpu&from={from}&to={to}");
    for path in ["/healthz", path_query.as_str()] {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{path} did not answer 200 within {limit:?}");
            let attempt = tokio::time::timeout(left, async {
                // A connection refused or cut by the server is a failed attempt, not a panic.
                let Ok(mut s) = tokio::net::TcpStream::connect(agg.http).await else { return None };
                let auth = agg.token.as_ref().map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
                let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n");
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                s.write_all(req.as_bytes()).await.ok()?;
                let mut raw = Vec::new();
                s.read_to_end(&mut raw).await.ok()?;
                Some(raw.starts_with(b"HTTP/1.1 200"))
            })
            .await;
            if attempt == Ok(Some(true)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    start.elapsed()
}
