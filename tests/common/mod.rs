//! Shared helpers for the integration tests: an in-process server, tokens,
//! v1 joins over a real WebSocket, HTTP probes and metrics.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use moselle::signaling::proto as lk;
use moselle::signaling::token::{join_claims, Claims, KeySet};
use prost::Message as _;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use lk::signal_request::Message as Req;
pub use lk::signal_response::Message as Resp;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const KEY: &str = "devkey";
pub const SECRET: &str = "secret";
/// Upper bound for any single wait on the server.
pub const WAIT: Duration = Duration::from_secs(3);

pub struct Server {
    pub running: moselle::server::Running,
    pub addr: SocketAddr,
}

/// A node on 127.0.0.1 with free ports and the dev key pair.
pub async fn start() -> Server {
    start_with(|_| {}).await
}

/// As [`start`], with the config adjusted first.
pub async fn start_with(adjust: impl FnOnce(&mut moselle::config::Config)) -> Server {
    let mut cfg = moselle::config::Config::embedded().unwrap();
    adjust(&mut cfg);
    cfg.keys.insert(KEY.into(), SECRET.into());
    cfg.dev = true; // the short dev secret
    cfg.server.bind = "127.0.0.1".parse().unwrap();
    cfg.server.http_port = 0;
    cfg.server.udp_port = 0;
    cfg.rtc.tcp_port = 0;
    let running = moselle::server::start(&cfg).await.unwrap();
    let addr = running.http_addr;
    Server { running, addr }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn keys() -> KeySet {
    KeySet::new([(KEY.to_string(), SECRET.to_string())].into())
}

pub fn claims(room: &str, identity: &str) -> Claims {
    join_claims(room, identity, Duration::from_secs(600))
}

pub fn mint(c: &Claims) -> String {
    keys().mint(KEY, c).unwrap()
}

pub fn token(room: &str, identity: &str) -> String {
    mint(&claims(room, identity))
}

/// base64url of a plain WrappedJoinRequest as current SDKs send it.
pub fn join_request_b64() -> String {
    let inner = lk::JoinRequest {
        client_info: Some(lk::ClientInfo {
            protocol: 16,
            ..Default::default()
        }),
        connection_settings: Some(lk::ConnectionSettings {
            auto_subscribe: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    moselle::signaling::join::encode_join_request(&inner)
}

pub fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn v1_path() -> String {
    format!("/rtc/v1?join_request={}", join_request_b64())
}

/// Open `/rtc/v1` with `Authorization: Bearer`, expect a JoinResponse first.
pub async fn join(addr: SocketAddr, token: &str) -> (Ws, lk::JoinResponse) {
    join_at(addr, &v1_path(), Some(token)).await
}

/// Open `path_and_query` as a WebSocket (bearer header if given) and read the
/// first message, which must be a binary SignalResponse with a JoinResponse.
pub async fn join_at(
    addr: SocketAddr,
    path_and_query: &str,
    bearer: Option<&str>,
) -> (Ws, lk::JoinResponse) {
    let url = format!("ws://{addr}{path_and_query}");
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = bearer {
        req.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
    }
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("WebSocket connect timed out")
        .expect("WebSocket upgrade refused");
    let first = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("no first message within the timeout")
        .expect("socket ended before the first message")
        .expect("socket error before the first message");
    let Message::Binary(b) = first else {
        panic!("first message is not binary: {first:?}");
    };
    let resp = lk::SignalResponse::decode(b.as_ref()).expect("first message is a SignalResponse");
    match resp.message {
        Some(Resp::Join(j)) => (ws, j),
        other => panic!("first message is not a JoinResponse: {other:?}"),
    }
}

pub async fn send(ws: &mut Ws, msg: Req) {
    let req = lk::SignalRequest { message: Some(msg) };
    tokio::time::timeout(WAIT, ws.send(Message::Binary(req.encode_to_vec().into())))
        .await
        .expect("send timed out")
        .expect("send failed");
}

/// What came off the socket.
#[derive(Debug)]
pub enum Got {
    Signal(Box<Resp>),
    Text(String),
    Close(Option<u16>, String),
    /// Stream ended or failed without a close frame.
    Ended(String),
    Timeout,
}

/// Next message, decoded; pings/pongs at the WebSocket level are skipped.
pub async fn next(ws: &mut Ws, within: Duration) -> Got {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let Ok(item) = tokio::time::timeout_at(deadline, ws.next()).await else {
            return Got::Timeout;
        };
        match item {
            None => return Got::Ended("stream ended".into()),
            Some(Err(e)) => return Got::Ended(format!("error: {e}")),
            Some(Ok(Message::Binary(b))) => {
                let r = lk::SignalResponse::decode(b.as_ref())
                    .expect("binary frame from server is a SignalResponse");
                match r.message {
                    Some(m) => return Got::Signal(Box::new(m)),
                    None => panic!("server sent an empty SignalResponse"),
                }
            }
            Some(Ok(Message::Text(t))) => return Got::Text(t.to_string()),
            Some(Ok(Message::Close(f))) => {
                return Got::Close(
                    f.as_ref().map(|f| u16::from(f.code)),
                    f.map(|f| f.reason.to_string()).unwrap_or_default(),
                )
            }
            Some(Ok(_)) => continue,
        }
    }
}

/// Read until a signal response matches; everything read is returned too.
pub async fn recv_until(
    ws: &mut Ws,
    what: &str,
    mut pred: impl FnMut(&Resp) -> bool,
) -> (Resp, Vec<Resp>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next(ws, left).await {
            Got::Signal(m) => {
                if pred(&m) {
                    return (*m, seen);
                }
                seen.push(*m);
            }
            other => panic!("waiting for {what}: got {other:?} instead (before that: {seen:?})"),
        }
    }
}

/// Send a ping_req and expect a pong_resp echoing its timestamp.
pub async fn ping(ws: &mut Ws, ts: i64) {
    send(
        ws,
        Req::PingReq(lk::Ping {
            timestamp: ts,
            rtt: 0,
        }),
    )
    .await;
    let (m, _) = recv_until(ws, "pong_resp", |m| matches!(m, Resp::PongResp(_))).await;
    let Resp::PongResp(p) = m else { unreachable!() };
    assert_eq!(
        p.last_ping_timestamp, ts,
        "pong_resp echoes the ping timestamp"
    );
    assert!(p.timestamp > 0, "pong_resp carries the server time");
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(WAIT)
        .no_proxy()
        .build()
        .unwrap()
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
    /// Assert an HTTP refusal with `{"error": label, "message": non-empty}`.
    pub fn assert_refused(&self, status: u16, label: Option<&str>, ctx: &str) {
        assert_eq!(self.status, status, "{ctx}: status (body {:?})", self.body);
        let j = self.json();
        let err = j["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{ctx}: no \"error\" string in {j}"));
        if let Some(l) = label {
            assert_eq!(err, l, "{ctx}: error label in {j}");
        }
        let msg = j["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{ctx}: no \"message\" string in {j}"));
        assert!(!msg.is_empty(), "{ctx}: empty message in {j}");
    }
}

/// GET with the headers of a WebSocket upgrade (what a client's first
/// request looks like), or a plain GET when `upgrade` is false.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)], upgrade: bool) -> Reply {
    let mut rb = http().get(format!("http://{addr}{path}"));
    if upgrade {
        rb = rb
            .header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==");
    }
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.expect("HTTP request failed");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = if status == 101 {
        String::new()
    } else {
        r.text().await.unwrap_or_default()
    };
    Reply {
        status,
        headers,
        body,
    }
}

/// `/rtc/v1/validate` with a valid join_request and the given headers.
pub async fn validate(addr: SocketAddr, query_extra: &str, headers: &[(&str, &str)]) -> Reply {
    let path = format!(
        "/rtc/v1/validate?join_request={}{query_extra}",
        join_request_b64()
    );
    get(addr, &path, headers, false).await
}

/// A WebSocket upgrade attempt on `/rtc/v1` with the given headers.
pub async fn upgrade_attempt(
    addr: SocketAddr,
    query_extra: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let path = format!("{}{query_extra}", v1_path());
    get(addr, &path, headers, true).await
}

pub async fn metrics_text(addr: SocketAddr) -> String {
    let r = http()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(r.status().as_u16(), 200, "GET /metrics status");
    r.text().await.unwrap()
}

/// One sample of the Prometheus text at /metrics.
pub async fn metric(addr: SocketAddr, name: &str) -> u64 {
    let text = metrics_text(addr).await;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix(name).and_then(|r| r.strip_prefix(' ')) {
            return v
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("metric {name} has a bad value: {line}"));
        }
    }
    panic!("metric {name} not found in /metrics:\n{text}");
}

pub async fn healthz(addr: SocketAddr) -> u16 {
    http()
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .expect("GET /healthz")
        .status()
        .as_u16()
}
