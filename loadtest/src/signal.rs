//! The LiveKit signaling client: a WebSocket to `/rtc/v1` or `/rtc` carrying
//! `SignalRequest` / `SignalResponse` protobufs, with the keep-alive pings a
//! real SDK sends.

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use livekit_protocol as lk;
use lk::signal_request::Message as Req;
use lk::signal_response::Message as Resp;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as Ws;

/// LiveKit protocol level we announce.
const PROTOCOL: u32 = 16;

pub struct Signal {
    pub tx: mpsc::UnboundedSender<Req>,
    pub rx: mpsc::UnboundedReceiver<Resp>,
}

/// Connect, read the JoinResponse and keep the socket pumping in two tasks
/// (reader, writer with pings) until either side drops.
pub async fn connect(
    base: &str,
    token: &str,
    single_pc: bool,
) -> anyhow::Result<(lk::JoinResponse, Signal)> {
    let base = base.trim_end_matches('/');
    let url = if single_pc {
        // `/rtc/v1`: the join parameters travel as a protobuf.
        let join = lk::JoinRequest {
            client_info: Some(lk::ClientInfo {
                sdk: lk::client_info::Sdk::Rust as i32,
                version: "moselle-loadtest".into(),
                protocol: PROTOCOL as i32,
                ..Default::default()
            }),
            connection_settings: Some(lk::ConnectionSettings {
                auto_subscribe: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let b64 = moselle::signaling::join::encode_join_request(&join);
        format!("{base}/rtc/v1?access_token={token}&join_request={b64}")
    } else {
        format!(
            "{base}/rtc?access_token={token}&protocol={PROTOCOL}&auto_subscribe=1&adaptive_stream=0&sdk=rust&version=moselle-loadtest"
        )
    };
    // TCP_NODELAY, as browsers set it on every socket.
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true)
        .await
        .with_context(|| format!("WebSocket connect to {base}/rtc"))?;
    let (mut sink, mut stream) = ws.split();
    let join = loop {
        let msg = stream
            .next()
            .await
            .ok_or_else(|| anyhow!("signaling closed before the JoinResponse"))??;
        match msg {
            Ws::Binary(b) => match lk::SignalResponse::decode(b.as_ref())?.message {
                Some(Resp::Join(j)) => break j,
                Some(Resp::Leave(l)) => bail!("server refused the join: {:?}", l.reason()),
                _ => continue,
            },
            Ws::Close(c) => bail!("signaling closed before the JoinResponse: {c:?}"),
            _ => continue,
        }
    };
    let (req_tx, mut req_rx) = mpsc::unbounded_channel::<Req>();
    let (resp_tx, resp_rx) = mpsc::unbounded_channel::<Resp>();
    let ping_every = std::time::Duration::from_secs(join.ping_interval.clamp(1, 30) as u64);
    tokio::spawn(async move {
        let mut ping = tokio::time::interval(ping_every);
        loop {
            let req = tokio::select! {
                r = req_rx.recv() => match r { Some(r) => r, None => break },
                _ = ping.tick() => Req::Ping(crate::stats::now_us() as i64),
            };
            let bytes = lk::SignalRequest { message: Some(req) }.encode_to_vec();
            if sink.send(Ws::Binary(bytes.into())).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            if let Ws::Binary(b) = msg {
                if let Ok(lk::SignalResponse { message: Some(m) }) =
                    lk::SignalResponse::decode(b.as_ref())
                {
                    if resp_tx.send(m).is_err() {
                        break;
                    }
                }
            }
        }
    });
    Ok((
        join,
        Signal {
            tx: req_tx,
            rx: resp_rx,
        },
    ))
}
