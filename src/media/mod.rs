//! The media plane: UDP I/O, rooms, participants, forwarding. Everything
//! here runs on a forwarding worker thread, except [`handle`], the
//! thread-safe door, and [`dispatch`]'s socket reader.

pub mod data;
pub mod dispatch;
mod dynacast;
pub mod engine;
pub mod forward;
pub mod handle;
pub mod keyframe;
mod negotiate;
pub mod participant;
mod publish;
mod quality;
mod relay_data;
pub mod room;
pub mod sdp;
pub mod speakers;
mod subscribe;
pub mod udp;
