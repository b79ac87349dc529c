//! Per-subscriber forwarding decisions: which simulcast layer, and the
//! sequence number / timestamp rewrite that keeps the outgoing stream
//! continuous across layer switches. Pure state, no I/O.

use std::time::{Duration, Instant};

/// A layer index: 0 = lowest (`q`), 2 = highest (`f`).
pub type Layer = u8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Drop,
    Forward { seq: u64, ts: u32 },
}

/// Where an outgoing stream stopped: the next stream sent on the same SSRC
/// (a subscriber's m-line given to another track) continues from it. A
/// receiver keeps its jitter buffer per SSRC and drops a keyframe whose
/// timestamp is not ahead of the last it decoded (libwebrtc), so starting
/// over from the new publisher's numbers froze such a line for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamTail {
    seq: u64,
    ts: u32,
    at: Instant,
}

#[derive(Debug, Clone)]
pub struct Forwarder {
    clock_rate: u32,
    /// Layer being forwarded; `None` until the first usable packet.
    current: Option<Layer>,
    /// Layer the subscriber asked for.
    pub target: Layer,
    /// Layers the publisher sends now, a bit each; 0 while unknown.
    available: u8,
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
    keyframe_gate: KeyframeGate,
}

/// Keyframe requests from one subscriber. One that asks again soon after
/// a keyframe reached it was not helped by it (a wrong E2EE key, a broken
/// decoder); the publisher's keyframes cost every other subscriber, so such
/// requests are passed on at doubling intervals, up to [`Self::MAX`].
/// A new subscriber of an E2EE call cannot decode until its keys arrive
/// over Matrix (Element Call: about 5 s after the media); the first
/// keyframe after that must not wait out a long backoff, so while young
/// the intervals stop at [`Self::MAX_YOUNG`].
#[derive(Debug, Clone, Default)]
struct KeyframeGate {
    first_request: Option<Instant>,
    last_request: Option<Instant>,
    backoff: Duration,
    keyframe_sent: bool,
}

impl KeyframeGate {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(8);
    const YOUNG: Duration = Duration::from_secs(20);
    const MAX_YOUNG: Duration = Duration::from_secs(2);
    /// A request this long after the previous one starts afresh.
    const FORGET: Duration = Duration::from_secs(20);

    fn allow(&mut self, now: Instant) -> bool {
        let first = *self.first_request.get_or_insert(now);
        let max = if now.saturating_duration_since(first) < Self::YOUNG {
            Self::MAX_YOUNG
        } else {
            Self::MAX
        };
        if let Some(last) = self.last_request {
            let since = now.saturating_duration_since(last);
            if since >= Self::FORGET {
                self.backoff = Duration::ZERO;
            } else if since < self.backoff {
                return false;
            } else if self.keyframe_sent {
                self.backoff = (self.backoff * 2).clamp(Self::FIRST, max);
            }
        }
        self.last_request = Some(now);
        self.keyframe_sent = false;
        true
    }
}

impl Forwarder {
    pub fn new(video: bool, clock_rate: u32, target: Layer) -> Self {
        Forwarder {
            clock_rate,
            current: None,
            target,
            available: 0,
            needs_keyframe: video,
            seq_offset: 0,
            ts_offset: 0,
            seq_floor: 0,
            last_out_seq: 0,
            last_out_ts: 0,
            last_at: None,
            started: false,
            keyframe_gate: KeyframeGate::default(),
        }
    }

    pub fn current(&self) -> Option<Layer> {
        self.current
    }

    /// Where this stream stands, once something was sent.
    pub fn tail(&self) -> Option<StreamTail> {
        let at = self.last_at.filter(|_| self.started)?;
        Some(StreamTail {
            seq: self.last_out_seq,
            ts: self.last_out_ts,
            at,
        })
    }

    /// Continue the stream that ended at `tail` (same SSRC): the first
    /// packet is numbered as after a layer switch.
    pub fn continue_from(&mut self, tail: StreamTail) {
        self.last_out_seq = tail.seq;
        self.last_out_ts = tail.ts;
        self.last_at = Some(tail.at);
        self.started = true;
    }

    /// Whether a keyframe on the goal layer is awaited.
    pub fn wants_keyframe(&self) -> bool {
        self.needs_keyframe && self.current != Some(self.goal())
    }

    /// Tell which layers the publisher sends now (bit `1 << layer` each).
    pub fn set_available(&mut self, layers: u8) {
        self.available = layers;
    }

    pub fn available(&self) -> u8 {
        self.available
    }

    /// The layer to forward: the target if the publisher sends it, else
    /// the best it sends below, else the lowest above; the target while
    /// nothing is known. A publisher short of bandwidth stops its top
    /// layer, and its subscribers must not freeze until it returns.
    #[inline]
    pub fn goal(&self) -> Layer {
        let below = self.available & ((2u16 << self.target) - 1) as u8;
        if below != 0 {
            (7 - below.leading_zeros()) as Layer
        } else if self.available != 0 {
            self.available.trailing_zeros() as Layer
        } else {
            self.target
        }
    }

    /// Stop: after a pause, forwarding starts again on a keyframe, with
    /// sequence numbers and timestamps continuing from the last sent.
    pub fn pause(&mut self) {
        self.current = None;
    }

    /// Whether to pass the subscriber's keyframe request on to the
    /// publisher (see [`KeyframeGate`]).
    pub fn allow_keyframe_request(&mut self, now: Instant) -> bool {
        self.keyframe_gate.allow(now)
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
                layer == self.goal() && keyframe_start
            };
            // Fall back to any layer up to the goal with a keyframe while
            // nothing flows yet (above it would not fit the downlink).
            let bootstrap = self.needs_keyframe
                && self.current.is_none()
                && keyframe_start
                && layer <= self.goal();
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
        if keyframe_start {
            self.keyframe_gate.keyframe_sent = true;
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

    /// A new track on a subscriber's reused m-line (same SSRC) continues
    /// the old one's numbering, whatever numbers its publisher starts at.
    #[test]
    fn a_new_track_on_the_same_line_continues_its_numbers() {
        let t0 = Instant::now();
        let mut old = Forwarder::new(true, 90000, 0);
        assert!(old.tail().is_none(), "nothing sent, nothing to continue");
        old.on_packet(0, 40_000, 3_000_000_000, true, t0);
        old.on_packet(0, 40_001, 3_000_003_000, false, t0);
        let tail = old.tail().expect("sent");
        // The new publisher's numbers lie behind the old ones.
        let t1 = t0 + Duration::from_secs(2);
        let mut new = Forwarder::new(true, 90000, 0);
        new.continue_from(tail);
        assert_eq!(new.on_packet(0, 7, 1_000, false, t1), Verdict::Drop);
        assert_eq!(
            new.on_packet(0, 8, 1_000, true, t1),
            Verdict::Forward {
                seq: 40_002,
                ts: 3_000_003_000 + 180_000
            }
        );
        assert_eq!(
            new.on_packet(0, 9, 4_000, false, t1),
            Verdict::Forward {
                seq: 40_003,
                ts: 3_000_003_000 + 180_000 + 3_000
            }
        );
        // Audio too: the first packet continues.
        let mut a = Forwarder::new(false, 48000, 0);
        a.on_packet(0, 65_000, 10, false, t0);
        let mut b = Forwarder::new(false, 48000, 0);
        b.continue_from(a.tail().expect("sent"));
        assert_eq!(
            b.on_packet(0, 3, 999, false, t0 + Duration::from_millis(20)),
            Verdict::Forward {
                seq: 65_001,
                ts: 10 + 960
            }
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
    fn falls_back_to_the_layers_the_publisher_sends() {
        let t = Instant::now();
        let mut f = Forwarder::new(true, 90000, 2);
        assert_eq!(f.goal(), 2, "nothing known: the target");
        f.on_packet(2, 1, 0, true, t);
        assert_eq!(f.current(), Some(2));
        // The publisher stops its top layer: the best one below is next.
        f.set_available(0b011);
        assert_eq!(f.goal(), 1);
        assert!(f.wants_keyframe());
        assert_eq!(f.on_packet(0, 50, 0, true, t), Verdict::Drop);
        assert!(matches!(
            f.on_packet(1, 70, 0, true, t),
            Verdict::Forward { seq: 2, .. }
        ));
        assert!(!f.wants_keyframe());
        // Only a layer above the target flows: take it rather than nothing.
        f.target = 0;
        f.set_available(0b100);
        assert_eq!(f.goal(), 2);
        // The top layer is back: the subscriber who wants it gets it.
        f.target = 2;
        f.set_available(0b111);
        assert_eq!(f.goal(), 2);
        assert!(f.wants_keyframe());
        assert!(matches!(
            f.on_packet(2, 9, 0, true, t),
            Verdict::Forward { seq: 3, .. }
        ));
        // A lower target is served exactly when it flows.
        f.target = 1;
        assert_eq!(f.goal(), 1);
    }

    #[test]
    fn keyframe_requests_that_keyframes_do_not_answer_back_off() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut f = Forwarder::new(true, 90000, 0);
        // Without a keyframe in between, requests pass (the publisher side
        // still throttles per layer).
        assert!(f.allow_keyframe_request(at(0)));
        assert!(f.allow_keyframe_request(at(100)));
        // A subscriber that cannot decode asks every 200 ms; each passed
        // request brings it a keyframe 50 ms later.
        let mut passed = Vec::new();
        let mut seq = 0;
        for ms in (200..24_000).step_by(200) {
            if f.allow_keyframe_request(at(ms)) {
                passed.push(ms);
                seq += 1;
                f.on_packet(0, seq, 0, true, at(ms + 50));
            }
        }
        // Young (first 20 s): every 2 s at most; then doubling up to 8 s.
        assert_eq!(
            passed,
            [200, 400, 1400, 3400, 5400, 7400, 9400, 11400, 13400, 15400, 17400, 19400, 21400]
        );
        for ms in (24_200..40_000).step_by(200) {
            if f.allow_keyframe_request(at(ms)) {
                passed.push(ms);
                seq += 1;
                f.on_packet(0, seq, 0, true, at(ms + 50));
            }
        }
        assert_eq!(&passed[13..], [25400, 33400]);
        // Quiet for a while: trusted again.
        assert!(f.allow_keyframe_request(at(60_000)));
        f.on_packet(0, seq + 1, 0, true, at(60_050));
        assert!(f.allow_keyframe_request(at(60_200)));
        assert!(!f.allow_keyframe_request(at(60_400)));
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
