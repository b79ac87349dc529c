//! The call page at `/call/`: a provider joins a room from a browser to
//! check a deployment. Off by default (anyone reaching it may join any
//! room); `--dev` or `[call_page] enabled` turns it on. livekit-client's
//! browser build is served from a local directory, never from elsewhere.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use moselle_signaling::token::{join_claims, KeySet};
use serde::Deserialize;

const INDEX: &str = include_str!("../web/call/index.html");
const APP_JS: &str = include_str!("../web/call/app.js");
const STYLE: &str = include_str!("../web/call/style.css");

#[derive(Clone)]
pub struct CallPage {
    pub keys: KeySet,
    /// API key the page signs its tokens with.
    pub key: String,
    /// Directory holding livekit-client's `dist/` files.
    pub assets_dir: PathBuf,
    pub token_ttl: Duration,
    /// This node serves HTTPS itself: the page's signaling URL is `wss://`.
    pub tls: bool,
}

pub fn router(page: CallPage) -> Router {
    Router::new()
        .route("/call", get(|| async { Redirect::permanent("/call/") }))
        .route("/call/", get(|| async { html(INDEX) }))
        .route("/call/app.js", get(|| async { js(APP_JS.to_string()) }))
        .route(
            "/call/style.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css")], STYLE) }),
        )
        .route("/call/livekit-client.umd.js", get(asset))
        .route("/call/livekit-client.e2ee.worker.js", get(asset))
        .route("/call/token", post(token))
        .with_state(Arc::new(page))
}

fn html(body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

fn js(body: String) -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn asset(State(page): State<Arc<CallPage>>, uri: axum::http::Uri) -> Response {
    let name = uri.path().rsplit('/').next().unwrap_or_default();
    let path = page.assets_dir.join(name);
    match tokio::fs::read_to_string(&path).await {
        Ok(body) => js(body),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{name} is not installed: run `npm ci --prefix web` (or set call_page.assets_dir to livekit-client's dist directory)"
            ),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct TokenRequest {
    room: String,
    identity: String,
    #[serde(default)]
    name: String,
    /// Lets the participant change its own metadata and attributes.
    #[serde(default)]
    can_update_metadata: bool,
}

async fn token(
    State(page): State<Arc<CallPage>>,
    headers: HeaderMap,
    Json(req): Json<TokenRequest>,
) -> Response {
    let room = req.room.trim();
    let identity = req.identity.trim();
    if room.is_empty() || identity.is_empty() || room.len() > 256 || identity.len() > 256 {
        return (
            StatusCode::BAD_REQUEST,
            "room and identity are required (at most 256 bytes)",
        )
            .into_response();
    }
    let mut claims = join_claims(room, identity, page.token_ttl);
    claims.name = req.name.trim().chars().take(256).collect();
    if let Some(v) = claims.video.as_mut() {
        v.can_update_own_metadata = Some(req.can_update_metadata);
    }
    let token = match page.keys.mint(&page.key, &claims) {
        Ok(t) => t,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    // The signaling URL is this very server, as the browser reached it.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let forwarded_https = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        == Some("https");
    let scheme = if page.tls || forwarded_https {
        "wss"
    } else {
        "ws"
    };
    Json(serde_json::json!({ "token": token, "url": format!("{scheme}://{host}") })).into_response()
}
