//! LiveKit signaling for Moselle: access tokens, join parsing, the WebSocket
//! session loop and its HTTP routes. Rooms and media live behind [`Backend`].

pub mod backend;
pub mod ids;
pub mod join;
pub mod rate;
pub mod routes;
pub mod session;
pub mod token;

pub use backend::{
    Backend, JoinTicket, OutboundTx, Outgoing, Refusal, SessionLink, SignalCounters,
};
pub use livekit_protocol as proto;
