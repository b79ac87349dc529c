//! Token grants as a client sees them over the WebSocket.

mod common;

use std::time::Duration;

use common::*;
use moselle::signaling::proto as lk;

fn add_track(cid: &str, kind: lk::TrackType, source: lk::TrackSource) -> Req {
    Req::AddTrack(lk::AddTrackRequest {
        cid: cid.into(),
        name: cid.into(),
        r#type: kind as i32,
        source: source as i32,
        ..Default::default()
    })
}

/// Everything the server sends within `quiet` (stops at close/end).
async fn drain(ws: &mut Ws, quiet: Duration) -> Vec<Resp> {
    let mut out = Vec::new();
    while let Got::Signal(m) = next(ws, quiet).await {
        out.push(*m);
    }
    out
}

fn expect_refusal(m: &Resp, reason: lk::request_response::Reason, mention: &str) {
    let Resp::RequestResponse(r) = m else {
        panic!("expected a RequestResponse, got {m:?}")
    };
    assert_eq!(
        r.reason, reason as i32,
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
async fn can_publish_false_refuses_add_track() {
    let s = start().await;
    let mut c = claims("viewers", "watcher");
    c.video.as_mut().unwrap().can_publish = Some(false);
    let (mut ws, jr) = join(s.addr, &mint(&c)).await;
    let perm = jr.participant.unwrap().permission.unwrap();
    assert!(!perm.can_publish, "permission.can_publish in JoinResponse");
    assert!(perm.can_subscribe, "canSubscribe defaults to true");

    send(
        &mut ws,
        add_track("mic-1", lk::TrackType::Audio, lk::TrackSource::Microphone),
    )
    .await;
    let (m, before) = recv_until(&mut ws, "RequestResponse", |m| {
        matches!(m, Resp::RequestResponse(_) | Resp::TrackPublished(_))
    })
    .await;
    expect_refusal(&m, lk::request_response::Reason::NotAllowed, "canPublish");
    ping(&mut ws, 11).await;
    let after = drain(&mut ws, Duration::from_millis(300)).await;
    for m in before.iter().chain(after.iter()) {
        assert!(
            !matches!(m, Resp::TrackPublished(_)),
            "a refused track was published: {m:?}"
        );
    }
    assert_eq!(metric(s.addr, "moselle_tracks").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn can_publish_sources_limits_sources() {
    let s = start().await;
    let mut c = claims("radio", "speaker");
    c.video.as_mut().unwrap().can_publish_sources = vec!["microphone".into()];
    let (mut ws, jr) = join(s.addr, &mint(&c)).await;
    let perm = jr.participant.unwrap().permission.unwrap();
    assert!(perm.can_publish);
    assert_eq!(
        perm.can_publish_sources,
        vec![lk::TrackSource::Microphone as i32],
        "permission.can_publish_sources"
    );

    send(
        &mut ws,
        add_track("cam-1", lk::TrackType::Video, lk::TrackSource::Camera),
    )
    .await;
    let (m, _) = recv_until(&mut ws, "answer to camera AddTrackRequest", |m| {
        matches!(m, Resp::RequestResponse(_) | Resp::TrackPublished(_))
    })
    .await;
    expect_refusal(
        &m,
        lk::request_response::Reason::NotAllowed,
        "canPublishSources",
    );

    send(
        &mut ws,
        add_track("mic-1", lk::TrackType::Audio, lk::TrackSource::Microphone),
    )
    .await;
    let (m, _) = recv_until(&mut ws, "answer to microphone AddTrackRequest", |m| {
        matches!(m, Resp::RequestResponse(_) | Resp::TrackPublished(_))
    })
    .await;
    let Resp::TrackPublished(tp) = m else {
        panic!("microphone should be accepted, got {m:?}")
    };
    assert_eq!(tp.cid, "mic-1", "TrackPublishedResponse echoes the cid");
    let track = tp.track.expect("TrackPublishedResponse.track");
    assert!(track.sid.starts_with("TR_"), "track sid {:?}", track.sid);
    assert_eq!(track.source, lk::TrackSource::Microphone as i32);
    assert_eq!(track.r#type, lk::TrackType::Audio as i32);
    ping(&mut ws, 12).await;
}
