//! The MatrixRTC token service (MSC4195, shaped as lk-jwt-service): a
//! Matrix user proves who it is with an OpenID token, the service checks it
//! with the user's homeserver and checks that the user is joined to the
//! room, then issues a LiveKit token for the call's SFU room.

pub mod delegation;
pub mod homeserver;
pub mod limits;
pub mod names;
pub mod service;
pub mod watch;
