//! The server API operators' tools call: LiveKit's RoomService over Twirp
//! (`POST /twirp/livekit.RoomService/<Method>`), so `livekit-api` (PyPI),
//! `livekit-server-sdk` (npm) and `lk` manage Moselle's rooms unchanged.
//!
//! - [`twirp`]: the framing (protobuf or JSON bodies, Twirp errors).
//! - [`room_service`]: each method with LiveKit's grant rules and limits.
//! - [`route`]: with Redis, a call reaching any node is carried out on the
//!   node holding the room (CreateRoom places it, as a first join would).

pub mod room_service;
pub mod route;
pub mod twirp;

use std::sync::atomic::{AtomicU64, Ordering};

pub use room_service::router;

#[derive(Debug, Default)]
pub struct ApiCounters {
    pub requests: AtomicU64,
    pub auth_failures: AtomicU64,
    pub refused: AtomicU64,
    pub malformed: AtomicU64,
    pub forwarded: AtomicU64,
}

impl ApiCounters {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// (name, help, value) for each counter.
    pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "api_requests_total",
                "Server API (RoomService) calls received",
                g(&self.requests),
            ),
            (
                "api_auth_failures_total",
                "Server API calls refused for a missing or invalid token",
                g(&self.auth_failures),
            ),
            (
                "api_refused_total",
                "Server API calls answered with an error (any code)",
                g(&self.refused),
            ),
            (
                "api_malformed_total",
                "Server API calls with a body or route that did not decode",
                g(&self.malformed),
            ),
            (
                "api_forwarded_total",
                "Server API calls carried out on the node holding the room",
                g(&self.forwarded),
            ),
        ]
    }
}
