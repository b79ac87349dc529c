//! Hostile or broken input: never a panic, other sessions and rooms
//! undisturbed, every case counted in /metrics.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use moselle::signaling::proto as lk;
use prost::Message as _;
use rand::{Rng, RngCore};
use tokio_tungstenite::tungstenite::Message;

fn expect_invalid(m: &Resp, mention: &str) {
    let Resp::RequestResponse(r) = m else {
        panic!("expected a RequestResponse, got {m:?}")
    };
    assert_eq!(
        r.reason,
        lk::request_response::Reason::InvalidRequest as i32,
        "RequestResponse reason (message {:?})",
        r.message
    );
    assert!(
        r.message.contains(mention),
        "RequestResponse message {:?} should mention {mention:?}",
        r.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_binary_frame_gets_invalid_request_and_session_survives() {
    let s = start().await;
    let (mut ws, _) = join(s.addr, &token("noise", "alice")).await;
    let before = metric(s.addr, "moselle_signal_bad_frames_total").await;
    // Random bytes that do not decode as a SignalRequest.
    let mut rng = rand::rng();
    let garbage = loop {
        let mut b = vec![0u8; 64 + rng.random_range(0..200)];
        rng.fill_bytes(&mut b);
        if lk::SignalRequest::decode(b.as_slice()).is_err() {
            break b;
        }
    };
    ws.send(Message::Binary(garbage.into())).await.unwrap();
    let (m, _) = recv_until(&mut ws, "RequestResponse", |m| {
        matches!(m, Resp::RequestResponse(_))
    })
    .await;
    expect_invalid(&m, "");
    ping(&mut ws, 424242).await;
    let after = metric(s.addr, "moselle_signal_bad_frames_total").await;
    assert_eq!(after, before + 1, "moselle_signal_bad_frames_total");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_text_ping_req_gets_json_pong_resp() {
    let s = start().await;
    let (mut ws, _) = join(s.addr, &token("json", "alice")).await;
    ws.send(Message::Text(
        r#"{"pingReq":{"timestamp":"1700000000123","rtt":"20"}}"#.into(),
    ))
    .await
    .unwrap();
    // Skip updates the server had already queued; the answer is a text frame.
    let t = loop {
        match next(&mut ws, WAIT).await {
            Got::Signal(_) => continue,
            Got::Text(t) if !t.contains("pongResp") => {
                serde_json::from_str::<lk::SignalResponse>(&t).unwrap_or_else(|e| {
                    panic!("text frame is not a JSON SignalResponse ({e}): {t}")
                });
                continue;
            }
            Got::Text(t) => break t,
            other => panic!("expected a JSON text pong_resp, got {other:?}"),
        }
    };
    let v: serde_json::Value =
        serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"));
    let pong = &v["pongResp"];
    assert!(pong.is_object(), "no pongResp in {t}");
    // pbjson writes int64 as strings; accept a number as well.
    let last = match &pong["lastPingTimestamp"] {
        serde_json::Value::String(s) => s.parse::<i64>().ok(),
        serde_json::Value::Number(n) => n.as_i64(),
        _ => None,
    };
    assert_eq!(last, Some(1_700_000_000_123), "lastPingTimestamp in {t}");
    assert!(!pong["timestamp"].is_null(), "timestamp in {t}");
    // It also decodes as a SignalResponse with livekit_protocol's serde.
    let r: lk::SignalResponse = serde_json::from_str(&t).unwrap();
    assert!(matches!(r.message, Some(Resp::PongResp(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_closes_with_1009_other_room_unaffected() {
    let s = start().await;
    let (mut big, _) = join(s.addr, &token("big", "flooder")).await;
    let (mut other, _) = join(s.addr, &token("elsewhere", "bystander")).await;
    ping(&mut other, 1).await;
    let before = metric(s.addr, "moselle_signal_oversized_frames_total").await;

    // Meanwhile the other room keeps pinging.
    let pinger = tokio::spawn(async move {
        for i in 0..8 {
            ping(&mut other, 100 + i).await;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        other
    });
    let mut payload = vec![0u8; 300 * 1024];
    rand::rng().fill_bytes(&mut payload);
    let sent = big.send(Message::Binary(payload.into())).await;
    let got = loop {
        match next(&mut big, WAIT).await {
            Got::Signal(_) => continue,
            other => break other,
        }
    };
    let mut other = pinger.await.expect("the other room's pings were answered");
    ping(&mut other, 999).await;
    let after = metric(s.addr, "moselle_signal_oversized_frames_total").await;
    let bad_frames = metric(s.addr, "moselle_signal_bad_frames_total").await;
    assert_eq!(healthz(s.addr).await, 200);

    assert!(
        matches!(got, Got::Close(Some(1009), _)),
        "oversized message: expected a close frame with code 1009, got {got:?} \
         (send result {sent:?}; oversized_frames_total {before} -> {after}, bad_frames_total {bad_frames})"
    );
    assert_eq!(
        after,
        before + 1,
        "moselle_signal_oversized_frames_total (bad_frames_total is {bad_frames})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_sdp_offer_is_invalid_request_and_counted() {
    let s = start().await;
    let (mut ws, _) = join(s.addr, &token("sdp", "alice")).await;
    let before = metric(s.addr, "moselle_sdp_errors_total").await;
    send(
        &mut ws,
        Req::Offer(lk::SessionDescription {
            r#type: "offer".into(),
            sdp: "v=0 nonsense".into(),
            id: 1,
            ..Default::default()
        }),
    )
    .await;
    let (m, seen) = recv_until(&mut ws, "RequestResponse for the offer", |m| {
        matches!(m, Resp::RequestResponse(_) | Resp::Answer(_))
    })
    .await;
    expect_invalid(&m, "SDP");
    assert!(
        !seen.iter().any(|m| matches!(m, Resp::Answer(_))),
        "garbage offer got an answer"
    );
    ping(&mut ws, 77).await;
    assert_eq!(
        metric(s.addr, "moselle_sdp_errors_total").await,
        before + 1,
        "moselle_sdp_errors_total"
    );
    assert_eq!(metric(s.addr, "moselle_participants").await, 1);
}

/// Datagrams that route to no peer: random bytes, STUN headers cut short
/// (magic cookie present), STUN requests for unknown ufrags, RTP/RTCP- and
/// DTLS-looking headers, an empty datagram.
fn garbage_datagrams(n: usize) -> Vec<Vec<u8>> {
    let mut rng = rand::rng();
    (0..n)
        .map(|i| match i % 7 {
            0 => {
                let mut b = vec![0u8; rng.random_range(1..600)];
                rng.fill_bytes(&mut b);
                b
            }
            1 => {
                // Truncated STUN binding request header.
                let mut b = vec![0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42];
                let mut tid = [0u8; 12];
                rng.fill_bytes(&mut tid);
                b.extend_from_slice(&tid[..rng.random_range(0..12)]);
                b
            }
            2 => {
                // Full STUN header, USERNAME for an unknown ufrag, bad lengths.
                let mut b = vec![0x00, 0x01, 0x00, 0x10, 0x21, 0x12, 0xa4, 0x42];
                let mut tid = [0u8; 12];
                rng.fill_bytes(&mut tid);
                b.extend_from_slice(&tid);
                let user = format!("nosuch{i}:peer");
                let claimed = if i % 2 == 0 { user.len() } else { 0xfff0 };
                b.extend_from_slice(&[0x00, 0x06]);
                b.extend_from_slice(&(claimed as u16).to_be_bytes());
                b.extend_from_slice(user.as_bytes());
                b
            }
            3 => {
                // RTP: V=2, PT 96/111, random seq/ts/ssrc, some payload.
                let mut b = vec![0x80, if i % 2 == 0 { 0x60 } else { 0xef }];
                let mut rest = vec![0u8; 10 + rng.random_range(0..200)];
                rng.fill_bytes(&mut rest);
                b.extend_from_slice(&rest);
                b
            }
            4 => {
                // RTCP sender report / PLI looking.
                let mut b = vec![0x81, 200 + (i % 7) as u8, 0x00, 0x06];
                let mut rest = vec![0u8; 24];
                rng.fill_bytes(&mut rest);
                b.extend_from_slice(&rest);
                b
            }
            5 => {
                // DTLS handshake record header.
                let mut b = vec![0x16, 0xfe, 0xfd, 0x00, 0x00];
                let mut rest = vec![0u8; rng.random_range(0..100)];
                rng.fill_bytes(&mut rest);
                b.extend_from_slice(&rest);
                b
            }
            _ => {
                if i % 70 == 6 {
                    Vec::new()
                } else {
                    vec![0x00; rng.random_range(1..40)]
                }
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_garbage_is_dropped_and_counted() {
    const N: usize = 2000;
    let s = start().await;
    let (mut ws, _) = join(s.addr, &token("calm", "alice")).await;
    let in0 = metric(s.addr, "moselle_udp_datagrams_in_total").await;
    let unr0 = metric(s.addr, "moselle_udp_unroutable_total").await;

    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], s.running.udp_port));
    for (i, d) in garbage_datagrams(N).iter().enumerate() {
        sock.send_to(d, target).await.unwrap();
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // Let the engine drain its socket.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut got_in = 0;
    while tokio::time::Instant::now() < deadline {
        got_in = metric(s.addr, "moselle_udp_datagrams_in_total").await - in0;
        if got_in >= N as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let unroutable = metric(s.addr, "moselle_udp_unroutable_total").await - unr0;
    assert!(
        got_in >= (N as u64) * 95 / 100 && got_in <= N as u64 + 10,
        "moselle_udp_datagrams_in_total grew by {got_in}, sent {N}"
    );
    assert!(
        unroutable + 5 >= got_in && unroutable <= got_in,
        "moselle_udp_unroutable_total grew by {unroutable} for {got_in} datagrams in"
    );
    assert_eq!(healthz(s.addr).await, 200, "/healthz after UDP garbage");
    ping(&mut ws, 5150).await;
    assert_eq!(metric(s.addr, "moselle_participants").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_identity_replaces_the_first_session() {
    let s = start().await;
    let (mut first, jr1) = join(s.addr, &token("dup", "same-person")).await;
    ping(&mut first, 1).await;
    let (mut second, jr2) = join(s.addr, &token("dup", "same-person")).await;
    let (p1, p2) = (jr1.participant.unwrap(), jr2.participant.unwrap());
    assert_eq!(p2.identity, "same-person");
    assert_ne!(p1.sid, p2.sid, "the new session gets a new participant sid");
    assert!(
        !jr2.other_participants
            .iter()
            .any(|p| p.identity == "same-person"),
        "the replaced session is not listed as another participant"
    );

    let (m, _) = recv_until(&mut first, "Leave on the replaced session", |m| {
        matches!(m, Resp::Leave(_))
    })
    .await;
    let Resp::Leave(l) = m else { unreachable!() };
    assert_eq!(
        l.reason,
        lk::DisconnectReason::DuplicateIdentity as i32,
        "Leave reason"
    );
    // Then the socket closes.
    let end = loop {
        match next(&mut first, WAIT).await {
            Got::Signal(_) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(end, Got::Close(..) | Got::Ended(_)),
        "replaced session should close, got {end:?}"
    );
    ping(&mut second, 2).await;
    assert_eq!(metric(s.addr, "moselle_participants").await, 1);
}
