//! Room lifecycle: created on first join, closed after the departure
//! timeout, refused when auto-create is off or the room is full.

mod common;

use std::time::{Duration, Instant};

use common::*;
use lk::signal_request::Message as Req;
use moselle::signaling::proto as lk;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_closes_after_last_participant_leaves() {
    let s = start_with(|c| c.room.departure_timeout_secs = 1).await;
    let (mut ws, _join) = join(s.addr, &token("lifecycle", "alice")).await;
    assert_eq!(metric(s.addr, "moselle_rooms").await, 1);
    assert_eq!(metric(s.addr, "moselle_participants").await, 1);
    send(&mut ws, Req::Leave(lk::LeaveRequest::default())).await;
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rooms = metric(s.addr, "moselle_rooms").await;
        let parts = metric(s.addr, "moselle_participants").await;
        if rooms == 0 && parts == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "room still open 5 s after its only participant left (rooms={rooms}, participants={parts})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_stays_open_while_someone_is_in_it() {
    let s = start_with(|c| c.room.departure_timeout_secs = 1).await;
    let (_a, _) = join(s.addr, &token("busy", "alice")).await;
    let (mut b, _) = join(s.addr, &token("busy", "bob")).await;
    send(&mut b, Req::Leave(lk::LeaveRequest::default())).await;
    drop(b);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        metric(s.addr, "moselle_rooms").await,
        1,
        "room closed with alice still in it"
    );
    assert_eq!(metric(s.addr, "moselle_participants").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_create_an_unknown_room_is_404() {
    let s = start_with(|c| c.room.auto_create = false).await;
    let t = token("nowhere", "alice");
    let r = validate(s.addr, &format!("&access_token={t}"), &[]).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.body.contains("room_not_found"), "{}", r.body);
    let r = upgrade_attempt(s.addr, &format!("&access_token={t}"), &[]).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(
        r.body.contains("requested room does not exist"),
        "{}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_room_refuses_the_next_join() {
    let s = start_with(|c| c.room.max_participants = 1).await;
    let (_a, _) = join(s.addr, &token("small", "alice")).await;
    let t = token("small", "bob");
    let r = upgrade_attempt(s.addr, &format!("&access_token={t}"), &[]).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("room_full"), "{}", r.body);
}

/// Clients resume only sessions whose media connected; a socket closed
/// before that (Element Call cancels a probe connection at once) leaves no
/// ghost behind for the resume window. (Resuming a session whose media
/// connected: tests/browser/reconnect.test.mjs, tests/python.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_closed_before_media_connected_is_removed_at_once() {
    let s = start_with(|c| {
        c.room.resume_window_secs = 20;
        c.room.departure_timeout_secs = 1;
    })
    .await;
    let (_a, _) = join(s.addr, &token("drop", "alice")).await;
    let (b, _) = join(s.addr, &token("drop", "bob")).await;
    assert_eq!(metric(s.addr, "moselle_participants").await, 2);
    drop(b); // no Leave, no media ever
    let deadline = Instant::now() + Duration::from_secs(3);
    while metric(s.addr, "moselle_participants").await != 1 {
        assert!(
            Instant::now() < deadline,
            "bob, who never connected media, is kept as a ghost"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Several forwarding workers each own some rooms; the gauges are the sum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauges_sum_over_workers() {
    let s = start_with(|c| c.rtc.workers = 3).await;
    let mut keep = Vec::new();
    for (room, who) in [
        ("r-one", "a"),
        ("r-two", "b"),
        ("r-three", "c"),
        ("r-one", "d"),
    ] {
        keep.push(join(s.addr, &token(room, who)).await);
    }
    // Housekeeping (every 500 ms) on a worker without rooms must not reset them.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(metric(s.addr, "moselle_rooms").await, 3);
    assert_eq!(metric(s.addr, "moselle_participants").await, 4);
}

/// A client that gives up while its join is still being answered (Element
/// Call drops its probe connection when its own token arrives; the HTTP
/// server then drops the request) leaves no participant behind: the join
/// the media engine made for it is undone, although no socket ever came up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_abandoned_before_the_upgrade_leaves_no_ghost() {
    use tokio::io::AsyncWriteExt;
    let s = start_with(|c| {
        c.room.resume_window_secs = 20;
        c.room.departure_timeout_secs = 1;
    })
    .await;
    let (_a, _) = join(s.addr, &token("abandon", "alice")).await;
    for i in 0..40 {
        let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Authorization: Bearer {}\r\n\r\n",
            v1_path(),
            s.addr,
            token("abandon", &format!("probe-{i}"))
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        drop(tcp); // gone before any answer
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let n = metric(s.addr, "moselle_participants").await;
        if n == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} abandoned joins are kept as participants",
            n - 1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
