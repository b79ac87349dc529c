//! LiveKit access tokens: HS256 JWTs whose `iss` names an API key.
//!
//! The claim names follow LiveKit's `ClaimGrants` so that tokens made by
//! `livekit-api` (PyPI) or `livekit-server-sdk` (npm) verify unchanged.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Clock skew tolerated on `nbf` and `exp`.
pub const LEEWAY_SECS: u64 = 10;

/// LiveKit's `VideoGrant`. Unset permissions default the way LiveKit's do.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct VideoGrant {
    #[serde(skip_serializing_if = "is_false")]
    pub room_create: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub room_list: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub room_record: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub room_admin: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub room_join: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub room: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_publish: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_subscribe: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_publish_data: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub can_publish_sources: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_update_own_metadata: Option<bool>,
    #[serde(skip_serializing_if = "is_false")]
    pub hidden: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub recorder: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl VideoGrant {
    pub fn can_publish(&self) -> bool {
        self.can_publish.unwrap_or(true)
    }
    pub fn can_subscribe(&self) -> bool {
        self.can_subscribe.unwrap_or(true)
    }
    pub fn can_publish_data(&self) -> bool {
        self.can_publish_data.unwrap_or(true)
    }
}

/// The claims of a LiveKit access token.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    pub exp: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub metadata: String,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub attributes: HashMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub video: Option<VideoGrant>,
    /// Base64 SHA-256 of a webhook's body (webhook tokens only).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sha256: String,
}

impl Claims {
    pub fn identity(&self) -> &str {
        &self.sub
    }
    pub fn video(&self) -> &VideoGrant {
        static NONE: std::sync::OnceLock<VideoGrant> = std::sync::OnceLock::new();
        self.video
            .as_ref()
            .unwrap_or_else(|| NONE.get_or_init(VideoGrant::default))
    }
}

/// Why a token was refused. The text is safe to show to the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("no access token given")]
    Missing,
    #[error("access token is malformed: {0}")]
    Malformed(String),
    #[error("access token signed with an unsupported algorithm (only HS256)")]
    Algorithm,
    #[error("access token names an unknown API key")]
    UnknownKey,
    #[error("access token signature is invalid")]
    Signature,
    #[error("access token has expired")]
    Expired,
    #[error("access token is not valid yet")]
    NotYetValid,
    #[error("access token has no expiry")]
    NoExpiry,
    #[error("access token does not grant roomJoin")]
    NoRoomJoin,
    #[error("access token names no room")]
    NoRoom,
    #[error("access token names no identity")]
    NoIdentity,
    #[error("could not sign token: {0}")]
    Sign(String),
}

impl TokenError {
    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            TokenError::Missing => "missing",
            TokenError::Malformed(_) => "malformed",
            TokenError::Algorithm => "algorithm",
            TokenError::UnknownKey => "unknown_key",
            TokenError::Signature => "signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::NoExpiry => "no_expiry",
            TokenError::NoRoomJoin => "no_room_join",
            TokenError::NoRoom => "no_room",
            TokenError::NoIdentity => "no_identity",
            TokenError::Sign(_) => "sign",
        }
    }
}

/// API key -> secret pairs, used to verify and to mint.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, String>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("KeySet")
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Unix time in seconds (0 if the clock is before 1970).
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl KeySet {
    pub fn new(keys: HashMap<String, String>) -> Self {
        KeySet { keys }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn key_names(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Verify signature and time bounds; does not look at grants.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        self.verify_at(token, now_secs())
    }

    pub fn verify_at(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if header.alg != Algorithm::HS256 {
            return Err(TokenError::Algorithm);
        }
        // Read `iss` before the signature check to pick the secret.
        let unverified = unverified_claims(token)?;
        let secret = self
            .keys
            .get(&unverified.iss)
            .ok_or(TokenError::UnknownKey)?;
        let mut validation = Validation::new(Algorithm::HS256);
        // Time bounds are checked below against `now`, so tests can move the clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<Claims>(
            token,
            &DecodingKey::from_secret(secret.as_bytes()),
            &validation,
        )
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::Signature,
            _ => TokenError::Malformed(e.to_string()),
        })?;
        let claims = data.claims;
        if claims.exp == 0 {
            return Err(TokenError::NoExpiry);
        }
        if claims.exp + LEEWAY_SECS < now {
            return Err(TokenError::Expired);
        }
        if let Some(nbf) = claims.nbf {
            if nbf > now + LEEWAY_SECS {
                return Err(TokenError::NotYetValid);
            }
        }
        Ok(claims)
    }

    /// Verify a token for joining a room: adds the roomJoin/room/identity rules.
    pub fn verify_join(&self, token: &str) -> Result<Claims, TokenError> {
        let claims = self.verify(token)?;
        check_join_grants(&claims)?;
        Ok(claims)
    }

    /// Mint a token signed with `key`'s secret.
    pub fn mint(&self, key: &str, claims: &Claims) -> Result<String, TokenError> {
        let secret = self.keys.get(key).ok_or(TokenError::UnknownKey)?;
        let mut claims = claims.clone();
        claims.iss = key.to_string();
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .map_err(|e| TokenError::Sign(e.to_string()))
    }

    /// Mint a token whose payload a browser's `atob` can read. Element Call
    /// reads its claims with `atob`, which refuses base64url's `-` and `_`.
    /// Those arise only from bytes whose low six bits are 62 or 63 (`>`,
    /// `?`, `~`, DEL, or any non-ASCII byte), so such characters are written
    /// as JSON `\u` escapes: the same claims, an atob-safe payload.
    pub fn mint_atob_safe(&self, key: &str, claims: &Claims) -> Result<String, TokenError> {
        let secret = self.keys.get(key).ok_or(TokenError::UnknownKey)?;
        let mut claims = claims.clone();
        claims.iss = key.to_string();
        let json = serde_json::to_string(&claims).map_err(|e| TokenError::Sign(e.to_string()))?;
        let raw = serde_json::value::RawValue::from_string(escape_for_atob(&json))
            .map_err(|e| TokenError::Sign(e.to_string()))?;
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &raw,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .map_err(|e| TokenError::Sign(e.to_string()))
    }
}

/// `json` with every character that could encode to base64url's `-` or `_`
/// escaped. They can only stand inside strings, where an escape means the
/// same character.
fn escape_for_atob(json: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() && !matches!(c, '>' | '?' | '~' | '\x7f') {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{u:04x}");
            }
        }
    }
    out
}

/// The grant rules a join needs, separate from the signature check.
pub fn check_join_grants(claims: &Claims) -> Result<(), TokenError> {
    let video = claims.video();
    if !video.room_join {
        return Err(TokenError::NoRoomJoin);
    }
    if video.room.is_empty() {
        return Err(TokenError::NoRoom);
    }
    if claims.sub.is_empty() {
        return Err(TokenError::NoIdentity);
    }
    Ok(())
}

fn unverified_claims(token: &str) -> Result<Claims, TokenError> {
    use base64::Engine;
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| TokenError::Malformed("not a JWT".into()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| TokenError::Malformed("payload is not base64url".into()))?;
    serde_json::from_slice(&bytes).map_err(|e| TokenError::Malformed(format!("claims: {e}")))
}

/// Claims for a test or dev token.
pub fn join_claims(room: &str, identity: &str, ttl: Duration) -> Claims {
    let now = now_secs();
    Claims {
        sub: identity.to_string(),
        nbf: Some(now),
        exp: now + ttl.as_secs().max(1),
        video: Some(VideoGrant {
            room_join: true,
            room: room.to_string(),
            ..VideoGrant::default()
        }),
        ..Claims::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> KeySet {
        KeySet::new(HashMap::from([("devkey".into(), "secret".into())]))
    }

    #[test]
    fn atob_safe_tokens_carry_the_same_claims_without_base64url_only_characters() {
        let ks = keys();
        // Characters whose UTF-8 bytes produce `-` or `_` in base64url.
        let sub = "@z\u{f6}e:example.org:DEV~?>\u{1f600}\u{7f}";
        let mut plain_had_them = false;
        for pad in 0..3 {
            let claims = join_claims(&"r".repeat(pad + 1), sub, Duration::from_secs(60));
            let plain = ks.mint("devkey", &claims).unwrap();
            plain_had_them |= plain.split('.').nth(1).unwrap().contains(['-', '_']);
            let safe = ks.mint_atob_safe("devkey", &claims).unwrap();
            let payload = safe.split('.').nth(1).unwrap();
            assert!(!payload.contains(['-', '_']), "{payload}");
            let back = ks.verify_join(&safe).unwrap();
            assert_eq!(back.sub, sub);
            assert_eq!(back.video().room, "r".repeat(pad + 1));
        }
        assert!(plain_had_them, "the case must matter for plain tokens");
    }

    #[test]
    fn mint_then_verify_round_trips() {
        let ks = keys();
        let claims = join_claims("r", "alice", Duration::from_secs(60));
        let t = ks.mint("devkey", &claims).unwrap();
        let back = ks.verify_join(&t).unwrap();
        assert_eq!(back.sub, "alice");
        assert_eq!(back.iss, "devkey");
        assert_eq!(back.video().room, "r");
        assert!(back.video().can_publish());
    }

    #[test]
    fn time_bounds_use_leeway() {
        let ks = keys();
        let mut c = join_claims("r", "a", Duration::from_secs(60));
        c.exp = 1000;
        c.nbf = Some(900);
        let t = ks.mint("devkey", &c).unwrap();
        assert!(ks.verify_at(&t, 1005).is_ok());
        assert_eq!(ks.verify_at(&t, 1011), Err(TokenError::Expired));
        assert!(ks.verify_at(&t, 895).is_ok());
        assert_eq!(ks.verify_at(&t, 880), Err(TokenError::NotYetValid));
    }

    #[test]
    fn wrong_secret_and_unknown_key_fail() {
        let other = KeySet::new(HashMap::from([("devkey".into(), "other".into())]));
        let t = other
            .mint("devkey", &join_claims("r", "a", Duration::from_secs(60)))
            .unwrap();
        assert_eq!(keys().verify(&t), Err(TokenError::Signature));
        let stranger = KeySet::new(HashMap::from([("k2".into(), "secret".into())]));
        let t = stranger
            .mint("k2", &join_claims("r", "a", Duration::from_secs(60)))
            .unwrap();
        assert_eq!(keys().verify(&t), Err(TokenError::UnknownKey));
    }

    #[test]
    fn garbage_is_malformed() {
        for t in ["x", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9.e30"] {
            assert!(
                matches!(keys().verify(t), Err(TokenError::Malformed(_))),
                "{t}"
            );
        }
        assert_eq!(keys().verify(""), Err(TokenError::Missing));
    }

    #[test]
    fn join_needs_room_join_room_and_identity() {
        let ks = keys();
        let mut c = join_claims("r", "a", Duration::from_secs(60));
        c.video.as_mut().unwrap().room_join = false;
        let t = ks.mint("devkey", &c).unwrap();
        assert_eq!(ks.verify_join(&t), Err(TokenError::NoRoomJoin));
        let mut c = join_claims("", "a", Duration::from_secs(60));
        c.video.as_mut().unwrap().room.clear();
        assert_eq!(
            ks.verify_join(&ks.mint("devkey", &c).unwrap()),
            Err(TokenError::NoRoom)
        );
        let c = join_claims("r", "", Duration::from_secs(60));
        assert_eq!(
            ks.verify_join(&ks.mint("devkey", &c).unwrap()),
            Err(TokenError::NoIdentity)
        );
    }

    #[test]
    fn livekit_json_shape_parses() {
        // The claim layout livekit-api emits.
        let json = r#"{"sub":"bob","iss":"devkey","nbf":1,"exp":99999999999,"name":"Bob",
            "video":{"roomJoin":true,"room":"x","canPublish":false,"canPublishSources":["microphone"]},
            "metadata":"","attributes":{},"kind":"standard","sha256":""}"#;
        let c: Claims = serde_json::from_str(json).unwrap();
        assert!(!c.video().can_publish());
        assert!(c.video().can_subscribe());
        assert_eq!(c.video().can_publish_sources, vec!["microphone"]);
    }
}
