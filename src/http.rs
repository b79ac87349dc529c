//! The HTTP server: signaling routes, health, metrics, CORS on every path.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tower_http::cors::{Any, CorsLayer};

use crate::media::handle::MediaHandle;

pub fn app(media: Arc<MediaHandle>, call_page: Option<crate::callpage::CallPage>) -> Router {
    let signaling = moselle_signaling::routes::router(media.clone());
    let router = Router::new()
        .route("/", get(|| async { "moselle" }))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(media)
        .merge(signaling)
        // Browser clients call from other origins, and read error statuses
        // of /validate to decide how to fall back (LiveKit does the same).
        .layer(
            CorsLayer::new()
                .allow_origin(Any)
                .allow_methods(Any)
                .allow_headers(Any),
        );
    // The call page mints tokens: same origin only, so no CORS for it.
    match call_page {
        Some(page) => router.merge(crate::callpage::router(page)),
        None => router,
    }
}

async fn healthz(State(m): State<Arc<MediaHandle>>) -> impl IntoResponse {
    if m.is_running() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "media engine stopped")
    }
}

async fn metrics(State(m): State<Arc<MediaHandle>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&m.media_counters, &m.signal_counters),
    )
}
