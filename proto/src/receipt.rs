//! Residency receipts, sans IO: what a region attests for every final it
//! makes, and the exact bytes it signs.
//!
//! A region's ingress signs [`Claims`] with the private key of its TLS
//! certificate (the same PKI as the edge↔region mutual TLS) and sends the
//! receipt on the final; the edge passes it to the client unchanged. Anyone
//! holding the deployment's CA and topology can later check, offline, that
//! a final was made by a region its session's jurisdiction permits, from
//! that audio, with that model, and that its text was not changed
//! (`earshot verify`; the checks are in `earshot_common::receipt`).
//!
//! The signed bytes are [`SIGNED_PREFIX`] followed by the claims as compact
//! JSON in the field order below. A verifier parses the claims it is given
//! and signs-checks their re-serialisation, so JSON whitespace or escapes
//! added on the way cannot break a genuine receipt, and no field can be
//! changed without breaking the signature.

use serde::{Deserialize, Serialize};

/// Put before the claims' JSON in the signed bytes: a receipt's signature
/// can never be mistaken for a signature over anything else the key signs.
pub const SIGNED_PREFIX: &[u8] = b"earshot-receipt/1\n";

/// The most bytes of claims JSON a receipt may carry (a real one is about
/// 500).
pub const MAX_CLAIMS_BYTES: usize = 4096;

/// What the region attests. The field order is the signed order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// The region that made the final.
    pub region: String,
    /// That region's jurisdiction, as the region knows it.
    pub region_jurisdiction: String,
    /// The session (a UUID, hyphenated lower case).
    pub session: String,
    /// The session's jurisdiction, as the edge declared it.
    pub session_jurisdiction: String,
    /// The edge the session entered.
    pub edge: String,
    pub utterance: u32,
    /// `name@version` of the model that produced the text.
    pub model: String,
    /// SHA-256 (hex) of the model version's manifest, or of its files when
    /// it has none.
    pub model_sha256: String,
    /// SHA-256 (hex) of the 16 kHz s16le PCM the model heard.
    pub audio_sha256: String,
    /// SHA-256 (hex) of the final's text, UTF-8.
    pub text_sha256: String,
    /// When the region signed, milliseconds since the Unix epoch.
    pub issued_at_ms: u64,
}

impl Claims {
    /// The bytes the region signs.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = SIGNED_PREFIX.to_vec();
        // Serialising a struct of strings and integers cannot fail.
        out.extend_from_slice(&serde_json::to_vec(self).unwrap_or_default());
        out
    }

    /// Parses claims as they travel on the wire; at most
    /// [`MAX_CLAIMS_BYTES`].
    pub fn from_json(bytes: &[u8]) -> Result<Claims, String> {
        if bytes.len() > MAX_CLAIMS_BYTES {
            return Err(format!(
                "{} bytes of receipt claims is over the {MAX_CLAIMS_BYTES}-byte limit",
                bytes.len()
            ));
        }
        serde_json::from_slice(bytes).map_err(|e| format!("receipt claims: {e}"))
    }
}

/// Signature schemes a receipt may use: the TLS 1.3 `SignatureScheme` code
/// (what the wire carries) and its name (what clients see). Whatever key a
/// region's certificate has, one of these signs with it.
pub const SCHEMES: [(u16, &str); 5] = [
    (0x0403, "ecdsa_secp256r1_sha256"),
    (0x0503, "ecdsa_secp384r1_sha384"),
    (0x0807, "ed25519"),
    (0x0804, "rsa_pss_rsae_sha256"),
    (0x0805, "rsa_pss_rsae_sha384"),
];

/// The name of a scheme code, if it is one of [`SCHEMES`].
pub fn scheme_name(code: u16) -> Option<&'static str> {
    SCHEMES.iter().find(|(c, _)| *c == code).map(|(_, n)| *n)
}

/// The code of a scheme name, if it is one of [`SCHEMES`].
pub fn scheme_code(name: &str) -> Option<u16> {
    SCHEMES.iter().find(|(_, n)| *n == name).map(|(c, _)| *c)
}

/// A receipt as clients see it, in a final's `receipt` field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptMessage {
    pub claims: Claims,
    /// One of [`SCHEMES`]' names.
    pub scheme: String,
    /// The signature over [`Claims::signed_bytes`], base64.
    pub signature: String,
    /// The region's certificate (DER, base64): it chains to the CA and is
    /// issued for the region's `tls_name`.
    pub certificate: String,
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// A UUID's 16 bytes as its hyphenated lower-case text.
pub fn uuid_text(bytes: &[u8; 16]) -> String {
    let h = hex(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            region: "eu-west".into(),
            region_jurisdiction: "eu".into(),
            session: "0195f3a2-0000-7000-8000-000000000001".into(),
            session_jurisdiction: "eu".into(),
            edge: "edge-eu-1".into(),
            utterance: 3,
            model: "whisper@1".into(),
            model_sha256: "ab".repeat(32),
            audio_sha256: "cd".repeat(32),
            text_sha256: "ef".repeat(32),
            issued_at_ms: 1_796_000_000_000,
        }
    }

    #[test]
    fn signed_bytes_are_the_prefix_then_the_claims_in_field_order() {
        let bytes = claims().signed_bytes();
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with(
            "earshot-receipt/1\n{\"region\":\"eu-west\",\"region_jurisdiction\":\"eu\",\"session\":"
        ));
        assert!(text.ends_with(",\"issued_at_ms\":1796000000000}"));
    }

    #[test]
    fn claims_reparsed_from_reformatted_json_sign_the_same_bytes() {
        let c = claims();
        let pretty = serde_json::to_string_pretty(&c).unwrap();
        let back = Claims::from_json(pretty.as_bytes()).unwrap();
        assert_eq!(back.signed_bytes(), c.signed_bytes());
    }

    #[test]
    fn unknown_or_oversized_claims_are_refused() {
        let mut v = serde_json::to_value(claims()).unwrap();
        v["verified"] = serde_json::Value::Bool(true);
        assert!(Claims::from_json(v.to_string().as_bytes()).is_err());
        assert!(Claims::from_json(&vec![b' '; MAX_CLAIMS_BYTES + 1]).is_err());
    }

    #[test]
    fn scheme_names_and_codes_map_both_ways() {
        for (code, name) in SCHEMES {
            assert_eq!(scheme_name(code), Some(name));
            assert_eq!(scheme_code(name), Some(code));
        }
        assert_eq!(scheme_name(0x0201), None);
        assert_eq!(scheme_code("rsa_pkcs1_sha1"), None);
    }

    #[test]
    fn uuid_text_is_hyphenated_lower_hex() {
        let mut b = [0u8; 16];
        b[0] = 0xAB;
        b[15] = 0x01;
        assert_eq!(uuid_text(&b), "ab000000-0000-0000-0000-000000000001");
    }
}
