//! Connection quality: each participant rated by the worst packet loss on
//! its streams, announced to the room when it changes.

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
                let q = match loss {
                    l if l < 0.02 => lk::ConnectionQuality::Excellent,
                    l if l < 0.06 => lk::ConnectionQuality::Good,
                    _ => lk::ConnectionQuality::Poor,
                };
                changed |= p.quality != Some(q);
                p.quality = Some(q);
                infos.push(lk::ConnectionQualityInfo {
                    participant_sid: p.sid.clone(),
                    quality: q as i32,
                    score: (5.0 * (1.0 - loss * 5.0)).clamp(1.0, 5.0),
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
