//! Connection quality: each participant rated by the worst packet loss on
//! its streams and by what its downlink could not carry (video paused or
//! below the layers asked for), announced to the room when it changes.

use livekit_protocol as lk;
use lk::signal_response::Message as Resp;

use super::engine::Core;

impl Core {
    // ------------------------------------------------ connection quality

    pub(super) fn note_loss(&mut self, key: usize, loss: Option<f32>) {
        if let (Some(p), Some(l)) = (self.parts.get_mut(key), loss) {
            if l.is_finite() {
                p.worst_loss = p.worst_loss.max(l.clamp(0.0, 1.0));
            }
        }
    }

    /// Rate each participant by the worst loss on its streams (both
    /// directions) over the last interval, and tell the room what changed.
    pub(super) fn connection_quality(&mut self) {
        let room_keys: Vec<usize> = self.rooms.iter().map(|(k, _)| k).collect();
        for rk in room_keys {
            let mut infos = Vec::new();
            let mut changed = false;
            for &pk in &self.rooms[rk].participants {
                let Some(p) = self.parts.get_mut(pk) else {
                    continue;
                };
                let loss = std::mem::take(&mut p.worst_loss);
                let by_loss = match loss {
                    l if l < 0.02 => 2,
                    l if l < 0.06 => 1,
                    _ => 0,
                };
                // As LiveKit rates a subscriber: a track paused for bandwidth
                // is poor, one held below the layer asked for at most good.
                let live = || p.subs.iter().filter(|(_, s)| s.live && !s.disabled);
                let by_downlink = if live().any(|(_, s)| s.paused) {
                    0
                } else if live().any(|(_, s)| s.fwd.target < s.want) {
                    1
                } else {
                    2
                };
                let (q, cap) = match by_loss.min(by_downlink) {
                    2 => (lk::ConnectionQuality::Excellent, 5.0),
                    1 => (lk::ConnectionQuality::Good, 3.5),
                    _ => (lk::ConnectionQuality::Poor, 2.0),
                };
                let score = (5.0 * (1.0 - loss * 5.0)).clamp(1.0, cap);
                changed |= p.quality != Some(q);
                p.quality = Some(q);
                infos.push(lk::ConnectionQualityInfo {
                    participant_sid: p.sid.clone(),
                    quality: q as i32,
                    score,
                });
            }
            if !changed {
                continue;
            }
            for m in self.rooms[rk].participants.clone() {
                if let Some(o) = self.parts.get_mut(m) {
                    o.send(Resp::ConnectionQuality(lk::ConnectionQualityUpdate {
                        updates: infos.clone(),
                    }));
                }
            }
        }
    }
}
