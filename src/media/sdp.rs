//! What we need to know of an SDP, read from its text, and the rewrites
//! LiveKit clients need in our answers (`a=msid` naming `PA_sid|TR_sid`,
//! unused send slots marked inactive).

use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Audio,
    Video,
    Application,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

/// One m-section as seen in an SDP.
#[derive(Debug, Clone)]
pub struct Section {
    pub mid: String,
    pub kind: Kind,
    pub dir: Dir,
    /// Port 0: rejected or stopped.
    pub disabled: bool,
    /// Track part of `a=msid`.
    pub track_id: Option<String>,
    pub rids: Vec<String>,
    /// Payload types in m-line order.
    pub pts: Vec<u8>,
}

/// A codec as named by `a=rtpmap` (+ the fmtp bits that must match).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CodecKey {
    pub name: String,
    pub clock: u32,
    pub h264_mode: Option<u8>,
    pub h264_profile: Option<String>,
}

impl CodecKey {
    pub fn mime(&self, kind: Kind) -> String {
        let top = if kind == Kind::Audio {
            "audio"
        } else {
            "video"
        };
        let name = match self.name.as_str() {
            "opus" => "opus".to_string(),
            n => n.to_ascii_uppercase(),
        };
        format!("{top}/{name}")
    }
}

#[derive(Debug, Clone, Default)]
pub struct SdpInfo {
    pub sections: Vec<Section>,
    /// Payload type -> codec, over all sections (BUNDLE keeps them unique).
    pub codecs: HashMap<u8, CodecKey>,
}

impl SdpInfo {
    pub fn section(&self, mid: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.mid == mid)
    }

    /// The codec of a section's first (preferred) payload type.
    pub fn first_codec(&self, mid: &str) -> Option<&CodecKey> {
        let s = self.section(mid)?;
        s.pts
            .iter()
            .filter_map(|pt| self.codecs.get(pt))
            .find(|c| !matches!(c.name.as_str(), "rtx" | "red" | "ulpfec" | "flexfec-03"))
    }

    /// A payload type in `self` carrying the same codec as `key`.
    pub fn pt_for(&self, key: &CodecKey) -> Option<u8> {
        let mut best = None;
        for (pt, c) in &self.codecs {
            if c.name == key.name && c.clock == key.clock && c.h264_mode == key.h264_mode {
                if c.h264_profile == key.h264_profile {
                    return Some(*pt);
                }
                best.get_or_insert(*pt);
            }
        }
        best
    }
}

fn sections_of(sdp: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    let mut pos = 0;
    for line in sdp.split_inclusive('\n') {
        if line.starts_with("m=") {
            if let Some(s) = start {
                out.push(&sdp[s..pos]);
            }
            start = Some(pos);
        }
        pos += line.len();
    }
    if let Some(s) = start {
        out.push(&sdp[s..]);
    }
    out
}

pub fn parse(sdp: &str) -> SdpInfo {
    let mut info = SdpInfo::default();
    let mut fmtp: HashMap<u8, String> = HashMap::new();
    for sec in sections_of(sdp) {
        let mut lines = sec.lines();
        let Some(m) = lines.next() else { continue };
        let mut parts = m[2..].split_whitespace();
        let kind = match parts.next() {
            Some("audio") => Kind::Audio,
            Some("video") => Kind::Video,
            _ => Kind::Application,
        };
        let port = parts.next().unwrap_or("0");
        let _proto = parts.next();
        let pts = parts.filter_map(|p| p.parse().ok()).collect();
        let mut s = Section {
            mid: String::new(),
            kind,
            dir: Dir::SendRecv,
            disabled: port == "0",
            track_id: None,
            rids: Vec::new(),
            pts,
        };
        for l in lines {
            let l = l.trim_end();
            if let Some(v) = l.strip_prefix("a=mid:") {
                s.mid = v.to_string();
            } else if let Some(v) = l.strip_prefix("a=msid:") {
                s.track_id = v.split_whitespace().nth(1).map(str::to_string);
            } else if let Some(v) = l.strip_prefix("a=rid:") {
                let mut it = v.split_whitespace();
                if let (Some(id), Some("send")) = (it.next(), it.next()) {
                    s.rids.push(id.to_string());
                }
            } else if let Some(v) = l.strip_prefix("a=rtpmap:") {
                let mut it = v.splitn(2, ' ');
                if let (Some(pt), Some(rest)) = (it.next(), it.next()) {
                    if let Ok(pt) = pt.parse::<u8>() {
                        let mut c = rest.split('/');
                        let name = c.next().unwrap_or("").to_ascii_lowercase();
                        let clock = c.next().and_then(|x| x.parse().ok()).unwrap_or(0);
                        info.codecs.insert(
                            pt,
                            CodecKey {
                                name,
                                clock,
                                h264_mode: None,
                                h264_profile: None,
                            },
                        );
                    }
                }
            } else if let Some(v) = l.strip_prefix("a=fmtp:") {
                let mut it = v.splitn(2, ' ');
                if let (Some(pt), Some(rest)) = (it.next(), it.next()) {
                    if let Ok(pt) = pt.parse::<u8>() {
                        fmtp.insert(pt, rest.to_string());
                    }
                }
            } else {
                s.dir = match l {
                    "a=sendrecv" => Dir::SendRecv,
                    "a=sendonly" => Dir::SendOnly,
                    "a=recvonly" => Dir::RecvOnly,
                    "a=inactive" => Dir::Inactive,
                    _ => s.dir,
                };
            }
        }
        info.sections.push(s);
    }
    for (pt, params) in fmtp {
        if let Some(c) = info.codecs.get_mut(&pt) {
            if c.name == "h264" {
                for kv in params.split(';') {
                    let mut kv = kv.trim().splitn(2, '=');
                    match (kv.next(), kv.next()) {
                        (Some("packetization-mode"), Some(v)) => c.h264_mode = v.parse().ok(),
                        (Some("profile-level-id"), Some(v)) => {
                            c.h264_profile = Some(v.get(..4).unwrap_or(v).to_ascii_lowercase())
                        }
                        _ => {}
                    }
                }
                c.h264_mode.get_or_insert(0);
            }
        }
    }
    info
}

/// How one of our send sections should look in the answer.
pub enum SendSlotView<'a> {
    /// Carry a track: `a=msid:<stream> <track>`.
    Track { stream: &'a str, track: &'a str },
    /// Nothing to send here.
    Inactive,
}

/// Rewrite our answer's send sections. `view` is asked per mid; sections it
/// returns `None` for are left alone.
pub fn munge_answer<'a>(
    sdp: &str,
    mut view: impl FnMut(&str) -> Option<SendSlotView<'a>>,
) -> String {
    let mut out = String::with_capacity(sdp.len() + 256);
    let secs = sections_of(sdp);
    let head_end = secs
        .first()
        .map(|f| f.as_ptr() as usize - sdp.as_ptr() as usize)
        .unwrap_or(sdp.len());
    out.push_str(&sdp[..head_end]);
    for sec in secs {
        let mid = sec
            .lines()
            .find_map(|l| l.trim_end().strip_prefix("a=mid:"))
            .unwrap_or("");
        let Some(v) = view(mid) else {
            out.push_str(sec);
            continue;
        };
        let mut wrote_msid = false;
        for line in sec.split_inclusive('\n') {
            let l = line.trim_end();
            match &v {
                SendSlotView::Track { stream, track } => {
                    if l.starts_with("a=msid:") {
                        out.push_str(&format!("a=msid:{stream} {track}\r\n"));
                        wrote_msid = true;
                        continue;
                    }
                    if l.starts_with("a=ssrc:") && l.contains(" msid:") {
                        let ssrc = l.split_whitespace().next().unwrap_or("a=ssrc:0");
                        out.push_str(&format!("{ssrc} msid:{stream} {track}\r\n"));
                        continue;
                    }
                    if l.starts_with("a=mid:") && !sec.contains("a=msid:") && !wrote_msid {
                        out.push_str(line);
                        out.push_str(&format!("a=msid:{stream} {track}\r\n"));
                        wrote_msid = true;
                        continue;
                    }
                }
                SendSlotView::Inactive => {
                    if matches!(l, "a=sendonly" | "a=sendrecv") {
                        out.push_str("a=inactive\r\n");
                        continue;
                    }
                    if l.starts_with("a=msid:")
                        || (l.starts_with("a=ssrc:") && l.contains(" msid:"))
                    {
                        continue;
                    }
                }
            }
            out.push_str(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1 2\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendonly\r\na=msid:x y\r\na=rtpmap:111 opus/48000/2\r\na=ssrc:5 cname:c\r\na=ssrc:5 msid:x y\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96 97\r\na=mid:1\r\na=sendonly\r\na=msid:x z\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:97 rtx/90000\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 102\r\na=mid:2\r\na=recvonly\r\na=msid:s cid1\r\na=rid:q send\r\na=rid:h send\r\na=rtpmap:102 H264/90000\r\na=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n";

    #[test]
    fn parses_sections_and_codecs() {
        let i = parse(ANSWER);
        assert_eq!(i.sections.len(), 3);
        assert_eq!(i.sections[0].kind, Kind::Audio);
        assert_eq!(i.sections[0].dir, Dir::SendOnly);
        assert_eq!(i.sections[2].track_id.as_deref(), Some("cid1"));
        assert_eq!(i.sections[2].rids, vec!["q", "h"]);
        assert_eq!(i.first_codec("1").unwrap().mime(Kind::Video), "video/VP8");
        assert_eq!(i.first_codec("0").unwrap().mime(Kind::Audio), "audio/opus");
        let h = i.first_codec("2").unwrap();
        assert_eq!(h.h264_mode, Some(1));
        assert_eq!(h.h264_profile.as_deref(), Some("42e0"));
        assert_eq!(i.pt_for(h), Some(102));
    }

    #[test]
    fn munges_msid_and_inactive() {
        let out = munge_answer(ANSWER, |mid| match mid {
            "0" => Some(SendSlotView::Track {
                stream: "PA_a|TR_b",
                track: "TR_b",
            }),
            "1" => Some(SendSlotView::Inactive),
            _ => None,
        });
        assert!(out.contains("a=msid:PA_a|TR_b TR_b\r\n"));
        assert!(out.contains("a=ssrc:5 msid:PA_a|TR_b TR_b\r\n"));
        assert!(!out.contains("a=msid:x"));
        let i = parse(&out);
        assert_eq!(i.sections[1].dir, Dir::Inactive);
        assert_eq!(i.sections[2].dir, Dir::RecvOnly);
        assert!(out.starts_with("v=0\r\n"));
    }
}
