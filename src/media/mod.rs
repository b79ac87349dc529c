//! The media plane: UDP I/O, rooms, participants, forwarding. Everything
//! here runs on the engine thread except [`handle`], the thread-safe door.

pub mod data;
pub mod engine;
pub mod forward;
pub mod handle;
pub mod keyframe;
pub mod participant;
pub mod room;
pub mod sdp;
pub mod speakers;
pub mod udp;
