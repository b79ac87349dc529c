//! HTTP side of signaling: `/rtc`, `/rtc/v1` and their `/validate` twins.
//! Every refusal is an HTTP status with a JSON body, sent before any upgrade.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::mpsc;

use crate::backend::{Backend, JoinTicket, Refusal, SignalCounters, OUTBOUND_CAPACITY};
use crate::join::{parse_v0, parse_v1, Flavor};
use crate::session::run_session;

/// Largest WebSocket message a client may send (an SDP offer with many
/// m-lines is a few tens of KiB).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

type Shared = Arc<dyn Backend>;

pub fn router(backend: Shared) -> Router {
    Router::new()
        .route("/rtc", get(rtc_v0))
        .route("/rtc/v1", get(rtc_v1))
        .route("/rtc/validate", get(validate_v0))
        .route("/rtc/v1/validate", get(validate_v1))
        .with_state(backend)
}

fn refuse(r: &Refusal) -> Response {
    (
        r.status,
        Json(serde_json::json!({
            "error": r.reason,
            "message": r.message,
        })),
    )
        .into_response()
}

/// The token of an `Authorization: Bearer <token>` header, if there is one.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
}

fn bearer(headers: &HeaderMap, q: &HashMap<String, String>) -> String {
    match bearer_token(headers) {
        Some(t) => t.to_string(),
        None => q.get("access_token").cloned().unwrap_or_default(),
    }
}

/// Token, query and room checks shared by the upgrade and `/validate`.
fn admit(
    backend: &Shared,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    flavor: Flavor,
) -> Result<JoinTicket, Refusal> {
    let counters: &SignalCounters = backend.counters();
    let claims = backend
        .keys()
        .verify_join(&bearer(headers, q))
        .map_err(|e| {
            SignalCounters::inc(&counters.auth_failures);
            tracing::info!(reason = e.label(), "join refused: bad token");
            Refusal::new(StatusCode::UNAUTHORIZED, e.label(), e.to_string())
        })?;
    let options = match flavor {
        Flavor::DualPc => parse_v0(q),
        Flavor::SinglePc => parse_v1(q).map_err(|e| {
            SignalCounters::inc(&counters.bad_requests);
            Refusal::new(StatusCode::BAD_REQUEST, "bad_join_request", e.to_string())
        })?,
    };
    let ticket = JoinTicket { claims, options };
    backend.precheck(&ticket).inspect_err(|_| {
        SignalCounters::inc(&counters.join_refused);
    })?;
    Ok(ticket)
}

async fn rtc_v0(
    State(b): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    upgrade(b, headers, q, ws, Flavor::DualPc).await
}

async fn rtc_v1(
    State(b): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    upgrade(b, headers, q, ws, Flavor::SinglePc).await
}

async fn upgrade(
    backend: Shared,
    headers: HeaderMap,
    q: HashMap<String, String>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    flavor: Flavor,
) -> Response {
    let ticket = match admit(&backend, &headers, &q, flavor) {
        Ok(t) => t,
        Err(r) => return refuse(&r),
    };
    let Ok(ws) = ws else {
        return refuse(&Refusal::new(
            StatusCode::NOT_FOUND,
            "not_websocket",
            "this endpoint takes a WebSocket upgrade; use /validate to check a token",
        ));
    };
    // Join before upgrading so a refusal is still an HTTP status; the
    // JoinResponse waits in the queue until the socket is up.
    let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
    let link = match backend.join(ticket, tx).await {
        Ok(l) => l,
        Err(r) => {
            SignalCounters::inc(&backend.counters().join_refused);
            return refuse(&r);
        }
    };
    let timeout = backend.ping_timeout_secs();
    ws.max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| run_session(socket, link, rx, backend, timeout))
}

async fn validate_v0(
    State(b): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    validate(b, headers, q, Flavor::DualPc)
}

async fn validate_v1(
    State(b): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    validate(b, headers, q, Flavor::SinglePc)
}

fn validate(b: Shared, headers: HeaderMap, q: HashMap<String, String>, flavor: Flavor) -> Response {
    match admit(&b, &headers, &q, flavor) {
        Ok(_) => (StatusCode::OK, "success").into_response(),
        Err(r) => refuse(&r),
    }
}
