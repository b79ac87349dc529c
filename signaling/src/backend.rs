//! The seam between signaling and the rest of the server: what a session may
//! ask of the room/media side, and what it hands back.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::StatusCode;
use livekit_protocol as lk;
use tokio::sync::mpsc;

use crate::join::JoinOptions;
use crate::token::{Claims, KeySet};

/// Messages the server side pushes to one client's socket.
#[derive(Debug)]
pub enum Outgoing {
    Signal(Box<lk::signal_response::Message>),
    /// Close the socket after everything queued before this.
    Close,
}

/// Bounded: a client that stops reading is disconnected rather than
/// buffering without limit. The sending side uses `try_send`.
pub type OutboundTx = mpsc::Sender<Outgoing>;
pub type OutboundRx = mpsc::Receiver<Outgoing>;
pub const OUTBOUND_CAPACITY: usize = 1024;

/// A verified, parsed join.
#[derive(Debug, Clone)]
pub struct JoinTicket {
    pub claims: Claims,
    pub options: JoinOptions,
}

/// A join the server will not take, answered as HTTP before the upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status,
            reason,
            message: message.into(),
        }
    }
}

/// One joined participant's line to its room. Dropping it means the socket
/// is gone.
pub trait SessionLink: Send + 'static {
    fn signal(&mut self, msg: lk::signal_request::Message);
}

pub type JoinFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Box<dyn SessionLink>, Refusal>> + Send + 'a>>;

pub trait Backend: Send + Sync + 'static {
    fn keys(&self) -> &KeySet;
    fn counters(&self) -> &SignalCounters;
    /// Whether the join would be taken, without joining (`/validate`).
    fn precheck(&self, ticket: &JoinTicket) -> Result<(), Refusal>;
    /// Join; the JoinResponse must be the first message put on `out`.
    fn join(&self, ticket: JoinTicket, out: OutboundTx) -> JoinFuture<'_>;
    /// Ping interval and timeout announced in JoinResponse, in seconds.
    fn ping_timeout_secs(&self) -> u64 {
        15
    }
    /// Signaling messages a session may send: (per second, burst); 0: no
    /// limit.
    fn signal_rate(&self) -> (u32, u32) {
        (100, 200)
    }
}

/// Signaling counters, exported by the binary's metrics endpoint.
#[derive(Debug, Default)]
pub struct SignalCounters {
    pub sessions_started: AtomicU64,
    pub sessions_ended: AtomicU64,
    pub auth_failures: AtomicU64,
    pub bad_requests: AtomicU64,
    pub join_refused: AtomicU64,
    pub bad_frames: AtomicU64,
    pub unknown_messages: AtomicU64,
    pub oversized_frames: AtomicU64,
    pub rate_limited: AtomicU64,
    pub ping_timeouts: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
}

impl SignalCounters {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// (name, help, value) for each counter.
    pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "signal_sessions_started_total",
                "Signaling sessions opened",
                g(&self.sessions_started),
            ),
            (
                "signal_sessions_ended_total",
                "Signaling sessions closed",
                g(&self.sessions_ended),
            ),
            (
                "signal_auth_failures_total",
                "Connections refused for a bad token",
                g(&self.auth_failures),
            ),
            (
                "signal_bad_requests_total",
                "Connections refused for a malformed request",
                g(&self.bad_requests),
            ),
            (
                "signal_join_refused_total",
                "Joins refused by the room side",
                g(&self.join_refused),
            ),
            (
                "signal_bad_frames_total",
                "WebSocket frames that did not decode",
                g(&self.bad_frames),
            ),
            (
                "signal_rate_limited_total",
                "Signal requests refused for coming faster than the session's rate limit",
                g(&self.rate_limited),
            ),
            (
                "signal_unknown_messages_total",
                "Signal requests of an unknown or unsupported kind",
                g(&self.unknown_messages),
            ),
            (
                "signal_oversized_frames_total",
                "WebSocket messages over the size limit",
                g(&self.oversized_frames),
            ),
            (
                "signal_ping_timeouts_total",
                "Sessions closed because the client went silent",
                g(&self.ping_timeouts),
            ),
            (
                "signal_messages_in_total",
                "Signal requests received",
                g(&self.messages_in),
            ),
            (
                "signal_messages_out_total",
                "Signal responses sent",
                g(&self.messages_out),
            ),
        ]
    }
}
