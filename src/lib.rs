//! Moselle: a selective forwarding unit for Matrix calls that speaks the
//! LiveKit protocol. See DESIGN.md in the project's shared folder.

pub mod api;
pub mod callpage;
pub mod cluster;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod log_writer;
pub mod matrix;
pub mod media;
pub mod metrics;
pub mod netinfo;
pub mod server;
pub mod tls;
pub mod transport;
pub mod webhook;

pub use moselle_signaling as signaling;
