//! The `earshot` operator CLI and the pieces it shares with tests:
//! development certificates for a topology, a loopback deployment written
//! as real config files, throwaway Redis servers, spoken test audio
//! (espeak-ng + sox), a `/v1/listen` client, and the demo.

pub mod assets;
pub mod certs;
pub mod client;
pub mod demo;
pub mod deploy;
pub mod redis_server;
pub mod speech;
