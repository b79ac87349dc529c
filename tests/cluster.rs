//! Many nodes on a real Redis: rooms are placed only in allowed
//! jurisdictions (two `LU` nodes, one `DE`, policy `["LU"]`), spread by
//! load, agreed on under concurrent first joins, re-placed when a node
//! dies, refused when no allowed node is left; a Redis outage does not cut
//! running calls. Nodes run as separate `moselle` processes so they can be
//! killed like real ones.

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use lk::signal_request::Message as Req;
use moselle::signaling::proto as lk;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Redis {
    child: Child,
    port: u16,
}

fn spawn_redis(port: u16) -> Child {
    Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (Debian package redis-server)")
}

impl Redis {
    fn start() -> Redis {
        let port = free_port();
        let child = spawn_redis(port);
        let r = Redis { child, port };
        r.wait_up();
        r
    }

    fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.kill();
        self.child = spawn_redis(self.port);
        self.wait_up();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Node {
    child: Child,
    id: String,
    addr: SocketAddr,
    _dir: PathBuf,
}

impl Node {
    fn start(id: &str, jurisdiction: &str, redis: &str) -> Node {
        let http = free_port();
        let dir = std::env::temp_dir().join(format!("moselle-cluster-{id}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = moselle::config::EMBEDDED_DEFAULT
            .replace("node_id = \"moselle-1\"", &format!("node_id = \"{id}\""))
            .replace(
                "jurisdiction = \"LU\"",
                &format!("jurisdiction = \"{jurisdiction}\""),
            )
            .replace("redis_url = \"\"", &format!("redis_url = \"{redis}\""))
            .replace("heartbeat_secs = 2", "heartbeat_secs = 1")
            .replace("node_ttl_secs = 6", "node_ttl_secs = 3")
            .replace("bind = \"0.0.0.0\"", "bind = \"127.0.0.1\"")
            .replace("http_port = 7880", &format!("http_port = {http}"))
            .replace("udp_port = 7882", "udp_port = 0")
            .replace("tcp_port = 7881", "tcp_port = 0");
        let cfg = dir.join("moselle.toml");
        std::fs::write(&cfg, text).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_moselle"))
            .args(["serve", "--dev", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "node {id} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Node {
            child,
            id: id.to_string(),
            addr,
            _dir: dir,
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Which node a join for `room` through `via` ends up on: the node itself
/// (101 upgrade), or the one a 409 names.
async fn placed_via(
    via: &Node,
    room: &str,
    ids: &HashMap<String, String>,
) -> Result<String, Reply> {
    let t = token(room, &format!("u-{room}-{}", via.id));
    let r = upgrade_attempt(via.addr, &format!("&access_token={t}"), &[]).await;
    match r.status {
        101 => Ok(via.id.clone()),
        409 => {
            let msg = r.json()["message"].as_str().unwrap_or_default().to_string();
            ids.keys()
                .find(|id| msg.contains(&format!("node {id} ")))
                .cloned()
                .ok_or(r)
        }
        _ => Err(r),
    }
}

fn ids(nodes: &[&Node]) -> HashMap<String, String> {
    nodes
        .iter()
        .map(|n| (n.id.clone(), n.addr.to_string()))
        .collect()
}

async fn admin_rooms(addr: SocketAddr) -> serde_json::Value {
    let mut c = claims("", "auditor");
    if let Some(v) = c.video.as_mut() {
        v.room_join = false;
        v.room_list = true;
    }
    let r = get(
        addr,
        "/admin/rooms",
        &[("Authorization", &format!("Bearer {}", mint(&c)))],
        false,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_stay_in_lu_spread_by_load_agree_and_fail_closed() {
    let redis = Redis::start();
    let mut lu1 = Node::start("lu-1", "LU", &redis.url());
    let lu2 = Node::start("lu-2", "LU", &redis.url());
    let de1 = Node::start("de-1", "DE", &redis.url());
    tokio::time::sleep(Duration::from_millis(1500)).await; // first heartbeats
    let all = ids(&[&lu1, &lu2, &de1]);

    // Twenty rooms, asked for through every node in turn: all on LU nodes.
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for i in 0..20 {
        let via = [&de1, &lu1, &lu2][i % 3];
        let node = placed_via(via, &format!("room-{i}"), &all)
            .await
            .unwrap_or_else(|r| panic!("room-{i} via {}: {} {}", via.id, r.status, r.body));
        *per_node.entry(node).or_default() += 1;
    }
    assert!(
        !per_node.contains_key("de-1"),
        "a room was placed in DE: {per_node:?}"
    );
    let (a, b) = (
        per_node.get("lu-1").copied().unwrap_or(0),
        per_node.get("lu-2").copied().unwrap_or(0),
    );
    assert_eq!(a + b, 20);
    assert!(
        a.abs_diff(b) <= 2,
        "rooms must spread by load: {per_node:?}"
    );

    // The audit lists every room with its node and jurisdiction.
    let audit = admin_rooms(de1.addr).await;
    let rooms = audit["rooms"].as_array().unwrap();
    assert_eq!(rooms.len(), 20, "{audit}");
    assert!(rooms.iter().all(|r| r["jurisdiction"] == "LU"), "{audit}");

    // Concurrent first joins to one room, through all nodes: one answer.
    let mut joins = Vec::new();
    for k in 0..9 {
        let via = [&de1, &lu1, &lu2][k % 3];
        joins.push(placed_via(via, "contended", &all));
    }
    let results = futures_util::future::join_all(joins).await;
    let chosen: std::collections::HashSet<String> = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|r| panic!("{} {}", r.status, r.body)))
        .collect();
    assert_eq!(chosen.len(), 1, "concurrent joins disagree: {chosen:?}");
    assert!(!chosen.contains("de-1"));

    // lu-1 dies: after its heartbeat lapses, new rooms go to lu-2, never DE,
    // and lu-1's rooms are placed again (on lu-2) at their next join.
    let lu1_room = (0..20)
        .map(|i| format!("room-{i}"))
        .find(|r| {
            rooms
                .iter()
                .any(|x| x["room"] == r.as_str() && x["node"] == "lu-1")
        })
        .expect("lu-1 held a room");
    lu1.kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    // The audit keeps a dead node's rooms, in the jurisdiction they were
    // placed in, until they are placed again.
    let audit = admin_rooms(de1.addr).await;
    let rows = audit["rooms"].as_array().unwrap();
    assert!(
        rows.iter().all(|r| r["jurisdiction"] == "LU"),
        "every row keeps its jurisdiction after lu-1 died: {audit}"
    );
    assert!(
        rows.iter()
            .any(|r| r["room"] == lu1_room.as_str() && r["node"] == "lu-1"),
        "{audit}"
    );
    for i in 0..5 {
        let node = placed_via(&de1, &format!("after-{i}"), &all)
            .await
            .unwrap_or_else(|r| panic!("{} {}", r.status, r.body));
        assert_eq!(node, "lu-2");
    }
    let again = placed_via(&de1, &lu1_room, &all)
        .await
        .unwrap_or_else(|r| panic!("{} {}", r.status, r.body));
    assert_eq!(
        again, "lu-2",
        "a dead node's room is placed again in the same jurisdiction"
    );
    let audit = admin_rooms(de1.addr).await;
    let row = audit["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["room"] == lu1_room.as_str())
        .cloned();
    assert_eq!(
        row.map(|r| (r["node"].clone(), r["jurisdiction"].clone())),
        Some(("lu-2".into(), "LU".into())),
        "the audit names the node the room was placed on again: {audit}"
    );

    // Both LU nodes gone: a clear refusal, never DE.
    drop(lu2);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let t = token("orphan", "u");
    let r = upgrade_attempt(de1.addr, &format!("&access_token={t}"), &[]).await;
    r.assert_refused(503, Some("no_eligible_node"), "no LU node left");
    assert!(r.body.contains("LU"), "{}", r.body);
    let m = metrics_text(de1.addr).await;
    assert!(
        m.lines().any(|l| l
            .starts_with("moselle_placements_refused_total{reason=\"no_eligible_node\"}")
            && !l.ends_with(" 0")),
        "refusals are counted:\n{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_does_not_cut_running_calls() {
    let mut redis = Redis::start();
    let lu = Node::start("lu-solo", "LU", &redis.url());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut alice, _) = join(lu.addr, &token("call", "alice")).await;

    redis.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The call goes on: signaling answers, and others can join the open room.
    ping(&mut alice, 42).await;
    let (mut bob, jr) = join(lu.addr, &token("call", "bob")).await;
    assert_eq!(jr.other_participants.len(), 1, "bob joins the running call");
    ping(&mut bob, 7).await;
    // A new room cannot be placed: a clear error, not a silent local room.
    let t = token("new-room", "carol");
    let r = upgrade_attempt(lu.addr, &format!("&access_token={t}"), &[]).await;
    r.assert_refused(503, Some("unavailable"), "placement while Redis is down");

    // Redis back: placements resume (after the next heartbeat).
    redis.restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = token("new-room", "carol");
    let r = upgrade_attempt(lu.addr, &format!("&access_token={t}"), &[]).await;
    assert_eq!(r.status, 101, "{}", r.body);
    ping(&mut alice, 43).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_no_new_rooms_running_calls_go_on_then_exit() {
    let redis = Redis::start();
    let mut a = Node::start("drain-a", "LU", &redis.url());
    let b = Node::start("drain-b", "LU", &redis.url());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let all = ids(&[&a, &b]);
    // A call on node a (equal loads: ties go to the lower id, a).
    let (mut alice, _) = join(a.addr, &token("ongoing", "alice")).await;

    // SIGTERM: a takes no new rooms (they go to b), the call on a goes on.
    // SAFETY: sending a signal to a child process we own.
    unsafe {
        libc::kill(a.child.id() as i32, libc::SIGTERM);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await; // next heartbeat says draining
    for i in 0..3 {
        let n = placed_via(&b, &format!("fresh-{i}"), &all)
            .await
            .unwrap_or_else(|r| panic!("{} {}", r.status, r.body));
        assert_eq!(n, "drain-b", "a draining node takes no new rooms");
    }
    ping(&mut alice, 1).await;
    assert!(
        a.child.try_wait().unwrap().is_none(),
        "node a keeps serving its call"
    );

    // The call ends: node a exits by itself.
    send(&mut alice, Req::Leave(lk::LeaveRequest::default())).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = a.child.try_wait().unwrap() {
            assert!(status.success(), "drained node exits cleanly: {status:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node a did not exit after its last call ended"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.kill();
}
