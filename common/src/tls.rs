//! QUIC endpoint configuration with mutual TLS.
//!
//! Regions present a certificate for their `tls_name`, signed by the
//! deployment's CA; edges verify it against that CA (never "accept
//! anything") and present their own client certificate, which regions verify
//! against the same CA. `earshot certs` generates such a CA and certificates
//! for development. One crypto provider (aws-lc-rs) is passed explicitly, so
//! nothing depends on a process-wide default.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::wire::ALPN;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {reason}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

/// Paths of a node's certificate, key and the CA it trusts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// PEM certificate chain of this node.
    pub cert: PathBuf,
    /// PEM private key of this node.
    pub key: PathBuf,
    /// PEM CA certificate(s) that peers must chain to.
    pub ca: PathBuf,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            what: "certificates",
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Config(format!("CA {}: {e}", path.display())))?;
    }
    Ok(roots)
}

fn config_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// Transport limits shared by both ends.
/// How fast a QUIC peer that went silent (killed, unplugged) is noticed:
/// both ends send a keep-alive every `keep_alive` when nothing else flows,
/// and a connection that hears nothing for `idle_timeout` is closed (the
/// smaller of the two ends' timeouts applies). A dial to a dead peer also
/// gives up after `idle_timeout`, provided `initial_rtt` is small: until a
/// handshake completes QUIC (RFC 9000, 10.1) stretches the idle timeout to
/// three probe timeouts, about 9 × the initial RTT guess, and quinn's
/// default guess (333 ms) made a dial to a dead region wait 3 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Liveness {
    pub keep_alive_ms: u64,
    pub idle_timeout_ms: u64,
    /// The round-trip time assumed before one is measured (a dial).
    pub initial_rtt_ms: u64,
}

impl Default for Liveness {
    /// A dead peer is noticed in 0.8 s (with 1 s, measured detection sat
    /// at 1.00 s: on the bound, not under it); a live one costs a
    /// keep-alive packet every 200 ms of silence, four per idle timeout.
    fn default() -> Self {
        Liveness {
            keep_alive_ms: 200,
            idle_timeout_ms: 800,
            // 9 × 50 ms = 450 ms < the idle timeout: a dial to a dead peer
            // gives up at 0.8 s. Where the real RTT is longer, a dial sends
            // one spare Initial packet before the first answer.
            initial_rtt_ms: 50,
        }
    }
}

impl Liveness {
    /// The keep-alive must be well inside the idle timeout, or an idle but
    /// live connection is dropped.
    pub fn validate(&self) -> Result<(), String> {
        if self.keep_alive_ms == 0 || self.idle_timeout_ms < 2 * self.keep_alive_ms {
            return Err(format!(
                "liveness: keep_alive_ms ({}) must be positive and at most half of idle_timeout_ms ({})",
                self.keep_alive_ms, self.idle_timeout_ms
            ));
        }
        if self.idle_timeout_ms > 600_000 {
            return Err("liveness: idle_timeout_ms must be at most 600000".into());
        }
        if !(1..=1_000).contains(&self.initial_rtt_ms) {
            return Err(format!(
                "liveness: initial_rtt_ms ({}) must be 1-1000",
                self.initial_rtt_ms
            ));
        }
        Ok(())
    }
}

fn transport(max_streams: u32, liveness: Liveness) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(max_streams.into());
    t.max_concurrent_uni_streams(0u8.into());
    t.keep_alive_interval(Some(Duration::from_millis(liveness.keep_alive_ms)));
    t.initial_rtt(Duration::from_millis(liveness.initial_rtt_ms));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_millis(liveness.idle_timeout_ms))
    {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

/// Server side of a region's QUIC ingress: presents `paths.cert`, requires a
/// client certificate chaining to `paths.ca`.
pub fn server_config(
    paths: &TlsPaths,
    max_streams: u32,
    liveness: Liveness,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&paths.ca)?), provider.clone())
            .build()
            .map_err(config_err)?;
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&paths.cert)?, load_key(&paths.key)?)
        .map_err(config_err)?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(crypto).map_err(config_err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(max_streams, liveness));
    Ok(config)
}

/// Client side of an edge's uplink: verifies regions against `paths.ca` and
/// presents `paths.cert`.
pub fn client_config(
    paths: &TlsPaths,
    liveness: Liveness,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_root_certificates(roots(&paths.ca)?)
        .with_client_auth_cert(load_certs(&paths.cert)?, load_key(&paths.key)?)
        .map_err(config_err)?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(crypto).map_err(config_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(1024, liveness));
    Ok(config)
}
