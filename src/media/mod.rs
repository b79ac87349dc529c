//! The media plane: rooms, participants, forwarding. Everything here runs on
//! a forwarding worker thread, except [`handle`], the thread-safe door.
//! Sockets and demultiplexing are the transport layer's (`crate::transport`).

pub mod admin;
pub mod allocate;
pub mod data;
pub mod datagram_harness;
mod downlink;
mod dynacast;
pub mod engine;
pub mod fallback;
pub mod forward;
pub mod handle;
mod hooks;
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
