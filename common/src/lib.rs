//! Types every earshot binary shares, with no servers in them: the codecs
//! (re-exported from [`earshot_proto`], which has no async runtime), QUIC/TLS
//! configuration, supervision of a node's tasks, retries, logging set-up and
//! signal handling.

#![forbid(unsafe_code)]

pub use earshot_proto::{audio, client, manifest, topology, wire};

pub mod receipt;
pub mod retry;
pub mod signals;
pub mod supervise;
pub mod telemetry;
pub mod tls;
