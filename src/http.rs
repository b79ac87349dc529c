//! The HTTP server: signaling routes, health, metrics, CORS on every path.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tower_http::cors::{Any, CorsLayer};

use crate::matrix::service::TokenService;
use crate::media::handle::MediaHandle;

#[derive(Clone)]
struct AppState {
    media: Arc<MediaHandle>,
    tokens: Option<Arc<TokenService>>,
    api: Arc<crate::api::ApiCounters>,
}

pub fn app(
    media: Arc<MediaHandle>,
    call_page: Option<crate::callpage::CallPage>,
    tokens: Option<Arc<TokenService>>,
) -> Router {
    let signaling = moselle_signaling::routes::router(media.clone());
    let api = Arc::new(crate::api::ApiCounters::default());
    let room_service = crate::api::router(media.clone(), api.clone());
    let mut router = Router::new()
        .route("/", get(|| async { "moselle" }))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/admin/rooms", get(admin_rooms))
        .with_state(AppState {
            media,
            tokens: tokens.clone(),
            api,
        })
        .merge(signaling)
        .merge(room_service);
    if let Some(t) = tokens {
        // Element Call asks for tokens from the browser: CORS applies.
        router = router.merge(crate::matrix::service::router(t));
    }
    let router = router
        // Browser clients call from other origins, and read error statuses
        // of /validate to decide how to fall back (LiveKit does the same).
        .layer(
            CorsLayer::new()
                .allow_origin(Any)
                .allow_methods(Any)
                // Mirrored: a wildcard would not cover `Authorization`.
                .allow_headers(tower_http::cors::AllowHeaders::mirror_request()),
        );
    // The call page mints tokens: same origin only, so no CORS for it.
    match call_page {
        Some(page) => router.merge(crate::callpage::router(page)),
        None => router,
    }
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    if s.media.is_running() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "media engine stopped")
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let mut text = crate::metrics::render(&s.media.media_counters, &s.media.signal_counters);
    s.media.cluster.counters.render(&mut text);
    crate::metrics::render_counters(&mut text, s.api.snapshot());
    if let Some(w) = &s.media.webhook_counters {
        crate::metrics::render_counters(&mut text, w.snapshot());
    }
    if let Some(t) = &s.tokens {
        crate::metrics::render_counters(&mut text, t.counters.snapshot());
        crate::metrics::render_counters(&mut text, t.delegations.counters.snapshot());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// Audit: every room with the node and jurisdiction serving it, for a
/// provider to show where media flowed. Needs a token with `roomList` or
/// `roomAdmin` (as LiveKit's RoomService does).
async fn admin_rooms(
    State(s): State<AppState>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use moselle_signaling::Backend;
    let token = moselle_signaling::routes::bearer_token(&headers).unwrap_or("");
    let claims = match s.media.keys().verify(token) {
        Ok(c) => c,
        Err(e) => {
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(serde_json::json!({"error": e.label(), "message": e.to_string()})),
            )
                .into_response()
        }
    };
    if !(claims.video().room_list || claims.video().room_admin) {
        return (
            StatusCode::FORBIDDEN,
            axum::Json(serde_json::json!({"error": "not_allowed", "message": "needs a token granting roomList"})),
        )
            .into_response();
    }
    match s.media.cluster.rooms().await {
        Ok(rooms) => axum::Json(serde_json::json!({ "rooms": rooms })).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"error": e.reason(), "message": e.to_string()})),
        )
            .into_response(),
    }
}
