//! Keyframe detection from the bytes LiveKit's frame encryption leaves in
//! clear: the RTP payload descriptor and the first bytes of the frame.
//! Nothing beyond those is read.

/// Codecs whose keyframes we can recognise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoCodec {
    Vp8,
    H264,
    Other,
}

impl VideoCodec {
    pub fn is_keyframe_start(self, payload: &[u8]) -> bool {
        match self {
            VideoCodec::Vp8 => vp8_keyframe_start(payload),
            VideoCodec::H264 => h264_keyframe_start(payload),
            VideoCodec::Other => false,
        }
    }
}

/// First packet of a VP8 keyframe (RFC 7741 descriptor, then the VP8 frame
/// tag whose lowest bit is 0 on keyframes).
pub fn vp8_keyframe_start(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else { return false };
    let start_of_partition = b0 & 0x10 != 0;
    let partition_id = b0 & 0x07;
    if !start_of_partition || partition_id != 0 {
        return false;
    }
    let mut i = 1;
    if b0 & 0x80 != 0 {
        let Some(&x) = p.get(i) else { return false };
        i += 1;
        if x & 0x80 != 0 {
            // PictureID, 7 or 15 bits.
            let Some(&pid) = p.get(i) else { return false };
            i += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            i += 1; // TL0PICIDX
        }
        if x & 0x30 != 0 {
            i += 1; // TID/Y/KEYIDX
        }
    }
    matches!(p.get(i), Some(tag) if tag & 0x01 == 0)
}

fn h264_nal_is_key(nal_type: u8) -> bool {
    // IDR slice, or SPS which precedes one.
    nal_type == 5 || nal_type == 7
}

/// First packet of an H.264 keyframe (RFC 6184: single NAL, STAP-A, FU-A).
pub fn h264_keyframe_start(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else { return false };
    match b0 & 0x1f {
        t @ 1..=23 => h264_nal_is_key(t),
        24 => {
            // STAP-A: 16-bit size, then a NAL, repeated.
            let mut i = 1;
            while i + 2 < p.len() {
                let size = u16::from_be_bytes([p[i], p[i + 1]]) as usize;
                let Some(&hdr) = p.get(i + 2) else {
                    return false;
                };
                if h264_nal_is_key(hdr & 0x1f) {
                    return true;
                }
                i += 2 + size;
            }
            false
        }
        28 => match p.get(1) {
            Some(&fu) => fu & 0x80 != 0 && h264_nal_is_key(fu & 0x1f),
            None => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vp8_keyframe_and_delta() {
        // S=1 PID=0, no extension, frame tag with P bit 0: keyframe.
        assert!(vp8_keyframe_start(&[0x10, 0x50, 0x01, 0x00]));
        // P bit 1: delta frame.
        assert!(!vp8_keyframe_start(&[0x10, 0x51, 0x01, 0x00]));
        // Not a start of partition.
        assert!(!vp8_keyframe_start(&[0x00, 0x50]));
        // X, I with 15-bit picture id, L, T: 1+1+2+1+1 = 6 bytes of descriptor.
        let p = [0x90, 0xe0, 0x81, 0x23, 0x05, 0x20, 0x50];
        assert!(vp8_keyframe_start(&p));
        let p = [0x90, 0xe0, 0x81, 0x23, 0x05, 0x20, 0x51];
        assert!(!vp8_keyframe_start(&p));
        // Truncated input never panics.
        for n in 0..p.len() {
            let _ = vp8_keyframe_start(&p[..n]);
        }
    }

    #[test]
    fn h264_forms() {
        assert!(h264_keyframe_start(&[0x65, 0x88])); // IDR
        assert!(!h264_keyframe_start(&[0x41, 0x9a])); // non-IDR slice
        assert!(h264_keyframe_start(&[
            0x78, 0x00, 0x02, 0x67, 0x42, 0x00, 0x02, 0x68, 0xce
        ])); // STAP-A with SPS
        assert!(h264_keyframe_start(&[0x7c, 0x85, 0x00])); // FU-A start of IDR
        assert!(!h264_keyframe_start(&[0x7c, 0x05, 0x00])); // FU-A continuation
        assert!(!h264_keyframe_start(&[0x78, 0xff]));
        assert!(!h264_keyframe_start(&[]));
    }
}
