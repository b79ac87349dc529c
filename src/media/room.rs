//! A room and the tracks published in it. Owned by the engine thread.

use std::time::{Duration, Instant};

use livekit_protocol as lk;
use slab::Slab;
use str0m::rtp::Ssrc;

use super::forward::Layer;
use super::keyframe::VideoCodec;
use super::sdp::{CodecKey, Kind};
use super::speakers::LevelMeter;

/// Most simulcast layers a track may have (`q`, `h`, `f`).
pub const MAX_LAYERS: usize = 3;

/// A simulcast layer without a packet for this long counts as stopped.
pub const LAYER_STALE: Duration = Duration::from_secs(1);

pub struct Track {
    pub sid: String,
    pub publisher: usize,
    pub kind: Kind,
    pub info: lk::TrackInfo,
    /// The publisher's m-line carrying it.
    pub mid: String,
    pub codec: Option<CodecKey>,
    pub video_codec: VideoCodec,
    /// Rids in layer order, lowest first; empty without simulcast.
    pub rids: Vec<String>,
    /// (width, height) per layer, lowest first.
    pub dims: Vec<(u32, u32)>,
    /// Incoming SSRC per layer, learnt from the first packet.
    pub layer_ssrc: [Option<Ssrc>; MAX_LAYERS],
    pub last_keyframe_request: [Option<Instant>; MAX_LAYERS],
    /// When each layer last brought a packet, and the layers that did
    /// within [`LAYER_STALE`] at the last look (a bit each).
    pub layer_seen: [Option<Instant>; MAX_LAYERS],
    pub available: u8,
    /// (subscriber participant key, its subscription key).
    pub subscribers: Vec<(usize, usize)>,
    pub meter: LevelMeter,
    /// Dynacast: highest layer the publisher was last told to send
    /// (-1: none), and since when fewer have been wanted.
    pub dyn_sent: i8,
    pub dyn_lower_since: Option<Instant>,
    /// Bytes each layer brought (with packet overhead) since the last
    /// measurement, and its rate then, bits per second (0: never seen).
    pub layer_bytes: [u64; MAX_LAYERS],
    pub layer_bps: [u64; MAX_LAYERS],
}

impl Track {
    pub fn layer_count(&self) -> usize {
        self.rids.len().max(1)
    }

    pub fn top_layer(&self) -> Layer {
        (self.layer_count() - 1) as Layer
    }

    pub fn layer_of_rid(&self, rid: Option<&str>) -> Layer {
        match rid {
            None => 0,
            Some(r) => self.rids.iter().position(|x| x == r).unwrap_or(0) as Layer,
        }
    }

    pub fn clock_rate(&self) -> u32 {
        self.codec
            .as_ref()
            .map(|c| c.clock)
            .filter(|c| *c > 0)
            .unwrap_or(match self.kind {
                Kind::Audio => 48_000,
                _ => 90_000,
            })
    }
}

pub struct Room {
    pub sid: String,
    pub name: String,
    pub created_at: i64,
    pub participants: Vec<usize>,
    pub tracks: Slab<Track>,
    pub empty_since: Option<Instant>,
    /// Opened ahead of any join (by the token service or the server API):
    /// closed after `empty_timeout_secs` if nobody comes.
    pub unjoined_since: Option<Instant>,
    pub sif_trailer: Vec<u8>,
    /// Speakers last announced, by participant sid.
    pub speakers: Vec<(String, f32)>,
    pub departure_timeout_secs: u64,
    pub empty_timeout_secs: u64,
    /// Subscribed video moved down or paused for bandwidth, so far.
    pub bwe_downgrades: u64,
    /// Set by the server API (RoomService), sent to members in RoomUpdate.
    pub metadata: String,
    /// 0: no limit.
    pub max_participants: u32,
}

impl Room {
    pub fn info(&self) -> lk::Room {
        lk::Room {
            sid: self.sid.clone(),
            name: self.name.clone(),
            empty_timeout: self.empty_timeout_secs as u32,
            departure_timeout: self.departure_timeout_secs as u32,
            creation_time: self.created_at / 1000,
            creation_time_ms: self.created_at,
            num_participants: self.participants.len() as u32,
            num_publishers: self.num_publishers(),
            metadata: self.metadata.clone(),
            max_participants: self.max_participants,
            ..Default::default()
        }
    }

    /// Participants with at least one published track.
    fn num_publishers(&self) -> u32 {
        let mut seen: Vec<usize> = self.tracks.iter().map(|(_, t)| t.publisher).collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len() as u32
    }

    pub fn track_by_sid(&self, sid: &str) -> Option<usize> {
        self.tracks
            .iter()
            .find(|(_, t)| t.sid == sid)
            .map(|(k, _)| k)
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
