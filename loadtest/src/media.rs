//! What the simulated publishers send: real Opus frames and VP8 simulcast
//! frames shaped like a browser's (sizes, rates, keyframes).
//!
//! The VP8 frames carry a real RFC 7741 payload descriptor and frame header
//! (keyframes with the start code and dimensions), so the SFU finds layer
//! switch points as it would in a call; the rest of each frame is filler, as
//! an end-to-end encrypted frame would be to the SFU. Every payload ends in
//! a trailer with the send time, the way LiveKit's E2EE trailer rides at the
//! end of a frame.

use bytes::{BufMut, Bytes, BytesMut};

pub use moselle::media::keyframe::vp8_keyframe_start as vp8_is_keyframe_start;

use crate::stats::now_us;

/// Marks our trailer: "MLT1".
const TRAILER_MAGIC: u32 = 0x4d4c_5431;
pub const TRAILER_LEN: usize = 12;
/// Largest RTP payload we produce; browsers stay near 1200 bytes.
const MAX_PAYLOAD: usize = 1100;
/// A keyframe is this many times a delta frame's size.
const KEYFRAME_FACTOR: usize = 8;

/// One simulcast layer, as livekit-client's presets publish it.
#[derive(Debug, Clone, Copy)]
pub struct LayerSpec {
    pub rid: &'static str,
    /// LiveKit VideoQuality: 0 low, 1 medium, 2 high.
    pub quality: i32,
    pub width: u32,
    pub height: u32,
    pub bitrate_bps: u32,
    pub fps: u32,
}

/// livekit-client's 720p camera with its default simulcast presets
/// (h180, h360 and the h720 top layer).
pub const LAYERS_720P: [LayerSpec; 3] = [
    LayerSpec {
        rid: "q",
        quality: 0,
        width: 320,
        height: 180,
        bitrate_bps: 160_000,
        fps: 20,
    },
    LayerSpec {
        rid: "h",
        quality: 1,
        width: 640,
        height: 360,
        bitrate_bps: 450_000,
        fps: 20,
    },
    LayerSpec {
        rid: "f",
        quality: 2,
        width: 1280,
        height: 720,
        bitrate_bps: 1_700_000,
        fps: 30,
    },
];

/// Seconds between keyframes. Our publishers do not answer PLIs (see the
/// README), so they send keyframes on a short period instead.
pub const KEYFRAME_INTERVAL_S: u32 = 2;

/// Append the send-time trailer.
pub fn put_trailer(b: &mut BytesMut, sent_us: u64) {
    b.put_u64(sent_us);
    b.put_u32(TRAILER_MAGIC);
}

/// The send time in a payload's trailer, if it has one.
pub fn read_trailer(payload: &[u8]) -> Option<u64> {
    let n = payload.len();
    if n < TRAILER_LEN {
        return None;
    }
    let magic = u32::from_be_bytes(payload[n - 4..].try_into().ok()?);
    if magic != TRAILER_MAGIC {
        return None;
    }
    Some(u64::from_be_bytes(payload[n - 12..n - 4].try_into().ok()?))
}

/// A cheap pseudo-random step (xorshift64).
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Makes the frames of one VP8 layer.
pub struct Vp8Layer {
    pub spec: LayerSpec,
    delta_bytes: usize,
    frame_no: u64,
    picture_id: u16,
    filler: Bytes,
}

impl Vp8Layer {
    pub fn new(spec: LayerSpec, seed: u64) -> Self {
        let frames_per_gop = (spec.fps * KEYFRAME_INTERVAL_S) as usize;
        let gop_bytes = spec.bitrate_bps as usize / 8 * KEYFRAME_INTERVAL_S as usize;
        let delta_bytes = gop_bytes / (frames_per_gop - 1 + KEYFRAME_FACTOR);
        let mut x = seed | 1;
        let filler: Vec<u8> = (0..MAX_PAYLOAD * 2)
            .map(|_| {
                // Incompressible-looking bytes, as encrypted media is.
                xorshift(&mut x) as u8
            })
            .collect();
        Self {
            spec,
            delta_bytes,
            frame_no: 0,
            picture_id: (seed as u16) & 0x7fff,
            filler: Bytes::from(filler),
        }
    }

    /// The next frame will be a keyframe.
    pub fn restart(&mut self) {
        self.frame_no = 0;
    }

    pub fn frame_interval_us(&self) -> u64 {
        1_000_000 / self.spec.fps as u64
    }

    /// The next frame's RTP payloads; `true` with the keyframe's first.
    pub fn next_frame(&mut self, out: &mut Vec<Bytes>) -> bool {
        out.clear();
        let gop = (self.spec.fps * KEYFRAME_INTERVAL_S) as u64;
        let key = self.frame_no.is_multiple_of(gop);
        self.frame_no += 1;
        self.picture_id = (self.picture_id + 1) & 0x7fff;
        let total = if key {
            self.delta_bytes * KEYFRAME_FACTOR
        } else {
            self.delta_bytes
        }
        .max(64);
        let sent = now_us();
        // Split about equally, as libwebrtc's packetizer does: the same size
        // throughout, the last few one byte larger.
        let cap = MAX_PAYLOAD - 4 - TRAILER_LEN;
        let packets = total.div_ceil(cap);
        let (base, larger) = (total / packets, total % packets);
        for i in 0..packets {
            let first = i == 0;
            let body = base + usize::from(i >= packets - larger);
            let mut b = BytesMut::with_capacity(body + 4 + TRAILER_LEN + 10);
            // Descriptor: X, S on the first packet, PID 0; I with a 15-bit
            // picture id.
            b.put_u8(0x80 | if first { 0x10 } else { 0 });
            b.put_u8(0x80);
            b.put_u16(0x8000 | self.picture_id);
            let mut body_left = body;
            if first {
                // Frame tag: P bit (0 = key), version 0, show_frame.
                b.put_u8(if key { 0x10 } else { 0x11 });
                b.put_u8(0);
                b.put_u8(0);
                body_left = body_left.saturating_sub(3);
                if key {
                    b.put_slice(&[0x9d, 0x01, 0x2a]);
                    b.put_u16_le(self.spec.width as u16);
                    b.put_u16_le(self.spec.height as u16);
                    body_left = body_left.saturating_sub(7);
                }
            }
            let off = (self.frame_no as usize * 31) % MAX_PAYLOAD;
            b.put_slice(&self.filler[off..off + body_left]);
            put_trailer(&mut b, sent);
            out.push(b.freeze());
        }
        key
    }
}

/// One second of real Opus frames (20 ms, mono, speech-like), encoded once
/// and replayed: encoding is not what is being measured.
pub struct OpusLoop {
    frames: Vec<Bytes>,
    next: usize,
}

pub const OPUS_FRAME_US: u64 = 20_000;

impl OpusLoop {
    pub fn new(seed: u64) -> anyhow::Result<Self> {
        let mut enc = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Voip)?;
        enc.set_bitrate(opus::Bitrate::Bits(32_000))?;
        let mut frames = Vec::with_capacity(50);
        let mut pcm = [0i16; 960];
        let mut out = [0u8; 1500];
        let f = 180.0 + (seed % 100) as f32;
        let mut x = seed | 1;
        for n in 0..50 {
            for (i, s) in pcm.iter_mut().enumerate() {
                let t = (n * 960 + i) as f32 / 48_000.0;
                let noise = (xorshift(&mut x) as i16 as f32) / 32768.0;
                // A voiced tone with a syllable-rate envelope, plus breath.
                let env = 0.5 + 0.5 * (t * 4.0 * std::f32::consts::TAU).sin();
                let v = env * (t * f * std::f32::consts::TAU).sin() * 0.4 + noise * 0.05;
                *s = (v * 32767.0) as i16;
            }
            let len = enc.encode(&pcm, &mut out)?;
            frames.push(Bytes::copy_from_slice(&out[..len]));
        }
        Ok(Self { frames, next: 0 })
    }

    /// The next frame with the send-time trailer.
    pub fn next_frame(&mut self) -> Bytes {
        let f = &self.frames[self.next];
        self.next = (self.next + 1) % self.frames.len();
        let mut b = BytesMut::with_capacity(f.len() + TRAILER_LEN);
        b.put_slice(f);
        put_trailer(&mut b, now_us());
        b.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_hit_their_bitrates_and_start_with_a_keyframe() {
        for spec in LAYERS_720P {
            let mut l = Vp8Layer::new(spec, 7);
            let mut out = Vec::new();
            let mut bytes = 0usize;
            let mut keys = 0;
            let frames = spec.fps * KEYFRAME_INTERVAL_S * 3;
            for i in 0..frames {
                let key = l.next_frame(&mut out);
                if i == 0 {
                    assert!(key);
                }
                keys += key as u32;
                assert_eq!(vp8_is_keyframe_start(&out[0]), key);
                assert!(out[1..].iter().all(|p| !vp8_is_keyframe_start(p)));
                assert!(out.iter().all(|p| p.len() <= MAX_PAYLOAD));
                assert!(out.iter().all(|p| read_trailer(p).is_some()));
                bytes += out.iter().map(|p| p.len()).sum::<usize>();
            }
            assert_eq!(keys, 3);
            let bps = bytes as f64 * 8.0 / (3 * KEYFRAME_INTERVAL_S) as f64;
            let want = spec.bitrate_bps as f64;
            assert!((bps - want).abs() < want * 0.1, "{}: {bps} bit/s", spec.rid);
        }
    }

    #[test]
    fn moselle_sees_our_keyframes() {
        let mut l = Vp8Layer::new(LAYERS_720P[2], 1);
        let mut out = Vec::new();
        assert!(l.next_frame(&mut out));
        assert!(moselle::media::keyframe::vp8_keyframe_start(&out[0]));
        assert!(!l.next_frame(&mut out));
        assert!(!moselle::media::keyframe::vp8_keyframe_start(&out[0]));
    }

    #[test]
    fn opus_frames_are_real_and_timed() {
        let mut o = OpusLoop::new(3).expect("opus encoder");
        let f = o.next_frame();
        assert!(f.len() > TRAILER_LEN + 10, "{}", f.len());
        // TOC byte: a SILK/hybrid or CELT config; 20 ms frames.
        assert!(read_trailer(&f).is_some());
    }
}
