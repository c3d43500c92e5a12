//! The `earshot` operator CLI and the pieces it shares with tests:
//! development certificates for a topology, a loopback deployment written
//! as real config files, throwaway Redis servers, spoken test audio
//! (espeak-ng + sox), a `/v1/listen` client, an in-process cluster, and the
//! demo.

pub mod assets;
pub mod bench;
pub mod bench_asr;
pub mod bench_edge;
pub mod certs;
pub mod client;
pub mod cluster;
pub mod demo;
pub mod deploy;
pub mod drill;
pub mod geodns;
pub mod loadtest;
pub mod planet;
pub mod processes;
pub mod redis_server;
pub mod speech;
pub mod udp_proxy;
pub mod up;
pub mod verify;
