//! earshot's codecs, sans IO: everything that turns bytes from the network
//! or disk into values — the edge↔region wire frames, the client↔edge JSON
//! messages, model manifests and channel pointers, the topology file and
//! its residency policy — and PCM helpers. No async runtime, no sockets:
//! the crate's dependencies carry none (`make test` fails if one appears),
//! so what is promised sans IO is enforced. `tests/properties.rs` feeds
//! every decoder arbitrary bytes.

#![forbid(unsafe_code)]

pub mod audio;
pub mod client;
pub mod manifest;
pub mod receipt;
pub mod topology;
pub mod wire;
