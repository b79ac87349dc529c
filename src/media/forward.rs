//! Per-subscriber forwarding decisions: which simulcast layer, and the
//! sequence number / timestamp rewrite that keeps the outgoing stream
//! continuous across layer switches. Pure state, no I/O.

use std::time::Instant;

/// A layer index: 0 = lowest (`q`), 2 = highest (`f`).
pub type Layer = u8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Drop,
    Forward { seq: u64, ts: u32 },
}

#[derive(Debug, Clone)]
pub struct Forwarder {
    clock_rate: u32,
    /// Layer being forwarded; `None` until the first usable packet.
    current: Option<Layer>,
    /// Layer the subscriber should get.
    pub target: Layer,
    /// Video waits for a keyframe to start or switch; audio never does.
    needs_keyframe: bool,
    seq_offset: i64,
    ts_offset: u32,
    /// Packets of the current layer older than this arrived before the switch.
    seq_floor: u64,
    last_out_seq: u64,
    last_out_ts: u32,
    last_at: Option<Instant>,
    started: bool,
}

impl Forwarder {
    pub fn new(video: bool, clock_rate: u32, target: Layer) -> Self {
        Forwarder {
            clock_rate,
            current: None,
            target,
            needs_keyframe: video,
            seq_offset: 0,
            ts_offset: 0,
            seq_floor: 0,
            last_out_seq: 0,
            last_out_ts: 0,
            last_at: None,
            started: false,
        }
    }

    pub fn current(&self) -> Option<Layer> {
        self.current
    }

    /// Whether a keyframe on the target layer is awaited.
    pub fn wants_keyframe(&self) -> bool {
        self.needs_keyframe && self.current != Some(self.target)
    }

    /// Decide for one incoming packet of `layer`.
    #[inline]
    pub fn on_packet(
        &mut self,
        layer: Layer,
        seq: u64,
        ts: u32,
        keyframe_start: bool,
        now: Instant,
    ) -> Verdict {
        if self.current != Some(layer) {
            let switch = if !self.needs_keyframe {
                self.current.is_none()
            } else {
                layer == self.target && keyframe_start
            };
            // Fall back to any layer with a keyframe while nothing flows yet.
            let bootstrap = self.needs_keyframe && self.current.is_none() && keyframe_start;
            if !(switch || bootstrap) {
                return Verdict::Drop;
            }
            self.switch_to(layer, seq, ts, now);
        }
        if seq < self.seq_floor {
            return Verdict::Drop;
        }
        let out_seq = (seq as i64 + self.seq_offset) as u64;
        let out_ts = ts.wrapping_add(self.ts_offset);
        if out_seq > self.last_out_seq || !self.started {
            self.last_out_seq = out_seq;
            self.last_out_ts = out_ts;
            self.last_at = Some(now);
            self.started = true;
        }
        Verdict::Forward {
            seq: out_seq,
            ts: out_ts,
        }
    }

    fn switch_to(&mut self, layer: Layer, seq: u64, ts: u32, now: Instant) {
        if self.started {
            let next = self.last_out_seq + 1;
            self.seq_offset = next as i64 - seq as i64;
            // Advance the clock by the wall time since the last packet sent.
            let elapsed = self
                .last_at
                .map(|t| now.saturating_duration_since(t))
                .unwrap_or_default();
            let ticks =
                ((elapsed.as_micros() as u64 * self.clock_rate as u64) / 1_000_000).max(1) as u32;
            self.ts_offset = self.last_out_ts.wrapping_add(ticks).wrapping_sub(ts);
        }
        self.seq_floor = seq;
        self.current = Some(layer);
    }
}

/// The layer that fits a requested size, as LiveKit picks it: the smallest
/// layer at least 90 % as tall as requested, else the largest. `layers` are
/// (width, height) from lowest to highest; a zero height compares widths.
pub fn layer_for_size(layers: &[(u32, u32)], width: u32, height: u32) -> Layer {
    if layers.is_empty() {
        return 0;
    }
    let by_height = height > 0 && layers.iter().all(|l| l.1 > 0);
    let side = |l: &(u32, u32)| if by_height { l.1 } else { l.0 };
    let want = if by_height { height } else { width };
    let need = want as u64 * 9 / 10;
    for (i, l) in layers.iter().enumerate() {
        if side(l) as u64 >= need {
            return i as Layer;
        }
    }
    (layers.len() - 1) as Layer
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn audio_passes_through() {
        let t = Instant::now();
        let mut f = Forwarder::new(false, 48000, 0);
        assert_eq!(
            f.on_packet(0, 100, 1000, false, t),
            Verdict::Forward { seq: 100, ts: 1000 }
        );
        assert_eq!(
            f.on_packet(0, 101, 1960, false, t),
            Verdict::Forward { seq: 101, ts: 1960 }
        );
    }

    #[test]
    fn video_waits_for_keyframe_then_switches_continuously() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(true, 90000, 2);
        assert_eq!(f.on_packet(2, 10, 0, false, t0), Verdict::Drop);
        // Nothing flowing yet: a keyframe on a lower layer starts the stream.
        assert_eq!(
            f.on_packet(0, 500, 7000, true, t0),
            Verdict::Forward { seq: 500, ts: 7000 }
        );
        assert_eq!(
            f.on_packet(0, 501, 7000, false, t0),
            Verdict::Forward { seq: 501, ts: 7000 }
        );
        assert!(f.wants_keyframe());
        // Target layer delta frames are not a switch point.
        assert_eq!(f.on_packet(2, 11, 100, false, t0), Verdict::Drop);
        // Keyframe on the target: continue at 502, clock moved by 33 ms.
        let t1 = t0 + Duration::from_millis(33);
        assert_eq!(
            f.on_packet(2, 12, 100, true, t1),
            Verdict::Forward {
                seq: 502,
                ts: 7000 + 2970
            }
        );
        assert_eq!(
            f.on_packet(2, 13, 100, false, t1),
            Verdict::Forward {
                seq: 503,
                ts: 7000 + 2970
            }
        );
        // The old layer and stragglers from before the switch are dropped.
        assert_eq!(f.on_packet(0, 502, 7000, false, t1), Verdict::Drop);
        assert_eq!(f.on_packet(2, 11, 100, false, t1), Verdict::Drop);
        assert!(!f.wants_keyframe());
        // Going down works the same way.
        f.target = 0;
        assert_eq!(
            f.on_packet(0, 600, 9000, true, t1),
            Verdict::Forward {
                seq: 504,
                ts: 7000 + 2970 + 1
            }
        );
    }

    #[test]
    fn size_to_layer() {
        let l = [(320, 180), (640, 360), (1280, 720)];
        assert_eq!(layer_for_size(&l, 100, 56), 0);
        assert_eq!(layer_for_size(&l, 356, 200), 0); // 180 >= 0.9 * 200
        assert_eq!(layer_for_size(&l, 400, 225), 1);
        assert_eq!(layer_for_size(&l, 1280, 720), 2);
        assert_eq!(layer_for_size(&l, 4000, 4000), 2);
        assert_eq!(layer_for_size(&[(320, 0), (640, 0)], 500, 0), 1);
    }
}
