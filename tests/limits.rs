//! Per-participant limits (`[limits]`): each refusal is a RequestResponse
//! with LIMIT_EXCEEDED naming the limit, counted by label, and harms
//! nobody else. (Data packets need a data channel: tests/python.)

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use lk::signal_request::Message as Req;
use lk::signal_response::Message as Resp;
use moselle::signaling::proto as lk;
use prost::Message as _;
use tokio_tungstenite::tungstenite::Message;

fn add_track(cid: &str) -> Req {
    Req::AddTrack(lk::AddTrackRequest {
        cid: cid.into(),
        name: cid.into(),
        r#type: lk::TrackType::Audio as i32,
        source: lk::TrackSource::Microphone as i32,
        ..Default::default()
    })
}

fn limit_exceeded(m: &Resp) -> Option<&lk::RequestResponse> {
    match m {
        Resp::RequestResponse(r)
            if r.reason == lk::request_response::Reason::LimitExceeded as i32 =>
        {
            Some(r)
        }
        _ => None,
    }
}

async fn refusals(addr: std::net::SocketAddr, limit: &str) -> u64 {
    metric(
        addr,
        &format!("moselle_limit_refusals_total{{limit=\"{limit}\"}}"),
    )
    .await
}

fn with_metadata_grant(room: &str, identity: &str) -> String {
    let mut c = claims(room, identity);
    if let Some(v) = c.video.as_mut() {
        v.can_update_own_metadata = Some(true);
    }
    mint(&c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_publishes_at_most_its_track_limit() {
    let s = start_with(|c| c.limits.tracks_per_participant = 3).await;
    let (mut ws, _) = join(s.addr, &token("tracks", "alice")).await;
    for i in 0..3 {
        send(&mut ws, add_track(&format!("mic-{i}"))).await;
        recv_until(&mut ws, "TrackPublished", |m| {
            matches!(m, Resp::TrackPublished(_))
        })
        .await;
    }
    send(&mut ws, add_track("mic-3")).await;
    let (m, _) = recv_until(&mut ws, "the fourth track's refusal", |m| {
        matches!(m, Resp::RequestResponse(_) | Resp::TrackPublished(_))
    })
    .await;
    let r = limit_exceeded(&m).unwrap_or_else(|| panic!("expected LIMIT_EXCEEDED, got {m:?}"));
    assert!(
        r.message.contains("3 tracks per participant"),
        "{}",
        r.message
    );
    assert!(
        matches!(&r.request, Some(lk::request_response::Request::AddTrack(a)) if a.cid == "mic-3"),
        "the refusal names the request: {:?}",
        r.request
    );
    assert_eq!(refusals(s.addr, "tracks").await, 1);
    // Still in the call.
    ping(&mut ws, 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_over_the_limit_is_refused_and_nobody_sees_it() {
    let s = start_with(|c| {
        c.limits.metadata_bytes = 1000;
        c.limits.attributes_bytes = 100;
    })
    .await;
    let (mut alice, _) = join(s.addr, &with_metadata_grant("meta", "alice")).await;
    let (mut bob, _) = join(s.addr, &token("meta", "bob")).await;
    recv_until(&mut alice, "bob's arrival", |m| {
        matches!(m, Resp::Update(_))
    })
    .await;

    let big = "x".repeat(1001);
    send(
        &mut alice,
        Req::UpdateMetadata(lk::UpdateParticipantMetadata {
            metadata: big.clone(),
            request_id: 41,
            ..Default::default()
        }),
    )
    .await;
    let (m, _) = recv_until(&mut alice, "the refusal", |m| {
        matches!(m, Resp::RequestResponse(_))
    })
    .await;
    let r = limit_exceeded(&m).unwrap_or_else(|| panic!("expected LIMIT_EXCEEDED, got {m:?}"));
    assert_eq!(r.request_id, 41);
    assert!(r.message.contains("1000 bytes"), "{}", r.message);

    // Attributes count together: 60 + 60 bytes is over 100.
    let attrs = |k: &str| {
        [(k.to_string(), "v".repeat(59))]
            .into_iter()
            .collect::<std::collections::HashMap<_, _>>()
    };
    for (id, key) in [(42, "a"), (43, "b")] {
        send(
            &mut alice,
            Req::UpdateMetadata(lk::UpdateParticipantMetadata {
                attributes: attrs(key),
                request_id: id,
                ..Default::default()
            }),
        )
        .await;
    }
    let (ok, _) = recv_until(
        &mut alice,
        "the first attribute's answer",
        |m| matches!(m, Resp::RequestResponse(r) if r.request_id == 42),
    )
    .await;
    assert!(
        limit_exceeded(&ok).is_none(),
        "60 bytes of attributes fit: {ok:?}"
    );
    let (m, _) = recv_until(
        &mut alice,
        "the second attribute's answer",
        |m| matches!(m, Resp::RequestResponse(r) if r.request_id == 43),
    )
    .await;
    let r = limit_exceeded(&m).unwrap_or_else(|| panic!("expected LIMIT_EXCEEDED, got {m:?}"));
    assert!(r.message.contains("120 bytes"), "{}", r.message);

    // Bob saw the attribute that fitted, never the refused changes.
    let (m, seen) = recv_until(&mut bob, "alice's attribute", |m| {
        matches!(m, Resp::Update(u) if u.participants.iter().any(|p| p.attributes.contains_key("a")))
    })
    .await;
    for u in seen.iter().chain([&m]) {
        if let Resp::Update(u) = u {
            for p in &u.participants {
                assert_ne!(p.metadata, big, "bob saw the refused metadata");
                assert!(
                    !p.attributes.contains_key("b"),
                    "bob saw the refused attribute"
                );
            }
        }
    }
    assert_eq!(refusals(s.addr, "metadata").await, 1);
    assert_eq!(refusals(s.addr, "attributes").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_carrying_too_much_metadata_is_refused() {
    let s = start_with(|c| c.limits.metadata_bytes = 1000).await;
    let inner = lk::JoinRequest {
        client_info: Some(lk::ClientInfo {
            protocol: 16,
            ..Default::default()
        }),
        metadata: "x".repeat(1001),
        ..Default::default()
    };
    let q = moselle::signaling::join::encode_join_request(&inner);
    let t = token("joinmeta", "alice");
    let r = get(
        s.addr,
        &format!("/rtc/v1?join_request={q}&access_token={t}"),
        &[],
        true,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("1000 bytes"), "{}", r.body);
    assert_eq!(refusals(s.addr, "metadata").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signaling_flood_is_refused_then_closed_while_another_room_goes_on() {
    let s = start_with(|c| c.limits.signal_requests_per_sec = 20).await;
    let (mut flood, _) = join(s.addr, &token("flood", "mallory")).await;
    let (mut calm, _) = join(s.addr, &token("calm", "alice")).await;
    let req = lk::SignalRequest {
        message: Some(Req::TrackSetting(lk::UpdateTrackSettings {
            track_sids: vec!["TR_nothing".into()],
            width: 640,
            height: 360,
            ..Default::default()
        })),
    }
    .encode_to_vec();
    // 10,000 as fast as the socket takes them; the server may close it
    // part way (sends then fail, which is the point).
    for _ in 0..10_000 {
        if flood
            .send(Message::Binary(req.clone().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut refused = 0;
    let closed = loop {
        match next(&mut flood, Duration::from_secs(10)).await {
            Got::Signal(m) => {
                if let Some(r) = limit_exceeded(&m) {
                    assert!(
                        r.message.contains("20 requests per second"),
                        "{}",
                        r.message
                    );
                    refused += 1;
                }
            }
            Got::Close(code, reason) => break (code, reason),
            other => panic!("after {refused} refusals: {other:?}"),
        }
    };
    assert_eq!(
        closed,
        (Some(1008), "signal request rate limit exceeded".to_string())
    );
    assert!(refused >= 16, "refusals told before the close: {refused}");
    let counted = metric(
        s.addr,
        "moselle_limit_refusals_total{limit=\"signal_rate\"}",
    )
    .await;
    assert!(counted >= 17, "counted {counted}");
    // The other room's participant noticed nothing.
    for ts in 1..=5 {
        ping(&mut calm, ts).await;
    }
}
