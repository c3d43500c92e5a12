//! Residency receipts (the claims and their bytes are in
//! [`earshot_proto::receipt`]): a region signs one for every final with the
//! key of its TLS certificate ([`ReceiptSigner`]); anyone with the
//! deployment's CA and topology checks it offline ([`ReceiptVerifier`]).
//!
//! A final passes only when every one of these holds, checked in this
//! order (each failure has a stable code, [`Failure::code`]):
//! 1. it carries a receipt, well formed (`missing`, `malformed`);
//! 2. the receipt speaks of this final: region, utterance, model, audio
//!    hash (`mismatch`), and the text hashes to the signed hash
//!    (`text_tampered`);
//! 3. the region is in the topology (`unknown_region`), the certificate
//!    chains to the CA for server use (`untrusted_certificate`) and is
//!    issued for that region's `tls_name` (`wrong_certificate`: a region
//!    cannot sign in another's name);
//! 4. the signature over the claims is the certificate's key's
//!    (`bad_signature`);
//! 5. the region's jurisdiction is the topology's (`region_jurisdiction`),
//!    the session's is the one expected (`session_jurisdiction`), and the
//!    topology lets that jurisdiction be processed in that region
//!    (`residency_violation`).

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use earshot_proto::client::FinalMessage;
use earshot_proto::receipt::{self, Claims, ReceiptMessage};
pub use earshot_proto::receipt::{hex, uuid_text};
use earshot_proto::topology::Topology;
use earshot_proto::wire;
use rustls::SignatureScheme;
use rustls::sign::Signer;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

use crate::tls::{TlsError, TlsPaths, load_certs, load_key};

/// Schemes a signer may pick, most preferred first (one fits every key
/// type rustls loads).
const OFFERED: [SignatureScheme; 5] = [
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
];

/// Signs receipts as one region.
pub struct ReceiptSigner {
    signer: Box<dyn Signer>,
    certificate: Vec<u8>,
    region: String,
    jurisdiction: String,
}

impl std::fmt::Debug for ReceiptSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiptSigner")
            .field("region", &self.region)
            .field("scheme", &self.signer.scheme())
            .finish()
    }
}

impl ReceiptSigner {
    /// The region's TLS certificate (the first of `paths.cert`) and key.
    pub fn load(paths: &TlsPaths, region: &str, jurisdiction: &str) -> Result<Self, TlsError> {
        let certificate = load_certs(&paths.cert)?
            .into_iter()
            .next()
            .ok_or_else(|| TlsError::NoCertificate {
                path: paths.cert.clone(),
            })?
            .to_vec();
        let key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&load_key(&paths.key)?)
            .map_err(|e| TlsError::Config(format!("{}: {e}", paths.key.display())))?;
        let signer = key.choose_scheme(&OFFERED).ok_or_else(|| {
            TlsError::Config(format!(
                "{}: no receipt signature scheme fits this key",
                paths.key.display()
            ))
        })?;
        Ok(ReceiptSigner {
            signer,
            certificate,
            region: region.to_owned(),
            jurisdiction: jurisdiction.to_owned(),
        })
    }

    /// The receipt for `fin`, which answers the utterance `header` opened,
    /// signed at `now_ms` (milliseconds since the Unix epoch).
    pub fn sign(
        &self,
        header: &wire::Header,
        fin: &wire::Final,
        now_ms: u64,
    ) -> Result<wire::Receipt, rustls::Error> {
        let claims = Claims {
            region: self.region.clone(),
            region_jurisdiction: self.jurisdiction.clone(),
            session: receipt::uuid_text(&header.session),
            session_jurisdiction: header.jurisdiction.clone(),
            edge: header.edge.clone(),
            utterance: fin.utterance,
            model: fin.model.clone(),
            model_sha256: fin
                .model_sha256
                .map(|d| receipt::hex(&d))
                .unwrap_or_default(),
            audio_sha256: receipt::hex(&fin.audio_sha256),
            text_sha256: receipt::hex(&Sha256::digest(fin.text.as_bytes())),
            issued_at_ms: now_ms,
        };
        let signature = self.signer.sign(&claims.signed_bytes())?;
        Ok(wire::Receipt {
            claims,
            scheme: u16::from(self.signer.scheme()),
            signature,
            certificate: self.certificate.clone(),
        })
    }
}

/// A wire receipt as clients see it.
pub fn to_message(r: &wire::Receipt) -> ReceiptMessage {
    ReceiptMessage {
        claims: r.claims.clone(),
        scheme: receipt::scheme_name(r.scheme)
            .map_or_else(|| format!("0x{:04x}", r.scheme), str::to_owned),
        signature: BASE64.encode(&r.signature),
        certificate: BASE64.encode(&r.certificate),
    }
}

/// Why a final's receipt does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("the final carries no receipt")]
    Missing,
    #[error("the receipt is malformed: {0}")]
    Malformed(String),
    #[error("the receipt's {field} is {signed:?} but the final's is {shown:?}")]
    Mismatch {
        field: &'static str,
        signed: String,
        shown: String,
    },
    #[error("the final's text is not the text the region signed")]
    TextTampered,
    #[error("region {0:?} is not in the topology")]
    UnknownRegion(String),
    #[error("the receipt's certificate does not chain to the CA: {0}")]
    UntrustedCertificate(String),
    #[error("the receipt's certificate is not issued for region {region:?} ({tls_name})")]
    WrongCertificate { region: String, tls_name: String },
    #[error("the receipt's signature does not verify with its certificate")]
    BadSignature,
    #[error(
        "the receipt says region {region:?} is in jurisdiction {signed:?}; the topology says {actual:?}"
    )]
    RegionJurisdiction {
        region: String,
        signed: String,
        actual: String,
    },
    #[error("the session's jurisdiction is {signed:?}, not the expected {expected:?}")]
    SessionJurisdiction { signed: String, expected: String },
    #[error(
        "a session of jurisdiction {session:?} was processed in region {region:?}, which may not process it"
    )]
    ResidencyViolation { session: String, region: String },
}

impl Failure {
    /// A stable code for scripts and reports.
    pub fn code(&self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::Malformed(_) => "malformed",
            Failure::Mismatch { .. } => "mismatch",
            Failure::TextTampered => "text_tampered",
            Failure::UnknownRegion(_) => "unknown_region",
            Failure::UntrustedCertificate(_) => "untrusted_certificate",
            Failure::WrongCertificate { .. } => "wrong_certificate",
            Failure::BadSignature => "bad_signature",
            Failure::RegionJurisdiction { .. } => "region_jurisdiction",
            Failure::SessionJurisdiction { .. } => "session_jurisdiction",
            Failure::ResidencyViolation { .. } => "residency_violation",
        }
    }

    /// Whether this failure means audio was processed where its session's
    /// jurisdiction forbids (or may have been: a receipt that does not
    /// prove where it was made proves nothing).
    pub fn is_residency(&self) -> bool {
        !matches!(self, Failure::TextTampered | Failure::Mismatch { .. })
    }
}

/// Checks receipts against a CA and a topology.
#[derive(Debug, Clone)]
pub struct ReceiptVerifier {
    ca: Vec<CertificateDer<'static>>,
    topology: Arc<Topology>,
}

impl ReceiptVerifier {
    pub fn new(ca: Vec<CertificateDer<'static>>, topology: Arc<Topology>) -> Self {
        ReceiptVerifier { ca, topology }
    }

    /// The CA certificate(s) in PEM file `ca`, and `topology`.
    pub fn load(ca: &Path, topology: Arc<Topology>) -> Result<Self, TlsError> {
        Ok(ReceiptVerifier::new(load_certs(ca)?, topology))
    }

    /// Checks `fin`'s receipt; with `session_jurisdiction`, also that the
    /// session was of that jurisdiction.
    pub fn verify(
        &self,
        fin: &FinalMessage,
        session_jurisdiction: Option<&str>,
    ) -> Result<(), Failure> {
        let r = fin.receipt.as_ref().ok_or(Failure::Missing)?;
        let c = &r.claims;
        let same = |field: &'static str, signed: &str, shown: &str| {
            if signed == shown {
                Ok(())
            } else {
                Err(Failure::Mismatch {
                    field,
                    signed: signed.to_owned(),
                    shown: shown.to_owned(),
                })
            }
        };
        same("region", &c.region, &fin.region)?;
        same(
            "utterance",
            &c.utterance.to_string(),
            &fin.utterance.to_string(),
        )?;
        same("model", &c.model, &fin.model)?;
        same("audio_sha256", &c.audio_sha256, &fin.audio_sha256)?;
        if c.text_sha256 != receipt::hex(&Sha256::digest(fin.text.as_bytes())) {
            return Err(Failure::TextTampered);
        }

        let region = self
            .topology
            .region(&c.region)
            .ok_or_else(|| Failure::UnknownRegion(c.region.clone()))?;
        let der = BASE64
            .decode(&r.certificate)
            .map_err(|e| Failure::Malformed(format!("certificate: {e}")))?;
        let signature = BASE64
            .decode(&r.signature)
            .map_err(|e| Failure::Malformed(format!("signature: {e}")))?;
        let scheme = receipt::scheme_code(&r.scheme)
            .ok_or_else(|| Failure::Malformed(format!("unknown scheme {:?}", r.scheme)))?;
        let der = CertificateDer::from(der);
        let cert = webpki::EndEntityCert::try_from(&der)
            .map_err(|e| Failure::Malformed(format!("certificate: {e}")))?;
        let anchors = self
            .ca
            .iter()
            .map(webpki::anchor_from_trusted_cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Failure::UntrustedCertificate(format!("CA: {e}")))?;
        let algorithms =
            rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_millis(c.issued_at_ms));
        cert.verify_for_usage(
            algorithms.all,
            &anchors,
            &[],
            at,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| Failure::UntrustedCertificate(e.to_string()))?;
        let name = ServerName::try_from(region.tls_name.as_str()).map_err(|_| {
            Failure::WrongCertificate {
                region: region.name.clone(),
                tls_name: region.tls_name.clone(),
            }
        })?;
        cert.verify_is_valid_for_subject_name(&name)
            .map_err(|_| Failure::WrongCertificate {
                region: region.name.clone(),
                tls_name: region.tls_name.clone(),
            })?;
        let scheme = SignatureScheme::from(scheme);
        let signed = c.signed_bytes();
        let verified = algorithms
            .mapping
            .iter()
            .filter(|(s, _)| *s == scheme)
            .flat_map(|(_, algs)| algs.iter())
            .any(|alg| cert.verify_signature(*alg, &signed, &signature).is_ok());
        if !verified {
            return Err(Failure::BadSignature);
        }

        if c.region_jurisdiction != region.jurisdiction {
            return Err(Failure::RegionJurisdiction {
                region: region.name.clone(),
                signed: c.region_jurisdiction.clone(),
                actual: region.jurisdiction.clone(),
            });
        }
        if let Some(expected) = session_jurisdiction
            && c.session_jurisdiction != expected
        {
            return Err(Failure::SessionJurisdiction {
                signed: c.session_jurisdiction.clone(),
                expected: expected.to_owned(),
            });
        }
        if !self.topology.may_process(&c.session_jurisdiction, region) {
            return Err(Failure::ResidencyViolation {
                session: c.session_jurisdiction.clone(),
                region: region.name.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair,
    };

    const TOPOLOGY: &str = r#"
[[jurisdiction]]
name = "eu"
strict = true
[[jurisdiction]]
name = "us"
[[region]]
name = "eu-west"
jurisdiction = "eu"
quic = "127.0.0.1:1"
tls_name = "ingress.eu-west.test"
[[region]]
name = "us-east"
jurisdiction = "us"
quic = "127.0.0.1:2"
tls_name = "ingress.us-east.test"
[[edge]]
name = "edge-eu"
jurisdiction = "eu"
regions = ["eu-west"]
[[edge]]
name = "edge-us"
jurisdiction = "us"
regions = ["us-east"]
"#;

    /// Where a test's CA and node certificates are written.
    struct Pki {
        dir: tempfile::TempDir,
        ca: std::path::PathBuf,
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().unwrap();
            let ca = dir.path().join("ca.pem");
            Pki { dir, ca }
        }

        fn issuer() -> CertifiedIssuer<'static, KeyPair> {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
        }

        /// Paths of a new server certificate for `tls_name` issued by
        /// `issuer` (the test's CA, or another).
        fn node(&self, tls_name: &str, issuer: &CertifiedIssuer<'_, KeyPair>) -> TlsPaths {
            let mut params = CertificateParams::new(vec![tls_name.to_owned()]).unwrap();
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, issuer).unwrap();
            let base = self.dir.path().join(tls_name);
            let paths = TlsPaths {
                cert: base.with_extension("pem"),
                key: base.with_extension("key"),
                ca: self.ca.clone(),
            };
            std::fs::write(&paths.cert, cert.pem()).unwrap();
            std::fs::write(&paths.key, key.serialize_pem()).unwrap();
            paths
        }
    }

    fn header(jurisdiction: &str, edge: &str) -> wire::Header {
        wire::Header {
            session: [7; 16],
            utterance: 2,
            jurisdiction: jurisdiction.into(),
            edge: edge.into(),
            language: String::new(),
            translate: String::new(),
            timestamps: false,
            words: false,
            resume: false,
            span: None,
            sample_rate: wire::SAMPLE_RATE,
        }
    }

    fn wire_final(region: &str) -> wire::Final {
        wire::Final {
            utterance: 2,
            text: "Audio from the EU stays in the EU.".into(),
            region: region.into(),
            model: "whisper@1".into(),
            audio_sha256: [3; 32],
            queue_us: 1,
            inference_us: 2,
            language: "en".into(),
            language_probability: -1.0,
            translation: None,
            segments: Vec::new(),
            words: Vec::new(),
            model_sha256: Some([4; 32]),
            span: None,
            receipt: None,
        }
    }

    /// The final a client would see, signed by `signer`.
    fn client_final(signer: &ReceiptSigner, header: &wire::Header, region: &str) -> FinalMessage {
        let fin = wire_final(region);
        let receipt = signer.sign(header, &fin, 1_796_000_000_000).unwrap();
        FinalMessage {
            utterance: fin.utterance,
            text: fin.text,
            region: fin.region,
            model: fin.model,
            start: 0.0,
            end: 1.0,
            audio_sha256: receipt::hex(&fin.audio_sha256),
            latency_ms: 0.0,
            queue_ms: 0.0,
            inference_ms: 0.0,
            language: None,
            language_probability: None,
            segments: None,
            words: None,
            receipt: Some(Box::new(to_message(&receipt))),
        }
    }

    struct World {
        pki: Pki,
        issuer: CertifiedIssuer<'static, KeyPair>,
        verifier: ReceiptVerifier,
    }

    fn world() -> World {
        let pki = Pki::new();
        let issuer = Pki::issuer();
        std::fs::write(&pki.ca, issuer.pem()).unwrap();
        let topology = Arc::new(Topology::from_toml_str(TOPOLOGY).unwrap());
        let verifier = ReceiptVerifier::load(&pki.ca, topology).unwrap();
        World {
            pki,
            issuer,
            verifier,
        }
    }

    impl World {
        fn signer(&self, tls_name: &str, region: &str, jurisdiction: &str) -> ReceiptSigner {
            ReceiptSigner::load(&self.pki.node(tls_name, &self.issuer), region, jurisdiction)
                .unwrap()
        }
    }

    #[test]
    fn a_genuine_eu_final_verifies_for_an_eu_session() {
        let w = world();
        let eu = w.signer("ingress.eu-west.test", "eu-west", "eu");
        let fin = client_final(&eu, &header("eu", "edge-eu"), "eu-west");
        assert_eq!(
            fin.receipt.as_ref().unwrap().scheme,
            "ecdsa_secp256r1_sha256"
        );
        assert_eq!(w.verifier.verify(&fin, Some("eu")), Ok(()));
        // Through JSON and back, as `earshot verify` reads it.
        let back: FinalMessage =
            serde_json::from_str(&serde_json::to_string(&fin).unwrap()).unwrap();
        assert_eq!(w.verifier.verify(&back, Some("eu")), Ok(()));
    }

    #[test]
    fn a_changed_text_fails_as_tampered() {
        let w = world();
        let eu = w.signer("ingress.eu-west.test", "eu-west", "eu");
        let mut fin = client_final(&eu, &header("eu", "edge-eu"), "eu-west");
        fin.text.push_str(" Or not.");
        assert_eq!(
            w.verifier.verify(&fin, Some("eu")),
            Err(Failure::TextTampered)
        );
        // Changing the signed hash to match breaks the signature instead.
        let r = fin.receipt.as_mut().unwrap();
        r.claims.text_sha256 = receipt::hex(&Sha256::digest(fin.text.as_bytes()));
        assert_eq!(
            w.verifier.verify(&fin, Some("eu")),
            Err(Failure::BadSignature)
        );
    }

    #[test]
    fn a_us_east_final_for_an_eu_session_is_a_residency_violation() {
        let w = world();
        let us = w.signer("ingress.us-east.test", "us-east", "us");
        // us-east honestly signs what it did: it processed an EU session.
        let fin = client_final(&us, &header("eu", "edge-eu"), "us-east");
        assert!(matches!(
            w.verifier.verify(&fin, Some("eu")),
            Err(Failure::ResidencyViolation { .. })
        ));
        // A US session's final from us-east is fine for a US session, and
        // fails when an EU session was expected.
        let fin = client_final(&us, &header("us", "edge-us"), "us-east");
        assert_eq!(w.verifier.verify(&fin, Some("us")), Ok(()));
        let e = w.verifier.verify(&fin, Some("eu")).unwrap_err();
        assert_eq!(e.code(), "session_jurisdiction");
        assert!(e.is_residency());
    }

    #[test]
    fn us_east_cannot_sign_in_eu_wests_name() {
        let w = world();
        // us-east's key, claiming to be eu-west in the EU.
        let liar = w.signer("ingress.us-east.test", "eu-west", "eu");
        let fin = client_final(&liar, &header("eu", "edge-eu"), "eu-west");
        assert!(matches!(
            w.verifier.verify(&fin, Some("eu")),
            Err(Failure::WrongCertificate { .. })
        ));
    }

    #[test]
    fn a_certificate_from_another_ca_is_untrusted() {
        let w = world();
        let rogue = Pki::issuer();
        let signer =
            ReceiptSigner::load(&w.pki.node("ingress.eu-west.test", &rogue), "eu-west", "eu")
                .unwrap();
        let fin = client_final(&signer, &header("eu", "edge-eu"), "eu-west");
        assert_eq!(
            w.verifier.verify(&fin, Some("eu")).map_err(|f| f.code()),
            Err("untrusted_certificate")
        );
    }

    #[test]
    fn edited_claims_missing_receipts_and_garbage_fail_with_their_codes() {
        let w = world();
        let eu = w.signer("ingress.eu-west.test", "eu-west", "eu");
        let fin = client_final(&eu, &header("eu", "edge-eu"), "eu-west");
        let code = |f: &FinalMessage| w.verifier.verify(f, Some("eu")).map_err(|e| e.code());

        let mut edited = fin.clone();
        edited.receipt.as_mut().unwrap().claims.session_jurisdiction = "us".into();
        assert_eq!(code(&edited), Err("bad_signature"));

        let mut moved = fin.clone();
        moved.region = "us-east".into();
        assert_eq!(code(&moved), Err("mismatch"));

        let mut bare = fin.clone();
        bare.receipt = None;
        assert_eq!(code(&bare), Err("missing"));

        let mut garbage = fin.clone();
        garbage.receipt.as_mut().unwrap().certificate = "!!".into();
        assert_eq!(code(&garbage), Err("malformed"));
        let mut scheme = fin;
        scheme.receipt.as_mut().unwrap().scheme = "rsa_pkcs1_sha1".into();
        assert_eq!(code(&scheme), Err("malformed"));
    }
}
