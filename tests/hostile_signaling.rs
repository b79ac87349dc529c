//! Structure-aware signaling fuzzing: several clients of one room send
//! random sequences of well-formed but hostile SignalRequests (offers out
//! of order, answers without offers, tracks that do not exist, huge
//! metadata, 10,000 AddTrackRequests, subscriptions to everything) while
//! two participants of another room keep talking. The node must stay up,
//! answer every hostile client, and the calm room must notice nothing.
//! Seeded: `MOSELLE_HOSTILE_SEED` replays a run, `MOSELLE_HOSTILE_STEPS`
//! makes it longer (the seed is printed).

// UpdateLayers is deprecated, and still sent by older clients.
#![allow(deprecated)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use lk::signal_request::Message as Req;
use lk::signal_response::Message as Resp;
use moselle::signaling::proto as lk;
use prost::Message as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_tungstenite::tungstenite::Message;

/// A browser's offer (audio and simulcast video), as livekit-client sends it.
const OFFER: &str = include_str!("../fuzz/seeds/sdp/offer");

/// Track sids the hostile clients have seen published (theirs or others').
type Seen = Arc<Mutex<Vec<String>>>;

fn sid(rng: &mut StdRng, seen: &Seen) -> String {
    let known = seen.lock().map(|s| s.clone()).unwrap_or_default();
    if !known.is_empty() && rng.random_bool(0.7) {
        known[rng.random_range(0..known.len())].clone()
    } else {
        format!("TR_{}", rng.random::<u32>())
    }
}

fn sdp(rng: &mut StdRng) -> String {
    match rng.random_range(0..5) {
        0 => OFFER.to_string(),
        1 => String::new(),
        2 => "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n".repeat(rng.random_range(1..300)),
        3 => {
            // The real offer with a line cut short somewhere.
            let cut = rng.random_range(0..OFFER.len());
            OFFER[..cut].to_string() // ASCII: any cut is a boundary
        }
        _ => OFFER.replace("a=mid:", &format!("a=mid:{}", rng.random::<u16>())),
    }
}

fn hostile(rng: &mut StdRng, seen: &Seen) -> Req {
    let sd = |rng: &mut StdRng, kind: &str| lk::SessionDescription {
        r#type: kind.into(),
        sdp: sdp(rng),
        id: rng.random(),
        ..Default::default()
    };
    match rng.random_range(0..12) {
        0 => Req::Offer(sd(rng, "offer")),
        1 => Req::Answer(sd(rng, "answer")),
        2 => Req::Trickle(lk::TrickleRequest {
            candidate_init: match rng.random_range(0..3) {
                0 => "{\"candidate\":\"candidate:1 1 udp 2122260223 192.0.2.1 50000 typ host\",\"sdpMid\":\"0\"}".into(),
                1 => "not json".into(),
                _ => format!("{{\"candidate\":\"{}\"}}", "x".repeat(rng.random_range(0..5000))),
            },
            target: rng.random_range(0..3),
            ..Default::default()
        }),
        3 => Req::AddTrack(lk::AddTrackRequest {
            cid: format!("c{}", rng.random_range(0..40)),
            name: "t".repeat(rng.random_range(0..2000)),
            r#type: rng.random_range(0..4),
            source: rng.random_range(0..6),
            width: rng.random(),
            height: rng.random(),
            layers: (0..rng.random_range(0..50))
                .map(|i| lk::VideoLayer {
                    quality: i % 4,
                    width: rng.random(),
                    height: rng.random(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        4 => Req::Mute(lk::MuteTrackRequest {
            sid: sid(rng, seen),
            muted: rng.random(),
        }),
        5 => Req::Subscription(lk::UpdateSubscription {
            track_sids: if rng.random_bool(0.5) {
                seen.lock().map(|s| s.clone()).unwrap_or_default()
            } else {
                (0..rng.random_range(0..100)).map(|_| sid(rng, seen)).collect()
            },
            subscribe: rng.random(),
            ..Default::default()
        }),
        6 => Req::TrackSetting(lk::UpdateTrackSettings {
            track_sids: vec![sid(rng, seen)],
            disabled: rng.random(),
            quality: rng.random_range(-1..5),
            width: rng.random(),
            height: rng.random(),
            fps: rng.random(),
            ..Default::default()
        }),
        7 => Req::UpdateMetadata(lk::UpdateParticipantMetadata {
            metadata: "m".repeat(rng.random_range(0..100_000)),
            name: "n".repeat(rng.random_range(0..300)),
            attributes: (0..rng.random_range(0..20))
                .map(|i| (format!("k{i}"), "v".repeat(rng.random_range(0..10_000))))
                .collect(),
            request_id: rng.random(),
        }),
        8 => Req::UpdateLayers(lk::UpdateVideoLayers {
            track_sid: sid(rng, seen),
            layers: vec![lk::VideoLayer::default(); rng.random_range(0..10)],
        }),
        9 => Req::SubscriptionPermission(lk::SubscriptionPermission {
            all_participants: rng.random(),
            ..Default::default()
        }),
        10 => Req::SyncState(lk::SyncState {
            answer: Some(sd(rng, "answer")),
            offer: Some(sd(rng, "offer")),
            ..Default::default()
        }),
        _ => Req::Simulate(lk::SimulateScenario::default()),
    }
}

fn frame(m: Req) -> Message {
    Message::Binary(
        lk::SignalRequest { message: Some(m) }
            .encode_to_vec()
            .into(),
    )
}

/// One hostile client: `steps` random requests (plus, for the first, a
/// burst of 10,000 AddTrackRequests), rejoining whenever it is closed.
async fn attack(
    addr: std::net::SocketAddr,
    n: usize,
    seed: u64,
    steps: usize,
    seen: Seen,
) -> usize {
    let mut rng = StdRng::seed_from_u64(seed ^ (n as u64) << 32);
    let mut joins = 0;
    let mut sent = 0;
    while sent < steps {
        let (ws, _) = join(addr, &token("hostile", &format!("mallory-{n}"))).await;
        joins += 1;
        let (mut tx, mut rx) = ws.split();
        let reader = {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Some(Ok(m)) = rx.next().await {
                    let Message::Binary(b) = m else { continue };
                    let Ok(r) = lk::SignalResponse::decode(b.as_ref()) else {
                        panic!("the server sent an undecodable frame");
                    };
                    if let Some(Resp::TrackPublished(t)) = r.message {
                        if let (Some(t), Ok(mut s)) = (t.track, seen.lock()) {
                            s.push(t.sid);
                        }
                    }
                }
            })
        };
        if n == 0 && joins == 1 {
            for i in 0..10_000 {
                let add = Req::AddTrack(lk::AddTrackRequest {
                    cid: format!("flood-{i}"),
                    r#type: lk::TrackType::Audio as i32,
                    ..Default::default()
                });
                if tx.send(frame(add)).await.is_err() {
                    break;
                }
            }
        }
        while sent < steps {
            sent += 1;
            let m = hostile(&mut rng, &seen);
            let leave = rng.random_ratio(1, 200);
            let m = if leave {
                Req::Leave(lk::LeaveRequest::default())
            } else {
                m
            };
            if tx.send(frame(m)).await.is_err() || leave {
                break;
            }
        }
        let _ = tx.close().await;
        let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
    }
    joins
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_signaling_harms_no_other_room() {
    let seed: u64 = std::env::var("MOSELLE_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let steps: usize = std::env::var("MOSELLE_HOSTILE_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    println!("MOSELLE_HOSTILE_SEED={seed} MOSELLE_HOSTILE_STEPS={steps}");
    // No signaling rate limit: every request reaches the room side
    // (tests/limits.rs covers the limit itself).
    let s = start_with(|c| c.limits.signal_requests_per_sec = 0).await;

    let mut calm_claims = claims("calm", "alice");
    if let Some(v) = calm_claims.video.as_mut() {
        v.can_update_own_metadata = Some(true);
    }
    let (mut alice, _) = join(s.addr, &mint(&calm_claims)).await;
    let (mut bob, _) = join(s.addr, &token("calm", "bob")).await;

    let seen: Seen = Arc::default();
    let attackers: Vec<_> = (0..4)
        .map(|n| tokio::spawn(attack(s.addr, n, seed, steps, seen.clone())))
        .collect();

    // Meanwhile the calm room talks: every change alice makes reaches bob.
    for round in 0..10 {
        ping(&mut alice, round).await;
        let word = format!("round-{round}");
        send(
            &mut alice,
            Req::UpdateMetadata(lk::UpdateParticipantMetadata {
                metadata: word.clone(),
                request_id: round as u32 + 1,
                ..Default::default()
            }),
        )
        .await;
        recv_until(
            &mut bob,
            "alice's metadata",
            |m| matches!(m, Resp::Update(u) if u.participants.iter().any(|p| p.metadata == word)),
        )
        .await;
        ping(&mut bob, round).await;
    }
    let mut joins = 0;
    for a in attackers {
        joins += a.await.expect("a hostile client's task panicked");
    }
    println!(
        "hostile clients: {joins} joins, {} track sids seen",
        seen.lock().map(|s| s.len()).unwrap_or(0)
    );
    assert_eq!(healthz(s.addr).await, 200, "the media engine stopped");
    // Still talking, and a newcomer is served.
    ping(&mut alice, 99).await;
    let (_carol, jr) = join(s.addr, &token("calm", "carol")).await;
    assert!(
        jr.other_participants.iter().any(|p| p.identity == "alice")
            && jr.other_participants.iter().any(|p| p.identity == "bob"),
        "the calm room lost someone: {:?}",
        jr.other_participants
    );
    // The flood met the track limit (or, read too slowly, ended its own
    // session: a full outbound queue closes it).
    let refused = metric(s.addr, "moselle_limit_refusals_total{limit=\"tracks\"}").await;
    println!("track-limit refusals: {refused}");
    assert!(
        refused > 0,
        "the 10,000 AddTrackRequests never met the track limit"
    );
}
