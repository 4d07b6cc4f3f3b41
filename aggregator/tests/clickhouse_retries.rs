//! A ClickHouse insert whose answer is lost after the server committed it
//! (a timeout, a connection cut on the way back) must not be counted twice
//! when the writer retries it.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aperture_aggregator::ClickHouseSettings;
use aperture_aggregator::store::clickhouse::ClickHouseStore;
use aperture_aggregator::store::{Store, WriteBatch};
use aperture_core::model::Labels;
use aperture_core::shard::{Flush, RowKey, RowKind, RowValue};

/// A TCP proxy in front of ClickHouse that, when armed, lets one request
/// through and throws its answer away, closing the client's connection.
struct LossyProxy {
    addr: SocketAddr,
    drop_next_answer: Arc<AtomicBool>,
}

impl LossyProxy {
    fn start(upstream: SocketAddr) -> LossyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let drop_next_answer = Arc::new(AtomicBool::new(false));
        let armed = Arc::clone(&drop_next_answer);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                std::thread::spawn(move || pipe(c2, s2, None));
                let armed = Arc::clone(&armed);
                std::thread::spawn(move || pipe(server, client, Some(armed)));
            }
        });
        LossyProxy { addr, drop_next_answer }
    }
}

/// Copies `from` to `to`. With `armed` set, the first bytes read are
/// dropped instead and both connections are closed.
fn pipe(mut from: TcpStream, mut to: TcpStream, armed: Option<Arc<AtomicBool>>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if armed.as_ref().is_some_and(|a| a.swap(false, Ordering::SeqCst)) {
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
            return;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn flush(rows: u64, t0: u64) -> Flush {
    let rows = (0..rows)
        .map(|i| {
            let key = RowKey {
                window_start_s: t0 + i * 10,
                kind: RowKind::Cpu,
                labels: 0,
                stack: aperture_core::model::StackHash(1000 + i),
                detail: 0,
            };
            (key, RowValue { count: 3, total_ns: 30, ..RowValue::default() })
        })
        .collect();
    Flush { labels: vec![Labels { node: "n1".into(), ..Labels::default() }], rows, ..Flush::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_lost_answer_does_not_count_twice() {
    let Some(server) = tokio::task::spawn_blocking(|| {
        aperture_testkit::clickhouse::start_or_skip("a_retry_after_a_lost_answer_does_not_count_twice")
    })
    .await
    .expect("start server") else {
        return;
    };
    let upstream = SocketAddr::from(([127, 0, 0, 1], server.http_port));
    let proxy = LossyProxy::start(upstream);
    let mut settings = ClickHouseSettings::new(format!("http://{}", proxy.addr));
    settings.database = "retries".into();
    settings.request_timeout = Duration::from_secs(10);
    let store = ClickHouseStore::open(&settings).await.expect("open store");

    let t0 = common::now_s() / 86_400 * 86_400 - 86_400;
    // One batch of rows only (no stacks, no ledger): the samples insert is
    // its only request, and it spans two days, so two partitions.
    let mut f = flush(20, t0 + 86_400 - 100);
    f.frames = vec![common::frame_id(1, 1, 1)];
    let batch = WriteBatch { flushes: vec![f], now_s: t0, batch_id: 0x5eed, ..WriteBatch::default() };
    let expected = 20 * 3;

    proxy.drop_next_answer.store(true, Ordering::SeqCst);
    let first = store.write(&batch).await;
    assert!(first.as_ref().is_err_and(|e| e.is_retryable()), "the lost answer is a retryable failure: {first:?}");
    assert!(!proxy.drop_next_answer.load(Ordering::SeqCst), "the proxy dropped an answer");
    // The ambiguous case: the server did commit.
    let stored = || server.query("SELECT sum(count) FROM retries.samples").expect("query").trim().to_owned();
    assert_eq!(stored(), expected.to_string(), "the first attempt was committed on the server");

    store.write(&batch).await.expect("retry");
    assert_eq!(stored(), expected.to_string(), "the retry must not insert the rows again");
    drop(server);
}
