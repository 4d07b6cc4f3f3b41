//! Two aggregator replicas as real processes on one ClickHouse, behind
//! relays that act like a Kubernetes Service (UDP for QUIC, TCP for gRPC):
//! agents are spread over both, one replica is SIGKILLed mid-stream and
//! taken out of the Service, its agents reconnect to the survivor and
//! resend what was not acknowledged. The store's frame ledger keeps the
//! survivor from storing again what the killed one committed.

use std::time::Duration;

use aperture_transport::client::CarrierChoice;

use crate::common::{batch, now_s};
use crate::oracle::{Conservation, cpu_total, scrape};
use crate::process::{Agent, Relay, TcpRelay, aggregator, aperture_bin, clickhouse_or_skip, client_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_two_replicas_clickhouse() {
    const NAME: &str = "fault_two_replicas_clickhouse";
    let Some(bin) = aperture_bin(NAME) else { return };
    let Some(server) = clickhouse_or_skip(NAME).await else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    for d in [&dir_a, &dir_b] {
        std::fs::create_dir_all(d).expect("replica dir");
    }
    let args = vec!["--clickhouse-endpoint".to_owned(), server.endpoint()];
    let mut a = aggregator(bin.clone(), args.clone(), &dir_a);
    let mut b = aggregator(bin, args, &dir_b);
    a.start();
    b.start();
    a.wait_healthy().await;
    b.wait_healthy().await;
    let udp = Relay::service(&[a.ingest, b.ingest]).await;
    let tcp = TcpRelay::service(&[a.ingest, b.ingest]).await;

    // Four agents: two over QUIC, two over gRPC, each pair spread over
    // both replicas by the Service.
    let t0 = now_s() - 600;
    let mut agents = Vec::new();
    for (i, carrier) in
        [CarrierChoice::Quic, CarrierChoice::Grpc, CarrierChoice::Quic, CarrierChoice::Grpc].into_iter().enumerate()
    {
        let port = if carrier == CarrierChoice::Quic { udp.port } else { tcp.port };
        // A QUIC connection whose replica died unannounced ends only when
        // it has been idle this long (the other replica cannot reset it:
        // it lacks the connection's keys); 30 s by default, shorter here.
        let config =
            aperture_transport::client::ClientConfig { carrier, idle_timeout_ms: 5_000, ..client_config(port) };
        // Each agent under a node name of its own, so that the store can be
        // asked about each.
        let node = format!("agent-{i}");
        agents.push(Agent::start_with(config, 0xa1 + i as u8, t0, move |t| batch(&node, t)));
        // One at a time, so that the Service's round robin alternates.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sessions = |m: f64| m as u64;
    let on_a = sessions(scrape(&a, "aperture_transport_sessions_opened_total", &[]).await);
    let on_b_before = sessions(scrape(&b, "aperture_transport_sessions_opened_total", &[]).await);
    assert!(on_a >= 2 && on_b_before >= 2, "the Service spreads the agents: {on_a} sessions on A, {on_b_before} on B");
    let acked_before: u64 = agents.iter().map(|g| g.client.stats().session.frames_acked).sum();

    // A dies mid-stream; the Service stops sending to it.
    a.kill();
    udp.remove(0);
    tcp.remove(0);
    tokio::time::sleep(Duration::from_secs(4)).await;

    agents.iter().for_each(Agent::stop);
    let stopped = std::time::Instant::now();
    let mut sent = 0;
    let mut per_agent = String::new();
    let mut stayed_on_b_duplicated = 0;
    for (i, agent) in agents.into_iter().enumerate() {
        let (n, stats) = agent.finish_with_stats().await;
        let settled_ms = stopped.elapsed().as_millis();

        sent += n;
        let path = format!("/api/v1/profile?mode=cpu&from={}&to={}&node=agent-{i}", t0 - 20, t0 + 400);
        let r = b.get(&path).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let stored = r.json()["root"]["value"].as_u64().unwrap_or(0) / 5;
        assert!(stored >= n, "agent {i}: {stored} of {n} frames stored");
        if stats.reconnects == 0 {
            stayed_on_b_duplicated += stored - n;
        }
        per_agent.push_str(&format!(
            " agent{i}:reconnects={}:sent={n}:stored={stored}:acked_{settled_ms}ms_after_stop",
            stats.reconnects
        ));
    }
    let on_b = sessions(scrape(&b, "aperture_transport_sessions_opened_total", &[]).await);
    let already = scrape(&b, "aperture_ingress_frames_total", &["result=\"committed\""]).await as u64;
    let checking = scrape(&b, "aperture_ingress_frames_total", &["result=\"checking\""]).await as u64;
    let stored = cpu_total(&b, t0 - 20, t0 + 400).await / 5;
    let c = Conservation { sent, stored, restarts: 1 };
    c.report_with(
        "two_replicas_clickhouse",
        &format!(
            " sessions_on_a={on_a} failed_over_to_b={} acked_before_kill={acked_before} \
             answered_committed_by_b={already} held_for_ledger_check_by_b={checking}{per_agent}",
            on_b - on_b_before
        ),
    );
    assert_eq!(c.lost(), 0, "nothing acknowledged is lost");
    assert!(on_b > on_b_before, "A's agents moved to B");
    assert_eq!(stayed_on_b_duplicated, 0, "the agents B served all along are stored exactly once");
    // A batch's ledger rows are written before its samples, with the state
    // before it, and read back by whether its samples are stored: whenever
    // A died, B answers as committed exactly what A stored
    // (`answered_committed_by_b`: committed by A but not acknowledged
    // before it died) and stores the rest once.
    assert_eq!(c.duplicated(), 0, "frames stored twice");
    drop(server);
}
