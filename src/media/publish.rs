//! Publishing: AddTrackRequest (grants checked), binding announced tracks
//! to the m-lines of the publisher's offer, unpublishing and muting.

// LiveKit marks TrackInfo fields deprecated that current clients still read.
#![allow(deprecated)]

use std::time::Instant;

use livekit_protocol as lk;
use lk::signal_response::Message as Resp;
use moselle_signaling::ids;

use super::engine::{error_to, full_mime, refuse_request, Core};
use super::keyframe::VideoCodec;
use super::participant::{Participant, PendingTrack};
use super::room::{Track, MAX_LAYERS};
use super::sdp::Dir;
use crate::metrics::{Limit, MediaCounters};

impl Core {
    // ------------------------------------------------------ publishing

    pub(super) fn add_track(&mut self, key: usize, a: lk::AddTrackRequest) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        let refuse = |p: &mut Participant, counters: &MediaCounters, why: String| {
            MediaCounters::add(&counters.signal_errors, 1);
            refuse_request(
                p,
                lk::request_response::Reason::NotAllowed,
                why,
                0,
                lk::request_response::Request::AddTrack(a.clone()),
            );
        };
        if !p.permission.can_publish {
            refuse(
                p,
                &self.counters,
                format!(
                    "cannot publish track {:?}: the token does not grant canPublish",
                    a.cid
                ),
            );
            return;
        }
        if !p.source_allowed(a.source) {
            refuse(
                p,
                &self.counters,
                format!(
                    "cannot publish track {:?}: source not in canPublishSources",
                    a.cid
                ),
            );
            return;
        }
        let max = self.cfg.limits.tracks_per_participant;
        if max > 0 && p.published.len() + p.pending_tracks.len() >= max {
            self.counters.refused(Limit::Tracks);
            refuse_request(
                p,
                lk::request_response::Reason::LimitExceeded,
                format!(
                    "cannot publish track {:?}: {max} tracks per participant at most ([limits] tracks_per_participant)",
                    a.cid
                ),
                0,
                lk::request_response::Request::AddTrack(a),
            );
            return;
        }
        if a.cid.is_empty() || p.pending_tracks.iter().any(|t| t.cid == a.cid) {
            refuse(
                p,
                &self.counters,
                "AddTrackRequest needs a new, non-empty cid".into(),
            );
            return;
        }
        let kind = lk::TrackType::try_from(a.r#type).unwrap_or(lk::TrackType::Audio);
        let mut layers = a.layers.clone();
        if layers.is_empty() {
            if let Some(sc) = a.simulcast_codecs.first() {
                layers = sc.layers.clone();
            }
        }
        for l in &mut layers {
            if l.rid.is_empty() {
                l.rid = match lk::VideoQuality::try_from(l.quality) {
                    Ok(lk::VideoQuality::Low) => "q",
                    Ok(lk::VideoQuality::Medium) => "h",
                    _ => "f",
                }
                .into();
            }
        }
        let info = lk::TrackInfo {
            sid: ids::track_sid(),
            name: a.name.clone(),
            r#type: kind as i32,
            muted: a.muted,
            width: a.width,
            height: a.height,
            source: a.source,
            layers,
            disable_dtx: a.disable_dtx,
            stereo: a.stereo,
            disable_red: a.disable_red,
            encryption: a.encryption,
            stream: a.stream.clone(),
            audio_features: a.audio_features.clone(),
            codecs: a
                .simulcast_codecs
                .iter()
                .map(|c| lk::SimulcastCodecInfo {
                    // Clients send "vp8"; TrackInfo carries "video/VP8"
                    // (livekit-client splits it at '/').
                    mime_type: full_mime(kind, &c.codec),
                    cid: c.cid.clone(),
                    layers: c.layers.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        p.send(Resp::TrackPublished(lk::TrackPublishedResponse {
            cid: a.cid.clone(),
            track: Some(info.clone()),
        }));
        p.pending_tracks.push(PendingTrack { cid: a.cid, info });
    }

    /// After an offer: bind announced tracks to their m-lines, drop tracks
    /// whose m-line stopped sending.
    pub(super) fn reconcile_published(&mut self, key: usize) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        let room_key = p.room;
        let mut announce = Vec::new();
        // Tracks that went away.
        let mut gone = Vec::new();
        for &tk in &p.published {
            if let Some(t) = self.rooms[room_key].tracks.get(tk) {
                let still =
                    p.peer.remote.section(&t.mid).is_some_and(|s| {
                        !s.disabled && matches!(s.dir, Dir::SendOnly | Dir::SendRecv)
                    });
                if !still {
                    gone.push(tk);
                }
            }
        }
        // Newly bound tracks.
        let mut i = 0;
        while i < p.pending_tracks.len() {
            let cid = p.pending_tracks[i].cid.clone();
            let sec = p.peer.remote.sections.iter().find(|s| {
                s.track_id.as_deref() == Some(cid.as_str())
                    && !s.disabled
                    && matches!(s.dir, Dir::SendOnly | Dir::SendRecv)
            });
            let Some(sec) = sec.cloned() else {
                i += 1;
                continue;
            };
            let pending = p.pending_tracks.swap_remove(i);
            let codec = p.peer.local.first_codec(&sec.mid).cloned();
            let mut info = pending.info;
            let kind = sec.kind;
            info.mid = sec.mid.clone();
            if let Some(c) = &codec {
                info.mime_type = c.mime(kind);
                if let Some(first) = info.codecs.first_mut() {
                    first.mime_type = info.mime_type.clone();
                    first.mid = sec.mid.clone();
                } else {
                    info.codecs.push(lk::SimulcastCodecInfo {
                        mime_type: info.mime_type.clone(),
                        mid: sec.mid.clone(),
                        cid: pending.cid.clone(),
                        layers: info.layers.clone(),
                        ..Default::default()
                    });
                }
            }
            // Layers in rid order q, h, f as offered.
            let mut rids: Vec<String> = sec.rids.clone();
            let order = |r: &str| match r {
                "q" => 0,
                "h" => 1,
                "f" => 2,
                _ => 3,
            };
            rids.sort_by_key(|r| order(r));
            info.simulcast = rids.len() > 1;
            let mut dims: Vec<(u32, u32)> = Vec::new();
            for r in &rids {
                let l = info.layers.iter().find(|l| &l.rid == r);
                dims.push(
                    l.map(|l| (l.width, l.height))
                        .unwrap_or((info.width, info.height)),
                );
            }
            for l in info.layers.iter_mut() {
                if let Some(ix) = rids.iter().position(|r| *r == l.rid) {
                    l.spatial_layer = ix as i32;
                }
            }
            let rids_len = rids.len();
            let video_codec = match codec.as_ref().map(|c| c.name.as_str()) {
                Some("vp8") => VideoCodec::Vp8,
                Some("h264") => VideoCodec::H264,
                _ => VideoCodec::Other,
            };
            let track = Track {
                sid: info.sid.clone(),
                publisher: key,
                kind,
                info,
                mid: sec.mid.clone(),
                codec,
                video_codec,
                rids,
                dims,
                layer_ssrc: [None; MAX_LAYERS],
                layer_seen: [None; MAX_LAYERS],
                available: 0,
                last_keyframe_request: [None; MAX_LAYERS],
                subscribers: Vec::new(),
                meter: Default::default(),
                dyn_sent: (rids_len.max(1) - 1) as i8,
                dyn_lower_since: Some(Instant::now()),
                layer_bytes: [0; MAX_LAYERS],
                layer_bps: [0; MAX_LAYERS],
            };
            let tk = self.rooms[room_key].tracks.insert(track);
            p.published.push(tk);
            announce.push(tk);
        }
        let changed = !announce.is_empty() || !gone.is_empty();
        for tk in gone {
            self.unpublish(key, tk);
        }
        if changed {
            self.publish_gauges();
            self.broadcast_participant(key, true);
        }
        // Subscribe the others after they know the track (ParticipantUpdate first).
        for tk in announce {
            if let Some(t) = self.rooms[room_key].tracks.get(tk) {
                tracing::info!(track = %t.sid, mime = %t.info.mime_type, layers = t.rids.len(), "track published");
                let info = t.info.clone();
                self.hook_participant("track_published", key, None, Some(info));
            }
            let others: Vec<usize> = self.rooms[room_key]
                .participants
                .iter()
                .copied()
                .filter(|k| *k != key)
                .collect();
            for o in others {
                let ok = self
                    .parts
                    .get(o)
                    .is_some_and(|p| p.auto_subscribe && p.permission.can_subscribe);
                if ok {
                    self.add_sub(o, tk, true);
                }
            }
        }
    }

    pub(super) fn unpublish(&mut self, key: usize, tk: usize) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        p.published.retain(|t| *t != tk);
        let room_key = p.room;
        p.peer.rx_routes.retain(|r| r.1 != tk);
        let Some(track) = self.rooms[room_key].tracks.try_remove(tk) else {
            return;
        };
        tracing::info!(track = %track.sid, "track unpublished");
        self.hook_participant("track_unpublished", key, None, Some(track.info.clone()));
        for (sp, sk) in track.subscribers {
            self.drop_sub(sp, sk, true);
        }
    }

    pub(super) fn mute(&mut self, key: usize, m: lk::MuteTrackRequest) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        let room = p.room;
        let found = p.published.iter().copied().find(|t| {
            self.rooms[room]
                .tracks
                .get(*t)
                .is_some_and(|t| t.info.sid == m.sid)
        });
        if let Some(tk) = found {
            let t = &mut self.rooms[room].tracks[tk];
            if t.info.muted != m.muted {
                t.info.muted = m.muted;
                self.broadcast_participant(key, true);
            }
        } else if let Some(pt) = p.pending_tracks.iter_mut().find(|t| t.info.sid == m.sid) {
            pt.info.muted = m.muted;
        } else {
            MediaCounters::add(&self.counters.signal_errors, 1);
            error_to(
                p,
                lk::request_response::Reason::NotFound,
                format!("no published track {:?}", m.sid),
            );
        }
    }
}
