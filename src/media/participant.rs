//! A participant: its peer connection, what it publishes and what it
//! subscribes to. Owned by the engine thread.

use std::time::Instant;

use livekit_protocol as lk;
use moselle_signaling::backend::{OutboundTx, Outgoing};
use moselle_signaling::join::Flavor;
use moselle_signaling::rate::TokenBucket;
use moselle_signaling::token::VideoGrant;
use slab::Slab;
use str0m::rtp::Ssrc;
use str0m::Rtc;

use super::allocate::Hold;
use super::fallback::Rung;
use super::forward::{Forwarder, Layer, StreamTail};
use super::sdp::{Kind, SdpInfo};
use crate::config::LimitsConfig;
use crate::metrics::Limit;
use crate::transport::{Path, Proto};

/// One str0m peer connection.
pub struct Peer {
    pub rtc: Rtc,
    pub ufrag: String,
    pub next_timeout: Instant,
    /// The instant of the last input given to `rtc` (see `Core::datagram`).
    pub last_input: Instant,
    /// Paths seen, so the demux maps can be cleaned on leave.
    pub remote_paths: Vec<Path>,
    /// The protocol the last datagram came by.
    pub last_proto: Option<Proto>,
    /// Incoming SSRC -> (room track key, layer); a handful of entries.
    pub rx_routes: Vec<(Ssrc, usize, Layer)>,
    /// The last remote and local descriptions, as read from their text
    /// (single PC and publisher: their offer, our answer; dual-PC
    /// subscriber: our offer, their answer).
    pub remote: SdpInfo,
    pub local: SdpInfo,
    /// Open data channels by label (`_reliable`, `_lossy`, ...).
    pub channels: Vec<(str0m::channel::ChannelId, String)>,
    /// Bandwidth estimation is on: str0m paces what it sends.
    pub paced: bool,
}

impl Peer {
    pub fn new(rtc: Rtc, ufrag: String) -> Peer {
        Peer {
            rtc,
            ufrag,
            next_timeout: Instant::now(),
            last_input: Instant::now(),
            remote_paths: Vec::new(),
            last_proto: None,
            rx_routes: Vec::new(),
            remote: SdpInfo::default(),
            local: SdpInfo::default(),
            channels: Vec::new(),
            paced: false,
        }
    }

    #[inline]
    pub fn route(&self, ssrc: Ssrc) -> Option<(usize, Layer)> {
        self.rx_routes
            .iter()
            .find(|r| r.0 == ssrc)
            .map(|r| (r.1, r.2))
    }
}

/// Dual-PC signaling: the peer connection we offer, carrying subscriptions.
pub struct SubscriberPeer {
    pub peer: Peer,
    /// Our offer awaiting the client's answer.
    pub pending: Option<str0m::change::SdpPendingOffer>,
    pub offer_id: u32,
    /// Changes arrived while an offer was pending: offer again after it.
    pub renegotiate: bool,
    /// The next offer restarts ICE (after a resume).
    pub restart_ice: bool,
    pub channels_added: bool,
}

/// What is known of the link towards a participant (see `downlink.rs`).
#[derive(Debug, Default)]
pub struct Downlink {
    /// Send-side estimate from its TWCC feedback, bits per second.
    pub twcc: Option<u64>,
    /// Its receiver's own estimate (REMB), for clients without TWCC.
    pub remb: Option<u64>,
    /// The desired rate last given to str0m's estimator by the allocation
    /// (`None`: still the start-up target).
    pub desired_set: Option<u64>,
    /// ICE lost its path; the estimate is started afresh when it is back.
    pub path_lost: bool,
    /// The recent peak of the estimate, and when the link was last found
    /// congested (see `downlink.rs`).
    pub peak: u64,
    pub congested_at: Option<Instant>,
    /// When the receiver last reported loss, and when layers were last cut
    /// for bandwidth (see `downlink.rs`).
    pub loss_at: Option<Instant>,
    /// The receiver's reported loss, smoothed (0..1), and when one report
    /// alone last showed loss.
    pub loss_avg: f32,
    pub report_loss_at: Option<Instant>,
    pub cut_at: Option<Instant>,
}

impl Downlink {
    pub fn estimate(&self) -> Option<u64> {
        self.twcc.or(self.remb)
    }
}

/// Which of a participant's peer connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PcRole {
    /// The single PC, or the dual-PC publisher.
    Main,
    /// The dual-PC subscriber.
    Subscriber,
}

/// Announced with AddTrackRequest, waiting for its m-line in an offer.
pub struct PendingTrack {
    pub cid: String,
    pub info: lk::TrackInfo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    Free,
    Assigned(usize),
    /// Was carrying a track; free once an answer has marked it inactive.
    Releasing,
    /// Dual PC: stopped m-line, never reused.
    Dead,
}

/// One of the client's receive m-lines, which we may send on.
pub struct SendSlot {
    pub mid: String,
    pub kind: Kind,
    pub state: SlotState,
    /// Where the last track sent on this line stopped (its SSRC stays).
    pub tail: Option<StreamTail>,
}

/// One subscription: a room track forwarded to this participant.
pub struct Sub {
    pub track: usize,
    pub track_sid: String,
    pub publisher_sid: String,
    pub kind: Kind,
    pub slot: Option<usize>,
    /// Negotiated: packets may flow.
    pub live: bool,
    pub disabled: bool,
    /// The layer the subscriber asked for; `fwd.target` is what its
    /// downlink allows (see `downlink.rs`).
    pub want: Layer,
    /// Paused because not even the lowest layer fits its downlink.
    pub paused: bool,
    pub hold: Hold,
    pub fwd: Forwarder,
    pub mid: Option<str0m::media::Mid>,
    /// Publisher payload type -> ours.
    pub pt_map: Vec<(u8, u8)>,
}

impl Sub {
    #[inline]
    pub fn map_pt(&self, pt: u8) -> Option<u8> {
        self.pt_map.iter().find(|m| m.0 == pt).map(|m| m.1)
    }
}

pub struct Participant {
    pub gen: u64,
    pub sid: String,
    pub identity: String,
    pub name: String,
    pub metadata: String,
    pub attributes: std::collections::HashMap<String, String>,
    pub room: usize,
    pub grant: VideoGrant,
    pub permission: lk::ParticipantPermission,
    pub state: lk::participant_info::State,
    pub version: u32,
    pub joined_at_ms: i64,
    pub out: OutboundTx,
    pub flavor: Flavor,
    pub protocol: i32,
    pub auto_subscribe: bool,
    pub peer: Peer,
    pub sub_peer: Option<Box<SubscriberPeer>>,
    pub pending_tracks: Vec<PendingTrack>,
    /// Room track keys this participant publishes.
    pub published: Vec<usize>,
    pub subs: Slab<Sub>,
    pub slots: Vec<SendSlot>,
    /// When a MediaSectionsRequirement was sent; the offer it causes is
    /// awaited, and asked for again if it does not come (see
    /// `Core::retry_reoffers`).
    pub reoffer_requested: Option<Instant>,
    /// Set when the outbound queue overflowed or closed.
    pub broken: bool,
    /// Last reliable data sequence seen from this participant (dedup).
    pub last_data_seq: u32,
    /// The signaling socket is gone; the session may still be resumed.
    pub detached_at: Option<Instant>,
    /// Worst packet loss (0..1) seen on its streams since the last quality
    /// update, and the quality last announced.
    pub worst_loss: f32,
    pub quality: Option<lk::ConnectionQuality>,
    /// The connectivity rung this session was given (see `fallback`).
    pub rung: Rung,
    pub downlink: Downlink,
    /// When ICE was last seen failing while signaling lives.
    pub ice_lost_at: Option<Instant>,
    /// The fallback ladder was consulted for this session.
    pub fallback_tried: bool,
    /// Data packets it may send (`[limits] data_packets_per_sec`).
    pub data_rate: TokenBucket,
    /// When it was last told a data packet was refused (at most once a
    /// second: a flood is not answered with a flood).
    pub data_refusal_told: Option<Instant>,
}

impl Participant {
    /// Name, metadata and attributes as LiveKit updates them: an empty
    /// name or metadata leaves it as it is; an attribute set to "" is
    /// removed.
    pub fn apply_update(
        &mut self,
        name: String,
        metadata: String,
        attributes: std::collections::HashMap<String, String>,
    ) {
        if !name.is_empty() {
            self.name = name;
        }
        if !metadata.is_empty() {
            self.metadata = metadata;
        }
        for (k, v) in attributes {
            if v.is_empty() {
                self.attributes.remove(&k);
            } else {
                self.attributes.insert(k, v);
            }
        }
    }

    /// The limit an update of name, metadata and attributes would break,
    /// with what to tell the client; see [`Self::apply_update`].
    pub fn update_exceeds(
        &self,
        metadata: &str,
        attributes: &std::collections::HashMap<String, String>,
        limits: &LimitsConfig,
    ) -> Option<(Limit, String)> {
        exceeds(
            metadata,
            attributes_bytes(&self.attributes, attributes),
            limits,
        )
    }

    pub fn peer_mut(&mut self, role: PcRole) -> Option<&mut Peer> {
        match role {
            PcRole::Main => Some(&mut self.peer),
            PcRole::Subscriber => self.sub_peer.as_mut().map(|s| &mut s.peer),
        }
    }

    /// The peer connection subscribed media is sent on.
    #[inline]
    pub fn send_peer(&mut self) -> &mut Peer {
        match self.sub_peer.as_mut() {
            Some(s) => &mut s.peer,
            None => &mut self.peer,
        }
    }

    pub fn send_peer_ref(&self) -> &Peer {
        match self.sub_peer.as_ref() {
            Some(s) => &s.peer,
            None => &self.peer,
        }
    }

    pub fn alive(&self) -> bool {
        self.peer.rtc.is_alive() && self.sub_peer.as_ref().is_none_or(|s| s.peer.rtc.is_alive())
    }

    /// Queue a message; a full queue marks the participant for removal.
    /// Queue a message. A full queue (a client that stopped reading) marks
    /// the participant for removal; a closed one (socket gone) detaches it
    /// until it resumes.
    pub fn send(&mut self, msg: lk::signal_response::Message) {
        if self.broken || self.detached_at.is_some() {
            return;
        }
        match self.out.try_send(Outgoing::Signal(Box::new(msg))) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => self.broken = true,
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                self.detached_at = Some(Instant::now());
            }
        }
    }

    pub fn info(&self, tracks: &slab::Slab<super::room::Track>) -> lk::ParticipantInfo {
        lk::ParticipantInfo {
            sid: self.sid.clone(),
            identity: self.identity.clone(),
            name: self.name.clone(),
            metadata: self.metadata.clone(),
            attributes: self.attributes.clone(),
            state: self.state as i32,
            tracks: self
                .published
                .iter()
                .filter_map(|k| tracks.get(*k))
                .map(|t| t.info.clone())
                .collect(),
            joined_at: self.joined_at_ms / 1000,
            joined_at_ms: self.joined_at_ms,
            version: self.version,
            permission: Some(self.permission.clone()),
            is_publisher: !self.published.is_empty(),
            ..Default::default()
        }
    }

    pub fn sub_for_track(&self, track: usize) -> Option<usize> {
        self.subs
            .iter()
            .find(|(_, s)| s.track == track)
            .map(|(k, _)| k)
    }

    pub fn sub_for_mid(&self, mid: &str) -> Option<usize> {
        let slot = self.slots.iter().find(|s| s.mid == mid)?;
        match slot.state {
            SlotState::Assigned(k) => Some(k),
            _ => None,
        }
    }

    pub fn source_allowed(&self, source: i32) -> bool {
        let allowed = &self.grant.can_publish_sources;
        if allowed.is_empty() {
            return true;
        }
        let name = match lk::TrackSource::try_from(source) {
            Ok(lk::TrackSource::Camera) => "camera",
            Ok(lk::TrackSource::Microphone) => "microphone",
            Ok(lk::TrackSource::ScreenShare) => "screen_share",
            Ok(lk::TrackSource::ScreenShareAudio) => "screen_share_audio",
            _ => "unknown",
        };
        allowed.iter().any(|a| a == name)
    }
}

/// Bytes of `current` attributes once `update` is applied (LiveKit's rule:
/// an empty value removes the key).
pub fn attributes_bytes(
    current: &std::collections::HashMap<String, String>,
    update: &std::collections::HashMap<String, String>,
) -> usize {
    let kept: usize = current
        .iter()
        .filter(|(k, _)| !update.contains_key(*k))
        .map(|(k, v)| k.len() + v.len())
        .sum();
    kept + update
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| k.len() + v.len())
        .sum::<usize>()
}

/// The limit `metadata` or attributes of `attributes` bytes would break.
pub fn exceeds(
    metadata: &str,
    attributes: usize,
    limits: &LimitsConfig,
) -> Option<(Limit, String)> {
    let over = |limit: usize, n: usize| limit > 0 && n > limit;
    if over(limits.metadata_bytes, metadata.len()) {
        return Some((
            Limit::Metadata,
            format!(
                "metadata of {} bytes is over the limit of {} bytes",
                metadata.len(),
                limits.metadata_bytes
            ),
        ));
    }
    if over(limits.attributes_bytes, attributes) {
        return Some((
            Limit::Attributes,
            format!(
                "attributes of {attributes} bytes in all are over the limit of {} bytes",
                limits.attributes_bytes
            ),
        ));
    }
    None
}
