//! Subscribing: which room tracks a participant receives, at which layer,
//! and asking its client to renegotiate when that changes.

use std::time::Instant;

use livekit_protocol as lk;
use lk::signal_response::Message as Resp;

use super::allocate::Hold;
use super::engine::{quality_layer, rejoin, Core};
use super::forward::{layer_for_size, Forwarder};
use super::participant::{SlotState, Sub};
use super::room::LAYER_STALE;
use super::sdp::Kind;

/// How long an offer asked for by a MediaSectionsRequirement may take.
const REOFFER_RETRY: std::time::Duration = std::time::Duration::from_secs(3);

impl Core {
    // ---------------------------------------------------- subscribing

    /// Subscribe `key` to room track `tk`. Negotiation follows on the
    /// client's next offer; `renegotiate` asks for that offer now.
    pub(super) fn add_sub(&mut self, key: usize, tk: usize, renegotiate: bool) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        if p.sub_for_track(tk).is_some() || !p.permission.can_subscribe {
            return;
        }
        let Some(t) = self.rooms[p.room].tracks.get_mut(tk) else {
            return;
        };
        if t.publisher == key {
            return;
        }
        let publisher_sid = self
            .parts
            .get(t.publisher)
            .map(|x| x.sid.clone())
            .unwrap_or_default();
        let video = t.kind == Kind::Video;
        let sub = Sub {
            track: tk,
            track_sid: t.sid.clone(),
            publisher_sid,
            kind: t.kind,
            slot: None,
            live: false,
            disabled: false,
            want: t.top_layer(),
            paused: false,
            hold: Hold::default(),
            fwd: {
                let mut f = Forwarder::new(video, t.clock_rate(), t.top_layer());
                f.set_available(t.available);
                f
            },
            mid: None,
            pt_map: Vec::new(),
        };
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        let sk = p.subs.insert(sub);
        t.subscribers.push((key, sk));
        if renegotiate {
            self.request_reoffer(key);
        }
    }

    pub(super) fn drop_sub(&mut self, key: usize, sk: usize, renegotiate: bool) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        let Some(sub) = p.subs.try_remove(sk) else {
            return;
        };
        if let Some(slot) = sub.slot.and_then(|s| p.slots.get_mut(s)) {
            slot.state = SlotState::Releasing;
            slot.tail = sub.fwd.tail().or(slot.tail);
        }
        if let Some(t) = self
            .rooms
            .get_mut(p.room)
            .and_then(|r| r.tracks.get_mut(sub.track))
        {
            t.subscribers.retain(|x| *x != (key, sk));
        }
        if renegotiate {
            self.request_reoffer(key);
        }
    }

    /// Ask a single-PC client to offer again (and add receive m-lines if
    /// it has too few free ones).
    pub(super) fn request_reoffer(&mut self, key: usize) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        if p.sub_peer.is_some() {
            self.negotiate_subscriber(key);
            return;
        }
        if p.reoffer_requested.is_some() || p.peer.local.sections.is_empty() {
            return;
        }
        let count = |k: Kind| {
            let wanted = p
                .subs
                .iter()
                .filter(|(_, s)| s.kind == k && s.slot.is_none())
                .count();
            let free = p
                .slots
                .iter()
                .filter(|s| s.kind == k && s.state == SlotState::Free)
                .count();
            wanted.saturating_sub(free) as u32
        };
        let (num_audios, num_videos) = (count(Kind::Audio), count(Kind::Video));
        p.reoffer_requested = Some(Instant::now());
        p.send(Resp::MediaSectionsRequirement(
            lk::MediaSectionsRequirement {
                num_audios,
                num_videos,
            },
        ));
    }

    /// A client may drop a MediaSectionsRequirement (livekit-client does
    /// while it rebuilds its connection in a full reconnect): subscriptions
    /// still without an m-line after [`REOFFER_RETRY`] are asked for again.
    pub(super) fn retry_reoffers(&mut self, now: Instant) {
        let late: Vec<usize> = self
            .parts
            .iter()
            .filter(|(_, p)| {
                p.reoffer_requested
                    .is_some_and(|at| now.saturating_duration_since(at) >= REOFFER_RETRY)
                    && p.subs.iter().any(|(_, s)| s.slot.is_none())
            })
            .map(|(k, _)| k)
            .collect();
        for key in late {
            if let Some(p) = self.parts.get_mut(key) {
                tracing::debug!(participant = %p.sid, "no offer after a media sections requirement: asking again");
                p.reoffer_requested = None;
            }
            self.request_reoffer(key);
        }
    }

    pub(super) fn update_subscription(&mut self, key: usize, s: lk::UpdateSubscription) {
        let Some(p) = self.parts.get(key) else { return };
        let room = p.room;
        let mut sids = s.track_sids;
        for pt in s.participant_tracks {
            sids.extend(pt.track_sids);
        }
        let mut changed = false;
        for sid in sids {
            let Some(tk) = self.rooms[room].track_by_sid(&sid) else {
                continue;
            };
            let existing = self.parts.get(key).and_then(|p| p.sub_for_track(tk));
            match (s.subscribe, existing) {
                (true, None) => {
                    self.add_sub(key, tk, false);
                    changed = true;
                }
                (false, Some(sk)) => {
                    self.drop_sub(key, sk, false);
                    changed = true;
                }
                _ => {}
            }
        }
        if changed {
            self.request_reoffer(key);
        }
    }

    pub(super) fn track_settings(&mut self, key: usize, s: lk::UpdateTrackSettings) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        let room = p.room;
        let mut need_kf = Vec::new();
        for sid in &s.track_sids {
            let Some((_, sub)) = p.subs.iter_mut().find(|(_, x)| &x.track_sid == sid) else {
                continue;
            };
            let Some(t) = self.rooms[room].tracks.get(sub.track) else {
                continue;
            };
            let top = t.top_layer();
            let target = if s.width > 0 || s.height > 0 {
                Some(layer_for_size(&t.dims, s.width, s.height))
            } else {
                quality_layer(s.quality, top)
            };
            sub.disabled = s.disabled || target.is_none();
            if let Some(l) = target {
                let l = l.min(top);
                sub.want = l;
                // Lower at once; higher as far as the downlink allows
                // (the allocation below), or at once without an estimate.
                let allowed = if p.downlink.estimate().is_some() {
                    l.min(sub.fwd.target)
                } else {
                    l
                };
                if sub.fwd.target != allowed {
                    sub.fwd.target = allowed;
                    need_kf.push((sub.track, sub.fwd.goal()));
                }
            }
        }
        let now = Instant::now();
        for (tk, l) in need_kf {
            self.request_keyframe(room, tk, l, now);
        }
        self.allocate_for(key, now);
    }

    /// Note which simulcast layers each publisher sends now and tell the
    /// subscribers' forwarders when that changes (see `Forwarder::goal`).
    pub(super) fn layer_availability(&mut self, now: Instant) {
        for (_, room) in self.rooms.iter_mut() {
            for (_, t) in room.tracks.iter_mut() {
                if t.kind != Kind::Video {
                    continue;
                }
                let mut mask = 0u8;
                for (l, seen) in t.layer_seen.iter().enumerate() {
                    if seen.is_some_and(|at| now.saturating_duration_since(at) < LAYER_STALE) {
                        mask |= 1 << l;
                    }
                }
                if mask == t.available {
                    continue;
                }
                tracing::debug!(track = %t.sid, was = t.available, now = mask, "layers sent");
                t.available = mask;
                for &(sp, sk) in &t.subscribers {
                    if let Some(sub) = self.parts.get_mut(sp).and_then(|p| p.subs.get_mut(sk)) {
                        sub.fwd.set_available(mask);
                    }
                }
            }
        }
    }

    /// After a resume the client says what it believes it publishes; if we
    /// do not know one of those tracks, only a full rejoin can fix it.
    pub(super) fn sync_state(&mut self, key: usize, state: lk::SyncState) {
        let Some(p) = self.parts.get(key) else {
            return;
        };
        let room = &self.rooms[p.room];
        let unknown = state
            .publish_tracks
            .iter()
            .filter_map(|t| t.track.as_ref())
            .any(|t| {
                !p.published
                    .iter()
                    .any(|k| room.tracks.get(*k).is_some_and(|x| x.sid == t.sid))
                    && !p.pending_tracks.iter().any(|x| x.info.sid == t.sid)
            });
        if unknown {
            tracing::info!(participant = %p.sid, "sync state names unknown tracks: full reconnect");
            let p = &mut self.parts[key];
            p.send(rejoin());
        }
    }
}
