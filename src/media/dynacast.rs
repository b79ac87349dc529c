//! Dynacast: publishers are told which simulcast layers anyone wants, so
//! they stop encoding the others.

// Older clients read the deprecated `subscribed_qualities`; it is still filled.
#![allow(deprecated)]

use std::time::Instant;

use livekit_protocol as lk;
use lk::signal_response::Message as Resp;

use super::engine::{Core, DYNACAST_DOWN_DELAY};
use super::sdp::Kind;

impl Core {
    // --------------------------------------------------------- dynacast

    /// Tell publishers which simulcast layers anyone wants: more at once,
    /// fewer after [`DYNACAST_DOWN_DELAY`].
    pub(super) fn dynacast(&mut self, now: Instant) {
        let mut updates: Vec<(usize, lk::SubscribedQualityUpdate)> = Vec::new();
        for (_, room) in self.rooms.iter_mut() {
            for (_, t) in room.tracks.iter_mut() {
                if t.kind != Kind::Video {
                    continue;
                }
                let wanted: i8 = t
                    .subscribers
                    .iter()
                    .filter_map(|(sp, sk)| self.parts.get(*sp)?.subs.get(*sk))
                    .filter(|s| !s.disabled && !s.paused)
                    .map(|s| s.fwd.target as i8)
                    .max()
                    .unwrap_or(-1);
                let send = if wanted > t.dyn_sent {
                    true
                } else if wanted < t.dyn_sent {
                    let since = *t.dyn_lower_since.get_or_insert(now);
                    now.duration_since(since) >= DYNACAST_DOWN_DELAY
                } else {
                    t.dyn_lower_since = None;
                    false
                };
                if !send {
                    continue;
                }
                t.dyn_sent = wanted;
                t.dyn_lower_since = None;
                // Layers are indexed by rid order; qualities LOW..HIGH map
                // onto them the same way.
                let qualities: Vec<lk::SubscribedQuality> = (0..3)
                    .map(|q| lk::SubscribedQuality {
                        quality: q,
                        enabled: (q as i8) <= wanted,
                    })
                    .collect();
                let codec = t.codec.as_ref().map(|c| c.name.clone()).unwrap_or_default();
                updates.push((
                    t.publisher,
                    lk::SubscribedQualityUpdate {
                        track_sid: t.sid.clone(),
                        subscribed_qualities: qualities.clone(),
                        subscribed_codecs: vec![lk::SubscribedCodec { codec, qualities }],
                    },
                ));
            }
        }
        for (pk, u) in updates {
            if let Some(p) = self.parts.get_mut(pk) {
                tracing::debug!(track = %u.track_sid, "dynacast update");
                p.send(Resp::SubscribedQualityUpdate(u));
            }
        }
    }
}
