//! TURN servers as clients and operators see them: only what is configured
//! is handed out, with coturn REST-API credentials, and a TURN server
//! outside the allowed jurisdictions stops the node from starting.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use moselle::transport::turn::{rest_api_password, TurnConfig};

fn secret_file(name: &str, secret: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("moselle-turn-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join(name);
    std::fs::write(&f, format!("{secret}\n")).unwrap();
    f
}

#[tokio::test]
async fn join_response_holds_nothing_unconfigured() {
    let s = start().await;
    let (_ws, jr) = join(s.addr, &token("r-none", "alice")).await;
    assert!(
        jr.ice_servers.is_empty(),
        "no [[turn]] configured, yet the client was given {:?}",
        jr.ice_servers
    );
}

#[tokio::test]
async fn join_response_carries_configured_turn_with_rest_api_credentials() {
    let f = secret_file("lu", "lu-shared-secret");
    let s = start_with(|c| {
        c.turn = vec![
            TurnConfig {
                urls: vec![
                    "turns:turn.example.lu:443?transport=tcp".into(),
                    "turn:turn.example.lu:3478".into(),
                ],
                secret_file: f.clone(),
                ttl_secs: 600,
                jurisdiction: "LU".into(),
            },
            // Allowed, but not where this node is: not handed out here.
            TurnConfig {
                urls: vec!["turn:turn.example.be:3478".into()],
                secret_file: f.clone(),
                ttl_secs: 600,
                jurisdiction: "BE".into(),
            },
        ];
        c.cluster.allowed_jurisdictions = vec!["LU".into(), "BE".into()];
    })
    .await;
    let (_ws, jr) = join(s.addr, &token("r-turn", "alice")).await;
    let sid = jr.participant.as_ref().unwrap().sid.clone();
    assert_eq!(jr.ice_servers.len(), 1, "{:?}", jr.ice_servers);
    let ice = &jr.ice_servers[0];
    assert_eq!(
        ice.urls,
        [
            "turns:turn.example.lu:443?transport=tcp",
            "turn:turn.example.lu:3478"
        ]
    );
    let (expiry, who) = ice.username.split_once(':').expect("<expiry>:<sid>");
    assert_eq!(who, sid);
    let expiry: u64 = expiry.parse().unwrap();
    let now = now_secs();
    assert!(
        (now + 590..=now + 610).contains(&expiry),
        "expiry {expiry}, now {now}"
    );
    assert_eq!(
        ice.credential,
        rest_api_password("lu-shared-secret", &ice.username)
    );
}

/// Run `moselle serve` on a config; returns (exit success, stderr).
fn serve_once(config: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("moselle-turn-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("moselle.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_moselle"))
        .args(["serve", "--dev", "--http-port", "0", "--udp-port", "0"])
        .args(["--tcp-port", "0", "--bind", "127.0.0.1", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A node that starts keeps running: give it a moment, then stop it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Some(_status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into(),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (true, String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn a_turn_server_in_another_jurisdiction_stops_the_node() {
    let f = secret_file("de", "x");
    let cfg = format!(
        "{}\n[[turn]]\nurls = [\"turns:turn.example.de:443?transport=tcp\"]\nsecret_file = {:?}\njurisdiction = \"DE\"\n",
        moselle::config::EMBEDDED_DEFAULT,
        f.display().to_string()
    );
    let (ok, stderr) = serve_once(&cfg);
    assert!(!ok, "the node started with a TURN server in DE: {stderr}");
    assert!(
        stderr.contains("turn.example.de")
            && stderr.contains("outside cluster.allowed_jurisdictions"),
        "the error must name the entry and why: {stderr}"
    );

    // A public STUN server is refused outright.
    let cfg = format!(
        "{}\n[[turn]]\nurls = [\"stun:stun.l.google.com:19302\"]\nsecret_file = {:?}\njurisdiction = \"LU\"\n",
        moselle::config::EMBEDDED_DEFAULT,
        f.display().to_string()
    );
    let (ok, stderr) = serve_once(&cfg);
    assert!(!ok, "the node started handing out a STUN server: {stderr}");
    assert!(stderr.contains("no STUN server"), "{stderr}");

    // A missing secret file is named.
    let cfg = format!(
        "{}\n[[turn]]\nurls = [\"turn:turn.example.lu:3478\"]\nsecret_file = \"/nonexistent/secret\"\njurisdiction = \"LU\"\n",
        moselle::config::EMBEDDED_DEFAULT,
    );
    let (ok, stderr) = serve_once(&cfg);
    assert!(!ok, "the node started without its TURN secret: {stderr}");
    assert!(stderr.contains("/nonexistent/secret"), "{stderr}");
}

/// The first SignalResponse on `path` (no JoinResponse expected).
async fn first_response(addr: std::net::SocketAddr, path: &str) -> Resp {
    use futures_util::StreamExt;
    use prost::Message as _;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}"))
        .await
        .expect("upgrade");
    let first = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("a first message")
        .expect("socket open")
        .expect("no socket error");
    let tokio_tungstenite::tungstenite::Message::Binary(b) = first else {
        panic!("not binary: {first:?}")
    };
    moselle::signaling::proto::SignalResponse::decode(b.as_ref())
        .expect("SignalResponse")
        .message
        .expect("a message")
}

#[tokio::test]
async fn a_resume_gets_fresh_turn_credentials() {
    let f = secret_file("resume", "resume-secret");
    let s = start_with(|c| {
        c.turn = vec![TurnConfig {
            urls: vec!["turns:turn.example.lu:443?transport=tcp".into()],
            secret_file: f.clone(),
            ttl_secs: 900,
            jurisdiction: "LU".into(),
        }];
    })
    .await;
    let tok = token("r-resume", "alice");
    let (_ws, jr) = join(s.addr, &tok).await;
    let sid = jr.participant.unwrap().sid;
    let path = format!("/rtc?access_token={tok}&reconnect=1&sid={sid}&protocol=16");
    let Resp::Reconnect(rr) = first_response(s.addr, &path).await else {
        panic!("a resume is answered with a ReconnectResponse first")
    };
    assert_eq!(rr.ice_servers.len(), 1, "{:?}", rr.ice_servers);
    let ice = &rr.ice_servers[0];
    assert_eq!(ice.urls, ["turns:turn.example.lu:443?transport=tcp"]);
    assert!(
        ice.username.ends_with(&format!(":{sid}")),
        "{}",
        ice.username
    );
    assert_eq!(
        ice.credential,
        rest_api_password("resume-secret", &ice.username)
    );
}
