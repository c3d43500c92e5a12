//! Types every earshot binary shares, with no servers in them: the topology
//! file and its residency policy, the edge↔region wire codec (sans IO), the
//! client↔edge JSON messages, model manifests and channel pointers, PCM helpers, QUIC/TLS configuration,
//! logging set-up and signal handling. The codecs use no tokio.

#![forbid(unsafe_code)]

pub mod audio;
pub mod client;
pub mod manifest;
pub mod retry;
pub mod signals;
pub mod supervise;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod wire;
