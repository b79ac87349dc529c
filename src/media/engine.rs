//! The media engine: a forwarding worker thread owning its rooms, their
//! participants and their str0m peer connections. Its datagrams come from
//! the transport layer (`crate::transport`: UDP, ICE over TCP, demux),
//! whatever path they took. Signaling reaches a worker through its command
//! channel; it answers through each participant's outbound queue.
//!
//! Why one thread per room: a room's forwarding then needs no locks, and a
//! packet is received, rewritten and queued for every subscriber without a
//! task hop. Datagrams are read and written in batches (recvmmsg/sendmmsg).

// LiveKit marks TrackInfo fields deprecated that current clients still read.
#![allow(deprecated)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use livekit_protocol as lk;
use lk::signal_request::Message as Req;
use lk::signal_response::Message as Resp;
use moselle_signaling::backend::{JoinTicket, OutboundTx, Outgoing, Refusal};
use moselle_signaling::ids;
use moselle_signaling::join::Flavor;
use moselle_signaling::rate::TokenBucket;
use slab::Slab;
use str0m::media::KeyframeRequestKind;
use str0m::net::TcpType;
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite, SeqNo};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::sync::{mpsc, oneshot};

use super::admin::{AdminError, AdminOp, AdminReply};
use super::downlink::WIRE_OVERHEAD;
use super::fallback::{Fallbacks, Offers, Rung};
use super::forward::{Layer, Verdict};
use super::handle::Link;
use super::participant::{self, Downlink, Participant, PcRole, Peer, SubscriberPeer};
use super::room::{now_ms, Room, MAX_LAYERS};
use super::sdp::Kind;
use crate::metrics::MediaCounters;
use crate::transport::turn::TurnServer;
use crate::transport::{Datagram, InletParts, Proto, Route, Sink, Transport};

/// What a transport path leads to: a participant and which of its peer
/// connections.
pub type PeerRef = (usize, PcRole);

/// The LiveKit server version we present: clients gate features on it
/// (RPC needs >= 1.8.0).
pub const COMPAT_VERSION: &str = "1.9.0";
/// LiveKit signaling protocol level we implement.
pub const PROTOCOL_VERSION: i32 = 16;
const PING_INTERVAL: i32 = 5;
const PING_TIMEOUT: i32 = 15;
pub(super) const HOUSEKEEPING: Duration = Duration::from_millis(500);
/// How often connection quality is assessed (LiveKit: 5 s).
pub(super) const QUALITY_INTERVAL: Duration = Duration::from_secs(5);
/// ICE seen failing while signaling lives (str0m: no consent check for
/// 15 s): this long later the server moves the session down the fallback
/// ladder. Short, so the Leave reaches LiveKit clients before their own
/// resume starts (about 1.5-3.5 s later, measured): they honour it at once
/// then, but only after a resume has run its course (15 s) otherwise.
const ICE_LOST_GRACE: Duration = Duration::from_secs(1);
/// Dynacast: fewer layers are requested only after this long, so a
/// subscriber flicking between sizes does not make publishers churn.
pub(super) const DYNACAST_DOWN_DELAY: Duration = Duration::from_secs(5);
/// Pacer deadlines this close count as due within one drain.
const PACER_STEP: Duration = Duration::from_millis(1);
/// Packets one drain lets the pacer release; the rest wait a loop turn.
const MAX_PACER_STEPS: u32 = 256;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub node_id: String,
    pub jurisdiction: String,
    /// UDP host candidates announced to clients.
    pub candidates: Vec<SocketAddr>,
    /// Passive ICE-TCP host candidates (lower priority than UDP).
    pub tcp_candidates: Vec<SocketAddr>,
    pub auto_create: bool,
    pub empty_timeout_secs: u64,
    pub departure_timeout_secs: u64,
    pub max_participants: u32,
    pub pli_throttle: Duration,
    /// How long a participant whose signaling socket dropped is kept for a
    /// resume.
    pub resume_window: Duration,
    /// TURN servers handed to clients, with credentials per participant.
    pub turn: Arc<Vec<TurnServer>>,
    /// How long a participant's fallback rung is remembered.
    pub fallback_memory: Duration,
    /// Downlink bandwidth estimation from this starting estimate; `None`:
    /// off (layers then follow only what subscribers ask for).
    pub bwe_initial: Option<str0m::bwe::Bitrate>,
    /// Where room, participant and track events go as webhooks, if any.
    pub webhooks: Option<crate::webhook::Sink>,
    /// What one participant may do.
    pub limits: crate::config::LimitsConfig,
}

pub enum Command {
    Join {
        ticket: Box<JoinTicket>,
        out: OutboundTx,
        /// Placement put the room on this node: it may be opened even
        /// without auto-create or a roomCreate grant.
        placed_here: bool,
        /// This worker's own queue, for the session's [`Link`].
        commands: mpsc::UnboundedSender<Command>,
        /// The session's link, or the refusal. A link the requester never
        /// takes (the client gave up and the HTTP server dropped its
        /// request mid-join) is dropped unused and closes the session.
        reply: oneshot::Sender<Result<Link, Refusal>>,
    },
    /// Open a room ahead of its first join (idempotent).
    OpenRoom {
        room: String,
        reply: oneshot::Sender<()>,
    },
    Signal {
        key: usize,
        gen: u64,
        msg: Box<Req>,
    },
    /// The participant's socket is gone.
    Closed {
        key: usize,
        gen: u64,
    },
    /// (room name, identity) of everyone connected.
    Members {
        reply: oneshot::Sender<Vec<(String, String)>>,
    },
    /// Remove a participant (its access ended).
    Evict {
        room: String,
        identity: String,
        reason: lk::DisconnectReason,
    },
    /// A server API (RoomService) call.
    Admin {
        op: Box<AdminOp>,
        reply: oneshot::Sender<Result<AdminReply, AdminError>>,
    },
}

/// Room names currently open, readable from other threads (for `/validate`).
pub type Directory = Arc<RwLock<HashSet<String>>>;

pub(super) struct Core {
    pub(super) cfg: EngineConfig,
    /// Sending, TCP connections, and the demux tables.
    pub(super) io: Transport<PeerRef>,
    pub(super) rooms: Slab<Room>,
    pub(super) room_by_name: HashMap<String, usize>,
    pub(super) parts: Slab<Participant>,
    /// Participants whose str0m state changed and must be polled.
    pub(super) dirty: Vec<usize>,
    pub(super) is_dirty: Vec<bool>,
    pub(super) events: Vec<(PcRole, Event)>,
    pub(super) due: Vec<usize>,
    pub(super) counters: Arc<MediaCounters>,
    pub(super) directory: Directory,
    pub(super) next_gen: u64,
    pub(super) next_housekeeping: Instant,
    pub(super) next_quality: Instant,
    // Batched counter updates, published once per loop turn.
    pub(super) n_rtp_in: u64,
    pub(super) n_fwd: u64,
    pub(super) n_fwd_bytes: u64,
    /// This worker's share of the rooms/participants/tracks/paused gauges.
    pub(super) gauges: [u64; 4],
    pub(super) fallbacks: Fallbacks,
}

/// Run the engine on the current thread until the command channel closes.
pub fn run(
    cfg: EngineConfig,
    (inlet, io): (InletParts, Transport<PeerRef>),
    mut commands: mpsc::UnboundedReceiver<Command>,
    counters: Arc<MediaCounters>,
    directory: Directory,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Registering the sockets needs the runtime's context.
    let mut inlet = {
        let _enter = rt.enter();
        inlet.attach()?
    };
    let mut core = Core::new(cfg, io, counters, directory);
    rt.block_on(async move {
        loop {
            let deadline = core.next_deadline();
            tokio::select! {
                biased;
                cmd = commands.recv() => match cmd {
                    Some(c) => core.command(c),
                    None => break,
                },
                r = inlet.read(&mut core) => r?,
                _ = tokio::time::sleep_until(deadline.into()) => {},
            }
            core.turn();
        }
        Ok::<(), std::io::Error>(())
    })
}

impl Sink<PeerRef> for Core {
    fn datagram(&mut self, d: Datagram<'_>, at: Instant) {
        Core::datagram(self, d, at)
    }

    fn flush(&mut self) {
        Core::flush(self)
    }

    fn transport(&mut self) -> &mut Transport<PeerRef> {
        &mut self.io
    }
}

impl Core {
    pub(super) fn new(
        cfg: EngineConfig,
        io: Transport<PeerRef>,
        counters: Arc<MediaCounters>,
        directory: Directory,
    ) -> Core {
        let fallbacks = Fallbacks::new(cfg.fallback_memory);
        Core {
            cfg,
            io,
            rooms: Slab::new(),
            room_by_name: HashMap::new(),
            parts: Slab::new(),
            dirty: Vec::new(),
            is_dirty: Vec::new(),
            events: Vec::with_capacity(64),
            due: Vec::new(),
            counters,
            directory,
            next_gen: 1,
            next_housekeeping: Instant::now() + HOUSEKEEPING,
            n_rtp_in: 0,
            n_fwd: 0,
            n_fwd_bytes: 0,
            gauges: [0; 4],
            next_quality: Instant::now() + QUALITY_INTERVAL,
            fallbacks,
        }
    }

    /// Bring the shared gauges up to date with this worker's counts (each
    /// worker adds its own share, so they sum over workers).
    pub(super) fn publish_gauges(&mut self) {
        let now = [
            self.rooms.len() as u64,
            self.parts.len() as u64,
            self.rooms.iter().map(|(_, r)| r.tracks.len() as u64).sum(),
            self.parts
                .iter()
                .map(|(_, p)| p.subs.iter().filter(|(_, s)| s.paused).count() as u64)
                .sum(),
        ];
        let c = &self.counters;
        for (i, gauge) in [&c.rooms, &c.participants, &c.tracks, &c.bwe_paused_tracks]
            .into_iter()
            .enumerate()
        {
            MediaCounters::shift(gauge, self.gauges[i], now[i]);
        }
        self.gauges = now;
    }

    /// End of a loop turn: due timers, then output.
    pub(super) fn turn(&mut self) {
        self.timeouts(Instant::now());
        self.flush();
    }
}

/// Poll one peer connection until it has nothing more to say.
fn drain(
    peer: &mut Peer,
    role: PcRole,
    io: &mut Transport<PeerRef>,
    events: &mut Vec<(PcRole, Event)>,
    sid: &str,
    now: Instant,
) {
    let mut steps = 0;
    loop {
        if !peer.rtc.is_alive() {
            peer.next_timeout = now + Duration::from_secs(3600);
            return;
        }
        match peer.rtc.poll_output() {
            Ok(Output::Transmit(t)) => {
                let proto = match t.proto {
                    str0m::net::Protocol::Udp => Proto::Udp,
                    str0m::net::Protocol::Tcp => Proto::Tcp,
                    // We offer no other kind of candidate.
                    _ => continue,
                };
                io.send(proto, t.source, t.destination, &t.contents)
            }
            Ok(Output::Timeout(t)) => {
                // str0m's pacer hands out one packet per timeout and asks
                // for the next a microsecond on: step through those here
                // rather than one packet per loop turn.
                if peer.paced && t <= now + PACER_STEP && steps < MAX_PACER_STEPS {
                    steps += 1;
                    let at = t.max(peer.last_input + Duration::from_micros(1));
                    peer.last_input = at;
                    if peer.rtc.handle_input(Input::Timeout(at)).is_ok() {
                        continue;
                    }
                }
                peer.next_timeout = t;
                return;
            }
            Ok(Output::Event(e)) => events.push((role, e)),
            Err(e) => {
                tracing::info!(participant = %sid, error = %e, "peer connection failed");
                peer.rtc.disconnect();
                peer.next_timeout = now;
                return;
            }
        }
    }
}

/// What a client is told to configure: on the relay rung, relay only.
fn client_configuration(rung: Rung) -> Option<lk::ClientConfiguration> {
    (rung == Rung::RelayOnly).then(|| lk::ClientConfiguration {
        force_relay: lk::ClientConfigSetting::Enabled as i32,
        ..Default::default()
    })
}

/// Tell a client to rejoin because its media failed (on the next rung).
fn media_failure_rejoin() -> Resp {
    Resp::Leave(lk::LeaveRequest {
        reason: lk::DisconnectReason::MediaFailure as i32,
        action: lk::leave_request::Action::Reconnect as i32,
        can_reconnect: true,
        ..Default::default()
    })
}

/// Tell a client its session cannot go on and it must join afresh.
pub(super) fn rejoin() -> Resp {
    Resp::Leave(lk::LeaveRequest {
        reason: lk::DisconnectReason::StateMismatch as i32,
        action: lk::leave_request::Action::Reconnect as i32,
        can_reconnect: true,
        ..Default::default()
    })
}

pub(super) fn refusal(status: StatusCode, reason: &'static str, msg: impl Into<String>) -> Refusal {
    Refusal::new(status, reason, msg)
}

pub(super) fn error_to(p: &mut Participant, reason: lk::request_response::Reason, message: String) {
    p.send(Resp::RequestResponse(lk::RequestResponse {
        reason: reason as i32,
        message,
        ..Default::default()
    }));
}

/// A refusal that names the request, so the client can fail that call.
pub(super) fn refuse_request(
    p: &mut Participant,
    reason: lk::request_response::Reason,
    message: String,
    request_id: u32,
    request: lk::request_response::Request,
) {
    p.send(Resp::RequestResponse(lk::RequestResponse {
        request_id,
        reason: reason as i32,
        message,
        request: Some(request),
    }));
}

pub(super) fn full_mime(kind: lk::TrackType, codec: &str) -> String {
    if codec.contains('/') || codec.is_empty() {
        return codec.to_string();
    }
    let top = if kind == lk::TrackType::Audio {
        "audio"
    } else {
        "video"
    };
    let name = if codec.eq_ignore_ascii_case("opus") {
        "opus".to_string()
    } else {
        codec.to_ascii_uppercase()
    };
    format!("{top}/{name}")
}

pub(super) fn quality_layer(q: i32, top: Layer) -> Option<Layer> {
    match lk::VideoQuality::try_from(q) {
        Ok(lk::VideoQuality::Low) => Some(0),
        Ok(lk::VideoQuality::Medium) => Some(1.min(top)),
        Ok(lk::VideoQuality::High) => Some(top),
        Ok(lk::VideoQuality::Off) => None,
        Err(_) => Some(top),
    }
}

impl Core {
    pub(super) fn next_deadline(&self) -> Instant {
        let mut d = self.next_housekeeping;
        for (_, p) in self.parts.iter() {
            d = d.min(p.peer.next_timeout);
            if let Some(s) = &p.sub_peer {
                d = d.min(s.peer.next_timeout);
            }
        }
        d
    }

    pub(super) fn mark_dirty(dirty: &mut Vec<usize>, is_dirty: &mut Vec<bool>, key: usize) {
        if is_dirty.len() <= key {
            is_dirty.resize(key + 1, false);
        }
        if !is_dirty[key] {
            is_dirty[key] = true;
            dirty.push(key);
        }
    }

    // ---------------------------------------------------------------- UDP

    pub(super) fn datagram(&mut self, d: Datagram<'_>, now: Instant) {
        let (unroutable, rejected) = match d.proto {
            Proto::Udp => (&self.counters.udp_unroutable, &self.counters.udp_rejected),
            Proto::Tcp => (
                &self.counters.tcp_frames_rejected,
                &self.counters.tcp_frames_rejected,
            ),
        };
        let (key, role) = match self.io.demux.route(&d) {
            Route::Known(r) => r,
            Route::New((k, role)) => {
                if let Some(peer) = self.parts.get_mut(k).and_then(|p| p.peer_mut(role)) {
                    peer.remote_paths.push((d.proto, d.source));
                }
                (k, role)
            }
            Route::Unknown => {
                MediaCounters::add(unroutable, 1);
                return;
            }
        };
        let Some(p) = self.parts.get_mut(key) else {
            self.io.demux.forget_path(&(d.proto, d.source), |_| true);
            MediaCounters::add(unroutable, 1);
            return;
        };
        let sid = &p.sid;
        let Some(peer) = (match role {
            PcRole::Main => Some(&mut p.peer),
            PcRole::Subscriber => p.sub_peer.as_mut().map(|s| &mut s.peer),
        }) else {
            return;
        };
        let Ok(contents) = d.data.try_into() else {
            MediaCounters::add(rejected, 1);
            return;
        };
        // str0m follows every received datagram with its whole timer pass
        // (every send stream's queue, NACK, RTCP): with one connection per
        // participant that is O(streams) per packet. Time that has not moved
        // skips it, so the first datagram of a batch for this peer carries
        // `now` and the others a nanosecond less; the timers still run on
        // their own deadlines (`timeouts`).
        let at = if peer.last_input >= now {
            now.checked_sub(Duration::from_nanos(1)).unwrap_or(now)
        } else {
            peer.last_input = now;
            now
        };
        let input = Input::Receive(
            at,
            Receive {
                proto: match d.proto {
                    Proto::Udp => Protocol::Udp,
                    Proto::Tcp => Protocol::Tcp,
                },
                source: d.source,
                destination: d.destination,
                contents,
            },
        );
        if let Err(e) = peer.rtc.handle_input(input) {
            tracing::debug!(participant = %sid, error = %e, "peer rejected a datagram");
            MediaCounters::add(rejected, 1);
        } else {
            peer.last_proto = Some(d.proto);
        }
        self.poll(key, now);
    }

    /// Drain one participant's str0m output: transmit, then handle events.
    pub(super) fn poll(&mut self, key: usize, now: Instant) {
        let mut events = std::mem::take(&mut self.events);
        {
            let Some(p) = self.parts.get_mut(key) else {
                return;
            };
            let sid = &p.sid;
            drain(
                &mut p.peer,
                PcRole::Main,
                &mut self.io,
                &mut events,
                sid,
                now,
            );
            if let Some(s) = p.sub_peer.as_mut() {
                drain(
                    &mut s.peer,
                    PcRole::Subscriber,
                    &mut self.io,
                    &mut events,
                    sid,
                    now,
                );
            }
        }
        for (role, e) in events.drain(..) {
            self.event(key, role, e, now);
        }
        self.events = events;
    }

    pub(super) fn flush(&mut self) {
        let now = Instant::now();
        while let Some(k) = self.dirty.pop() {
            if let Some(f) = self.is_dirty.get_mut(k) {
                *f = false;
            }
            self.poll(k, now);
        }
        self.io.flush(&self.counters);
        let c = &self.counters;
        MediaCounters::add(&c.rtp_packets_in, std::mem::take(&mut self.n_rtp_in));
        MediaCounters::add(&c.rtp_packets_forwarded, std::mem::take(&mut self.n_fwd));
        MediaCounters::add(
            &c.rtp_bytes_forwarded,
            std::mem::take(&mut self.n_fwd_bytes),
        );
    }

    pub(super) fn timeouts(&mut self, now: Instant) {
        let mut due = std::mem::take(&mut self.due);
        due.extend(
            self.parts
                .iter()
                .filter(|(_, p)| {
                    p.peer.next_timeout <= now
                        || p.sub_peer
                            .as_ref()
                            .is_some_and(|s| s.peer.next_timeout <= now)
                })
                .map(|(k, _)| k),
        );
        for &k in &due {
            if let Some(p) = self.parts.get_mut(k) {
                for peer in [Some(&mut p.peer), p.sub_peer.as_mut().map(|s| &mut s.peer)]
                    .into_iter()
                    .flatten()
                {
                    if peer.next_timeout <= now && peer.rtc.is_alive() {
                        peer.last_input = now;
                        if let Err(e) = peer.rtc.handle_input(Input::Timeout(now)) {
                            tracing::debug!(error = %e, "timeout handling failed");
                        }
                    }
                }
            }
            self.poll(k, now);
        }
        due.clear();
        self.due = due;
        if now >= self.next_housekeeping {
            self.next_housekeeping = now + HOUSEKEEPING;
            self.housekeeping(now);
        }
    }

    pub(super) fn event(&mut self, key: usize, role: PcRole, e: Event, now: Instant) {
        match e {
            Event::RtpPacket(pkt) if role == PcRole::Main => self.forward(key, pkt, now),
            Event::KeyframeRequest(req) => {
                let Some(p) = self.parts.get_mut(key) else {
                    return;
                };
                let Some(sk) = p.sub_for_mid(&req.mid.to_string()) else {
                    return;
                };
                let s = &mut p.subs[sk];
                if s.paused {
                    return;
                }
                if !s.fwd.allow_keyframe_request(now) {
                    MediaCounters::add(&self.counters.keyframe_requests_ignored, 1);
                    return;
                }
                let (track, layer) = (s.track, s.fwd.current().unwrap_or(s.fwd.target));
                let room = p.room;
                self.request_keyframe(room, track, layer, now);
            }
            Event::IceConnectionStateChange(s) => {
                let mut path_back = false;
                if let Some(p) = self.parts.get_mut(key) {
                    tracing::debug!(participant = %p.sid, state = ?s, "ice state");
                    use str0m::IceConnectionState as Ice;
                    match s {
                        // Checking again once media flowed: the client is
                        // moving to another pair (UDP to TCP, a new network).
                        Ice::Checking if p.downlink.estimate().is_some() => {
                            p.downlink.path_lost = true;
                        }
                        Ice::Disconnected => {
                            p.downlink.path_lost = true;
                            // Only while signaling lives: a client that lost
                            // both resumes, and is not moved down the ladder.
                            if p.detached_at.is_none() {
                                p.ice_lost_at.get_or_insert(now);
                            }
                        }
                        Ice::Connected | Ice::Completed => {
                            p.ice_lost_at = None;
                            path_back = std::mem::take(&mut p.downlink.path_lost);
                        }
                        _ => {}
                    }
                }
                if path_back {
                    self.downlink_path_changed(key, now);
                }
            }
            Event::ChannelOpen(id, label) => {
                if let Some(peer) = self.parts.get_mut(key).and_then(|p| p.peer_mut(role)) {
                    peer.channels.retain(|(c, _)| *c != id);
                    peer.channels.push((id, label));
                }
            }
            Event::ChannelClose(id) => {
                if let Some(peer) = self.parts.get_mut(key).and_then(|p| p.peer_mut(role)) {
                    peer.channels.retain(|(c, _)| *c != id);
                }
            }
            Event::ChannelData(d) => self.data_in(key, role, d),
            Event::MediaIngressStats(st) => self.note_loss(key, st.loss),
            Event::MediaEgressStats(st) => {
                self.note_loss(key, st.loss);
                self.note_downlink_loss(key, st.loss, now);
            }
            Event::EgressBitrateEstimate(b) => self.on_estimate(key, b),
            Event::Connected => {
                if let Some(p) = self.parts.get_mut(key) {
                    tracing::info!(participant = %p.sid, "media connected");
                    if p.state != lk::participant_info::State::Active {
                        p.state = lk::participant_info::State::Active;
                    }
                }
            }
            _ => {}
        }
    }

    // ------------------------------------------------------- forwarding

    /// The per-packet path: find the track, decide per subscriber, queue.
    pub(super) fn forward(&mut self, key: usize, pkt: RtpPacket, now: Instant) {
        self.n_rtp_in += 1;
        let Core {
            parts,
            rooms,
            dirty,
            is_dirty,
            n_fwd,
            n_fwd_bytes,
            ..
        } = self;
        let Some(p) = parts.get_mut(key) else { return };
        let room_key = p.room;
        let Some(room) = rooms.get_mut(room_key) else {
            return;
        };
        let ssrc = pkt.header.ssrc;
        let (tk, layer) = match p.peer.route(ssrc) {
            Some(r) => r,
            None => {
                // First packet of this SSRC: ask str0m which m-line and rid.
                let mut api = p.peer.rtc.direct_api();
                let Some(rx) = api.stream_rx(&ssrc) else {
                    return;
                };
                let mid = rx.mid().to_string();
                let rid = rx.rid().map(|r| r.to_string());
                let Some(tk) = p
                    .published
                    .iter()
                    .copied()
                    .find(|t| room.tracks.get(*t).is_some_and(|t| t.mid == mid))
                else {
                    return;
                };
                let track = &mut room.tracks[tk];
                if track.kind == Kind::Video {
                    // LiveKit SDKs publish video without RTX, and str0m
                    // then does not NACK; plain NACK still makes libwebrtc
                    // resend on the media SSRC, which repairs upstream loss.
                    if let Some(rx) = p.peer.rtc.direct_api().stream_rx(&ssrc) {
                        rx.suppress_nack(false);
                    }
                }
                let layer = track.layer_of_rid(rid.as_deref());
                if (layer as usize) < MAX_LAYERS {
                    track.layer_ssrc[layer as usize] = Some(ssrc);
                }
                p.peer.rx_routes.push((ssrc, tk, layer));
                (tk, layer)
            }
        };
        let Some(track) = room.tracks.get_mut(tk) else {
            return;
        };
        if track.kind == Kind::Audio {
            if let Some(level) = pkt.header.ext_vals.audio_level {
                track.meter.observe(level);
            }
        }
        let keyframe =
            track.kind == Kind::Video && track.video_codec.is_keyframe_start(&pkt.payload);
        // Padding (bandwidth probes) does not show that a layer flows.
        if !pkt.payload.is_empty() {
            if let Some(seen) = track.layer_seen.get_mut(layer as usize) {
                *seen = Some(now);
            }
            if let Some(b) = track.layer_bytes.get_mut(layer as usize) {
                *b += pkt.payload.len() as u64 + WIRE_OVERHEAD;
            }
        }
        let ext = ExtensionValues {
            audio_level: pkt.header.ext_vals.audio_level,
            voice_activity: pkt.header.ext_vals.voice_activity,
            video_orientation: pkt.header.ext_vals.video_orientation,
            ..Default::default()
        };
        let mut want_keyframe: Option<Layer> = None;
        for &(sp, sk) in &track.subscribers {
            let Some(subp) = parts.get_mut(sp) else {
                continue;
            };
            let Participant {
                subs,
                peer,
                sub_peer,
                ..
            } = subp;
            let Some(sub) = subs.get_mut(sk) else {
                continue;
            };
            if !sub.live || sub.disabled || sub.paused {
                continue;
            }
            match sub
                .fwd
                .on_packet(layer, *pkt.seq_no, pkt.header.timestamp, keyframe, now)
            {
                Verdict::Drop => {
                    if sub.fwd.wants_keyframe() {
                        want_keyframe = Some(sub.fwd.goal());
                    }
                }
                Verdict::Forward { seq, ts } => {
                    let (Some(mid), Some(pt)) = (sub.mid, sub.map_pt(*pkt.header.payload_type))
                    else {
                        continue;
                    };
                    let send_peer = match sub_peer {
                        Some(s) => &mut s.peer,
                        None => &mut *peer,
                    };
                    let mut api = send_peer.rtc.direct_api();
                    let Some(stx) = api.stream_tx_by_mid(mid, None) else {
                        continue;
                    };
                    let w = RtpWrite::new(
                        pt.into(),
                        SeqNo::from(seq),
                        ts,
                        pkt.timestamp,
                        pkt.payload.clone(),
                    )
                    .marker(pkt.header.marker)
                    .ext_vals(ext.clone())
                    .nackable(sub.kind == Kind::Video);
                    stx.write_rtp(w);
                    *n_fwd += 1;
                    *n_fwd_bytes += pkt.payload.len() as u64;
                    Self::mark_dirty(dirty, is_dirty, sp);
                }
            }
        }
        if let Some(l) = want_keyframe {
            self.request_keyframe(room_key, tk, l, now);
        }
    }

    /// Ask a publisher for a keyframe on one layer, at most once per
    /// throttle interval.
    pub(super) fn request_keyframe(
        &mut self,
        room: usize,
        track: usize,
        layer: Layer,
        now: Instant,
    ) {
        let Some(t) = self
            .rooms
            .get_mut(room)
            .and_then(|r| r.tracks.get_mut(track))
        else {
            return;
        };
        if t.kind != Kind::Video {
            return;
        }
        let l = (layer as usize).min(MAX_LAYERS - 1);
        if t.last_keyframe_request[l]
            .is_some_and(|at| now.duration_since(at) < self.cfg.pli_throttle)
        {
            return;
        }
        let Some(ssrc) = t.layer_ssrc[l] else {
            tracing::debug!(track = %t.sid, layer, "keyframe wanted from a layer not seen yet");
            return;
        };
        t.last_keyframe_request[l] = Some(now);
        let publisher = t.publisher;
        if let Some(p) = self.parts.get_mut(publisher) {
            let mut api = p.peer.rtc.direct_api();
            if let Some(rx) = api.stream_rx(&ssrc) {
                tracing::debug!(track = %t.sid, layer, "keyframe requested");
                rx.request_keyframe(KeyframeRequestKind::Pli);
                MediaCounters::add(&self.counters.keyframe_requests, 1);
                Self::mark_dirty(&mut self.dirty, &mut self.is_dirty, publisher);
            } else {
                tracing::debug!(track = %t.sid, layer, "keyframe wanted from a stream str0m does not know");
            }
        }
    }

    // ---------------------------------------------------------- commands

    pub(super) fn command(&mut self, c: Command) {
        match c {
            Command::Join {
                ticket,
                out,
                placed_here,
                commands,
                reply,
            } => {
                // The link goes out at once: from here on, dropping it
                // anywhere (with the reply unsent, or with a request
                // cancelled before it read the reply) queues Closed, and
                // the participant, which never connected, is removed.
                let r = self
                    .join(*ticket, out, placed_here)
                    .map(|(key, gen)| Link::new(commands, key, gen));
                let _ = reply.send(r);
            }
            Command::OpenRoom { room, reply } => {
                if !self.room_by_name.contains_key(&room) {
                    let k = self.create_room(&room);
                    self.rooms[k].unjoined_since = Some(Instant::now());
                }
                let _ = reply.send(());
            }
            Command::Signal { key, gen, msg } => {
                if self.parts.get(key).is_some_and(|p| p.gen == gen) {
                    self.signal(key, *msg);
                }
            }
            Command::Members { reply } => {
                let list = self
                    .parts
                    .iter()
                    .filter_map(|(_, p)| {
                        Some((self.rooms.get(p.room)?.name.clone(), p.identity.clone()))
                    })
                    .collect();
                let _ = reply.send(list);
            }
            Command::Evict {
                room,
                identity,
                reason,
            } => {
                let found = self.room_by_name.get(&room).and_then(|rk| {
                    self.rooms[*rk]
                        .participants
                        .iter()
                        .copied()
                        .find(|k| self.parts.get(*k).is_some_and(|p| p.identity == identity))
                });
                if let Some(k) = found {
                    self.remove_participant(k, Some(reason));
                }
            }
            Command::Admin { op, reply } => {
                let _ = reply.send(self.admin(*op));
            }
            Command::Closed { key, gen } => {
                let Some(p) = self.parts.get_mut(key).filter(|p| p.gen == gen) else {
                    self.reap_broken();
                    return;
                };
                if p.state != lk::participant_info::State::Active {
                    // Clients resume only sessions whose media connected; one
                    // given up while connecting (Element Call cancels a probe
                    // connection at once) would linger as a ghost for the
                    // whole resume window.
                    tracing::info!(participant = %p.sid, "signaling closed before media connected");
                    self.remove_participant(key, None);
                } else {
                    // Media goes on; the client may resume the session.
                    p.detached_at.get_or_insert_with(Instant::now);
                    tracing::info!(participant = %p.sid, "signaling lost, waiting for a resume");
                }
            }
        }
        self.reap_broken();
    }

    pub(super) fn server_info(&self) -> lk::ServerInfo {
        lk::ServerInfo {
            edition: lk::server_info::Edition::Standard as i32,
            version: COMPAT_VERSION.into(),
            protocol: PROTOCOL_VERSION,
            region: self.cfg.jurisdiction.clone(),
            node_id: self.cfg.node_id.clone(),
            debug_info: format!("moselle {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        }
    }

    /// The configured TURN servers, with credentials for participant `sid`
    /// (nothing unconfigured, ever: no public STUN).
    pub(super) fn ice_servers(&self, sid: &str) -> Vec<lk::IceServer> {
        let now = std::time::SystemTime::now();
        self.cfg
            .turn
            .iter()
            .map(|t| {
                let c = t.credentials(sid, now);
                lk::IceServer {
                    urls: c.urls,
                    username: c.username,
                    credential: c.credential,
                }
            })
            .collect()
    }

    /// A peer connection; `sends` when it carries subscriptions (bandwidth
    /// estimation and pacing then run on it, if configured).
    pub(super) fn new_rtc(&self, rung: Rung, sends: bool) -> Rtc {
        let bwe = self.cfg.bwe_initial.filter(|_| sends);
        let mut rtc = Rtc::builder()
            .enable_bwe(bwe)
            .set_rtp_mode(true)
            .set_ice_lite(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .enable_h264(true)
            // Receiver reports feed connection quality and, with BWE,
            // tell a full downlink (loss) from a busy host: sooner then.
            .set_stats_interval(Some(if bwe.is_some() {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(2)
            }))
            .build(Instant::now());
        // No probing at the start: the allocation asks for it only where
        // the estimate holds video back. Measured, padding several Mbit/s
        // to each new subscriber on a loaded host slowed the publishers'
        // own ramp-up (their top layer came seconds later, or not at all).
        // The TCP rung of the fallback ladder: no UDP candidates.
        let udp: &[SocketAddr] = if rung == Rung::TcpOnly {
            &[]
        } else {
            &self.cfg.candidates
        };
        for a in udp {
            match Candidate::host(*a, "udp") {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => tracing::warn!(error = %e, "bad host candidate"),
            }
        }
        // Passive only: clients behind UDP-blocking networks dial us.
        for a in &self.cfg.tcp_candidates {
            match Candidate::builder()
                .tcp()
                .host(*a)
                .tcptype(TcpType::Passive)
                .build()
            {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => tracing::warn!(error = %e, "bad TCP host candidate"),
            }
        }
        rtc
    }

    pub(super) fn join(
        &mut self,
        ticket: JoinTicket,
        out: OutboundTx,
        placed_here: bool,
    ) -> Result<(usize, u64), Refusal> {
        let JoinTicket { claims, options } = ticket;
        let grant = claims.video().clone();
        if options.reconnect {
            let known = self.room_by_name.get(&grant.room).and_then(|rk| {
                self.rooms[*rk].participants.iter().copied().find(|k| {
                    self.parts.get(*k).is_some_and(|p| {
                        p.identity == claims.sub && Some(&p.sid) == options.participant_sid.as_ref()
                    })
                })
            });
            if let Some(key) = known {
                // The client resumes because its media failed while its
                // signaling lived: the next rung needs a fresh session, so
                // answer the resume with a rejoin on it.
                let lost = self.parts[key].ice_lost_at.is_some()
                    && self.parts[key].state == lk::participant_info::State::Active
                    && !self.parts[key].fallback_tried;
                if lost && self.step_rung(key, Instant::now()) {
                    self.remove_participant(key, None);
                    let _ = out.try_send(Outgoing::Signal(Box::new(media_failure_rejoin())));
                    let _ = out.try_send(Outgoing::Close);
                    return Ok((usize::MAX, 0));
                }
                return Ok(self.resume(key, out));
            }
            // Nothing to resume: the client must join afresh.
            tracing::info!(
                sid = options.participant_sid.as_deref().unwrap_or(""),
                "resume of an unknown session: told to rejoin"
            );
            let _ = out.try_send(Outgoing::Signal(Box::new(rejoin())));
            let _ = out.try_send(Outgoing::Close);
            return Ok((usize::MAX, 0));
        }
        // What the client itself asks to carry (the token's own metadata is
        // the operator's, not limited).
        let client_attributes = participant::attributes_bytes(&HashMap::new(), &options.attributes);
        if let Some((limit, why)) = participant::exceeds(
            options.metadata.as_deref().unwrap_or(""),
            client_attributes,
            &self.cfg.limits,
        ) {
            self.counters.refused(limit);
            return Err(refusal(StatusCode::BAD_REQUEST, "limit_exceeded", why));
        }
        let room_key = match self.room_by_name.get(&grant.room) {
            Some(k) => *k,
            // With auto-create off, only a token granting roomCreate or a
            // placement made ahead (token service, server API) opens a room.
            None if self.cfg.auto_create || grant.room_create || placed_here => {
                self.create_room(&grant.room)
            }
            None => {
                return Err(refusal(
                    StatusCode::NOT_FOUND,
                    "room_not_found",
                    "requested room does not exist",
                ))
            }
        };
        let r = &self.rooms[room_key];
        let rejoining = r
            .participants
            .iter()
            .any(|k| self.parts.get(*k).is_some_and(|p| p.identity == claims.sub));
        if r.max_participants > 0
            && r.participants.len() >= r.max_participants as usize
            && !rejoining
        {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                "room_full",
                "the room has reached its maximum number of participants",
            ));
        }
        // Same identity again: the newer session replaces the older one.
        let dup = self.rooms[room_key]
            .participants
            .iter()
            .copied()
            .find(|k| self.parts.get(*k).is_some_and(|p| p.identity == claims.sub));
        if let Some(old) = dup {
            self.remove_participant(old, Some(lk::DisconnectReason::DuplicateIdentity));
        }
        let max = self.cfg.max_participants;
        if max > 0 && self.rooms[room_key].participants.len() as u32 >= max {
            return Err(refusal(StatusCode::FORBIDDEN, "room_full", "room is full"));
        }

        let now = Instant::now();
        let rung = self.fallbacks.rung(&grant.room, &claims.sub, now);
        // Dual PC: a second connection that we offer, for what it subscribes to.
        let dual = options.flavor == Flavor::DualPc;
        let mut rtc = self.new_rtc(rung, !dual);
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        let paced = self.cfg.bwe_initial.is_some();
        let sub_peer = dual.then(|| {
            let mut rtc = self.new_rtc(rung, true);
            let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
            let mut peer = Peer::new(rtc, ufrag);
            peer.paced = paced;
            Box::new(SubscriberPeer {
                peer,
                pending: None,
                offer_id: 0,
                renegotiate: false,
                restart_ice: false,
                channels_added: false,
            })
        });
        let permission = lk::ParticipantPermission {
            can_subscribe: grant.can_subscribe(),
            can_publish: grant.can_publish(),
            can_publish_data: grant.can_publish_data(),
            can_publish_sources: grant
                .can_publish_sources
                .iter()
                .filter_map(|s| match s.as_str() {
                    "camera" => Some(lk::TrackSource::Camera as i32),
                    "microphone" => Some(lk::TrackSource::Microphone as i32),
                    "screen_share" => Some(lk::TrackSource::ScreenShare as i32),
                    "screen_share_audio" => Some(lk::TrackSource::ScreenShareAudio as i32),
                    _ => None,
                })
                .collect(),
            hidden: grant.hidden,
            can_update_metadata: grant.can_update_own_metadata.unwrap_or(false),
            ..Default::default()
        };
        let gen = self.next_gen;
        self.next_gen += 1;
        let p = Participant {
            gen,
            sid: ids::participant_sid(),
            identity: claims.sub.clone(),
            name: claims.name.clone(),
            metadata: options.metadata.clone().unwrap_or(claims.metadata.clone()),
            attributes: if options.attributes.is_empty() {
                claims.attributes.clone()
            } else {
                options.attributes.clone()
            },
            room: room_key,
            grant,
            permission,
            state: lk::participant_info::State::Joined,
            version: 1,
            joined_at_ms: now_ms(),
            out,
            flavor: options.flavor,
            protocol: options.protocol,
            auto_subscribe: options.auto_subscribe,
            peer: {
                let mut peer = Peer::new(rtc, ufrag.clone());
                peer.paced = paced && !dual;
                peer
            },
            sub_peer,
            pending_tracks: Vec::new(),
            published: Vec::new(),
            subs: Slab::new(),
            slots: Vec::new(),
            reoffer_requested: None,
            broken: false,
            last_data_seq: 0,
            detached_at: None,
            worst_loss: 0.0,
            quality: None,
            rung,
            downlink: Downlink::default(),
            ice_lost_at: None,
            fallback_tried: false,
            data_rate: TokenBucket::new(
                self.cfg.limits.data_packets_per_sec,
                self.cfg.limits.data_packets_per_sec.saturating_mul(2),
                now,
            ),
            data_refusal_told: None,
        };
        if rung != Rung::Any {
            tracing::info!(rung = rung.name(), "joining on a fallback rung");
        }
        let key = self.parts.insert(p);
        self.io.demux.set_ufrag(ufrag, (key, PcRole::Main));
        if let Some(sp) = &self.parts[key].sub_peer {
            self.io
                .demux
                .set_ufrag(sp.peer.ufrag.clone(), (key, PcRole::Subscriber));
        }
        let server_info = self.server_info();
        let ice_servers = self.ice_servers(&self.parts[key].sid);
        self.publish_gauges();
        let room = &mut self.rooms[room_key];
        room.participants.push(key);
        room.empty_since = None;
        room.unjoined_since = None;

        // JoinResponse first, as every client requires.
        let others: Vec<lk::ParticipantInfo> = room
            .participants
            .iter()
            .filter(|k| **k != key)
            .filter_map(|k| self.parts.get(*k))
            .filter(|p| !p.permission.hidden)
            .map(|p| p.info(&room.tracks))
            .collect();
        let jr = lk::JoinResponse {
            room: Some(room.info()),
            participant: Some(self.parts[key].info(&room.tracks)),
            other_participants: others,
            server_version: COMPAT_VERSION.into(),
            server_info: Some(server_info),
            // Dual PC: the client waits for our subscriber offer.
            subscriber_primary: dual && self.parts[key].permission.can_subscribe,
            ping_interval: PING_INTERVAL,
            ping_timeout: PING_TIMEOUT,
            ice_servers,
            client_configuration: client_configuration(rung),
            sif_trailer: room.sif_trailer.clone(),
            server_region: self.cfg.jurisdiction.clone(),
            ..Default::default()
        };
        self.parts[key].send(Resp::Join(jr));
        tracing::info!(room = %self.rooms[room_key].name, participant = %self.parts[key].sid, dual_pc = dual, "participant joined");
        self.hook_participant("participant_joined", key, None, None);

        // Subscribe to what is already published, then answer the bundled
        // offer so the first answer can already carry those tracks.
        if self.parts[key].auto_subscribe && self.parts[key].permission.can_subscribe {
            let tracks: Vec<usize> = self.rooms[room_key].tracks.iter().map(|(k, _)| k).collect();
            for t in tracks {
                self.add_sub(key, t, false);
            }
        }
        if let Some(offer) = options.publisher_offer {
            self.offer(key, offer);
        }
        if dual {
            // Offered even when empty: the client is connected when it is.
            self.negotiate_subscriber(key);
        }
        self.broadcast_participant(key, false);
        self.send_current_speakers(key);
        Ok((key, gen))
    }

    /// Speaker updates are deltas: one who joins (or resumes) while someone
    /// keeps talking at a steady level would otherwise never hear of them.
    fn send_current_speakers(&mut self, key: usize) {
        let Some(p) = self.parts.get(key) else {
            return;
        };
        let speakers: Vec<lk::SpeakerInfo> = self.rooms[p.room]
            .speakers
            .iter()
            .map(|(sid, level)| lk::SpeakerInfo {
                sid: sid.clone(),
                level: *level,
                active: true,
            })
            .collect();
        if !speakers.is_empty() {
            self.parts[key].send(Resp::SpeakersChanged(lk::SpeakersChanged { speakers }));
        }
    }

    /// A client whose socket dropped comes back: same participant, same
    /// tracks, same peer connections; it restarts ICE itself (single PC),
    /// we do for the subscriber connection (dual PC).
    pub(super) fn resume(&mut self, key: usize, out: OutboundTx) -> (usize, u64) {
        let gen = self.next_gen;
        self.next_gen += 1;
        let server_info = self.server_info();
        let ice_servers = self.ice_servers(&self.parts[key].sid);
        let p = &mut self.parts[key];
        // A late Closed from the old socket now names an old generation.
        let _ = p.out.try_send(Outgoing::Close);
        p.gen = gen;
        p.out = out;
        p.broken = false;
        p.detached_at = None;
        let room = p.room;
        tracing::info!(participant = %p.sid, "session resumed");
        p.send(Resp::Reconnect(lk::ReconnectResponse {
            server_info: Some(server_info),
            ice_servers,
            client_configuration: client_configuration(p.rung),
            last_message_seq: p.last_data_seq,
        }));
        let r = &self.rooms[room];
        let everyone: Vec<lk::ParticipantInfo> = r
            .participants
            .iter()
            .filter_map(|k| self.parts.get(*k))
            .filter(|o| !o.permission.hidden || o.sid == self.parts[key].sid)
            .map(|o| o.info(&r.tracks))
            .collect();
        let room_info = r.info();
        let p = &mut self.parts[key];
        p.send(Resp::Update(lk::ParticipantUpdate {
            participants: everyone,
        }));
        p.send(Resp::RoomUpdate(lk::RoomUpdate {
            room: Some(room_info),
        }));
        if p.sub_peer.is_some() {
            self.restart_subscriber_ice(key);
        }
        self.send_current_speakers(key);
        (key, gen)
    }

    pub(super) fn create_room(&mut self, name: &str) -> usize {
        let mut sif = vec![0u8; 8];
        rand::Rng::fill(&mut rand::rng(), &mut sif[..]);
        let key = self.rooms.insert(Room {
            sid: ids::room_sid(),
            name: name.to_string(),
            created_at: now_ms(),
            participants: Vec::new(),
            tracks: Slab::new(),
            empty_since: None,
            unjoined_since: None,
            sif_trailer: sif,
            speakers: Vec::new(),
            departure_timeout_secs: self.cfg.departure_timeout_secs,
            empty_timeout_secs: self.cfg.empty_timeout_secs,
            bwe_downgrades: 0,
            metadata: String::new(),
            max_participants: 0,
        });
        self.room_by_name.insert(name.to_string(), key);
        if let Ok(mut d) = self.directory.write() {
            d.insert(name.to_string());
        }
        self.publish_gauges();
        tracing::info!(room = %name, "room created");
        self.hook_room("room_started", &self.rooms[key]);
        key
    }

    pub(super) fn signal(&mut self, key: usize, msg: Req) {
        match msg {
            Req::Offer(sd) => self.offer(key, sd),
            Req::Answer(sd) => self.subscriber_answer(key, sd),
            Req::Trickle(t) => self.trickle(key, t),
            Req::AddTrack(a) => self.add_track(key, a),
            Req::Mute(m) => self.mute(key, m),
            Req::Subscription(s) => self.update_subscription(key, s),
            Req::TrackSetting(s) => self.track_settings(key, s),
            Req::Leave(_) => self.remove_participant(key, None),
            Req::UpdateMetadata(m) => self.update_metadata(key, m),
            Req::SyncState(state) => self.sync_state(key, state),
            Req::Simulate(_) | Req::UpdateLayers(_) | Req::SubscriptionPermission(_) => {}
            _ => {
                let Some(p) = self.parts.get_mut(key) else {
                    return;
                };
                MediaCounters::add(&self.counters.signal_errors, 1);
                error_to(
                    p,
                    lk::request_response::Reason::UnsupportedType,
                    "request not supported by this server".into(),
                );
            }
        }
    }

    pub(super) fn trickle(&mut self, key: usize, t: lk::TrickleRequest) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        #[derive(serde::Deserialize)]
        struct Init {
            candidate: String,
        }
        let Ok(init) = serde_json::from_str::<Init>(&t.candidate_init) else {
            MediaCounters::add(&self.counters.signal_errors, 1);
            error_to(
                p,
                lk::request_response::Reason::InvalidRequest,
                "trickle candidate is not JSON RTCIceCandidateInit".into(),
            );
            return;
        };
        let line = init.candidate.trim();
        if line.is_empty() {
            return; // end of candidates
        }
        let to_subscriber = t.target == lk::SignalTarget::Subscriber as i32;
        let peer = match (to_subscriber, p.sub_peer.as_mut()) {
            (true, Some(s)) => &mut s.peer,
            _ => &mut p.peer,
        };
        match Candidate::from_sdp_string(line) {
            Ok(c) => peer.rtc.add_remote_candidate(c),
            Err(_) => {
                // Candidates we cannot use (mDNS, TCP) are harmless to skip.
                tracing::debug!("unparseable remote candidate skipped");
            }
        }
    }

    // ------------------------------------------------ participant state

    pub(super) fn broadcast_participant(&mut self, key: usize, bump: bool) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        if bump {
            p.version += 1;
        }
        let room = p.room;
        let info = p.info(&self.rooms[room].tracks);
        if p.permission.hidden {
            return;
        }
        let members: Vec<usize> = self.rooms[room].participants.clone();
        for m in members {
            if let Some(o) = self.parts.get_mut(m) {
                o.send(Resp::Update(lk::ParticipantUpdate {
                    participants: vec![info.clone()],
                }));
            }
        }
    }

    pub(super) fn remove_participant(&mut self, key: usize, reason: Option<lk::DisconnectReason>) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        let room_key = p.room;
        if let Some(r) = reason {
            p.send(Resp::Leave(lk::LeaveRequest {
                reason: r as i32,
                action: lk::leave_request::Action::Disconnect as i32,
                ..Default::default()
            }));
        }
        let _ = p.out.try_send(Outgoing::Close);
        p.peer.rtc.disconnect();
        if let Some(sp) = p.sub_peer.as_mut() {
            sp.peer.rtc.disconnect();
        }
        tracing::info!(participant = %p.sid, reason = ?reason, "participant left");
        for tk in p.published.clone() {
            self.unpublish(key, tk);
        }
        let gone = lk::participant_info::State::Disconnected;
        self.hook_participant("participant_left", key, Some(gone), None);
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        let subs: Vec<usize> = p.subs.iter().map(|(k, _)| k).collect();
        for sk in subs {
            self.drop_sub(key, sk, false);
        }
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        p.state = lk::participant_info::State::Disconnected;
        p.version += 1;
        let info = p.info(&self.rooms[room_key].tracks);
        let hidden = p.permission.hidden;
        let p = self.parts.remove(key);
        for peer in [Some(&p.peer), p.sub_peer.as_ref().map(|s| &s.peer)]
            .into_iter()
            .flatten()
        {
            self.io.demux.remove_ufrag(&peer.ufrag);
            self.io.forget(&peer.remote_paths, |(k, _)| *k == key);
        }
        if let Some(f) = self.is_dirty.get_mut(key) {
            *f = false;
        }
        self.dirty.retain(|k| *k != key);
        let room = &mut self.rooms[room_key];
        room.participants.retain(|k| *k != key);
        if room.participants.is_empty() {
            room.empty_since = Some(Instant::now());
        }
        if !hidden {
            for m in room.participants.clone() {
                if let Some(o) = self.parts.get_mut(m) {
                    o.send(Resp::Update(lk::ParticipantUpdate {
                        participants: vec![info.clone()],
                    }));
                }
            }
        }
        self.publish_gauges();
    }

    /// Move sessions whose ICE failed while their signaling lives one rung
    /// down the fallback ladder: remember the rung for their next join, and
    /// ask the client to rejoin (LiveKit clients do that at once).
    pub(super) fn ice_fallback(&mut self, now: Instant) {
        let failed: Vec<usize> = self
            .parts
            .iter()
            .filter(|(_, p)| p.detached_at.is_none() && !p.broken && !p.fallback_tried)
            // As LiveKit: only a connection that worked and then failed
            // says which path to leave; one that never connected says none.
            .filter(|(_, p)| {
                p.state == lk::participant_info::State::Active
                    && p.ice_lost_at
                        .is_some_and(|t| now.duration_since(t) >= ICE_LOST_GRACE)
            })
            .map(|(k, _)| k)
            .collect();
        for k in failed {
            if self.step_rung(k, now) {
                self.parts[k].send(media_failure_rejoin());
                self.remove_participant(k, None);
            }
        }
    }

    /// Record the next rung for a session whose ICE failed while its
    /// signaling lived; false if there is none to go to.
    fn step_rung(&mut self, key: usize, now: Instant) -> bool {
        let offers = Offers {
            ice_tcp: !self.cfg.tcp_candidates.is_empty(),
            turn: !self.cfg.turn.is_empty(),
        };
        let p = &mut self.parts[key];
        p.fallback_tried = true;
        // The path the media last took says which rung failed.
        let path = p
            .sub_peer
            .as_ref()
            .and_then(|s| s.peer.last_proto)
            .or(p.peer.last_proto);
        let room = &self.rooms[p.room].name;
        match self
            .fallbacks
            .step(room, &p.identity, p.rung, path, offers, now)
        {
            Some(next) => {
                tracing::info!(participant = %p.sid, from = p.rung.name(), to = next.name(), "ICE failed while signaling lives: the client rejoins on the next rung");
                MediaCounters::add(&self.counters.ice_fallbacks, 1);
                true
            }
            None => {
                tracing::info!(participant = %p.sid, rung = p.rung.name(), "ICE failed while signaling lives; no further rung to offer");
                false
            }
        }
    }

    pub(super) fn reap_broken(&mut self) {
        let window = self.cfg.resume_window;
        let broken: Vec<usize> = self
            .parts
            .iter()
            .filter(|(_, p)| {
                p.broken || !p.alive() || p.detached_at.is_some_and(|t| t.elapsed() >= window)
            })
            .map(|(k, _)| k)
            .collect();
        for k in broken {
            self.remove_participant(k, None);
        }
    }

    pub(super) fn housekeeping(&mut self, now: Instant) {
        self.reap_broken();
        self.io.sweep(now);
        self.ice_fallback(now);
        self.retry_reoffers(now);
        // Active speakers per room, as deltas.
        let room_keys: Vec<usize> = self.rooms.iter().map(|(k, _)| k).collect();
        for rk in room_keys {
            let mut changed = Vec::new();
            {
                let room = &mut self.rooms[rk];
                let mut per_participant: HashMap<usize, (bool, f32)> = HashMap::new();
                let mut any_change = false;
                for (_, t) in room.tracks.iter_mut() {
                    if t.kind != Kind::Audio {
                        continue;
                    }
                    any_change |= t.meter.close_window();
                    let e = per_participant.entry(t.publisher).or_insert((false, 0.0));
                    e.0 |= t.meter.active;
                    e.1 = e.1.max(t.meter.level);
                }
                if any_change {
                    for (pk, (active, level)) in per_participant {
                        let Some(p) = self.parts.get(pk) else {
                            continue;
                        };
                        let was = room.speakers.iter().position(|s| s.0 == p.sid);
                        match (active, was) {
                            (true, None) => {
                                room.speakers.push((p.sid.clone(), level));
                                changed.push(lk::SpeakerInfo {
                                    sid: p.sid.clone(),
                                    level,
                                    active: true,
                                });
                            }
                            (true, Some(i)) => {
                                room.speakers[i].1 = level;
                                changed.push(lk::SpeakerInfo {
                                    sid: p.sid.clone(),
                                    level,
                                    active: true,
                                });
                            }
                            (false, Some(i)) => {
                                room.speakers.remove(i);
                                changed.push(lk::SpeakerInfo {
                                    sid: p.sid.clone(),
                                    level: 0.0,
                                    active: false,
                                });
                            }
                            (false, None) => {}
                        }
                    }
                }
            }
            if !changed.is_empty() {
                for m in self.rooms[rk].participants.clone() {
                    if let Some(o) = self.parts.get_mut(m) {
                        o.send(Resp::SpeakersChanged(lk::SpeakersChanged {
                            speakers: changed.clone(),
                        }));
                    }
                }
            }
        }
        self.layer_availability(now);
        self.measure_layers();
        self.allocate_downlinks(now);
        self.dynacast(now);
        if now >= self.next_quality {
            self.next_quality = now + QUALITY_INTERVAL;
            self.connection_quality();
        }
        // Close rooms that stayed empty.
        let closing: Vec<usize> = self
            .rooms
            .iter()
            .filter(|(_, r)| {
                r.participants.is_empty()
                    && (r.empty_since.is_some_and(|t| {
                        now.duration_since(t) >= Duration::from_secs(r.departure_timeout_secs)
                    }) || r.unjoined_since.is_some_and(|t| {
                        now.duration_since(t) >= Duration::from_secs(r.empty_timeout_secs)
                    }))
            })
            .map(|(k, _)| k)
            .collect();
        for rk in closing {
            self.close_room(rk);
        }
        self.publish_gauges();
    }

    /// Close an empty room.
    pub(super) fn close_room(&mut self, rk: usize) {
        let Some(r) = self.rooms.try_remove(rk) else {
            return;
        };
        self.room_by_name.remove(&r.name);
        if let Ok(mut d) = self.directory.write() {
            d.remove(&r.name);
        }
        if let Ok(mut m) = self.counters.room_bandwidth.lock() {
            m.remove(&r.name);
        }
        tracing::info!(room = %r.name, "room closed");
        self.hook_room("room_finished", &r);
    }
}
