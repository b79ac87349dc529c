//! Entry points for the fuzz targets in `fuzz/`: each hands untrusted bytes
//! to one parser the way the server does, without the sockets around it.
//! Not an API; nothing here is used by the server itself.

use std::collections::HashMap;

use livekit_protocol as lk;
use prost::Message;

use crate::api::twirp::Format;
use crate::media::datagram_harness::DatagramHarness;
use crate::media::{keyframe, sdp};
use crate::transport::stun;

/// A WebSocket frame as the signaling session reads it: binary frames are
/// protobuf, text frames JSON.
pub fn signal_frame(data: &[u8]) {
    let _ = lk::SignalRequest::decode(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = serde_json::from_str::<lk::SignalRequest>(text);
    }
}

/// `/rtc/v1`'s `join_request` and `/rtc`'s query parameters.
pub fn join_query(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut q = HashMap::new();
    for (i, part) in text.split('&').enumerate() {
        let (k, v) = part.split_once('=').unwrap_or(("join_request", part));
        // The first value is always tried as a join request.
        let k = if i == 0 { "join_request" } else { k };
        q.insert(k.to_string(), v.to_string());
    }
    let _ = moselle_signaling::join::parse_v1(&q);
    let _ = moselle_signaling::join::parse_v0(&q);
}

/// An access token, with the key the server would hold.
pub fn access_token(data: &[u8]) {
    let keys = moselle_signaling::token::KeySet::new(HashMap::from([(
        "devkey".to_string(),
        "secret".to_string(),
    )]));
    let token = String::from_utf8_lossy(data);
    let _ = keys.verify(&token);
    let _ = keys.verify_join(&token);
}

/// A client's SDP read, and our answer rewritten over it (each section
/// given a track, made inactive or left alone in turn).
pub fn sdp(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let info = sdp::parse(&text);
    for s in &info.sections {
        let _ = info.first_codec(&s.mid);
    }
    let mut n = 0u32;
    let _ = sdp::munge_answer(&text, |_mid| {
        n += 1;
        match n % 3 {
            0 => None,
            1 => Some(sdp::SendSlotView::Inactive),
            _ => Some(sdp::SendSlotView::Track {
                stream: "PA_x",
                track: "TR_x",
            }),
        }
    });
}

/// Keyframe detection from payload bytes.
pub fn keyframe(data: &[u8]) {
    let _ = keyframe::vp8_keyframe_start(data);
    let _ = keyframe::h264_keyframe_start(data);
}

/// The demultiplexer's peek at a datagram: is it STUN, and whose ufrag.
pub fn stun_ufrag(data: &[u8]) {
    if stun::looks_like_stun(data) {
        let _ = stun::local_ufrag(data);
    }
    let _ = stun::local_ufrag(data);
}

/// ICE-TCP's RFC 4571 framing over a byte stream that arrives in pieces.
pub fn rfc4571(data: &[u8]) {
    crate::transport::tcp::fuzz_frames(data);
}

/// The token service's request bodies (`/get_token`, `/sfu/get`,
/// `/delegate_delayed_leave`) and the names derived from them.
pub fn token_service_body(data: &[u8]) {
    crate::matrix::service::fuzz_bodies(data);
}

/// A config file over the embedded default, and its checks.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(cfg) = crate::config::Config::layered(&text, "fuzz") {
        let _ = cfg.problems();
        let _ = cfg.masked_toml();
    }
}

/// RoomService bodies in both of Twirp's encodings.
pub fn twirp(data: &[u8]) {
    for fmt in [Format::Protobuf, Format::Json] {
        let _ = fmt.decode::<lk::CreateRoomRequest>(data);
        let _ = fmt.decode::<lk::UpdateParticipantRequest>(data);
        let _ = fmt.decode::<lk::SendDataRequest>(data);
        let _ = fmt.decode::<lk::UpdateSubscriptionsRequest>(data);
        let _ = fmt.decode::<lk::ListRoomsRequest>(data);
    }
}

/// The engine's datagram entry: arbitrary bytes from a stranger, or from
/// a participant's path (see [`DatagramHarness::feed`]).
pub fn datagram(data: &[u8]) {
    thread_local! {
        static HARNESS: std::cell::RefCell<Option<DatagramHarness>> =
            const { std::cell::RefCell::new(None) };
    }
    HARNESS.with(|h| {
        let mut h = h.borrow_mut();
        if h.is_none() {
            *h = Some(DatagramHarness::new().expect("the fuzz harness binds a loopback socket"));
        }
        if let Some(h) = h.as_mut() {
            h.feed(data);
        }
    });
}
