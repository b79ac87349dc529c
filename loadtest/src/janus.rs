//! The same simulated participants against Janus VideoRoom, the peer SFU
//! we measure side by side: its WebSocket API (`janus-protocol`), one
//! publisher handle and one multistream subscriber handle per participant,
//! the same media and the same counting as against Moselle.
//!
//! Janus ignores loopback interfaces, so it runs on a veth address inside
//! a network namespace (`loadtest/janus.sh` sets one up).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Ws;
use webrtc::peer_connection::RTCSessionDescription;

use crate::client::{self, Ctx, Plan};
use crate::media::LAYERS_720P;
use crate::stats::{now_us, JoinPhase, JoinSteps, Stats};

const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// Janus drops a session that says nothing for 60 s.
const KEEPALIVE: Duration = Duration::from_secs(20);

/// Janus rooms are numbers: one per room name.
pub fn room_id(name: &str) -> u64 {
    // FNV-1a, kept within JavaScript's safe integers as Janus's tools expect.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h & ((1 << 52) - 1)
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>;

/// One WebSocket session with Janus: requests by transaction, and the
/// plugin events that answer no request, per handle.
struct Session {
    tx: mpsc::UnboundedSender<Value>,
    pending: Pending,
    events: mpsc::UnboundedReceiver<Value>,
    id: u64,
    next: AtomicU64,
}

impl Session {
    async fn open(url: &str) -> anyhow::Result<Self> {
        let mut req = url.into_client_request()?;
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "janus-protocol".parse()?);
        let (ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true)
            .await
            .with_context(|| format!("WebSocket connect to Janus at {url}"))?;
        let (mut sink, mut stream) = ws.split();
        let (tx, mut out) = mpsc::unbounded_channel::<Value>();
        let (ev_tx, events) = mpsc::unbounded_channel::<Value>();
        let pending: Pending = Arc::default();
        tokio::spawn(async move {
            while let Some(v) = out.recv().await {
                if sink.send(Ws::Text(v.to_string().into())).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let p = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Ws::Text(t) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&t) else {
                    continue;
                };
                let kind = v["janus"].as_str().unwrap_or("");
                if kind == "ack" || kind == "keepalive" {
                    continue;
                }
                let waiter = v["transaction"]
                    .as_str()
                    .and_then(|t| p.lock().ok().and_then(|mut m| m.remove(t)));
                match waiter {
                    Some(w) => {
                        let _ = w.send(v);
                    }
                    None => {
                        if ev_tx.send(v).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let mut s = Session {
            tx,
            pending,
            events,
            id: 0,
            next: AtomicU64::new(0),
        };
        let r = s.call(json!({"janus": "create"})).await?;
        s.id = r["data"]["id"]
            .as_u64()
            .ok_or_else(|| anyhow!("Janus created no session: {r}"))?;
        let keep = s.tx.clone();
        let id = s.id;
        tokio::spawn(async move {
            let mut t = tokio::time::interval(KEEPALIVE);
            t.tick().await;
            loop {
                t.tick().await;
                let msg = json!({"janus": "keepalive", "session_id": id, "transaction": "k"});
                if keep.send(msg).is_err() {
                    break;
                }
            }
        });
        Ok(s)
    }

    /// Send one request and wait for its reply (a plugin's asynchronous
    /// event counts as the reply: it carries the same transaction).
    async fn call(&self, mut msg: Value) -> anyhow::Result<Value> {
        let t = format!("t{}", self.next.fetch_add(1, Relaxed));
        msg["transaction"] = json!(t);
        if self.id != 0 {
            msg["session_id"] = json!(self.id);
        }
        let (w, r) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| anyhow!("lock"))?
            .insert(t, w);
        self.tx
            .send(msg.clone())
            .map_err(|_| anyhow!("Janus connection closed"))?;
        let v = tokio::time::timeout(REPLY_TIMEOUT, r)
            .await
            .with_context(|| format!("no reply from Janus to {msg}"))?
            .map_err(|_| anyhow!("Janus connection closed"))?;
        if v["janus"] == "error" {
            bail!("Janus refused {}: {}", msg["body"], v["error"]);
        }
        if let Some(e) = v["plugindata"]["data"]["error"].as_str() {
            bail!("VideoRoom refused {}: {e}", msg["body"]);
        }
        Ok(v)
    }

    async fn attach(&self) -> anyhow::Result<u64> {
        let r = self
            .call(json!({"janus": "attach", "plugin": "janus.plugin.videoroom"}))
            .await?;
        r["data"]["id"]
            .as_u64()
            .ok_or_else(|| anyhow!("Janus attached no handle: {r}"))
    }

    async fn message(
        &self,
        handle: u64,
        body: Value,
        jsep: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut m = json!({"janus": "message", "handle_id": handle, "body": body});
        if let Some(j) = jsep {
            m["jsep"] = j;
        }
        self.call(m).await
    }
}

/// Create the VideoRoom for `room` (idempotent).
pub async fn create_room(url: &str, room: &str) -> anyhow::Result<()> {
    let s = Session::open(url).await?;
    let h = s.attach().await?;
    let body = json!({
        "request": "create",
        "room": room_id(room),
        "publishers": 1000,
        "audiocodec": "opus",
        "videocodec": "vp8",
        "bitrate": 0,
        "fir_freq": 0,
        "notify_joining": false,
        "audiolevel_event": false,
        "permanent": false,
    });
    match s.message(h, body, None).await {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("already exists") => Ok(()),
        Err(e) => Err(e),
    }
}

/// The feeds a VideoRoom event lists as publishing (not us).
fn feeds(v: &Value, me: u64) -> Vec<u64> {
    v["plugindata"]["data"]["publishers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["id"].as_u64())
                .filter(|id| *id != me)
                .collect()
        })
        .unwrap_or_default()
}

fn jsep_sdp(v: &Value) -> Option<String> {
    v["jsep"]["sdp"].as_str().map(str::to_string)
}

/// Run one participant against Janus until `stop` turns true.
pub async fn run(ctx: Arc<Ctx>, plan: Plan, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let joined_at = now_us();
    let steps = Arc::new(JoinSteps::default());
    let first_media = Arc::new(AtomicU64::new(0));
    let mut s = Session::open(&ctx.url).await?;
    let room = room_id(&plan.room);
    let pub_h = s.attach().await?;
    // Everyone joins as a publisher (one who never configures media is a
    // passive one): the join lists who publishes, and later events tell of
    // new publishers.
    let joined = s
        .message(
            pub_h,
            json!({"request": "join", "ptype": "publisher", "room": room, "display": plan.identity}),
            None,
        )
        .await?;
    steps.mark(JoinPhase::Signal, joined_at);
    let me = joined["plugindata"]["data"]["id"].as_u64().unwrap_or(0);
    let mut sends = Vec::new();
    let mut publisher = None;
    if plan.audio || plan.video {
        let mut pc = client::new_pc(&ctx, joined_at, first_media.clone(), steps.clone()).await?;
        let pending = client::add_senders(&plan, &pc.pc).await?;
        let offer = client::offer(&pc.pc, &pc.gathered).await?;
        steps.mark(JoinPhase::Offer, joined_at);
        let r = s
            .message(
                pub_h,
                json!({"request": "configure", "audio": plan.audio, "video": plan.video}),
                Some(json!({"type": "offer", "sdp": offer})),
            )
            .await?;
        let answer = jsep_sdp(&r).ok_or_else(|| anyhow!("no answer to the publish offer: {r}"))?;
        pc.pc
            .set_remote_description(RTCSessionDescription::answer(answer)?)
            .await?;
        steps.mark(JoinPhase::Answer, joined_at);
        pc.wait_connected().await?;
        sends = client::ready_senders(pending).await?;
        publisher = Some(pc);
    }
    let mut sub = Subscriber {
        handle: 0,
        pc: None,
        feeds: HashSet::new(),
        substream: substream_for(plan.view),
    };
    if plan.subscribe {
        sub.handle = s.attach().await?;
        sub.add(
            &s,
            &ctx,
            room,
            feeds(&joined, me),
            joined_at,
            &first_media,
            &steps,
        )
        .await?;
    }
    Stats::add(&ctx.stats.joined, 1);
    let _ = ctx
        .media_since
        .compare_exchange(0, now_us(), Relaxed, Relaxed);

    // Media goes out on its own task; this one follows the room.
    let (stop_media_tx, mut stop_media) = watch::channel(false);
    let media_ctx = ctx.clone();
    let media = tokio::spawn(async move {
        let layers_on = std::array::from_fn(|_| std::sync::atomic::AtomicBool::new(true));
        client::send_media(&media_ctx, sends, &layers_on, &mut stop_media).await;
    });
    while !*stop.borrow() {
        let ev = tokio::select! {
            r = stop.changed() => {
                if r.is_err() {
                    break;
                }
                continue;
            }
            ev = s.events.recv() => ev,
        };
        let Some(ev) = ev else { break };
        let new = feeds(&ev, me);
        if plan.subscribe && !new.is_empty() {
            if let Err(e) = sub
                .add(&s, &ctx, room, new, joined_at, &first_media, &steps)
                .await
            {
                tracing::warn!(error = %format!("{e:#}"), "Janus subscription failed");
            }
        }
    }
    let _ = stop_media_tx.send(true);
    let _ = media.await;
    let _ = s
        .call(json!({"janus": "destroy"}))
        .await
        .map_err(|e| tracing::debug!(error = %e, "Janus session destroy"));
    if let Some(p) = publisher {
        let _ = p.pc.close().await;
    }
    if let Some(p) = sub.pc {
        let _ = p.pc.close().await;
    }
    Ok(())
}

/// The Janus substream for the simulcast layer Moselle would pick for this
/// view (the same rule). Janus takes the offer's rids as highest first
/// (meetecho/janus-gateway#2385); ours are lowest first (q, h, f, as
/// livekit-client lists them), so its substream N is our layer 2 - N.
fn substream_for(view: (u32, u32)) -> u8 {
    let layers: Vec<(u32, u32)> = LAYERS_720P.iter().map(|l| (l.width, l.height)).collect();
    let top = (layers.len() - 1) as u8;
    let ours = if view.0 == 0 && view.1 == 0 {
        top
    } else {
        moselle::media::forward::layer_for_size(&layers, view.0, view.1)
    };
    top - ours.min(top)
}

/// One multistream subscriber connection: Janus offers, we answer.
struct Subscriber {
    handle: u64,
    pc: Option<client::Pc>,
    feeds: HashSet<u64>,
    substream: u8,
}

impl Subscriber {
    #[allow(clippy::too_many_arguments)]
    async fn add(
        &mut self,
        s: &Session,
        ctx: &Arc<Ctx>,
        room: u64,
        feeds: Vec<u64>,
        joined_at: u64,
        first_media: &Arc<AtomicU64>,
        steps: &Arc<JoinSteps>,
    ) -> anyhow::Result<()> {
        let streams: Vec<Value> = feeds
            .into_iter()
            .filter(|f| self.feeds.insert(*f))
            .map(|f| json!({"feed": f, "substream": self.substream}))
            .collect();
        if streams.is_empty() {
            return Ok(());
        }
        steps.mark(JoinPhase::Subscribe, joined_at);
        let r = if self.pc.is_none() {
            let body =
                json!({"request": "join", "ptype": "subscriber", "room": room, "streams": streams});
            let r = s.message(self.handle, body, None).await?;
            self.pc =
                Some(client::new_pc(ctx, joined_at, first_media.clone(), steps.clone()).await?);
            r
        } else {
            s.message(
                self.handle,
                json!({"request": "subscribe", "streams": streams}),
                None,
            )
            .await?
        };
        let Some(offer) = jsep_sdp(&r) else {
            // Nothing new to negotiate (a feed without media yet).
            return Ok(());
        };
        let Some(pc) = self.pc.as_ref() else {
            return Ok(());
        };
        pc.pc
            .set_remote_description(RTCSessionDescription::offer(offer)?)
            .await?;
        let a = pc.pc.create_answer(None).await?;
        let sdp = pc.local_with_candidates(a).await?;
        s.message(
            self.handle,
            json!({"request": "start"}),
            Some(json!({"type": "answer", "sdp": sdp})),
        )
        .await?;
        steps.mark(JoinPhase::Answer, joined_at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids_are_stable_and_safe_integers() {
        assert_eq!(room_id("meeting-8-0-w1"), room_id("meeting-8-0-w1"));
        assert_ne!(room_id("meeting-8-0-w1-r0"), room_id("meeting-8-0-w1-r1"));
        assert!(room_id("x") < 1 << 53);
    }

    #[test]
    fn views_pick_the_layer_moselle_would() {
        // Janus counts our rids from the top: substream 0 is our 1280x720.
        assert_eq!(substream_for((0, 0)), 0);
        assert_eq!(substream_for((1280, 720)), 0);
        assert_eq!(substream_for((640, 360)), 1);
        assert_eq!(substream_for((320, 180)), 2);
    }
}
