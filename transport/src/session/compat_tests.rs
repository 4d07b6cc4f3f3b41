//! Mixed fleets: agents and aggregators of different releases, in both
//! directions. An "older server" is a server session limited to protocol 1
//! with no capabilities, which is what the first release's server sends and
//! accepts; its frame validator knows lock kinds 0..=4 only, so every frame
//! it receives must hold nothing else.

use aperture_core::frame::{DecodeLimits, decode, encode_batch};
use aperture_core::model::{Batch, LockKind, LockWait, Stack, StackFrame, Target};

use super::*;
use crate::control::{Capabilities, Hello, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Welcome};

/// A frame with one lock wait of every kind.
fn classed_frame(seq: u64) -> FrameBuf {
    let batch = Batch {
        node: "node-a".into(),
        targets: vec![Target { pid: 1, process: "app".into(), ..Default::default() }],
        stacks: vec![Stack::new(vec![StackFrame { symbol: "pthread_mutex_lock".into(), ..Default::default() }])],
        locks: LockKind::ALL
            .iter()
            .map(|&kind| LockWait { time_ns: 1, target: 0, stack: 0, kind, count: 1, wait_ns: 10, max_wait_ns: 10 })
            .collect(),
        ..Default::default()
    };
    let id = FrameId { agent_id: AGENT, boot_id: BOOT, sequence: seq };
    encode_batch(&batch, id, 0, &DecodeLimits::default()).expect("encode")
}

/// The lock kinds of a received frame, as numbers.
fn kinds(frame: &FrameBuf) -> Vec<u8> {
    let view = decode(frame, &DecodeLimits::default()).expect("a valid frame");
    view.batch.locks.iter().map(|w| w.kind.to_native() as u8).collect()
}

fn older_server() -> ServerSessionConfig {
    ServerSessionConfig { max_protocol: 1, capabilities: Capabilities::NONE, ..server_cfg(16, 1 << 20) }
}

fn established(evs: &[ClientEvent]) -> (u16, Capabilities) {
    match evs {
        [.., ClientEvent::Established { protocol, capabilities, .. }] => (*protocol, *capabilities),
        other => panic!("not established: {other:?}"),
    }
}

const ALL_KINDS: [u8; 10] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
const OLD_KINDS: [u8; 10] = [0, 1, 2, 3, 4, 0, 0, 0, 0, 0];

#[test]
fn a_server_that_reads_lock_classes_gets_them() {
    let mut link = Link::new(ClientSession::new(client_cfg(1 << 20)), server_cfg(16, 1 << 20));
    link.client.push(classed_frame(1)).expect("push");
    link.pump();
    let (protocol, caps) = established(&events(&mut link.client));
    assert_eq!(protocol, PROTOCOL_VERSION);
    assert!(caps.contains(Capabilities::LOCK_CLASSES));
    assert_eq!(link.received.len(), 1);
    assert_eq!(kinds(&link.received[0]), ALL_KINDS);
    assert_eq!(link.client.stats().frames_downgraded, 0);
}

#[test]
fn an_older_server_is_spoken_to_in_its_protocol_and_gets_only_kinds_it_knows() {
    let mut link = Link::new(ClientSession::new(client_cfg(1 << 20)), older_server());
    link.client.push(classed_frame(1)).expect("push");
    link.pump();
    // It refuses protocol 2, as the first release does; nothing was sent.
    assert_eq!(link.rejected, vec![RejectReason::UnsupportedProtocol]);
    assert!(link.wire.is_empty());
    let evs = events(&mut link.client);
    assert!(matches!(&evs[..], [ClientEvent::OlderServer { offered: PROTOCOL_VERSION, .. }]), "{evs:?}");
    // The next connection offers protocol 1 and is welcomed.
    link.reconnect(older_server());
    link.pump();
    let (protocol, caps) = established(&events(&mut link.client));
    assert_eq!((protocol, caps), (MIN_PROTOCOL_VERSION, Capabilities::NONE));
    assert_eq!(link.received.len(), 1);
    assert_eq!(kinds(&link.received[0]), OLD_KINDS);
    assert_eq!(link.admitted, vec![1]);
    assert!(link.server_closed.is_empty(), "{:?}", link.server_closed);
    let stats = link.client.stats();
    assert_eq!((stats.frames_downgraded, stats.protocol_fallbacks), (1, 1));
    link.commit(&[1]);
    assert!(link.unacked().is_empty());
}

#[test]
fn a_held_frame_keeps_its_classes_for_the_next_server() {
    // Sent to an older server, not acknowledged, then resent after the
    // aggregator was upgraded: the classes are back.
    let mut link = Link::new(ClientSession::new(client_cfg(1 << 20)), older_server());
    link.client.push(classed_frame(1)).expect("push");
    link.pump();
    link.reconnect(older_server());
    link.pump();
    assert_eq!(kinds(&link.received[0]), OLD_KINDS);
    // The fallback lasted one connection: the next one offers protocol 2.
    link.reconnect(server_cfg(16, 1 << 20));
    link.pump();
    let (protocol, _) = established(&events(&mut link.client));
    assert_eq!(protocol, PROTOCOL_VERSION);
    assert_eq!(link.wire, vec![1, 1]);
    assert_eq!(kinds(&link.received[1]), ALL_KINDS);
    // And a rollback to an older server downgrades it again.
    link.reconnect(older_server());
    link.pump();
    link.reconnect(older_server());
    link.pump();
    assert_eq!(link.wire, vec![1, 1, 1]);
    assert_eq!(kinds(&link.received[2]), OLD_KINDS);
}

#[test]
fn a_server_without_the_capability_gets_futex_even_on_protocol_2() {
    let scfg = ServerSessionConfig { capabilities: Capabilities::NONE, ..server_cfg(16, 1 << 20) };
    let mut link = Link::new(ClientSession::new(client_cfg(1 << 20)), scfg);
    link.client.push(classed_frame(1)).expect("push");
    link.pump();
    let (protocol, caps) = established(&events(&mut link.client));
    assert_eq!((protocol, caps), (PROTOCOL_VERSION, Capabilities::NONE));
    assert_eq!(kinds(&link.received[0]), OLD_KINDS);
}

#[test]
fn an_older_agent_gets_the_welcome_of_protocol_1() {
    // The first release's agent offers 1 and refuses any byte it does not
    // expect: the welcome it gets has no capabilities field.
    let now = Instant::now();
    let mut server = ServerSession::new(now, server_cfg(16, 1 << 20), Authenticator::with_token(TOKEN));
    server.handle_control(
        now,
        Control::Hello(Hello {
            protocol: 1,
            agent_id: AGENT,
            boot_id: BOOT,
            token: TOKEN.as_bytes().to_vec(),
            node: "old".into(),
            agent_version: "0.1.0".into(),
        }),
    );
    let Some(Control::Welcome(w)) = server.poll_transmit() else { panic!("no welcome") };
    assert_eq!(w.capabilities, None);
    let old_layout = Control::Welcome(Welcome { capabilities: None, ..w.clone() }).to_bytes().expect("encode");
    assert_eq!(Control::Welcome(w).to_bytes().expect("encode"), old_layout);
    // A protocol it does not know at all is still refused.
    let mut server = ServerSession::new(now, server_cfg(16, 1 << 20), Authenticator::with_token(TOKEN));
    server.handle_control(
        now,
        Control::Hello(Hello {
            protocol: PROTOCOL_VERSION + 1,
            agent_id: AGENT,
            boot_id: BOOT,
            token: TOKEN.as_bytes().to_vec(),
            node: "future".into(),
            agent_version: "9".into(),
        }),
    );
    assert!(matches!(server.poll_event(), Some(ServerEvent::Rejected(RejectReason::UnsupportedProtocol))));
}
