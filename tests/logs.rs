//! `moselle serve --log-json`: JSON lines, and no IP address at info level
//! while clients come and go.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use moselle::signaling::proto as lk;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// Where the test client connects from: a loopback address of its own, so
/// it can be told apart from the server's.
const CLIENT_IP: &str = "127.0.0.3";

fn free_ports() -> (u16, u16) {
    let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    (
        t.local_addr().unwrap().port(),
        u.local_addr().unwrap().port(),
    )
}

/// Dotted-quad IPv4 addresses anywhere in `s`.
fn ipv4s(s: &str) -> Vec<String> {
    let mut found = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() && (i == 0 || !(b[i - 1].is_ascii_digit() || b[i - 1] == b'.')) {
            let mut j = i;
            let mut parts = 0;
            loop {
                let start = j;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
                if j == start || j - start > 3 {
                    break;
                }
                parts += 1;
                if parts == 4 || j >= b.len() || b[j] != b'.' {
                    break;
                }
                j += 1;
            }
            if parts == 4 {
                found.push(s[i..j].to_string());
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    found
}

/// A WebSocket join made from CLIENT_IP.
async fn join_from_client_ip(addr: SocketAddr, token: &str) -> Ws {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{CLIENT_IP}:0").parse().unwrap())
        .unwrap();
    let stream = sock.connect(addr).await.unwrap();
    let mut req = format!("ws://{addr}{}", v1_path())
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    let (ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Plain(stream)),
    )
    .await
    .expect("connect timed out")
    .expect("upgrade refused");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_log_json_has_json_lines_and_no_ip_addresses() {
    let (http_port, udp_port) = free_ports();
    let mut child = Command::new(env!("CARGO_BIN_EXE_moselle"))
        .args(["serve", "--dev", "--log-json", "--bind", "127.0.0.1"])
        .args(["--http-port", &http_port.to_string()])
        .args(["--udp-port", &udp_port.to_string()])
        .args(["--tcp-port", "0"])
        .env_remove("RUST_LOG")
        .env_remove("MOSELLE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn moselle serve");
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let readers: Vec<_> = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .into_iter()
    .map(|r| {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(r).lines() {
                let Ok(l) = l else { break };
                lines.lock().unwrap().push(l);
            }
        })
    })
    .collect();

    let addr: SocketAddr = ([127, 0, 0, 1], http_port).into();
    let result = tokio::time::timeout(Duration::from_secs(8), async {
        // Up?
        let mut up = false;
        for _ in 0..100 {
            if let Ok(r) = http().get(format!("http://{addr}/healthz")).send().await {
                if r.status().as_u16() == 200 {
                    up = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(up, "server did not answer /healthz");
        let startup = lines.lock().unwrap().len();

        // A client connects, talks, leaves; another is refused.
        let mut ws = join_from_client_ip(addr, &token("logroom", "logger")).await;
        ping(&mut ws, 1).await;
        let from_client = reqwest::Client::builder()
            .local_address(CLIENT_IP.parse::<std::net::IpAddr>().ok())
            .timeout(WAIT)
            .no_proxy()
            .build()
            .unwrap();
        let r = from_client
            .get(format!(
                "http://{addr}/rtc/v1/validate?join_request={}",
                join_request_b64()
            ))
            .bearer_auth(bad_token())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "bad token refused");
        send(&mut ws, Req::Leave(lk::LeaveRequest::default())).await;
        let _ = ws.close(None).await;
        // Let the server log the departure.
        for _ in 0..50 {
            if lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("participant left"))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        startup
    })
    .await;

    let _ = child.kill();
    let _ = child.wait();
    for r in readers {
        let _ = r.join();
    }
    let startup = result.expect("test timed out");
    let lines = lines.lock().unwrap().clone();
    let all = lines.join("\n");

    assert!(!lines.is_empty(), "no output at all");
    for l in lines.iter().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(l)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}\n--- all output:\n{all}"));
        assert!(v.is_object() && v.get("level").is_some(), "log line: {l}");
    }
    // The window did log the session (so the check below looks at something).
    let window = &lines[startup..];
    assert!(
        window.iter().any(|l| l.contains("participant joined")),
        "no 'participant joined' line while the client was connected:\n{all}"
    );
    for l in &lines {
        let ips = ipv4s(l);
        assert!(
            ips.is_empty() && !l.contains(CLIENT_IP) && !l.contains("127.0.0.1"),
            "IP address {ips:?} logged at info level: {l}"
        );
    }
    assert!(
        !all.contains(CLIENT_IP),
        "the client's address {CLIENT_IP} appears in the logs:\n{all}"
    );
}

/// A token for the dev key signed with the wrong secret.
fn bad_token() -> String {
    moselle::signaling::token::KeySet::new([(KEY.to_string(), "nope".to_string())].into())
        .mint(KEY, &claims("logroom", "intruder"))
        .unwrap()
}

#[test]
fn ipv4_finder_finds_addresses() {
    assert_eq!(
        ipv4s(r#"{"a":"127.0.0.1:7880","v":"1.9.0","b":"10.1.2.3"}"#),
        vec!["127.0.0.1", "10.1.2.3"]
    );
    assert!(ipv4s("version 1.9.0 at 12:00").is_empty());
}
