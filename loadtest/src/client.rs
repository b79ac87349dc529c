//! One simulated participant: signaling, a publisher and a subscriber peer
//! connection on webrtc-rs (LiveKit's two-connection flavour), the media it
//! sends and the counting of what it receives.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use livekit_protocol as lk;
use lk::signal_request::Message as Req;
use lk::signal_response::Message as Resp;
use moselle::signaling::token::{join_claims, KeySet};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MIME_TYPE_VP8};
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    register_default_interceptors, MediaEngine, PeerConnection, PeerConnectionBuilder,
    PeerConnectionEventHandler, RTCConfigurationBuilder, RTCIceGatheringState,
    RTCPeerConnectionState, RTCSessionDescription, Registry, SettingEngineBuilder,
};

use crate::media::{self, OpusLoop, Vp8Layer, LAYERS_720P};
use crate::stats::{now_us, JoinPhase, JoinSteps, Stats};

const SDES_MID: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
const SDES_RID: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";
const OPUS_PT: u8 = 111;
const VP8_PT: u8 = 96;
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Shared by every participant of a run.
pub struct Ctx {
    /// ws:// base URL of the server.
    pub url: String,
    pub keys: KeySet,
    pub key: String,
    /// Local address the peer connections bind (one host candidate each).
    pub bind_ip: IpAddr,
    pub stats: Arc<Stats>,
    /// When the first publisher started sending (µs, 0 = not yet): join time
    /// counts from here for those who joined before there was media.
    pub media_since: AtomicU64,
    pub flavor: Flavor,
    pub transport: Transport,
}

/// What one participant does.
#[derive(Debug, Clone)]
pub struct Plan {
    pub room: String,
    pub identity: String,
    pub audio: bool,
    pub video: bool,
    pub subscribe: bool,
    /// The size this participant renders each remote video at (its tile in
    /// a grid, or the full stage); the SFU picks the layer from it, as it
    /// does for livekit-client's adaptive stream.
    pub view: (u32, u32),
}

/// Per-received-stream state for loss counting, kept in the reader task.
struct SeqTrack {
    highest: Option<u64>,
}

impl SeqTrack {
    /// Extended sequence number tracking: returns how many packets this one
    /// advances the expected count by.
    fn advance(&mut self, seq: u16) -> u64 {
        match self.highest {
            None => {
                self.highest = Some(seq as u64);
                1
            }
            Some(h) => {
                let cand = (h & !0xffff) | seq as u64;
                let ext = if cand + 0x8000 < h {
                    cand + 0x1_0000
                } else if cand > h + 0x8000 && cand >= 0x1_0000 {
                    cand - 0x1_0000
                } else {
                    cand
                };
                if ext > h {
                    self.highest = Some(ext);
                    ext - h
                } else {
                    0
                }
            }
        }
    }
}

struct Handler {
    gathered: Arc<Notify>,
    state: watch::Sender<RTCPeerConnectionState>,
    ctx: Arc<Ctx>,
    joined_at: u64,
    first_media: Arc<AtomicU64>,
    steps: Arc<JoinSteps>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.notify_one();
        }
    }
    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        if state == RTCPeerConnectionState::Connected {
            self.steps.mark(JoinPhase::Connected, self.joined_at);
        }
        let _ = self.state.send(state);
    }
    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let ctx = self.ctx.clone();
        let joined_at = self.joined_at;
        let first_media = self.first_media.clone();
        let steps = self.steps.clone();
        tokio::spawn(read_track(ctx, track, joined_at, first_media, steps));
    }
}

/// Count what arrives on one remote track. Kept cheap: webrtc-rs drops
/// packets when this loop falls behind, and we would report our own loss.
async fn read_track(
    ctx: Arc<Ctx>,
    track: Arc<dyn TrackRemote>,
    joined_at: u64,
    first_media: Arc<AtomicU64>,
    steps: Arc<JoinSteps>,
) {
    let video = track.kind().await == RtpCodecKind::Video;
    let s = &ctx.stats;
    Stats::add(&s.recv_tracks, 1);
    let mut seqs: HashMap<u32, SeqTrack> = HashMap::new();
    while let Some(ev) = track.poll().await {
        let TrackRemoteEvent::OnRtpPacket(p) = ev else {
            continue;
        };
        let now = now_us();
        if first_media
            .compare_exchange(0, now, Relaxed, Relaxed)
            .is_ok()
        {
            // Token to first media, for those who joined a room where
            // media already flowed; earlier joiners waited for publishers.
            let since = ctx.media_since.load(Relaxed);
            if since != 0 && since <= joined_at {
                s.join_us.record(now.saturating_sub(joined_at));
                steps.record(&s.join_phase_us);
            }
        }
        let st = seqs
            .entry(p.header.ssrc)
            .or_insert(SeqTrack { highest: None });
        Stats::add(&s.recv_expected, st.advance(p.header.sequence_number));
        Stats::add(&s.recv_packets, 1);
        Stats::add(&s.recv_bytes, p.payload.len() as u64);
        if video {
            Stats::add(&s.recv_video_packets, 1);
            if media::vp8_is_keyframe_start(&p.payload) {
                Stats::add(&s.recv_keyframes, 1);
            }
        }
        if let Some(sent) = media::read_trailer(&p.payload) {
            s.delay_us.record(now.saturating_sub(sent));
        }
    }
}

fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: vec![],
    }
}

fn vp8_codec() -> RTCRtpCodec {
    let fb = |typ: &str, parameter: &str| RTCPFeedback {
        typ: typ.to_owned(),
        parameter: parameter.to_owned(),
    };
    RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: vec![fb("nack", ""), fb("nack", "pli"), fb("ccm", "fir")],
    }
}

pub(crate) struct Pc {
    pub(crate) pc: Arc<dyn PeerConnection>,
    pub(crate) gathered: Arc<Notify>,
    state: watch::Receiver<RTCPeerConnectionState>,
    /// The server's passive TCP candidates were handed to the ICE agent.
    dialled: Arc<AtomicBool>,
}

/// webrtc-rs dials a passive TCP candidate only when it is trickled
/// (`add_ice_candidate`), not when it comes inside the SDP, and Moselle
/// sends its candidates in the SDP: so hand them over once, as trickle.
async fn dial_tcp_candidates(
    pc: &Arc<dyn PeerConnection>,
    dialled: &AtomicBool,
    sdp: &str,
) -> anyhow::Result<()> {
    if dialled.swap(true, Relaxed) {
        return Ok(());
    }
    let (mut mid, mut index) = (None::<String>, -1i32);
    for line in sdp.lines() {
        if line.starts_with("m=") {
            index += 1;
        } else if let Some(m) = line.strip_prefix("a=mid:") {
            mid = Some(m.trim().to_string());
        } else if let Some(c) = line.strip_prefix("a=") {
            if c.starts_with("candidate:") && c.contains(" tcp ") && c.contains("tcptype passive") {
                pc.add_ice_candidate(webrtc::peer_connection::RTCIceCandidateInit {
                    candidate: c.trim().to_string(),
                    sdp_mid: mid.clone(),
                    sdp_mline_index: u16::try_from(index).ok(),
                    ..Default::default()
                })
                .await?;
            }
        }
    }
    Ok(())
}

pub(crate) async fn new_pc(
    ctx: &Arc<Ctx>,
    joined_at: u64,
    first_media: Arc<AtomicU64>,
    steps: Arc<JoinSteps>,
) -> anyhow::Result<Pc> {
    let mut me = MediaEngine::default();
    me.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: opus_codec(),
            payload_type: OPUS_PT,
        },
        RtpCodecKind::Audio,
    )?;
    // No RTX: LiveKit's SDKs publish VP8 simulcast without it too, and
    // webrtc-rs would not signal its repair SSRCs.
    me.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: vp8_codec(),
            payload_type: VP8_PT,
        },
        RtpCodecKind::Video,
    )?;
    let registry = register_default_interceptors(Registry::new(), &mut me)?;
    let se = SettingEngineBuilder::new()
        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
        .build();
    let gathered = Arc::new(Notify::new());
    let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
    let handler = Arc::new(Handler {
        gathered: gathered.clone(),
        state: state_tx,
        ctx: ctx.clone(),
        joined_at,
        first_media,
        steps,
    });
    let local = vec![format!("{}:0", ctx.bind_ip)];
    let (udp, tcp) = match ctx.transport {
        Transport::Udp => (local, vec![]),
        Transport::Tcp => (vec![], local),
    };
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(me)
        .with_setting_engine(se)
        .with_interceptor_registry(registry)
        .with_handler(handler)
        .with_udp_addrs(udp)
        .with_tcp_addrs(tcp)
        .build()
        .await?;
    Ok(Pc {
        pc: Arc::new(pc),
        gathered,
        state,
        dialled: Arc::new(AtomicBool::new(ctx.transport != Transport::Tcp)),
    })
}

impl Pc {
    pub(crate) async fn local_with_candidates(
        &self,
        desc: RTCSessionDescription,
    ) -> anyhow::Result<String> {
        set_local(&self.pc, &self.gathered, desc).await
    }

    pub(crate) async fn wait_connected(&mut self) -> anyhow::Result<()> {
        let r = tokio::time::timeout(
            SETUP_TIMEOUT,
            self.state.wait_for(|s| {
                matches!(
                    s,
                    RTCPeerConnectionState::Connected
                        | RTCPeerConnectionState::Failed
                        | RTCPeerConnectionState::Closed
                )
            }),
        )
        .await
        .context("peer connection did not connect in time")?;
        let s = *r.map_err(|_| anyhow!("peer connection handler gone"))?;
        if s != RTCPeerConnectionState::Connected {
            bail!("peer connection {s}");
        }
        Ok(())
    }
}

fn sdp_msg(kind: &str, sdp: String) -> lk::SessionDescription {
    lk::SessionDescription {
        r#type: kind.into(),
        sdp,
        ..Default::default()
    }
}

/// A published track ready to send: the ids the answer negotiated.
pub(crate) struct Outgoing {
    track: Arc<TrackLocalStaticRTP>,
    mid: Bytes,
    mid_ext: Option<u8>,
    rid_ext: Option<u8>,
    pt: u8,
}

async fn outgoing(
    tr: &Arc<dyn webrtc::rtp_transceiver::RtpTransceiver>,
    track: Arc<TrackLocalStaticRTP>,
) -> anyhow::Result<Outgoing> {
    let mid = tr.mid().await?.unwrap_or_default();
    let sender = tr
        .sender()
        .await?
        .ok_or_else(|| anyhow!("transceiver without sender"))?;
    let params = sender.get_parameters().await?.rtp_parameters;
    let ext = |uri: &str| {
        params
            .header_extensions
            .iter()
            .find(|e| e.uri == uri)
            .map(|e| e.id as u8)
    };
    let pt = params
        .codecs
        .first()
        .map(|c| c.payload_type)
        .ok_or_else(|| anyhow!("no codec negotiated for mid {mid}"))?;
    Ok(Outgoing {
        track,
        mid: Bytes::from(mid.clone()),
        mid_ext: ext(SDES_MID),
        rid_ext: ext(SDES_RID),
        pt,
    })
}

/// A send-only transceiver of its own (add_track would reuse a receiving one).
async fn add_sender(
    pc: &Arc<dyn PeerConnection>,
    track: &Arc<TrackLocalStaticRTP>,
) -> anyhow::Result<Arc<dyn webrtc::rtp_transceiver::RtpTransceiver>> {
    Ok(pc
        .add_transceiver_from_track(
            track.clone() as Arc<dyn TrackLocal>,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Sendonly,
                streams: vec![],
                send_encodings: vec![],
            }),
        )
        .await?)
}

fn encoding(codec: &RTCRtpCodec, rid: &str, ssrc: u32) -> RTCRtpEncodingParameters {
    RTCRtpEncodingParameters {
        rtp_coding_parameters: RTCRtpCodingParameters {
            rid: rid.into(),
            ssrc: Some(ssrc),
            ..Default::default()
        },
        codec: codec.clone(),
        ..Default::default()
    }
}

/// Which LiveKit signaling flavour the participants use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Flavor {
    /// `/rtc/v1`: one peer connection, the client always offers (current
    /// livekit-client and the Python/Rust SDKs).
    V1,
    /// `/rtc`: a publisher and a server-offered subscriber connection.
    V0,
}

/// How the participants' media reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// UDP host candidates (what clients use when they can).
    Udp,
    /// ICE over TCP only: the client dials the server's passive TCP
    /// candidates (a client whose network blocks UDP).
    Tcp,
}

/// Run one participant until `stop` turns true. Returns after leaving.
pub async fn run(ctx: Arc<Ctx>, plan: Plan, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let joined_at = now_us();
    let mut claims = join_claims(&plan.room, &plan.identity, Duration::from_secs(3600));
    if let Some(v) = claims.video.as_mut() {
        v.can_publish = Some(plan.audio || plan.video);
        v.can_subscribe = Some(plan.subscribe);
    }
    let token = ctx.keys.mint(&ctx.key, &claims)?;
    let single = ctx.flavor == Flavor::V1;
    let (join, mut sig) = crate::signal::connect(&ctx.url, &token, single).await?;
    let join_steps = Arc::new(JoinSteps::default());
    join_steps.mark(JoinPhase::Signal, joined_at);
    let first_media = Arc::new(AtomicU64::new(0));
    // The connection we offer on, and (two-connection flavour) the one
    // the server offers on.
    let mut offerer = new_pc(&ctx, joined_at, first_media.clone(), join_steps.clone()).await?;
    let answerer = if single {
        None
    } else {
        Some(new_pc(&ctx, joined_at, first_media.clone(), join_steps.clone()).await?)
    };
    if single {
        // As the SDKs do: the first offer carries the data channel.
        offerer.pc.create_data_channel("_reliable", None).await?;
    }

    // One loop owns signaling and negotiation; the publish steps talk to
    // it through these.
    let (published_tx, mut published_rx) = mpsc::unbounded_channel::<lk::TrackPublishedResponse>();
    // A negotiation request is answered with the number of the answer
    // that will cover it.
    let (negotiate_tx, mut negotiate_rx) =
        mpsc::unbounded_channel::<Option<oneshot::Sender<u64>>>();
    let (negotiated_tx, negotiated_rx) = watch::channel(0u64);
    let req_tx = sig.tx.clone();
    let view = plan.view;
    let mut seen_tracks: HashSet<String> = HashSet::new();
    let mut settings_for = move |parts: &[lk::ParticipantInfo], tx: &mpsc::UnboundedSender<Req>| {
        for p in parts {
            for t in &p.tracks {
                if t.r#type == lk::TrackType::Video as i32 && seen_tracks.insert(t.sid.clone()) {
                    let _ = tx.send(Req::TrackSetting(lk::UpdateTrackSettings {
                        track_sids: vec![t.sid.clone()],
                        width: view.0,
                        height: view.1,
                        ..Default::default()
                    }));
                }
            }
        }
    };
    settings_for(&join.other_participants, &req_tx);
    // Dynacast: the layers the SFU wants (SubscribedQualityUpdate), as a
    // browser's encoder turns simulcast layers off and on.
    let layers_on: Arc<[AtomicBool; 3]> = Arc::new(std::array::from_fn(|_| AtomicBool::new(true)));
    let wanted = layers_on.clone();
    let off_pc = offerer.pc.clone();
    let off_gathered = offerer.gathered.clone();
    let off_dialled = offerer.dialled.clone();
    let signal_loop = tokio::spawn(async move {
        let mut in_flight = false;
        let mut again = false;
        let mut applied = 0u64;
        // Offer now, or after the answer in flight.
        macro_rules! negotiate {
            () => {
                if in_flight {
                    again = true;
                } else {
                    match offer(&off_pc, &off_gathered).await {
                        Ok(sdp) => {
                            in_flight = true;
                            let _ = req_tx.send(Req::Offer(sdp_msg("offer", sdp)));
                            join_steps.mark(JoinPhase::Offer, joined_at);
                        }
                        Err(e) => tracing::warn!(error = %e, "offer failed"),
                    }
                }
            };
        }
        loop {
            let m = tokio::select! {
                m = sig.rx.recv() => match m { Some(m) => m, None => break },
                n = negotiate_rx.recv() => {
                    let Some(ticket) = n else { break };
                    let covered_by = applied + if in_flight { 2 } else { 1 };
                    negotiate!();
                    if let Some(t) = ticket {
                        let _ = t.send(covered_by);
                    }
                    continue;
                }
            };
            match m {
                Resp::Offer(o) => {
                    join_steps.mark(JoinPhase::Subscribe, joined_at);
                    let Some(ans) = &answerer else { continue };
                    let r = async {
                        ans.pc
                            .set_remote_description(RTCSessionDescription::offer(o.sdp.clone())?)
                            .await?;
                        dial_tcp_candidates(&ans.pc, &ans.dialled, &o.sdp).await?;
                        let a = ans.pc.create_answer(None).await?;
                        let sdp = ans.local_with_candidates(a).await?;
                        let _ = req_tx.send(Req::Answer(sdp_msg("answer", sdp)));
                        join_steps.mark(JoinPhase::Answer, joined_at);
                        anyhow::Ok(())
                    }
                    .await;
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "subscriber offer failed");
                    }
                }
                Resp::Answer(a) => {
                    // The server's part ends here; applying it is the client's.
                    join_steps.mark(JoinPhase::Answer, joined_at);
                    let r = match RTCSessionDescription::answer(a.sdp.clone()) {
                        Ok(d) => off_pc.set_remote_description(d).await,
                        Err(e) => Err(e),
                    };
                    if r.is_ok() {
                        if let Err(e) = dial_tcp_candidates(&off_pc, &off_dialled, &a.sdp).await {
                            tracing::warn!(error = %e, "TCP candidates refused");
                        }
                    }
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "answer refused");
                    }
                    in_flight = false;
                    applied += 1;
                    let _ = negotiated_tx.send(applied);
                    if std::mem::take(&mut again) {
                        negotiate!();
                    }
                }
                Resp::MediaSectionsRequirement(r) => {
                    join_steps.mark(JoinPhase::Subscribe, joined_at);
                    // Room for more subscriptions: receive-only m-lines.
                    let kinds =
                        std::iter::repeat_n(RtpCodecKind::Audio, r.num_audios as usize).chain(
                            std::iter::repeat_n(RtpCodecKind::Video, r.num_videos as usize),
                        );
                    for kind in kinds {
                        let init = RTCRtpTransceiverInit {
                            direction: RTCRtpTransceiverDirection::Recvonly,
                            streams: vec![],
                            send_encodings: vec![],
                        };
                        if let Err(e) = off_pc.add_transceiver_from_kind(kind, Some(init)).await {
                            tracing::warn!(error = %e, "receive transceiver");
                        }
                    }
                    negotiate!();
                }
                Resp::TrackPublished(p) => {
                    let _ = published_tx.send(p);
                }
                Resp::Update(u) => settings_for(&u.participants, &req_tx),
                Resp::SubscribedQualityUpdate(u) => {
                    // Per codec, as livekit-client reads it (one codec here).
                    for q in u.subscribed_codecs.iter().flat_map(|c| &c.qualities) {
                        let i = usize::try_from(q.quality).ok();
                        if let Some(f) = i.and_then(|i| wanted.get(i)) {
                            f.store(q.enabled, Relaxed);
                        }
                    }
                }
                Resp::Leave(_) => break,
                _ => {}
            }
        }
    });

    let r = async {
        if single {
            let _ = negotiate_tx.send(None);
        }
        let mut sends = Vec::new();
        if plan.audio || plan.video {
            let steps = Negotiation {
                tx: &sig.tx,
                published: &mut published_rx,
                negotiate: &negotiate_tx,
                negotiated: negotiated_rx,
            };
            sends = publish(&plan, &mut offerer, steps).await?;
        }
        Stats::add(&ctx.stats.joined, 1);
        let _ = ctx
            .media_since
            .compare_exchange(0, now_us(), Relaxed, Relaxed);
        send_media(&ctx, sends, &layers_on, &mut stop).await;
        anyhow::Ok(())
    }
    .await;
    let _ = sig.tx.send(Req::Leave(lk::LeaveRequest::default()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    signal_loop.abort();
    let _ = offerer.pc.close().await;
    r
}

/// Create an offer, set it, and return it with its candidates.
pub(crate) async fn offer(
    pc: &Arc<dyn PeerConnection>,
    gathered: &Arc<Notify>,
) -> anyhow::Result<String> {
    let o = pc.create_offer(None).await?;
    set_local(pc, gathered, o).await
}

/// Set the local description and return it with every candidate in it
/// (one host socket: gathering is immediate).
async fn set_local(
    pc: &Arc<dyn PeerConnection>,
    gathered: &Arc<Notify>,
    desc: RTCSessionDescription,
) -> anyhow::Result<String> {
    let done = gathered.notified();
    pc.set_local_description(desc).await?;
    let _ = tokio::time::timeout(Duration::from_secs(2), done).await;
    Ok(pc
        .local_description()
        .await
        .ok_or_else(|| anyhow!("no local description"))?
        .sdp)
}

/// The publish steps' line to the signaling loop.
struct Negotiation<'a> {
    tx: &'a mpsc::UnboundedSender<Req>,
    published: &'a mut mpsc::UnboundedReceiver<lk::TrackPublishedResponse>,
    negotiate: &'a mpsc::UnboundedSender<Option<oneshot::Sender<u64>>>,
    negotiated: watch::Receiver<u64>,
}

async fn publish(
    plan: &Plan,
    publisher: &mut Pc,
    mut n: Negotiation<'_>,
) -> anyhow::Result<Vec<(Outgoing, Source)>> {
    let tx = n.tx;
    if plan.audio {
        let _ = tx.send(Req::AddTrack(lk::AddTrackRequest {
            cid: format!("{}-mic", plan.identity),
            name: "microphone".into(),
            r#type: lk::TrackType::Audio as i32,
            source: lk::TrackSource::Microphone as i32,
            ..Default::default()
        }));
    }
    if plan.video {
        let top = LAYERS_720P[2];
        let _ = tx.send(Req::AddTrack(lk::AddTrackRequest {
            cid: format!("{}-camera", plan.identity),
            name: "camera".into(),
            r#type: lk::TrackType::Video as i32,
            source: lk::TrackSource::Camera as i32,
            width: top.width,
            height: top.height,
            layers: LAYERS_720P
                .iter()
                .map(|l| lk::VideoLayer {
                    quality: l.quality,
                    width: l.width,
                    height: l.height,
                    bitrate: l.bitrate_bps,
                    rid: l.rid.into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }));
    }
    let pending = add_senders(plan, &publisher.pc).await?;
    // The SDKs wait for every TrackPublished before offering.
    let want = pending.len();
    for _ in 0..want {
        tokio::time::timeout(SETUP_TIMEOUT, n.published.recv())
            .await
            .context("no TrackPublishedResponse")?
            .ok_or_else(|| anyhow!("signaling closed"))?;
    }
    // Offer (through the signaling loop, which serialises negotiations)
    // and wait for an answer that covers the new senders.
    let (ticket, covered_by) = oneshot::channel();
    let _ = n.negotiate.send(Some(ticket));
    let target = covered_by.await.map_err(|_| anyhow!("signaling closed"))?;
    tokio::time::timeout(SETUP_TIMEOUT, n.negotiated.wait_for(|v| *v >= target))
        .await
        .context("no answer to the publish offer")?
        .map_err(|_| anyhow!("signaling closed"))?;
    publisher.wait_connected().await?;
    ready_senders(pending).await
}

/// A sender added to a peer connection, not negotiated yet.
pub(crate) type PendingSender = (
    Arc<dyn webrtc::rtp_transceiver::RtpTransceiver>,
    Arc<TrackLocalStaticRTP>,
    Source,
);

/// The plan's microphone and simulcast camera as send-only transceivers
/// (track ids `<identity>-mic` and `<identity>-camera`).
pub(crate) async fn add_senders(
    plan: &Plan,
    pc: &Arc<dyn PeerConnection>,
) -> anyhow::Result<Vec<PendingSender>> {
    let stream = format!("{}-stream", plan.identity);
    let mut pending = Vec::new();
    let base_ssrc: u32 = rand::random::<u32>() & 0xffff_ff00;
    if plan.audio {
        let codec = opus_codec();
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            stream.clone(),
            format!("{}-mic", plan.identity),
            "microphone".into(),
            RtpCodecKind::Audio,
            vec![encoding(&codec, "", base_ssrc)],
        )));
        let tr = add_sender(pc, &track).await?;
        let src = Source::Audio {
            opus: OpusLoop::new(base_ssrc as u64)?,
            ssrc: base_ssrc,
        };
        pending.push((tr, track, src));
    }
    if plan.video {
        let codec = vp8_codec();
        let encodings = LAYERS_720P
            .iter()
            .enumerate()
            .map(|(i, l)| encoding(&codec, l.rid, base_ssrc + 1 + i as u32))
            .collect();
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            stream.clone(),
            format!("{}-camera", plan.identity),
            "camera".into(),
            RtpCodecKind::Video,
            encodings,
        )));
        let tr = add_sender(pc, &track).await?;
        let layers = LAYERS_720P
            .iter()
            .enumerate()
            .map(|(i, l)| {
                (
                    Vp8Layer::new(*l, base_ssrc as u64 + i as u64),
                    base_ssrc + 1 + i as u32,
                )
            })
            .collect();
        pending.push((tr, track, Source::Video { layers }));
    }
    Ok(pending)
}

/// After the answer: what each sender must put in its packets.
pub(crate) async fn ready_senders(
    pending: Vec<PendingSender>,
) -> anyhow::Result<Vec<(Outgoing, Source)>> {
    let mut out = Vec::new();
    for (tr, track, src) in pending {
        out.push((outgoing(&tr, track).await?, src));
    }
    Ok(out)
}

/// What a sender produces.
pub enum Source {
    Audio { opus: OpusLoop, ssrc: u32 },
    Video { layers: Vec<(Vp8Layer, u32)> },
}

struct StreamState {
    seq: u16,
    next_due: u64,
    interval: u64,
}

/// Send every source at its own rate until `stop`. One task per
/// participant, waking at the earliest due frame.
pub(crate) async fn send_media(
    ctx: &Arc<Ctx>,
    sends: Vec<(Outgoing, Source)>,
    layers_on: &[AtomicBool; 3],
    stop: &mut watch::Receiver<bool>,
) {
    let s = &ctx.stats;
    let start = now_us();
    // (index into sends, layer index) -> state
    let mut streams: Vec<(usize, usize, StreamState)> = Vec::new();
    for (i, (_, src)) in sends.iter().enumerate() {
        match src {
            Source::Audio { .. } => streams.push((
                i,
                0,
                StreamState {
                    seq: rand::random(),
                    next_due: start,
                    interval: media::OPUS_FRAME_US,
                },
            )),
            Source::Video { layers } => {
                for (l, (layer, _)) in layers.iter().enumerate() {
                    streams.push((
                        i,
                        l,
                        StreamState {
                            seq: rand::random(),
                            next_due: start,
                            interval: layer.frame_interval_us(),
                        },
                    ))
                }
            }
        }
    }
    let mut sends = sends;
    let mut frame: Vec<Bytes> = Vec::with_capacity(64);
    if streams.is_empty() {
        let _ = stop.wait_for(|v| *v).await;
        return;
    }
    loop {
        let due = streams.iter().map(|s| s.2.next_due).min().unwrap_or(start);
        let now = now_us();
        if due > now {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_micros(due - now)) => {},
                _ = stop.changed() => {},
            }
        }
        if *stop.borrow() {
            return;
        }
        let now = now_us();
        for (i, l, st) in streams.iter_mut() {
            if st.next_due > now {
                continue;
            }
            if now - st.next_due > st.interval {
                Stats::add(&s.send_late, 1);
            }
            st.next_due += st.interval;
            if st.next_due < now {
                // Far behind: skip ahead rather than burst.
                st.next_due = now + st.interval;
            }
            let (out, src) = &mut sends[*i];
            let (ssrc, rid, ts_clock) = match src {
                Source::Audio { opus, ssrc } => {
                    frame.clear();
                    frame.push(opus.next_frame());
                    (*ssrc, None, 48_000u64)
                }
                Source::Video { layers } => {
                    let (layer, ssrc) = &mut layers[*l];
                    let on = layers_on.get(*l).is_none_or(|f| f.load(Relaxed));
                    if !on {
                        // Paused: resume with a keyframe, as an encoder does.
                        layer.restart();
                        continue;
                    }
                    layer.next_frame(&mut frame);
                    (*ssrc, Some(layer.spec.rid), 90_000u64)
                }
            };
            let ts = (now * ts_clock / 1_000_000) as u32;
            let n = frame.len();
            for (k, payload) in frame.drain(..).enumerate() {
                let mut header = rtc::rtp::header::Header {
                    version: 2,
                    marker: k + 1 == n,
                    payload_type: out.pt,
                    sequence_number: st.seq,
                    timestamp: ts,
                    ssrc,
                    ..Default::default()
                };
                st.seq = st.seq.wrapping_add(1);
                if let (Some(id), Some(rid)) = (out.rid_ext, rid) {
                    let _ = header.set_extension(id, Bytes::from_static(rid.as_bytes()));
                    if let Some(mid) = out.mid_ext {
                        let _ = header.set_extension(mid, out.mid.clone());
                    }
                }
                let len = payload.len() as u64;
                let pkt = rtc::rtp::Packet { header, payload };
                match out.track.write_rtp(pkt).await {
                    Ok(()) => {
                        Stats::add(&s.sent_packets, 1);
                        Stats::add(&s.sent_bytes, len);
                    }
                    Err(_) => Stats::add(&s.send_errors, 1),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_tracking_counts_gaps_and_wraps() {
        let mut t = SeqTrack { highest: None };
        assert_eq!(t.advance(65534), 1);
        assert_eq!(t.advance(65535), 1);
        assert_eq!(t.advance(2), 3); // wrapped, 0 and 1 missing
        assert_eq!(t.advance(1), 0); // late
        assert_eq!(t.advance(3), 1);
    }
}
