//! Twirp framing as LiveKit's server SDKs speak it: a POST whose body is
//! protobuf (`application/protobuf`, the Python SDK) or protobuf JSON
//! (`application/json`, the Node SDK), answered in the same encoding;
//! errors as Twirp JSON `{"code", "msg"}` with the code's HTTP status.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Twirp error codes we answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    BadRoute,
    Malformed,
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    NotFound,
    FailedPrecondition,
    Internal,
    Unavailable,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadRoute => "bad_route",
            Code::Malformed => "malformed",
            Code::InvalidArgument => "invalid_argument",
            Code::Unauthenticated => "unauthenticated",
            Code::PermissionDenied => "permission_denied",
            Code::NotFound => "not_found",
            Code::FailedPrecondition => "failed_precondition",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
        }
    }

    /// The HTTP status Twirp gives the code.
    pub fn status(self) -> StatusCode {
        match self {
            Code::BadRoute | Code::NotFound => StatusCode::NOT_FOUND,
            Code::Malformed | Code::InvalidArgument => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {msg}", code.as_str())]
pub struct TwirpError {
    pub code: Code,
    pub msg: String,
}

impl TwirpError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        TwirpError {
            code,
            msg: msg.into(),
        }
    }
}

impl IntoResponse for TwirpError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.code.as_str(), "msg": self.msg });
        (
            self.code.status(),
            // Exactly this: livekit-server-sdk reads the error only when
            // the content type equals it.
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

/// A request body's encoding, from its Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Protobuf,
    Json,
}

impl Format {
    pub fn of(headers: &HeaderMap) -> Result<Format, TwirpError> {
        let ct = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim();
        match mime.to_ascii_lowercase().as_str() {
            "application/protobuf" => Ok(Format::Protobuf),
            "application/json" => Ok(Format::Json),
            _ => Err(TwirpError::new(
                Code::BadRoute,
                format!(
                    "unexpected Content-Type {ct:?}: use application/protobuf or application/json"
                ),
            )),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Protobuf => "application/protobuf",
            Format::Json => "application/json",
        }
    }

    pub fn decode<M>(self, body: &[u8]) -> Result<M, TwirpError>
    where
        M: prost::Message + Default + DeserializeOwned,
    {
        match self {
            Format::Protobuf => M::decode(body).map_err(|e| {
                TwirpError::new(
                    Code::Malformed,
                    format!("the body is not a valid protobuf message: {e}"),
                )
            }),
            // An empty JSON body is an empty message, as Twirp's Go server
            // takes it.
            Format::Json if body.iter().all(u8::is_ascii_whitespace) => Ok(M::default()),
            Format::Json => serde_json::from_slice(body).map_err(|e| {
                TwirpError::new(
                    Code::Malformed,
                    format!("the body is not valid protobuf JSON: {e}"),
                )
            }),
        }
    }

    pub fn encode<M>(self, msg: &M) -> Response
    where
        M: prost::Message + Serialize,
    {
        let body = match self {
            Format::Protobuf => msg.encode_to_vec(),
            Format::Json => match serde_json::to_vec(msg) {
                Ok(b) => b,
                Err(e) => return TwirpError::new(Code::Internal, e.to_string()).into_response(),
            },
        };
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, self.content_type())],
            body,
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livekit_protocol as lk;

    fn headers(ct: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
        h
    }

    #[test]
    fn content_types_as_the_sdks_send_them() {
        assert_eq!(
            Format::of(&headers("application/protobuf")),
            Ok(Format::Protobuf)
        );
        assert_eq!(
            Format::of(&headers("application/json;charset=UTF-8")),
            Ok(Format::Json)
        );
        let e = Format::of(&headers("text/plain")).unwrap_err();
        assert_eq!(e.code, Code::BadRoute);
        assert_eq!(
            Format::of(&HeaderMap::new()).unwrap_err().code,
            Code::BadRoute
        );
    }

    #[test]
    fn json_bodies_as_protobuf_es_writes_them() {
        let r: lk::CreateRoomRequest = Format::Json
            .decode(br#"{"name":"r1","emptyTimeout":30,"maxParticipants":2,"metadata":"m"}"#)
            .unwrap();
        assert_eq!(
            (r.name.as_str(), r.empty_timeout, r.max_participants),
            ("r1", 30, 2)
        );
        let e: lk::ListRoomsRequest = Format::Json.decode(b"").unwrap();
        assert!(e.names.is_empty());
        let bad = Format::Json.decode::<lk::CreateRoomRequest>(b"{\"name\": 5}");
        assert_eq!(bad.unwrap_err().code, Code::Malformed);
    }

    #[test]
    fn garbage_protobuf_is_malformed_not_a_panic() {
        let e = Format::Protobuf.decode::<lk::CreateRoomRequest>(&[0xff, 0xff, 0xff, 0x0f]);
        assert_eq!(e.unwrap_err().code, Code::Malformed);
    }
}
