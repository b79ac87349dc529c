//! One client's WebSocket: frames in and out, pings answered here, every
//! other request handed to the room side through its [`SessionLink`].

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use livekit_protocol as lk;
use lk::signal_request::Message as Req;
use lk::signal_response::Message as Resp;
use prost::Message as _;

use crate::backend::{Backend, OutboundRx, Outgoing, SessionLink, SignalCounters};
use crate::rate::TokenBucket;

/// Undecodable frames tolerated before the session is closed.
const MAX_STRIKES: u32 = 16;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Clone, Copy, PartialEq)]
enum Encoding {
    Binary,
    Json,
}

fn encode(msg: Resp, enc: Encoding) -> Option<Message> {
    let resp = lk::SignalResponse { message: Some(msg) };
    match enc {
        Encoding::Binary => Some(Message::Binary(resp.encode_to_vec().into())),
        Encoding::Json => serde_json::to_string(&resp)
            .ok()
            .map(|s| Message::Text(s.into())),
    }
}

fn error_response(message: &str) -> Resp {
    Resp::RequestResponse(lk::RequestResponse {
        reason: lk::request_response::Reason::InvalidRequest as i32,
        message: message.to_string(),
        ..Default::default()
    })
}

pub async fn run_session(
    socket: WebSocket,
    mut link: Box<dyn SessionLink>,
    mut out: OutboundRx,
    backend: Arc<dyn Backend>,
    ping_timeout_secs: u64,
) {
    let counters: &SignalCounters = backend.counters();
    SignalCounters::inc(&counters.sessions_started);
    let (mut sink, mut stream) = socket.split();
    let mut enc = Encoding::Binary;
    let mut strikes = 0u32;
    let silence = Duration::from_secs(ping_timeout_secs.max(1));
    let mut close: Option<(u16, &'static str)> = None;
    let (per_sec, burst) = backend.signal_rate();
    let mut rate = TokenBucket::new(per_sec, burst, std::time::Instant::now());

    loop {
        tokio::select! {
            biased;
            msg = out.recv() => match msg {
                Some(Outgoing::Signal(m)) => {
                    SignalCounters::inc(&counters.messages_out);
                    if let Some(frame) = encode(*m, enc) {
                        if sink.send(frame).await.is_err() { break; }
                    }
                }
                Some(Outgoing::Close) | None => { close = Some((1000, "session ended")); break; }
            },
            frame = tokio::time::timeout(silence, stream.next()) => {
                let frame = match frame {
                    Err(_) => {
                        SignalCounters::inc(&counters.ping_timeouts);
                        close = Some((1000, "ping timeout"));
                        break;
                    }
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        // Oversized messages surface here as a capacity error.
                        // tungstenite reports it as "Space limit exceeded:
                        // Message too long"; axum hides the typed error.
                        let text = e.to_string().to_ascii_lowercase();
                        if text.contains("too long") || text.contains("space limit") || text.contains("size") {
                            SignalCounters::inc(&counters.oversized_frames);
                            close = Some((1009, "message too big"));
                        } else {
                            SignalCounters::inc(&counters.bad_frames);
                        }
                        break;
                    }
                    Ok(Some(Ok(f))) => f,
                };
                let req = match frame {
                    Message::Binary(b) => {
                        enc = Encoding::Binary;
                        lk::SignalRequest::decode(b.as_ref()).map_err(|_| "frame is not a SignalRequest")
                    }
                    Message::Text(t) => {
                        enc = Encoding::Json;
                        serde_json::from_str::<lk::SignalRequest>(t.as_str()).map_err(|_| "text frame is not a JSON SignalRequest")
                    }
                    Message::Close(_) => break,
                    Message::Ping(_) | Message::Pong(_) => continue,
                };
                let msg = match req {
                    Ok(lk::SignalRequest { message: Some(m) }) => m,
                    Ok(lk::SignalRequest { message: None }) => {
                        SignalCounters::inc(&counters.unknown_messages);
                        if reply(&mut sink, error_response("unknown or empty signal request"), enc).await.is_err() { break; }
                        strikes += 1;
                        if strikes > MAX_STRIKES { close = Some((1008, "too many bad messages")); break; }
                        continue;
                    }
                    Err(why) => {
                        SignalCounters::inc(&counters.bad_frames);
                        if reply(&mut sink, error_response(why), enc).await.is_err() { break; }
                        strikes += 1;
                        if strikes > MAX_STRIKES { close = Some((1008, "too many bad messages")); break; }
                        continue;
                    }
                };
                SignalCounters::inc(&counters.messages_in);
                // Over the rate: refused, and a strike (a flood ends the
                // session). Pings pass, so a limited client is not also
                // timed out.
                let is_ping = matches!(msg, Req::Ping(_) | Req::PingReq(_));
                if !is_ping && !rate.take(std::time::Instant::now()) {
                    SignalCounters::inc(&counters.rate_limited);
                    let why = format!("signal request refused: over {per_sec} requests per second");
                    let refused = Resp::RequestResponse(lk::RequestResponse {
                        reason: lk::request_response::Reason::LimitExceeded as i32,
                        message: why,
                        ..Default::default()
                    });
                    if reply(&mut sink, refused, enc).await.is_err() { break; }
                    strikes += 1;
                    if strikes > MAX_STRIKES { close = Some((1008, "signal request rate limit exceeded")); break; }
                    continue;
                }
                match msg {
                    Req::Ping(_) => {
                        if reply(&mut sink, Resp::Pong(now_ms()), enc).await.is_err() { break; }
                    }
                    Req::PingReq(p) => {
                        let pong = Resp::PongResp(lk::Pong { last_ping_timestamp: p.timestamp, timestamp: now_ms() });
                        if reply(&mut sink, pong, enc).await.is_err() { break; }
                    }
                    Req::Leave(l) => {
                        link.signal(Req::Leave(l));
                        close = Some((1000, "client left"));
                        break;
                    }
                    other => link.signal(other),
                }
            }
        }
    }
    if let Some((code, reason)) = close {
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })))
            .await;
    }
    drop(link);
    SignalCounters::inc(&counters.sessions_ended);
}

async fn reply<S>(sink: &mut S, msg: Resp, enc: Encoding) -> Result<(), ()>
where
    S: futures_util::Sink<Message> + Unpin,
{
    match encode(msg, enc) {
        Some(frame) => sink.send(frame).await.map_err(|_| ()),
        None => Ok(()),
    }
}
