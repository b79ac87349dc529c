//! `POST /get_token` and `POST /sfu/get`: request and answer shapes as
//! lk-jwt-service's, plus the membership check it does not make.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use moselle_signaling::token::{join_claims, Claims, KeySet};
use serde::Deserialize;

use super::delegation::{self, Delegations, LeaveJob};
use super::homeserver::{Homeservers, HsError, Membership};
use super::limits::RateLimiter;
use super::names;
use super::watch::Issued;
use crate::config::MatrixConfig;
use crate::media::handle::MediaHandle;

/// Request bodies are small; anything larger is refused before parsing.
pub const MAX_BODY: usize = 16 * 1024;

pub struct TokenService {
    pub cfg: MatrixConfig,
    pub keys: KeySet,
    /// API key tokens are signed with.
    pub key: String,
    pub homeservers: Homeservers,
    pub membership: Membership,
    pub media: Arc<MediaHandle>,
    pub per_address: RateLimiter,
    pub per_user: RateLimiter,
    pub issued: Issued,
    pub counters: TokenCounters,
    pub delegations: Delegations,
}

#[derive(Default)]
pub struct TokenCounters {
    pub issued: AtomicU64,
    pub bad_request: AtomicU64,
    pub unauthorized: AtomicU64,
    pub forbidden: AtomicU64,
    pub unavailable: AtomicU64,
    pub rate_limited: AtomicU64,
    pub evicted: AtomicU64,
}

impl TokenCounters {
    pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "matrix_tokens_issued_total",
                "Call tokens issued to Matrix users",
                g(&self.issued),
            ),
            (
                "matrix_token_bad_requests_total",
                "Token requests refused as malformed",
                g(&self.bad_request),
            ),
            (
                "matrix_token_unauthorized_total",
                "Token requests whose OpenID token did not check out",
                g(&self.unauthorized),
            ),
            (
                "matrix_token_forbidden_total",
                "Token requests refused: not a member, denied homeserver, no call",
                g(&self.forbidden),
            ),
            (
                "matrix_token_unavailable_total",
                "Token requests refused because a homeserver could not be asked",
                g(&self.unavailable),
            ),
            (
                "matrix_token_rate_limited_total",
                "Token requests over a rate limit",
                g(&self.rate_limited),
            ),
            (
                "matrix_participants_removed_total",
                "Participants removed because their membership ended",
                g(&self.evicted),
            ),
        ]
    }
}

/// A refusal, answered as a Matrix error body.
struct Refuse(StatusCode, &'static str, String);

impl IntoResponse for Refuse {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(serde_json::json!({ "errcode": self.1, "error": self.2 })),
        )
            .into_response()
    }
}

// Fields clients send that the service accepts but does not act on are kept
// so that unknown fields can still be refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct OpenIdToken {
    #[serde(default)]
    access_token: String,
    #[serde(default)]
    token_type: String,
    #[serde(default)]
    matrix_server_name: String,
    #[serde(default)]
    expires_in: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Member {
    #[serde(default)]
    id: String,
    #[serde(default)]
    claimed_user_id: String,
    #[serde(default)]
    claimed_device_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct GetToken {
    #[serde(default)]
    room_id: String,
    #[serde(default)]
    slot_id: String,
    openid_token: Option<OpenIdToken>,
    member: Option<Member>,
    // Delayed-leave delegation (see `delegation`). `delay_cs_api_url` is
    // accepted and ignored, as lk-jwt-service does: the homeserver's URL
    // is found from its server name, never taken from the client.
    #[serde(default)]
    delay_id: Option<String>,
    #[serde(default)]
    delay_timeout: Option<i64>,
    #[serde(default)]
    delay_cs_api_url: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct DelegateLeave {
    #[serde(default)]
    room_id: String,
    #[serde(default)]
    slot_id: String,
    openid_token: Option<OpenIdToken>,
    member: Option<Member>,
    #[serde(default)]
    delay_id: Option<String>,
    #[serde(default)]
    delay_timeout: Option<i64>,
    #[serde(default)]
    delay_cs_api_url: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct SfuGet {
    #[serde(default)]
    room: String,
    openid_token: Option<OpenIdToken>,
    #[serde(default)]
    device_id: String,
    #[serde(default)]
    delay_id: Option<String>,
    #[serde(default)]
    delay_timeout: Option<i64>,
    #[serde(default)]
    delay_cs_api_url: Option<String>,
}

/// For the fuzz target (`crate::fuzzing`): a body read as each endpoint
/// reads it, and the names derived from what it carries.
#[doc(hidden)]
pub fn fuzz_bodies(data: &[u8]) {
    if let Ok(b) = serde_json::from_slice::<GetToken>(data) {
        let _ = names::room_name(&b.room_id, &b.slot_id);
        if let Some(m) = &b.member {
            let _ = names::identity(&m.claimed_user_id, &m.claimed_device_id, &m.id);
        }
    }
    if let Ok(b) = serde_json::from_slice::<SfuGet>(data) {
        let _ = names::legacy_identity(&b.room, &b.device_id);
    }
    let _ = serde_json::from_slice::<DelegateLeave>(data);
}

pub fn router(svc: Arc<TokenService>) -> Router {
    Router::new()
        .route("/get_token", post(get_token))
        .route("/sfu/get", post(sfu_get))
        .route("/delegate_delayed_leave", post(delegate_delayed_leave))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(svc)
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn parse<T: for<'de> Deserialize<'de>>(svc: &TokenService, body: &Bytes) -> Result<T, Refuse> {
    serde_json::from_slice(body).map_err(|_| {
        bump(&svc.counters.bad_request);
        Refuse(
            StatusCode::BAD_REQUEST,
            "M_NOT_JSON",
            "Error reading request".into(),
        )
    })
}

fn bad_json(svc: &TokenService, msg: &str) -> Refuse {
    bump(&svc.counters.bad_request);
    Refuse(StatusCode::BAD_REQUEST, "M_BAD_JSON", msg.into())
}

/// The delayed leave a request delegates, if any: (delay id, timeout ms).
fn check_delay(
    svc: &TokenService,
    id: &Option<String>,
    timeout: &Option<i64>,
) -> Result<Option<(String, u64)>, Refuse> {
    let id = id.as_deref().filter(|s| !s.is_empty());
    let timeout = timeout.filter(|t| *t > 0);
    match (id, timeout) {
        (None, None) => Ok(None),
        (Some(id), Some(t)) => {
            if id.len() > 255 {
                return Err(bad_json(svc, "`delay_id` is too long"));
            }
            if !(delegation::MIN_TIMEOUT_MS..=delegation::MAX_TIMEOUT_MS).contains(&t) {
                return Err(bad_json(
                    svc,
                    "`delay_timeout` must be between 5 seconds and 7 days (milliseconds)",
                ));
            }
            Ok(Some((id.to_string(), t as u64)))
        }
        _ => Err(bad_json(
            svc,
            "The request body is missing `delay_id` or `delay_timeout`",
        )),
    }
}

/// The MatrixRTC fields `/get_token` and `/delegate_delayed_leave` share:
/// a room, a slot, and a member with its id and claimed user and device.
fn slot_member<'a>(
    svc: &TokenService,
    room_id: &str,
    slot_id: &str,
    member: Option<&'a Member>,
) -> Result<&'a Member, Refuse> {
    if room_id.is_empty() || slot_id.is_empty() {
        return Err(bad_json(
            svc,
            "The request body is missing `room_id` or `slot_id`",
        ));
    }
    member
        .filter(|m| {
            !m.id.is_empty() && !m.claimed_user_id.is_empty() && !m.claimed_device_id.is_empty()
        })
        .ok_or_else(|| {
            bad_json(
                svc,
                "The request body `member` is missing a `id`, `claimed_user_id` or `claimed_device_id`",
            )
        })
}

async fn get_token(
    State(svc): State<Arc<TokenService>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Result<Response, Refuse> {
    let svc = &*svc;
    limit_address(svc, peer)?;
    let req: GetToken = parse(svc, &body)?;
    let member = slot_member(svc, &req.room_id, &req.slot_id, req.member.as_ref())?;
    let openid = openid_of(svc, &req.openid_token)?;
    let delay = check_delay(svc, &req.delay_id, &req.delay_timeout)?;
    let user = verify(svc, openid).await?;
    if user != member.claimed_user_id {
        bump(&svc.counters.unauthorized);
        return Err(unauthorized());
    }
    let sfu_room = names::room_name(&req.room_id, &req.slot_id);
    let identity = names::identity(&user, &member.claimed_device_id, &member.id);
    issue(
        svc,
        &openid.matrix_server_name,
        &user,
        &req.room_id,
        sfu_room,
        identity,
        delay,
    )
    .await
}

async fn sfu_get(
    State(svc): State<Arc<TokenService>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Result<Response, Refuse> {
    let svc = &*svc;
    limit_address(svc, peer)?;
    let req: SfuGet = parse(svc, &body)?;
    if req.room.is_empty() {
        return Err(bad_json(svc, "Missing room parameter"));
    }
    let openid = match &req.openid_token {
        Some(t) if !t.access_token.is_empty() && !t.matrix_server_name.is_empty() => t,
        _ => return Err(bad_json(svc, "Missing OpenID token parameters")),
    };
    let delay = check_delay(svc, &req.delay_id, &req.delay_timeout)?;
    let user = verify(svc, openid).await?;
    let sfu_room = names::room_name(&req.room, names::LEGACY_SLOT);
    let identity = names::legacy_identity(&user, &req.device_id);
    issue(
        svc,
        &openid.matrix_server_name,
        &user,
        &req.room,
        sfu_room,
        identity,
        delay,
    )
    .await
}

/// `POST /delegate_delayed_leave`: delegate the delayed leave of a
/// participant already in the call (no token issued). Element Call probes
/// it without a body: any answer but 404 says delegation is supported.
async fn delegate_delayed_leave(
    State(svc): State<Arc<TokenService>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Result<Response, Refuse> {
    let svc = &*svc;
    limit_address(svc, peer)?;
    let req: DelegateLeave = parse(svc, &body)?;
    let member = slot_member(svc, &req.room_id, &req.slot_id, req.member.as_ref())?;
    let openid = openid_of(svc, &req.openid_token)?;
    let Some(delay) = check_delay(svc, &req.delay_id, &req.delay_timeout)? else {
        return Err(bad_json(
            svc,
            "The request body is missing `delay_id` or `delay_timeout`",
        ));
    };
    let user = verify(svc, openid).await?;
    if user != member.claimed_user_id {
        bump(&svc.counters.unauthorized);
        return Err(unauthorized());
    }
    let server = &openid.matrix_server_name;
    if !homeserver_in(&svc.cfg.full_access_homeservers, server) {
        bump(&svc.counters.forbidden);
        return Err(Refuse(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "Delegation of delayed events is only supported for full access users".into(),
        ));
    }
    check_member(svc, &req.room_id, &user).await?;
    let sfu_room = names::room_name(&req.room_id, &req.slot_id);
    let identity = names::identity(&user, &member.claimed_device_id, &member.id);
    let node = match svc.media.cluster.locate(&sfu_room).await {
        Ok(Some(n)) => n,
        Ok(None) => {
            return Err(Refuse(
                StatusCode::NOT_FOUND,
                "M_NOT_FOUND",
                "This call is not running".into(),
            ))
        }
        Err(_) => return Err(unavailable(svc, "Room placement")),
    };
    delegate(svc, server, &node.id, sfu_room, identity, delay).await?;
    Ok(Json(serde_json::json!({})).into_response())
}

/// Hand a delayed leave to the node holding its call (this one, or another
/// through Redis), once the user's homeserver is known to be reachable.
async fn delegate(
    svc: &TokenService,
    server: &str,
    node: &str,
    room: String,
    identity: String,
    (delay_id, timeout_ms): (String, u64),
) -> Result<(), Refuse> {
    if svc.homeservers.client_url(server).await.is_err() {
        return Err(bad_json(svc, "Unable to resolve client-server API"));
    }
    let job = LeaveJob {
        room,
        identity,
        server_name: server.to_string(),
        delay_id,
        timeout_ms,
    };
    let cluster = &svc.media.cluster;
    let taken = match &cluster.redis {
        Some(r) if node != cluster.me.id => match serde_json::to_string(&job) {
            Ok(text) => r.hand_leave_job(node, &text).await.is_ok(),
            Err(_) => false,
        },
        _ => svc.delegations.add(job, std::time::Instant::now()),
    };
    if taken {
        Ok(())
    } else {
        Err(unavailable(svc, "The delegation store"))
    }
}

async fn check_member(svc: &TokenService, room_id: &str, user: &str) -> Result<(), Refuse> {
    match svc.membership.is_joined(room_id, user).await {
        Ok(true) => Ok(()),
        Ok(false) => {
            bump(&svc.counters.forbidden);
            Err(Refuse(
                StatusCode::FORBIDDEN,
                "M_FORBIDDEN",
                "You are not a member of this room".into(),
            ))
        }
        Err(_) => Err(unavailable(svc, "The homeserver checking room membership")),
    }
}

fn openid_of<'a>(
    svc: &TokenService,
    t: &'a Option<OpenIdToken>,
) -> Result<&'a OpenIdToken, Refuse> {
    match t {
        Some(t) if !t.access_token.is_empty() && !t.matrix_server_name.is_empty() => Ok(t),
        _ => Err(bad_json(
            svc,
            "The request body `openid_token` is missing a `access_token` or `matrix_server_name`",
        )),
    }
}

fn rate_limited(svc: &TokenService) -> Refuse {
    bump(&svc.counters.rate_limited);
    Refuse(
        StatusCode::TOO_MANY_REQUESTS,
        "M_LIMIT_EXCEEDED",
        "Too many requests".into(),
    )
}

fn unauthorized() -> Refuse {
    Refuse(
        StatusCode::UNAUTHORIZED,
        "M_UNAUTHORIZED",
        "The request could not be authorised.".into(),
    )
}

fn unavailable(svc: &TokenService, what: &str) -> Refuse {
    bump(&svc.counters.unavailable);
    Refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "M_UNKNOWN",
        format!("{what} could not be reached; no token was issued, try again later"),
    )
}

fn limit_address(svc: &TokenService, peer: SocketAddr) -> Result<(), Refuse> {
    if svc.per_address.allow(&peer.ip().to_string()) {
        Ok(())
    } else {
        Err(rate_limited(svc))
    }
}

fn homeserver_in(list: &[String], server: &str) -> bool {
    list.iter().any(|h| h == "*" || h == server)
}

/// Who the OpenID token belongs to, as its homeserver says; the user id must
/// live on the homeserver the client named.
async fn verify(svc: &TokenService, t: &OpenIdToken) -> Result<String, Refuse> {
    if homeserver_in(&svc.cfg.denied_homeservers, &t.matrix_server_name) {
        bump(&svc.counters.forbidden);
        return Err(Refuse(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "Calls are not offered to this homeserver".into(),
        ));
    }
    let sub = match svc
        .homeservers
        .openid_user(&t.matrix_server_name, &t.access_token)
        .await
    {
        Ok(s) => s,
        Err(HsError::InvalidToken) | Err(HsError::BadServerName(_)) => {
            bump(&svc.counters.unauthorized);
            return Err(unauthorized());
        }
        Err(HsError::Unreachable(_)) | Err(HsError::BadResponse(_)) => {
            return Err(unavailable(svc, "The user's homeserver"));
        }
    };
    let server = sub.split_once(':').map(|(_, s)| s).unwrap_or_default();
    if !sub.starts_with('@') || server != t.matrix_server_name {
        bump(&svc.counters.unauthorized);
        return Err(unauthorized());
    }
    if !svc.per_user.allow(&sub) {
        return Err(rate_limited(svc));
    }
    Ok(sub)
}

/// The grants of a call token (MSC4195): users of full-access homeservers
/// publish and may start the call; everyone else listens. No admin grants.
pub fn call_claims(
    sfu_room: &str,
    identity: &str,
    ttl: Duration,
    full: bool,
    metadata: bool,
) -> Claims {
    let mut claims = join_claims(sfu_room, identity, ttl);
    if let Some(v) = claims.video.as_mut() {
        v.can_publish = Some(full);
        v.can_subscribe = Some(true);
        v.can_publish_data = Some(true);
        v.can_update_own_metadata = Some(metadata);
    }
    claims
}

async fn issue(
    svc: &TokenService,
    server: &str,
    user: &str,
    room_id: &str,
    sfu_room: String,
    identity: String,
    delay: Option<(String, u64)>,
) -> Result<Response, Refuse> {
    check_member(svc, room_id, user).await?;
    let full = homeserver_in(&svc.cfg.full_access_homeservers, server);
    if delay.is_some() && !full {
        // As lk-jwt-service; Element Call then asks again without it.
        return Err(bad_json(
            svc,
            "Delegation of delayed events is only supported for full access users",
        ));
    }
    let cluster = &svc.media.cluster;
    let started = match cluster.locate(&sfu_room).await {
        Ok(n) => n.is_some(),
        Err(_) => return Err(unavailable(svc, "Room placement")),
    };
    if !full && !started {
        // Guests of other homeservers join calls; they do not start them.
        bump(&svc.counters.forbidden);
        return Err(Refuse(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "This call has not been started; only users of this deployment's homeservers can start it".into(),
        ));
    }
    // The call's node: only one in a jurisdiction allowed for this
    // homeserver, or no token at all.
    let node = match cluster
        .place(&sfu_room, cluster.allowed_for(Some(server)))
        .await
    {
        Ok(n) => n,
        Err(e) => {
            bump(&svc.counters.unavailable);
            return Err(Refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "M_UNKNOWN",
                e.to_string(),
            ));
        }
    };
    // Full-access users start the call: the room is opened (here) or its
    // placement stands (elsewhere) before the answer, so the token itself
    // needs no roomCreate.
    if full && node.id == cluster.me.id && !svc.media.open_room(&sfu_room).await {
        return Err(unavailable(svc, "The media engine"));
    }
    if let Some(delay) = delay {
        delegate(
            svc,
            server,
            &node.id,
            sfu_room.clone(),
            identity.clone(),
            delay,
        )
        .await?;
    }
    let url = if cluster.redis.is_some() {
        node.url
    } else {
        svc.cfg.livekit_url.clone()
    };
    let ttl = Duration::from_secs(svc.cfg.token_ttl_secs);
    let claims = call_claims(
        &sfu_room,
        &identity,
        ttl,
        full,
        svc.cfg.allow_metadata_updates,
    );
    let jwt = svc.keys.mint_atob_safe(&svc.key, &claims).map_err(|_| {
        Refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "M_UNKNOWN",
            "Internal Server Error".into(),
        )
    })?;
    svc.issued.record(&sfu_room, &identity, room_id, user, ttl);
    bump(&svc.counters.issued);
    tracing::info!(full_access = full, "call token issued");
    Ok(Json(serde_json::json!({ "url": url, "jwt": jwt })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_access_publishes_and_starts_calls_guests_only_listen() {
        let ttl = Duration::from_secs(600);
        let full = call_claims("R", "I", ttl, true, false);
        let v = full.video();
        assert!(v.room_join && v.can_publish() && v.can_subscribe() && !v.room_create);
        assert!(
            !v.room_admin
                && !v.room_list
                && !v.room_record
                && v.can_update_own_metadata == Some(false)
        );
        let guest = call_claims("R", "I", ttl, false, false);
        let g = guest.video();
        assert!(g.room_join && !g.can_publish() && g.can_subscribe() && !g.room_create);
        assert_eq!(guest.exp - guest.nbf.unwrap(), 600, "nbf set, short exp");
        assert_eq!(guest.sub, "I");
        assert_eq!(g.room, "R");
    }

    #[test]
    fn homeserver_lists() {
        let l = vec!["a.org".to_string()];
        assert!(homeserver_in(&l, "a.org") && !homeserver_in(&l, "b.org"));
        assert!(homeserver_in(&["*".to_string()], "anything"));
        assert!(!homeserver_in(&[], "a.org"));
    }
}
