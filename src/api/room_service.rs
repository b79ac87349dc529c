//! RoomService's methods: grant checks and limits as LiveKit applies them
//! (`roomCreate` to create and delete, `roomList` to list, `roomAdmin` for
//! that very room for the rest), then the call is carried out where the
//! room lives.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use livekit_protocol as lk;
use moselle_signaling::token::Claims;

use super::route::{self, Where, FORWARDED};
use super::twirp::{Code, Format, TwirpError};
use super::ApiCounters;
use crate::media::admin::{AdminError, AdminOp, AdminReply};
use crate::media::handle::{AdminCallError, MediaHandle};

/// LiveKit's limits where they protect the node; metadata is held lower
/// than LiveKit's 512 KiB, as it is sent to every member on each change.
pub const MAX_NAME: usize = 256;
pub const MAX_METADATA: usize = 64 * 1024;
pub const MAX_ATTRIBUTES: usize = 64 * 1024;
/// A data packet must fit one SCTP message.
pub const MAX_DATA: usize = 60 * 1024;

#[derive(Clone)]
struct Api {
    media: Arc<MediaHandle>,
    http: reqwest::Client,
    counters: Arc<ApiCounters>,
}

pub fn router(media: Arc<MediaHandle>, counters: Arc<ApiCounters>) -> Router {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default();
    Router::new()
        .route("/twirp/livekit.RoomService/{method}", post(call))
        .with_state(Api {
            media,
            http,
            counters,
        })
}

async fn call(
    State(api): State<Api>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    ApiCounters::inc(&api.counters.requests);
    match serve(&api, &method, &headers, body).await {
        Ok(r) => r,
        Err(e) => {
            ApiCounters::inc(&api.counters.refused);
            match e.code {
                Code::Unauthenticated => ApiCounters::inc(&api.counters.auth_failures),
                Code::Malformed | Code::BadRoute => ApiCounters::inc(&api.counters.malformed),
                _ => {}
            }
            tracing::debug!(method = %method, code = e.code.as_str(), "server API call refused");
            e.into_response()
        }
    }
}

fn authenticate(api: &Api, headers: &HeaderMap) -> Result<Claims, TwirpError> {
    let token = moselle_signaling::routes::bearer_token(headers).ok_or_else(|| {
        TwirpError::new(
            Code::Unauthenticated,
            "no access token (Authorization: Bearer <token>)",
        )
    })?;
    use moselle_signaling::Backend;
    api.media
        .keys()
        .verify(token)
        .map_err(|e| TwirpError::new(Code::Unauthenticated, format!("invalid access token: {e}")))
}

fn denied(grant: &str) -> TwirpError {
    TwirpError::new(
        Code::PermissionDenied,
        format!("the token does not grant {grant}"),
    )
}

fn need_create(c: &Claims) -> Result<(), TwirpError> {
    c.video()
        .room_create
        .then_some(())
        .ok_or_else(|| denied("roomCreate"))
}

fn need_list(c: &Claims) -> Result<(), TwirpError> {
    c.video()
        .room_list
        .then_some(())
        .ok_or_else(|| denied("roomList"))
}

/// `roomAdmin`, for this room only.
fn need_admin(c: &Claims, room: &str) -> Result<(), TwirpError> {
    let v = c.video();
    if v.room_admin && v.room == room {
        Ok(())
    } else {
        Err(denied(&format!("roomAdmin for room {room:?}")))
    }
}

fn invalid(msg: impl Into<String>) -> TwirpError {
    TwirpError::new(Code::InvalidArgument, msg)
}

fn check_len(what: &str, v: &str, max: usize) -> Result<(), TwirpError> {
    if v.len() > max {
        return Err(invalid(format!("{what} is longer than {max} bytes")));
    }
    Ok(())
}

fn need(what: &str, v: &str) -> Result<(), TwirpError> {
    if v.is_empty() {
        return Err(invalid(format!("{what} is required")));
    }
    Ok(())
}

fn engine_error(e: AdminCallError) -> TwirpError {
    match e {
        AdminCallError::Unavailable => TwirpError::new(Code::Unavailable, e.to_string()),
        AdminCallError::Refused(r) => {
            let code = match r {
                AdminError::RoomNotFound
                | AdminError::ParticipantNotFound
                | AdminError::TrackNotFound(_) => Code::NotFound,
                AdminError::RemoteUnmute => Code::FailedPrecondition,
            };
            TwirpError::new(code, r.to_string())
        }
    }
}

async fn serve(
    api: &Api,
    method: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, TwirpError> {
    let fmt = Format::of(headers)?;
    let claims = authenticate(api, headers)?;
    let forwarded = headers.contains_key(FORWARDED);
    let cluster = &api.media.cluster;
    // Decode, check, and find where the call is carried out.
    let (op, at) = match method {
        "CreateRoom" => {
            need_create(&claims)?;
            let req: lk::CreateRoomRequest = fmt.decode(&body)?;
            need("name", &req.name)?;
            check_len("name", &req.name, MAX_NAME)?;
            check_len("metadata", &req.metadata, MAX_METADATA)?;
            let at = route::place(cluster, &req.name, forwarded).await?;
            (AdminOp::CreateRoom(Box::new(req)), at)
        }
        "ListRooms" => {
            need_list(&claims)?;
            let req: lk::ListRoomsRequest = fmt.decode(&body)?;
            let mut rooms = match api.media.admin(AdminOp::ListRooms(req.clone())).await {
                Ok(AdminReply::Rooms(r)) => r,
                Ok(_) => Vec::new(),
                Err(e) => return Err(engine_error(e)),
            };
            if !forwarded {
                rooms.extend(route::list_elsewhere(&api.http, cluster, headers, &req).await?);
            }
            rooms.sort_by(|a, b| a.name.cmp(&b.name));
            return Ok(fmt.encode(&lk::ListRoomsResponse { rooms }));
        }
        "DeleteRoom" => {
            need_create(&claims)?;
            let req: lk::DeleteRoomRequest = fmt.decode(&body)?;
            need("room", &req.room)?;
            let at = route::locate(cluster, &req.room, forwarded).await?;
            (AdminOp::DeleteRoom(req.room), at)
        }
        "ListParticipants" => {
            let req: lk::ListParticipantsRequest = fmt.decode(&body)?;
            need_admin(&claims, &req.room)?;
            let at = route::locate(cluster, &req.room, forwarded).await?;
            (AdminOp::ListParticipants(req.room), at)
        }
        "GetParticipant" | "RemoveParticipant" => {
            let req: lk::RoomParticipantIdentity = fmt.decode(&body)?;
            need_admin(&claims, &req.room)?;
            need("identity", &req.identity)?;
            let at = route::locate(cluster, &req.room, forwarded).await?;
            if method == "GetParticipant" {
                (AdminOp::GetParticipant(req), at)
            } else {
                (AdminOp::RemoveParticipant(req), at)
            }
        }
        "MutePublishedTrack" => {
            let req: lk::MuteRoomTrackRequest = fmt.decode(&body)?;
            need_admin(&claims, &req.room)?;
            need("identity", &req.identity)?;
            need("track_sid", &req.track_sid)?;
            let at = route::locate(cluster, &req.room, forwarded).await?;
            (AdminOp::MuteTrack(req), at)
        }
        "UpdateParticipant" => {
            let req: lk::UpdateParticipantRequest = fmt.decode(&body)?;
            need_admin(&claims, &req.room)?;
            need("identity", &req.identity)?;
            check_len("name", &req.name, MAX_NAME)?;
            check_len("metadata", &req.metadata, MAX_METADATA)?;
            let attrs: usize = req.attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
            if attrs > MAX_ATTRIBUTES {
                return Err(invalid(format!(
                    "attributes are larger than {MAX_ATTRIBUTES} bytes"
                )));
            }
            let at = route::locate(cluster, &req.room, forwarded).await?;
            (AdminOp::UpdateParticipant(req), at)
        }
        "UpdateSubscriptions" => {
            let req: lk::UpdateSubscriptionsRequest = fmt.decode(&body)?;
            need_admin(&claims, &req.room)?;
            need("identity", &req.identity)?;
            let at = route::locate(cluster, &req.room, forwarded).await?;
            (AdminOp::UpdateSubscriptions(req), at)
        }
        "SendData" => {
            let req: lk::SendDataRequest = fmt.decode(&body)?;
            need_admin(&claims, &req.room)?;
            if req.data.len() > MAX_DATA {
                return Err(invalid(format!("data is larger than {MAX_DATA} bytes")));
            }
            if !req.nonce.is_empty() && req.nonce.len() != 16 {
                return Err(invalid(format!(
                    "nonce should be 16 bytes or not present, got {} bytes",
                    req.nonce.len()
                )));
            }
            let at = route::locate(cluster, &req.room, forwarded).await?;
            (AdminOp::SendData(req), at)
        }
        "UpdateRoomMetadata" => {
            let req: lk::UpdateRoomMetadataRequest = fmt.decode(&body)?;
            need_admin(&claims, &req.room)?;
            check_len("metadata", &req.metadata, MAX_METADATA)?;
            let at = route::locate(cluster, &req.room, forwarded).await?;
            (AdminOp::UpdateRoomMetadata(req), at)
        }
        other => {
            return Err(TwirpError::new(
                Code::BadRoute,
                format!("RoomService has no method {other:?} on this server"),
            ))
        }
    };
    if let Where::There(node) = at {
        ApiCounters::inc(&api.counters.forwarded);
        return route::forward(&api.http, &node, method, headers, body).await;
    }
    let reply = api.media.admin(op).await.map_err(engine_error)?;
    Ok(match reply {
        AdminReply::Room(r) => fmt.encode(&r),
        AdminReply::Rooms(rooms) => fmt.encode(&lk::ListRoomsResponse { rooms }),
        AdminReply::Participants(participants) => {
            fmt.encode(&lk::ListParticipantsResponse { participants })
        }
        AdminReply::Participant(p) => fmt.encode(&p),
        AdminReply::Track(track) => fmt.encode(&lk::MuteRoomTrackResponse { track: Some(track) }),
        // Each of these answers with an empty message.
        AdminReply::Done => fmt.encode(&lk::DeleteRoomResponse {}),
    })
}
