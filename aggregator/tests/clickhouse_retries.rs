//! A ClickHouse insert whose answer is lost after the server committed it
//! (a timeout, a connection cut on the way back) must not be counted twice
//! when the writer retries it; and an aggregator that dies between the
//! inserts of a batch must leave a ledger that says exactly which of its
//! frames are stored, for the next reader (itself restarted, or a replica).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aperture_aggregator::ClickHouseSettings;
use aperture_aggregator::store::clickhouse::ClickHouseStore;
use aperture_aggregator::store::{Store, WriteBatch};
use aperture_core::ids::{AgentId, BootId};
use aperture_core::ledger::{RunKey, RunState};
use aperture_core::model::Labels;
use aperture_core::shard::{Flush, RowKey, RowKind, RowValue};

/// How the URL of the insert into `samples` starts (form-encoded, the
/// table name backquoted).
const SAMPLES_INSERT: &str = "query=INSERT+INTO+%60samples%60";

/// What a [`FaultyProxy`] does to the next request whose head contains its
/// pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Let the request through, throw its answer away and close the
    /// client's connection: the server commits, the client cannot know.
    LoseAnswer,
    /// Close the connection instead of passing the request on: the server
    /// never sees it.
    LoseRequest,
    /// Pass the request on only once [`FaultyProxy::release`] is called: a
    /// server frozen with the request in its socket, or slow to take it.
    Hold,
}

/// A TCP proxy in front of ClickHouse that, when armed, applies a [`Fault`]
/// to one request: the next one, or the next whose head contains a pattern
/// (an insert names its table in the URL: [`SAMPLES_INSERT`]).
struct FaultyProxy {
    addr: SocketAddr,
    armed: Arc<Mutex<Option<(Fault, &'static str)>>>,
    released: Arc<AtomicBool>,
    /// Set once the server answered the request a [`Fault::Hold`] held.
    held_answered: Arc<AtomicBool>,
}

impl FaultyProxy {
    fn start(upstream: SocketAddr) -> FaultyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let armed: Arc<Mutex<Option<(Fault, &'static str)>>> = Arc::default();
        let released = Arc::new(AtomicBool::new(false));
        let held_answered = Arc::new(AtomicBool::new(false));
        let (shared, release, answered) = (Arc::clone(&armed), Arc::clone(&released), Arc::clone(&held_answered));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                let faults = Arc::new(ConnectionFaults::default());
                let (armed, release, mine) = (Arc::clone(&shared), Arc::clone(&release), Arc::clone(&faults));
                std::thread::spawn(move || requests(c2, s2, &armed, &mine, &release));
                let answered = Arc::clone(&answered);
                std::thread::spawn(move || answers(server, client, &faults, &answered));
            }
        });
        FaultyProxy { addr, armed, released, held_answered }
    }

    /// Passes on the request a [`Fault::Hold`] holds.
    fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
    }

    /// Whether the server answered the request a [`Fault::Hold`] held.
    fn held_answered(&self) -> bool {
        self.held_answered.load(Ordering::SeqCst)
    }

    /// Applies `fault` to the next request whose head contains `pattern`
    /// (any request for `""`).
    fn arm(&self, fault: Fault, pattern: &'static str) {
        *self.armed.lock().expect("proxy lock") = Some((fault, pattern));
    }

    /// Whether the armed fault was applied.
    fn fired(&self) -> bool {
        self.armed.lock().expect("proxy lock").is_none()
    }
}

/// What the faults did to one proxied connection.
#[derive(Default)]
struct ConnectionFaults {
    /// Drop the next answer ([`Fault::LoseAnswer`]).
    lose: AtomicBool,
    /// A request of this connection was held ([`Fault::Hold`]).
    held: AtomicBool,
}

/// Copies requests from `client` to `server`, applying the armed fault.
fn requests(
    mut client: TcpStream,
    mut server: TcpStream,
    armed: &Mutex<Option<(Fault, &str)>>,
    faults: &ConnectionFaults,
    released: &AtomicBool,
) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let fault = {
            let mut armed = armed.lock().expect("proxy lock");
            let hit = armed.is_some_and(|(_, p)| p.is_empty() || buf[..n].windows(p.len()).any(|w| w == p.as_bytes()));
            if hit { armed.take().map(|(f, _)| f) } else { None }
        };
        match fault {
            Some(Fault::LoseRequest) => {
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
                return;
            }
            Some(Fault::LoseAnswer) => faults.lose.store(true, Ordering::SeqCst),
            // What the client sends meanwhile, its end included, waits in
            // the socket and follows.
            Some(Fault::Hold) => {
                faults.held.store(true, Ordering::SeqCst);
                while !released.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            None => {}
        }
        if server.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Write);
}

/// Copies answers from `server` to `client`. With `faults.lose` set, the
/// first bytes read are dropped instead and both connections are closed;
/// with `faults.held` set, the first bytes read answer the held request
/// (HTTP/1.1: one request at a time), and `held_answered` is set.
fn answers(mut server: TcpStream, mut client: TcpStream, faults: &ConnectionFaults, held_answered: &AtomicBool) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match server.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if faults.held.load(Ordering::SeqCst) {
            held_answered.store(true, Ordering::SeqCst);
        }
        if faults.lose.swap(false, Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
            return;
        }
        if client.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Write);
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

/// A test ClickHouse server (or `None`, reported skipped as `test`), a
/// [`FaultyProxy`] in front of it, and a store on database `database`
/// reached through the proxy, with the settings it was opened with.
async fn proxied_store(
    test: &'static str,
    database: &str,
) -> Option<(aperture_testkit::clickhouse::ClickHouseServer, FaultyProxy, ClickHouseSettings, ClickHouseStore)> {
    let server = tokio::task::spawn_blocking(move || aperture_testkit::clickhouse::start_or_skip(test))
        .await
        .expect("start server")?;
    let proxy = FaultyProxy::start(SocketAddr::from(([127, 0, 0, 1], server.http_port)));
    let mut settings = ClickHouseSettings::new(format!("http://{}", proxy.addr));
    settings.database = database.into();
    settings.request_timeout = Duration::from_secs(10);
    let store = ClickHouseStore::open(&settings).await.expect("open store");
    Some((server, proxy, settings, store))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_lost_answer_does_not_count_twice() {
    let Some((server, proxy, _, store)) =
        proxied_store("a_retry_after_a_lost_answer_does_not_count_twice", "retries").await
    else {
        return;
    };

    let t0 = common::now_s() / 86_400 * 86_400 - 86_400;
    // One batch of rows only (no stacks, no ledger): the samples insert is
    // its only request, and it spans two days, so two partitions.
    let mut f = flush(20, t0 + 86_400 - 100);
    f.frames = vec![common::frame_id(1, 1, 1)];
    let batch = WriteBatch { flushes: vec![f], now_s: t0, batch_id: 0x5eed, ..WriteBatch::default() };
    let expected = 20 * 3;

    proxy.arm(Fault::LoseAnswer, SAMPLES_INSERT);
    let first = store.write(&batch).await;
    assert!(first.as_ref().is_err_and(|e| e.is_retryable()), "the lost answer is a retryable failure: {first:?}");
    assert!(proxy.fired(), "the proxy dropped an answer");
    // The ambiguous case: the server did commit.
    let stored = || {
        server.query("SELECT sum(count) FROM retries.samples WHERE kind != 'batch'").expect("query").trim().to_owned()
    };
    assert_eq!(stored(), expected.to_string(), "the first attempt was committed on the server");

    store.write(&batch).await.expect("retry");
    assert_eq!(stored(), expected.to_string(), "the retry must not insert the rows again");
    drop(server);
}

/// A samples insert that reaches the server only after its attempt timed
/// out and the writer tried again (a server frozen with the request in its
/// socket, then resumed): the writer waits for that insert's own answer
/// rather than sending the rows beside it, and they are stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_answered_after_its_timeout_is_not_sent_again_beside_it() {
    const TEST: &str = "an_insert_answered_after_its_timeout_is_not_sent_again_beside_it";
    let Some((server, proxy, settings, _)) = proxied_store(TEST, "late_answer").await else { return };
    let quick = ClickHouseSettings { request_timeout: Duration::from_secs(1), ..settings };
    let store = ClickHouseStore::open(&quick).await.expect("open store");
    let t0 = common::now_s() / 86_400 * 86_400 - 86_400;
    let batch = WriteBatch { flushes: vec![flush(20, t0)], now_s: t0, batch_id: 0x7a1e, ..WriteBatch::default() };

    proxy.arm(Fault::Hold, SAMPLES_INSERT);
    let first = store.write(&batch).await;
    assert!(first.as_ref().is_err_and(|e| e.is_retryable()), "the insert timed out: {first:?}");
    assert!(proxy.fired(), "the proxy holds the insert");
    // The server has none of the rows yet: a check by batch id finds none.
    let second = store.write(&batch).await;
    assert!(
        second.as_ref().is_err_and(|e| e.to_string().contains("no answer yet")),
        "the retry waits for the first insert's answer: {second:?}"
    );
    proxy.release();
    let mut written = store.write(&batch).await;
    for _ in 0..200 {
        if written.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        written = store.write(&batch).await;
    }
    written.expect("the batch is written once the held insert is answered");
    for _ in 0..200 {
        if proxy.held_answered() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(proxy.held_answered(), "the server answered the held insert");
    let stored = server.query("SELECT sum(count) FROM late_answer.samples WHERE kind != 'batch'").expect("query");
    assert_eq!(stored.trim(), (20 * 3).to_string(), "the rows are stored once");
    drop(server);
}

/// A batch of `rows` sample rows from `t`, carrying frames `from..=to` of
/// the run of `frame_id(7, 7, _)`, which had every frame below `from`
/// committed before it.
fn run_batch(batch_id: u64, rows: u64, t: u64, from: u64, to: u64) -> WriteBatch {
    let key = (AgentId([7; 16]), BootId([7; 16]));
    let mut f = flush(rows, t);
    f.frames = (from..=to).map(|s| common::frame_id(7, 7, s)).collect();
    let state = |watermark| RunState { watermark, above: Default::default() };
    WriteBatch {
        flushes: vec![f],
        runs: vec![(key, state(to))],
        runs_before: if from > 1 { vec![(key, state(from - 1))] } else { Vec::new() },
        now_s: common::now_s(),
        batch_id,
        ..WriteBatch::default()
    }
}

/// What another replica (or this one restarted) reads as committed for the
/// run of [`run_batch`]: by the look-up of a run, and by the start-up load.
async fn committed_watermark(store: &ClickHouseStore) -> (u64, u64) {
    let key = (AgentId([7; 16]), BootId([7; 16]));
    let looked_up = store.load_runs(&[key]).await.expect("look up run");
    let loaded = store.load_ledger(0).await.expect("load ledger");
    let of = |runs: Vec<(RunKey, RunState)>| runs.into_iter().find(|(k, _)| *k == key).map_or(0, |(_, s)| s.watermark);
    (of(looked_up), of(loaded))
}

async fn replica_settings(
    server: &aperture_testkit::clickhouse::ClickHouseServer,
    dir: &std::path::Path,
    db: &str,
) -> aperture_aggregator::Settings {
    let mut s = common::settings(dir);
    let mut ch = ClickHouseSettings::new(server.endpoint());
    ch.database = db.into();
    s.clickhouse = Some(ch);
    s
}

/// The aggregator dies after a batch's samples are committed and before it
/// learns so (its connection lost on the way back): the store must still say
/// those frames are committed, so a replica answers their resent copies as
/// such and stores nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_committed_before_a_crash_are_committed_for_the_next_reader() {
    let Some((server, proxy, settings, store)) =
        proxied_store("samples_committed_before_a_crash_are_committed_for_the_next_reader", "crash_after_samples")
            .await
    else {
        return;
    };
    let t = common::now_s() / 86_400 * 86_400 - 2 * 86_400;

    store.write(&run_batch(0x11, 4, t, 1, 3)).await.expect("first batch");
    // The second batch's samples reach the server; its answer does not, and
    // the process is gone before any retry.
    proxy.arm(Fault::LoseAnswer, SAMPLES_INSERT);
    let second = store.write(&run_batch(0x13, 5, t + 1000, 4, 6)).await;
    assert!(second.is_err(), "the lost answer fails the write: {second:?}");
    assert!(proxy.fired(), "the proxy dropped the answer of the samples insert");
    let stored = || {
        server
            .query("SELECT sum(count) FROM crash_after_samples.samples WHERE kind != 'batch'")
            .expect("query")
            .trim()
            .to_owned()
    };
    assert_eq!(stored(), ((4 + 5) * 3).to_string(), "both batches' samples are stored");

    let replica = ClickHouseStore::open(&ClickHouseSettings { endpoint: server.endpoint(), ..settings.clone() })
        .await
        .expect("open replica");
    assert_eq!(committed_watermark(&replica).await, (6, 6), "frames 4 to 6 are stored, so committed");

    // A replica meeting the run answers every resent frame as committed.
    let dir = tempfile::tempdir().expect("dir");
    let b = aperture_aggregator::Aggregator::start(replica_settings(&server, dir.path(), "crash_after_samples").await)
        .await
        .expect("start replica");
    let ingress = b.ingress();
    let t_push = common::now_s() - 600;
    let taken = tokio::task::spawn_blocking(move || {
        (1..=6)
            .map(|s| common::push(&ingress, common::frame_id(7, 7, s), &common::batch("n2", t_push)))
            .collect::<Vec<_>>()
    })
    .await
    .expect("push");
    assert!(taken.iter().all(|t| *t == common::Taken::AlreadyCommitted), "{taken:?}");
    b.shutdown().await.expect("shutdown");
    assert_eq!(stored(), ((4 + 5) * 3).to_string(), "nothing stored twice");
    drop(server);
}

/// The reverse: the ledger row of a batch is written, its samples never
/// reach the server, and the aggregator dies. Its frames are not committed:
/// resent, they are stored once, and nothing is lost. A ledger row from
/// before the batch id was recorded (batch_id 0) still reads as committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_row_whose_samples_never_landed_readmits_its_frames() {
    let Some((server, proxy, settings, store)) =
        proxied_store("a_ledger_row_whose_samples_never_landed_readmits_its_frames", "crash_before_samples").await
    else {
        return;
    };
    let t = common::now_s() / 86_400 * 86_400 - 2 * 86_400;

    store.write(&run_batch(0x21, 4, t, 1, 3)).await.expect("first batch");
    proxy.arm(Fault::LoseRequest, SAMPLES_INSERT);
    let second = store.write(&run_batch(0x23, 5, t + 1000, 4, 6)).await;
    assert!(second.is_err(), "the lost request fails the write: {second:?}");
    assert!(proxy.fired(), "the proxy dropped the samples insert");
    let stored = || {
        server
            .query("SELECT sum(count) FROM crash_before_samples.samples WHERE kind != 'batch'")
            .expect("query")
            .trim()
            .to_owned()
    };
    assert_eq!(stored(), (4 * 3).to_string(), "only the first batch's samples are stored");
    let rows =
        server.query("SELECT count() FROM crash_before_samples.frame_ledger WHERE batch_id = 35").expect("query");
    assert_eq!(rows.trim(), "1", "the second batch's ledger row is written");
    // A row as written before batch ids were recorded.
    server
        .query(
            "INSERT INTO crash_before_samples.frame_ledger (agent_id, boot_id, watermark, above, updated, version)
             VALUES ('08080808080808080808080808080808', '08080808080808080808080808080808', 9, [], now(), 1)",
        )
        .expect("old-style row");

    let replica = ClickHouseStore::open(&ClickHouseSettings { endpoint: server.endpoint(), ..settings.clone() })
        .await
        .expect("open replica");
    assert_eq!(committed_watermark(&replica).await, (3, 3), "frames 4 to 6 are not stored, so not committed");
    let old = (AgentId([8; 16]), BootId([8; 16]));
    let runs = replica.load_runs(&[old]).await.expect("look up");
    assert_eq!(runs.first().map(|(_, s)| s.watermark), Some(9), "a row without batch id holds the committed state");

    // A replica re-admits frames 4 to 6 and stores them once.
    let dir = tempfile::tempdir().expect("dir");
    let b = aperture_aggregator::Aggregator::start(replica_settings(&server, dir.path(), "crash_before_samples").await)
        .await
        .expect("start replica");
    let acks = common::acks(&b);
    let ingress = b.ingress();
    let t_push = common::now_s() - 600;
    let taken = tokio::task::spawn_blocking(move || {
        (1..=6)
            .map(|s| common::push(&ingress, common::frame_id(7, 7, s), &common::batch("n2", t_push)))
            .collect::<Vec<_>>()
    })
    .await
    .expect("push");
    use common::Taken::{AlreadyCommitted, Queued};
    assert_eq!(taken, [AlreadyCommitted, AlreadyCommitted, AlreadyCommitted, Queued, Queued, Queued]);
    let resent: Vec<_> = (4..=6).map(|s| common::frame_id(7, 7, s)).collect();
    tokio::task::spawn_blocking(move || acks.wait_for(&resent, Duration::from_secs(60))).await.expect("acks");
    assert_eq!(common::cpu_total(b.http_addr(), t_push - 20, t_push + 20).await, 3 * 5, "frames 4 to 6 once each");
    b.shutdown().await.expect("shutdown");
    drop(server);
}

/// A writer dies with its samples insert sent, and ClickHouse commits the
/// insert a moment after another replica started reading the ledger: the
/// reader must not take the batch as lost, or that replica would store its
/// frames a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_landing_just_after_the_ledger_is_read_still_count_as_committed() {
    const TEST: &str = "samples_landing_just_after_the_ledger_is_read_still_count_as_committed";
    let Some((server, proxy, settings, store)) = proxied_store(TEST, "late_samples").await else { return };
    let t = common::now_s() / 86_400 * 86_400 - 2 * 86_400;
    store.write(&run_batch(0x31, 4, t, 1, 3)).await.expect("first batch");
    proxy.arm(Fault::LoseRequest, SAMPLES_INSERT);
    let second = run_batch(0x33, 5, t + 1000, 4, 6);
    assert!(store.write(&second).await.is_err(), "the samples insert is held back");
    let direct = ClickHouseSettings { endpoint: server.endpoint(), ..settings.clone() };
    let replica = ClickHouseStore::open(&direct).await.expect("open replica");
    let late = ClickHouseStore::open(&direct).await.expect("open late writer");
    // The held-back insert lands while the replica reads.
    let landing = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        late.write(&second).await
    });
    assert_eq!(committed_watermark(&replica).await, (6, 6), "frames 4 to 6 landed: committed");
    landing.await.expect("task").expect("the samples land");
    let stored = server.query("SELECT sum(count) FROM late_samples.samples WHERE kind != 'batch'").expect("query");
    assert_eq!(stored.trim(), (4 * 3 + 5 * 3).to_string(), "both batches, once");
    drop(server);
}
