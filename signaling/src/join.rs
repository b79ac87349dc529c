//! What a client asks for when it opens `/rtc` (v0, two peer connections) or
//! `/rtc/v1` (one peer connection, `join_request` in the query).

use std::collections::HashMap;
use std::io::Read;

use base64::Engine;
use livekit_protocol as lk;
use prost::Message;

/// Upper bound on a decompressed `join_request`, as LiveKit's.
pub const MAX_JOIN_REQUEST: usize = 1 << 20;

/// Which signaling flavour the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `/rtc`: publisher and subscriber peer connections.
    DualPc,
    /// `/rtc/v1`: one peer connection, the client always offers.
    SinglePc,
}

/// A parsed join, before the token's grants are applied.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    pub flavor: Flavor,
    pub protocol: i32,
    pub auto_subscribe: bool,
    pub adaptive_stream: bool,
    pub client_info: Option<lk::ClientInfo>,
    /// v1: the first offer rides in the join request.
    pub publisher_offer: Option<lk::SessionDescription>,
    /// A resume of an existing session rather than a fresh join.
    pub reconnect: bool,
    pub participant_sid: Option<String>,
    pub metadata: Option<String>,
    pub attributes: HashMap<String, String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JoinParseError {
    #[error("join_request is missing")]
    Missing,
    #[error("join_request is not base64url")]
    Base64,
    #[error("join_request is too large")]
    TooLarge,
    #[error("join_request could not be decompressed")]
    Gzip,
    #[error("join_request is not a valid protobuf message")]
    Protobuf,
    #[error("join_request uses an unsupported compression")]
    Compression,
}

fn truthy(v: Option<&String>, default: bool) -> bool {
    match v.map(|s| s.as_str()) {
        None => default,
        Some("1") | Some("true") | Some("True") => true,
        Some(_) => false,
    }
}

/// Parse the query of a v0 `/rtc` request.
pub fn parse_v0(q: &HashMap<String, String>) -> JoinOptions {
    let protocol = q.get("protocol").and_then(|p| p.parse().ok()).unwrap_or(0);
    JoinOptions {
        flavor: Flavor::DualPc,
        protocol,
        auto_subscribe: truthy(q.get("auto_subscribe"), true),
        adaptive_stream: truthy(q.get("adaptive_stream"), false),
        client_info: Some(lk::ClientInfo {
            protocol,
            version: q.get("version").cloned().unwrap_or_default(),
            ..Default::default()
        }),
        publisher_offer: None,
        reconnect: truthy(q.get("reconnect"), false),
        participant_sid: q.get("sid").filter(|s| !s.is_empty()).cloned(),
        metadata: None,
        attributes: HashMap::new(),
    }
}

/// Parse the `join_request` of a v1 `/rtc/v1` request.
pub fn parse_v1(q: &HashMap<String, String>) -> Result<JoinOptions, JoinParseError> {
    let raw = q.get("join_request").ok_or(JoinParseError::Missing)?;
    let req = decode_join_request(raw)?;
    let settings = req.connection_settings.unwrap_or_default();
    let protocol = req.client_info.as_ref().map(|c| c.protocol).unwrap_or(0);
    Ok(JoinOptions {
        flavor: Flavor::SinglePc,
        protocol,
        auto_subscribe: settings.auto_subscribe,
        adaptive_stream: settings.adaptive_stream,
        client_info: req.client_info,
        publisher_offer: req.publisher_offer,
        reconnect: req.reconnect,
        participant_sid: Some(req.participant_sid).filter(|s| !s.is_empty()),
        metadata: Some(req.metadata).filter(|m| !m.is_empty()),
        attributes: req.participant_attributes,
    })
}

/// The `/rtc/v1` `join_request` parameter for `join`, as current SDKs send
/// it: an uncompressed `WrappedJoinRequest`, base64url without padding.
pub fn encode_join_request(join: &lk::JoinRequest) -> String {
    let wrapped = lk::WrappedJoinRequest {
        compression: lk::wrapped_join_request::Compression::None as i32,
        join_request: join.encode_to_vec(),
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(wrapped.encode_to_vec())
}

/// base64url (padding optional) of a `WrappedJoinRequest`, possibly gzipped.
pub fn decode_join_request(raw: &str) -> Result<lk::JoinRequest, JoinParseError> {
    if raw.len() > MAX_JOIN_REQUEST * 2 {
        return Err(JoinParseError::TooLarge);
    }
    let trimmed = raw.trim().trim_end_matches('=');
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(trimmed)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed))
        .map_err(|_| JoinParseError::Base64)?;
    let wrapped =
        lk::WrappedJoinRequest::decode(bytes.as_slice()).map_err(|_| JoinParseError::Protobuf)?;
    let inner = match wrapped.compression {
        0 => {
            if wrapped.join_request.len() > MAX_JOIN_REQUEST {
                return Err(JoinParseError::TooLarge);
            }
            wrapped.join_request
        }
        1 => {
            let mut out = Vec::new();
            let mut dec = flate2::read::GzDecoder::new(wrapped.join_request.as_slice())
                .take(MAX_JOIN_REQUEST as u64 + 1);
            dec.read_to_end(&mut out)
                .map_err(|_| JoinParseError::Gzip)?;
            if out.len() > MAX_JOIN_REQUEST {
                return Err(JoinParseError::TooLarge);
            }
            out
        }
        _ => return Err(JoinParseError::Compression),
    };
    lk::JoinRequest::decode(inner.as_slice()).map_err(|_| JoinParseError::Protobuf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn encode(req: &lk::JoinRequest, gzip: bool, pad: bool) -> String {
        let mut inner = req.encode_to_vec();
        if gzip {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&inner).unwrap();
            inner = enc.finish().unwrap();
        }
        let wrapped = lk::WrappedJoinRequest {
            compression: gzip as i32,
            join_request: inner,
        };
        let eng = if pad {
            base64::engine::general_purpose::URL_SAFE
        } else {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
        };
        eng.encode(wrapped.encode_to_vec())
    }

    fn sample() -> lk::JoinRequest {
        lk::JoinRequest {
            client_info: Some(lk::ClientInfo {
                protocol: 17,
                ..Default::default()
            }),
            connection_settings: Some(lk::ConnectionSettings {
                auto_subscribe: true,
                adaptive_stream: true,
                ..Default::default()
            }),
            publisher_offer: Some(lk::SessionDescription {
                r#type: "offer".into(),
                sdp: "v=0".into(),
                id: 1,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn encoded_join_request_decodes_to_itself() {
        let req = sample();
        assert_eq!(encode_join_request(&req), encode(&req, false, false));
        assert_eq!(
            decode_join_request(&encode_join_request(&req)).unwrap(),
            req
        );
    }

    #[test]
    fn v1_round_trips_plain_and_gzip_with_and_without_padding() {
        for gzip in [false, true] {
            for pad in [false, true] {
                let q = HashMap::from([("join_request".to_string(), encode(&sample(), gzip, pad))]);
                let o = parse_v1(&q).unwrap();
                assert_eq!(o.flavor, Flavor::SinglePc);
                assert_eq!(o.protocol, 17);
                assert!(o.auto_subscribe && o.adaptive_stream);
                assert_eq!(o.publisher_offer.unwrap().id, 1);
            }
        }
    }

    #[test]
    fn v1_errors_are_specific() {
        assert_eq!(
            parse_v1(&HashMap::new()).unwrap_err(),
            JoinParseError::Missing
        );
        let q = HashMap::from([("join_request".to_string(), "!!!".to_string())]);
        assert_eq!(parse_v1(&q).unwrap_err(), JoinParseError::Base64);
        let q = HashMap::from([("join_request".to_string(), "AAAA".to_string())]);
        assert!(parse_v1(&q).is_err());
        // A gzip bomb is cut off at the limit.
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![0u8; MAX_JOIN_REQUEST + 10]).unwrap();
        let wrapped = lk::WrappedJoinRequest {
            compression: 1,
            join_request: enc.finish().unwrap(),
        };
        let q = HashMap::from([(
            "join_request".to_string(),
            base64::engine::general_purpose::URL_SAFE.encode(wrapped.encode_to_vec()),
        )]);
        assert_eq!(parse_v1(&q).unwrap_err(), JoinParseError::TooLarge);
    }

    #[test]
    fn v0_defaults() {
        let q = HashMap::from([
            ("protocol".to_string(), "16".to_string()),
            ("auto_subscribe".to_string(), "0".to_string()),
        ]);
        let o = parse_v0(&q);
        assert_eq!(o.flavor, Flavor::DualPc);
        assert_eq!(o.protocol, 16);
        assert!(!o.auto_subscribe);
        assert!(!o.reconnect);
    }
}
