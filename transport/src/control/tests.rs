//! Round trips, malformed input and the layouts of both protocol versions.

use super::*;

fn samples() -> Vec<Control> {
    vec![
        Control::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            agent_id: AgentId([1; 16]),
            boot_id: BootId([2; 16]),
            token: b"s3cret".to_vec(),
            node: "node-a".into(),
            agent_version: "0.1.0".into(),
        }),
        Control::Welcome(Welcome {
            max_frame_len: 1 << 20,
            credit: Credit { frames: 64, bytes: 8 << 20 },
            server_version: "0.1.0".into(),
            capabilities: None,
        }),
        Control::Welcome(Welcome {
            max_frame_len: 1 << 20,
            credit: Credit { frames: 64, bytes: 8 << 20 },
            server_version: "0.2.0".into(),
            capabilities: Some(Capabilities::LOCK_CLASSES),
        }),
        Control::Reject(Reject { reason: RejectReason::WrongToken, message: "no".into() }),
        Control::Ack(Ack { ranges: vec![SeqRange { first: 1, last: 3 }, SeqRange { first: 7, last: 7 }] }),
        Control::Ack(Ack::default()),
        Control::Credit(Credit { frames: 3, bytes: 99 }),
        Control::Close(Close { reason: CloseReason::Superseded, message: String::new() }),
    ]
}

#[test]
fn every_message_round_trips() {
    for m in samples() {
        let bytes = m.to_bytes().expect("encode");
        assert_eq!(decode(&bytes).expect("decode"), m);
        // Every strict prefix is truncated, never a different message.
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "{m:?} cut at {cut}");
        }
    }
}

#[test]
fn acks_merge_and_split() {
    let acks = Ack::from_sequences([5, 3, 4, 9, 1, 3]);
    assert_eq!(acks.len(), 1);
    assert_eq!(
        acks[0].ranges,
        vec![SeqRange { first: 1, last: 1 }, SeqRange { first: 3, last: 5 }, SeqRange { first: 9, last: 9 }]
    );
    assert_eq!(acks[0].len(), 5);
    let many = Ack::from_sequences((0..3000u64).map(|i| i * 2));
    assert_eq!(many.len(), 3000usize.div_ceil(Ack::MAX_RANGES));
    for a in &many {
        let bytes = Control::Ack(a.clone()).to_bytes().expect("fits");
        assert!(bytes.len() <= CONTROL_HEADER_LEN + MAX_CONTROL_BODY);
    }
}

#[test]
fn malformed_messages_are_typed_errors() {
    let good = samples()[4].to_bytes().expect("encode");
    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(matches!(decode(&bad), Err(ControlError::BadMagic { .. })));
    let mut bad = good.clone();
    bad[4] = 99;
    assert_eq!(decode(&bad), Err(ControlError::UnknownKind { found: 99 }));
    let mut bad = good.clone();
    bad[5] = 1;
    assert_eq!(decode(&bad), Err(ControlError::ReservedFlags { found: 1 }));
    let mut bad = good.clone();
    bad.push(0);
    assert_eq!(decode(&bad), Err(ControlError::TrailingBytes { extra: 1 }));
    // Overlapping ack ranges.
    let overlapping =
        Control::Ack(Ack { ranges: vec![SeqRange { first: 1, last: 5 }, SeqRange { first: 5, last: 6 }] });
    assert_eq!(decode(&overlapping.to_bytes().expect("encode")), Err(ControlError::BadRanges));
    let reversed = Control::Ack(Ack { ranges: vec![SeqRange { first: 5, last: 1 }] });
    assert_eq!(decode(&reversed.to_bytes().expect("encode")), Err(ControlError::BadRanges));
    // Oversized body announced in the header.
    let mut big = CONTROL_MAGIC.to_vec();
    big.extend_from_slice(&[4, 0, 0xff, 0xff]);
    assert_eq!(parse_header(&big), Err(ControlError::Oversized { len: 0xffff }));
    // Unknown reason.
    let mut rej = samples()[3].to_bytes().expect("encode");
    rej[8] = 0x77;
    assert!(matches!(decode(&rej), Err(ControlError::UnknownReason { .. })));
}

/// The welcome a server of protocol 1 sends, byte for byte, as a decoder
/// of protocol 1 reads it: exactly these fields, nothing after them.
fn welcome_v1_bytes(max_frame_len: u32, frames: u32, bytes: u64, version: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&max_frame_len.to_le_bytes());
    body.extend_from_slice(&frames.to_le_bytes());
    body.extend_from_slice(&bytes.to_le_bytes());
    body.extend_from_slice(&(version.len() as u16).to_le_bytes());
    body.extend_from_slice(version.as_bytes());
    let mut out = CONTROL_MAGIC.to_vec();
    out.extend_from_slice(&[2, 0]);
    out.extend_from_slice(&(body.len() as u16).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

#[test]
fn welcomes_of_both_protocols_are_read_and_the_old_layout_is_unchanged() {
    let old = welcome_v1_bytes(4096, 8, 1 << 20, "0.1.0");
    // A welcome of protocol 1 (an older server's) reads as no capability.
    let Control::Welcome(w) = decode(&old).expect("decode") else { panic!("not a welcome") };
    assert_eq!(w.capabilities, None);
    assert_eq!(w.capabilities(), Capabilities::NONE);
    assert!(!w.capabilities().contains(Capabilities::LOCK_CLASSES));
    // Without capabilities this build writes exactly that layout, which
    // is what an older agent, whose decoder refuses trailing bytes, reads.
    assert_eq!(Control::Welcome(w.clone()).to_bytes().expect("encode"), old);
    // With them, four more bytes; unknown bits are kept, not refused.
    let new = Welcome { capabilities: Some(Capabilities(Capabilities::LOCK_CLASSES.0 | 0x80)), ..w };
    let bytes = Control::Welcome(new.clone()).to_bytes().expect("encode");
    assert_eq!(bytes.len(), old.len() + 4);
    assert_eq!(decode(&bytes).expect("decode"), Control::Welcome(new.clone()));
    assert!(new.capabilities().contains(Capabilities::LOCK_CLASSES));
    // Anything else after the version is still an error.
    let mut odd = old.clone();
    odd.extend_from_slice(&[1, 0]);
    odd[6] += 2;
    assert!(matches!(decode(&odd), Err(ControlError::Truncated { .. })));
}

#[test]
fn hello_debug_hides_the_token() {
    let Control::Hello(h) = &samples()[0] else { unreachable!() };
    let shown = format!("{h:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("token_len: 6"), "{shown}");
}

#[test]
fn oversized_fields_are_refused_by_the_encoder() {
    let ack = Control::Ack(Ack { ranges: vec![SeqRange { first: 0, last: 0 }; Ack::MAX_RANGES + 1] });
    assert!(matches!(ack.to_bytes(), Err(ControlEncodeError::BodyTooLong { .. })));
}
