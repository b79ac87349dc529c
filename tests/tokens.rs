//! Access tokens and the HTTP side of a join: every refusal is an HTTP status
//! with a JSON body, on the WebSocket URL and on `/rtc/v1/validate` alike.

mod common;

use std::net::SocketAddr;

use common::*;
use moselle::signaling::token::KeySet;

/// Refused with 401 and `label`, on both endpoints, with nothing joined.
async fn assert_token_refused(token: Option<&str>, label: &str) {
    let s = start().await;
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();

    let r = validate(s.addr, "", &headers).await;
    r.assert_refused(401, Some(label), "/rtc/v1/validate");
    let r = upgrade_attempt(s.addr, "", &headers).await;
    r.assert_refused(401, Some(label), "/rtc/v1 upgrade");
    // The same token in the query is refused the same way.
    if let Some(t) = token {
        let r = upgrade_attempt(s.addr, &format!("&access_token={t}"), &[]).await;
        r.assert_refused(401, Some(label), "/rtc/v1 upgrade, access_token in query");
    }
    assert_eq!(
        metric(s.addr, "moselle_signal_sessions_started_total").await,
        0,
        "a refused token must not open a session"
    );
    assert_eq!(metric(s.addr, "moselle_participants").await, 0);
    assert!(metric(s.addr, "moselle_signal_auth_failures_total").await >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_is_401() {
    assert_token_refused(None, "missing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_token_is_401() {
    assert_token_refused(Some("not-a.jwt"), "malformed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_401_signature() {
    let other = KeySet::new([(KEY.to_string(), "not-the-secret".to_string())].into());
    let t = other.mint(KEY, &claims("r", "alice")).unwrap();
    assert_token_refused(Some(&t), "signature").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_api_key_is_401_unknown_key() {
    let other = KeySet::new([("strangerkey".to_string(), SECRET.to_string())].into());
    let t = other.mint("strangerkey", &claims("r", "alice")).unwrap();
    assert_token_refused(Some(&t), "unknown_key").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_401_expired() {
    let mut c = claims("r", "alice");
    c.nbf = Some(now_secs() - 600);
    c.exp = now_secs() - 60;
    assert_token_refused(Some(&mint(&c)), "expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn future_nbf_is_401_not_yet_valid() {
    let mut c = claims("r", "alice");
    c.nbf = Some(now_secs() + 60);
    c.exp = now_secs() + 600;
    assert_token_refused(Some(&mint(&c)), "not_yet_valid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_join_false_is_401_no_room_join() {
    let mut c = claims("r", "alice");
    c.video.as_mut().unwrap().room_join = false;
    assert_token_refused(Some(&mint(&c)), "no_room_join").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_room_is_401() {
    let mut c = claims("r", "alice");
    c.video.as_mut().unwrap().room.clear();
    assert_token_refused(Some(&mint(&c)), "no_room").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_identity_is_401() {
    assert_token_refused(Some(&token("r", "")), "no_identity").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_5s_past_exp_is_still_accepted() {
    let s = start().await;
    let mut c = claims("leeway", "late");
    c.nbf = Some(now_secs() - 600);
    c.exp = now_secs() - 5;
    let t = mint(&c);
    let auth = format!("Bearer {t}");
    let r = validate(s.addr, "", &[("Authorization", &auth)]).await;
    assert_eq!(r.status, 200, "validate within leeway: {}", r.body);
    let (_ws, jr) = join(s.addr, &t).await;
    assert_eq!(jr.participant.unwrap().identity, "late");
}

/// The claim layout `livekit-api` (PyPI) writes: a camelCase video grant
/// with every field spelled out, plus `identity`, `kind`, `sha256`, ...
fn python_style_token(room: &str, identity: &str, name: &str) -> String {
    let now = now_secs();
    let claims = serde_json::json!({
        "identity": identity,
        "name": name,
        "kind": "standard",
        "metadata": "{\"team\":\"blue\"}",
        "attributes": {},
        "video": {
            "roomCreate": false,
            "roomList": false,
            "roomRecord": false,
            "roomAdmin": false,
            "roomJoin": true,
            "room": room,
            "canPublish": true,
            "canSubscribe": true,
            "canPublishData": true,
            "canPublishSources": [],
            "canUpdateOwnMetadata": false,
            "ingressAdmin": false,
            "hidden": false,
            "recorder": false,
            "agent": false
        },
        "sha256": "",
        "sub": identity,
        "iss": KEY,
        "nbf": now,
        "exp": now + 6 * 3600,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn semver_at_least(v: &str, major: u64, minor: u64) -> bool {
    let core = v.trim_start_matches('v').split(['-', '+']).next().unwrap();
    let parts: Vec<u64> = core.split('.').filter_map(|p| p.parse().ok()).collect();
    parts.len() == 3 && (parts[0], parts[1]) >= (major, minor)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_style_token_validates_and_joins() {
    let s = start().await;
    let t = python_style_token("py-room", "py-user", "Py User");
    let auth = format!("Bearer {t}");
    let r = validate(s.addr, "", &[("Authorization", &auth)]).await;
    assert_eq!(r.status, 200, "validate: {}", r.body);

    let (_ws, jr) = join(s.addr, &t).await;
    let p = jr.participant.expect("JoinResponse.participant");
    assert_eq!(p.identity, "py-user");
    assert_eq!(p.name, "Py User");
    assert!(p.sid.starts_with("PA_"), "participant sid {:?}", p.sid);
    let perm = p.permission.expect("participant.permission");
    assert!(perm.can_publish, "canPublish true in the token");
    assert!(perm.can_subscribe, "canSubscribe true in the token");
    let room = jr.room.expect("JoinResponse.room");
    assert_eq!(room.name, "py-room");
    assert!(room.sid.starts_with("RM_"), "room sid {:?}", room.sid);
    let info = jr.server_info.expect("JoinResponse.server_info");
    assert!(
        semver_at_least(&info.version, 1, 8),
        "server_info.version {:?} is not a semver >= 1.8",
        info.version
    );
    assert!(jr.ping_interval > 0, "ping_interval {}", jr.ping_interval);
    assert!(
        jr.ping_timeout > jr.ping_interval,
        "ping_timeout {}",
        jr.ping_timeout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_header_wins_over_query_token() {
    let s = start().await;
    let header_tok = token("pick", "from-header");
    let query_tok = token("pick", "from-query");
    let bad = KeySet::new([(KEY.to_string(), "wrong".to_string())].into())
        .mint(KEY, &claims("pick", "x"))
        .unwrap();

    // Valid header, invalid query: accepted.
    let r = validate(
        s.addr,
        &format!("&access_token={bad}"),
        &[("Authorization", &format!("Bearer {header_tok}"))],
    )
    .await;
    assert_eq!(r.status, 200, "header token should be used: {}", r.body);
    // Invalid header, valid query: refused for the header's signature.
    let r = validate(
        s.addr,
        &format!("&access_token={query_tok}"),
        &[("Authorization", &format!("Bearer {bad}"))],
    )
    .await;
    r.assert_refused(401, Some("signature"), "bad header, good query");
    // Both valid: the session is the header token's identity.
    let path = format!("{}&access_token={query_tok}", v1_path());
    let (_ws, jr) = join_at(s.addr, &path, Some(&header_tok)).await;
    assert_eq!(jr.participant.unwrap().identity, "from-header");
    // The query alone works too.
    let (_ws2, jr) = join_at(s.addr, &path, None).await;
    assert_eq!(jr.participant.unwrap().identity, "from-query");
}

async fn assert_bad_join_request(addr: SocketAddr, join_request: &str, what: &str) {
    let auth = format!("Bearer {}", token("jr", "alice"));
    let h = [("Authorization", auth.as_str())];
    let path = format!("/rtc/v1?join_request={join_request}");
    let r = get(addr, &path, &h, true).await;
    r.assert_refused(400, Some("bad_join_request"), &format!("upgrade, {what}"));
    let path = format!("/rtc/v1/validate?join_request={join_request}");
    let r = get(addr, &path, &h, false).await;
    r.assert_refused(400, Some("bad_join_request"), &format!("validate, {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_join_request_is_400() {
    let s = start().await;
    assert_bad_join_request(s.addr, "%21%21not*base64%21", "not base64").await;
    assert_bad_join_request(s.addr, &b64url(&[0xff; 12]), "not protobuf").await;
    // A valid wrapper around bytes that are not a JoinRequest.
    let wrapped = moselle::signaling::proto::WrappedJoinRequest {
        compression: 0,
        join_request: vec![0x0f, 0xff, 0xff, 0xff],
    };
    use prost::Message as _;
    assert_bad_join_request(
        s.addr,
        &b64url(&wrapped.encode_to_vec()),
        "inner not protobuf",
    )
    .await;
    // Gzip claimed, not gzip.
    let wrapped = moselle::signaling::proto::WrappedJoinRequest {
        compression: 1,
        join_request: b"plain bytes".to_vec(),
    };
    assert_bad_join_request(s.addr, &b64url(&wrapped.encode_to_vec()), "bad gzip").await;
    assert_eq!(
        metric(s.addr, "moselle_signal_sessions_started_total").await,
        0
    );
    assert_eq!(
        metric(s.addr, "moselle_rooms").await,
        0,
        "no room for a bad join"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_get_on_v1_with_valid_token_is_404() {
    let s = start().await;
    let auth = format!("Bearer {}", token("plain", "alice"));
    let r = get(s.addr, &v1_path(), &[("Authorization", &auth)], false).await;
    r.assert_refused(404, Some("not_websocket"), "GET /rtc/v1 without upgrade");
    assert_eq!(metric(s.addr, "moselle_participants").await, 0);
    // The same request as an upgrade is taken (so the 404 is about the upgrade).
    let r = get(s.addr, &v1_path(), &[("Authorization", &auth)], true).await;
    assert_eq!(r.status, 101, "upgrade with a valid token: {}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_header_on_validate_401() {
    let s = start().await;
    let r = validate(s.addr, "", &[("Origin", "https://call.example.org")]).await;
    r.assert_refused(401, None, "validate without token");
    let acao = r
        .headers
        .get("access-control-allow-origin")
        .unwrap_or_else(|| panic!("no Access-Control-Allow-Origin on a 401: {:?}", r.headers));
    let v = acao.to_str().unwrap();
    assert!(
        v == "*" || v == "https://call.example.org",
        "Access-Control-Allow-Origin {v:?}"
    );
}
